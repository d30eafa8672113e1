"""The catch-up service tells the truth: ``bmigrate run`` under a notify socket, with
stderr as the "journal", beside a real breqd, bmig-nbd and breceive on 127.0.0.1.

- STATUS= follows the state: caught up with its lag and the age of the last pass; with
  the receiver killed (kill -9) and writes coming in, "receiver unreachable, retry in N
  s" with the lag growing; connected and caught up again once a receiver is back;
  stopped, with what breqd says is left, after SIGTERM.
- The log: changes of state at notice (``<5>``), failures at warning (``<4>``), a fatal
  error at ``<3>`` (and exit 5 for a device breqd does not know: no retries), passes
  only at debug; the prefixes only when JOURNAL_STREAM names stderr's device and inode.
- ``bmigrate status`` (every device, or one with --to: the local part and ``target:
  unreachable``), ``bmigrate events --now`` and ``bmigrate metrics`` say the same, from
  the state the run publishes in its status directory; node_exporter's textfile
  collector reads the metrics file without an error.

Everything is waited for through the notify socket, the log file and the commands'
output: no sleeps.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import urllib.request

import pytest

from bmig.nbdclient import NbdClient
from tests.daemon import Daemon, wait_until
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (MiB, Background, bmigrate, bmigrate_argv,
                                            json_lines, migrations,  # noqa: F401
                                            receivers, start_receiver,  # noqa: F401
                                            write_secret)
from tests.relay import Relay

SIZE = 8 * MiB
PRIORITY = re.compile(r"^<(\d)>")


def journal_env(log_path: str) -> dict[str, str]:
    """JOURNAL_STREAM naming the log file, which is the child's stderr."""
    open(log_path, "ab").close()
    st = os.stat(log_path)
    return {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}


class Service:
    """``bmigrate run`` as a daemon: READY=1, STATUS= lines, its log file."""

    def __init__(self, breqd, tmp_path, argv_tail: list[str], env: dict[str, str],
                 name: str = "run"):
        self.status_dir = str(tmp_path / "status")
        self.log_path = str(tmp_path / f"{name}.log")
        full_env = {"BMIG_CONTROL": breqd.control, "BMIG_STATUS_DIR": self.status_dir,
                    "PYTHONUNBUFFERED": "1", **env}
        self.daemon = Daemon(bmigrate_argv("run", *argv_tail), self.log_path, full_env)

    def start(self) -> "Service":
        self.daemon.start()
        return self

    def statuses(self) -> list[str]:
        return [line[len("STATUS="):] for note in self.daemon.notifications
                for line in note.split("\n") if line.startswith("STATUS=")]

    def wait_status(self, pattern: str, after: int = 0, timeout: float = 60) -> str:
        regex = re.compile(pattern)

        def found():
            for line in self.statuses()[after:]:
                if regex.search(line):
                    return line
            if self.daemon.proc.poll() is not None:
                raise AssertionError(f"bmigrate run ended ({self.daemon.proc.returncode}) "
                                     f"before STATUS={pattern}:\n{self.daemon.log()}")
            return None
        return wait_until(found, timeout=timeout, what=f"STATUS= matching {pattern!r}")

    def lines(self) -> list[str]:
        return self.daemon.log().splitlines()

    def wait_log(self, pattern: str, timeout: float = 60) -> str:
        regex = re.compile(pattern)

        def found():
            line = next((l for l in self.lines() if regex.search(l)), None)
            if line is None and self.daemon.proc.poll() is not None:
                line = next((l for l in self.lines() if regex.search(l)), None)
                assert line, (f"bmigrate run ended ({self.daemon.proc.returncode}) before "
                              f"a log line matching {pattern!r}:\n{self.daemon.log()}")
            return line
        return wait_until(found, timeout=timeout, what=f"a log line matching {pattern!r}")


def write_through(uri: str, offset: int, data: bytes) -> None:
    with NbdClient.connect(uri, timeout=60) as client:
        client.pwrite(data, offset)
        client.flush()


def status_json(breqd, service: Service, manage_dir: str, *args: str) -> object:
    done = bmigrate(breqd, "status", *args, "--status-dir", service.status_dir,
                    "--manage-dir", manage_dir, "--json")
    return json.loads(done.stdout)


@pytest.fixture
def rig(breqd, tmp_path, receivers):
    """bmig-nbd serving d1, a breceive behind a relay (so that a new one can take the
    old one's place on the same URL), and ``bmigrate run`` not started yet."""
    server = start_nbd(breqd, tmp_path, SIZE)
    r = start_receiver(tmp_path, {"d1": str(tmp_path / "tgt.img")})
    receivers.append(r)
    relay = Relay(("127.0.0.1", r.port)).start()
    url = r.url("d1", port=relay.port)
    args = ["d1", "--source", server.backing, "--to", url, "--secret-file", r.secret_file,
            "--interval", "0.2", "--log-level", "info", "--manage-dir", server.manage_dir]
    yield server, r, relay, url, args
    relay.stop()
    server.daemon.stop()


def test_status_follows_the_state_of_run_through_a_receiver_crash(breqd, tmp_path,
                                                                 receivers, rig):
    server, r, relay, url, args = rig
    log_path = str(tmp_path / "run.log")
    service = Service(breqd, tmp_path, args, journal_env(log_path)).start()

    # 1. Caught up: the initial copy is done, nothing dirty.
    service.wait_status(r"^d1: caught up; lag 0 B, .*last pass ")
    connected = service.wait_log(r"^<5>d1: connected, catching up; ")
    assert f"to {url}" in connected
    service.wait_log(r"^<5>d1: caught up; ")
    every = status_json(breqd, service, server.manage_dir)
    assert [s["device"] for s in every] == ["d1"]
    assert every[0]["service"]["state"] == "caught up"
    assert every[0]["service"]["lag_bytes"] == 0
    assert every[0]["service"]["last_pass_time"] <= every[0]["time"]
    assert every[0]["nbd"]["state"] == "tracking"

    # 2. The receiver is killed; writes come in: STATUS= says so, with the lag.
    seen = len(service.statuses())
    r.daemon.kill9()
    relay.reset_now()
    write_through(server.uri, 0, os.urandom(2 * MiB))
    line = service.wait_status(r"^d1: receiver unreachable, retry in \d+ s; lag 2\.0 MiB",
                               after=seen)
    assert "last pass" in line, line
    assert "caught up" not in service.statuses()[-1]
    warning = service.wait_log(r"^<4>d1: receiver unreachable, retry in \d+ s")
    assert "lag 2.0 MiB" in warning or "lag" in warning
    stats = breqd.client().stats("d1")
    assert stats["dirty_bytes"] == 2 * MiB

    # ... and so do status (every device; one with --to: the local part still there),
    # events --now and metrics.
    text = bmigrate(breqd, "status", "--status-dir", service.status_dir, "--manage-dir",
                    server.manage_dir).stdout
    assert text.startswith("d1: primary; generation "), text
    assert "2.0 MiB dirty" in text
    assert re.search(r"bmigrate run: receiver unreachable, retry in \d+ s; lag 2\.0 MiB",
                     text), text
    one = bmigrate(breqd, "status", "d1", "--to", url, "--secret-file", r.secret_file,
                   "--status-dir", service.status_dir)
    assert one.returncode == 0
    assert one.stdout.startswith("d1: primary; "), one.stdout
    assert re.search(r"^  target: unreachable; ", one.stdout, re.M), one.stdout
    mine = status_json(breqd, service, server.manage_dir, "d1", "--to", url,
                       "--secret-file", r.secret_file)
    assert mine["dirty_bytes"] == 2 * MiB and mine["role"] == "primary"
    assert mine["target"]["state"] == "unreachable" and mine["target"]["error"]
    assert mine["service"]["state"] == "retrying"
    assert mine["service"]["errors_total"] >= 1

    now = json_lines(bmigrate(breqd, "events", "--now", "--status-dir", service.status_dir,
                              "--manage-dir", server.manage_dir).stdout)
    assert {e["event"] for e in now} == {"exists"}
    by_part = {e["part"]: e for e in now}
    assert set(by_part) == {"tracker", "nbd", "service"}
    assert by_part["service"]["status"]["state"] == "retrying"
    assert by_part["service"]["severity"] == "warning"
    assert by_part["tracker"]["status"]["dirty_bytes"] == 2 * MiB

    prom = bmigrate(breqd, "metrics", "--status-dir", service.status_dir,
                    "--manage-dir", server.manage_dir).stdout
    assert 'bmig_service_state{device="d1",state="retrying"} 1' in prom
    assert 'bmig_service_state{device="d1",state="caught up"} 0' in prom
    assert f'bmig_dirty_bytes{{device="d1"}} {2 * MiB}' in prom
    assert re.search(r'^bmig_service_errors_total\{device="d1"\} [1-9]', prom, re.M)

    # 3. A receiver is back behind the same URL: connected, caught up again.
    seen = len(service.statuses())
    again = start_receiver(tmp_path, {"d1": str(tmp_path / "tgt.img")})
    receivers.append(again)
    relay.upstream = ("127.0.0.1", again.port)
    service.wait_status(r"^d1: caught up; lag 0 B", after=seen)
    assert len([l for l in service.lines() if re.match(r"^<5>d1: connected, ", l)]) == 2

    # 4. SIGTERM: stopped, and the summary says what breqd says is left (nothing: the
    # copy is identical, as sync would say it).
    service.daemon.proc.send_signal(signal.SIGTERM)
    assert service.daemon.proc.wait(timeout=60) == 0, service.daemon.log()
    service.wait_log(r"^<5>d1: stopped; ")
    service.wait_log(r"^<5>d1: converged, the copy is identical: ")
    after = status_json(breqd, service, server.manage_dir, "d1")
    assert after["service"]["state"] == "stopped"

    # Every line of the log went to the journal with a priority, none of them a pass
    # (debug) at --log-level info.
    lines = service.lines()
    assert lines and all(PRIORITY.match(l) for l in lines), lines
    assert {PRIORITY.match(l).group(1) for l in lines} <= {"4", "5", "6"}, lines
    assert not [l for l in lines if ": pass " in l]


def test_a_device_breqd_does_not_know_is_a_configuration_error(breqd, tmp_path):
    """exit 5 at once (RestartPreventExitStatus), never a retry; the error at <3>."""
    source = str(tmp_path / "src.img")
    with open(source, "wb") as f:
        f.truncate(MiB)
    log_path = str(tmp_path / "run.log")
    env = dict(os.environ, BMIG_CONTROL=breqd.control, BMIG_STATUS_DIR=str(tmp_path / "st"),
               **journal_env(log_path))
    with open(log_path, "ab") as log:
        done = subprocess.run(bmigrate_argv("run", "nope", "--source", source, "--to",
                                            "tcp://127.0.0.1:9/nope", "--log-level", "debug"),
                              env=env, stdout=subprocess.DEVNULL, stderr=log, timeout=60,
                              stdin=subprocess.DEVNULL)
    lines = open(log_path).read().splitlines()
    assert done.returncode == 5, lines
    assert "<3>bmigrate: no tracked device named 'nope'" in lines, lines
    assert not [l for l in lines if "retry" in l], lines
    published = json.load(open(tmp_path / "st" / "nope.json"))
    assert published["state"] == "failed" and "nope" in published["error"]


def unreachable_run(breqd, tmp_path, env: dict[str, str]) -> list[str]:
    """bmigrate run toward a port nobody listens on, until its first retry is logged."""
    source = str(tmp_path / "src.img")
    with open(source, "wb") as f:
        f.truncate(MiB)
    breqd.client().add_device("d", MiB)
    secret = write_secret(str(tmp_path / "secret"))
    with socket.socket() as s:               # a port that refuses: bound, not listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        service = Service(breqd, tmp_path, ["d", "--source", source, "--to",
                                            f"tcp://127.0.0.1:{port}/d", "--secret-file",
                                            secret, "--log-level", "info"], env).start()
        try:
            service.wait_log(r"receiver unreachable, retry in 1 s")
            service.wait_status(r"^d: receiver unreachable, retry in 1 s; lag 1\.0 MiB")
        finally:
            service.daemon.stop()
    return service.lines()


@pytest.mark.parametrize("how", ["unset", "another file", "garbage"])
def test_no_priorities_unless_stderr_is_the_journal_stream(breqd, tmp_path, how):
    other = str(tmp_path / "elsewhere")
    env = {"unset": {}, "another file": journal_env(other),
           "garbage": {"JOURNAL_STREAM": "x:y"}}[how]
    lines = unreachable_run(breqd, tmp_path, env)
    assert not [l for l in lines if PRIORITY.match(l)], lines
    assert [l for l in lines
            if l.startswith("bmigrate: WARNING: d: receiver unreachable, retry in 1 s")], lines


def test_priorities_when_stderr_is_the_journal_stream(breqd, tmp_path):
    lines = unreachable_run(breqd, tmp_path, journal_env(str(tmp_path / "run.log")))
    assert [l for l in lines if l.startswith("<4>d: receiver unreachable, retry in 1 s")], \
        lines
    assert not [l for l in lines if l.startswith("bmigrate: ")], lines


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_node_exporter_reads_the_metrics_file(breqd, tmp_path):
    exporter = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if exporter is None:
        pytest.skip("not installed: prometheus-node-exporter")
    breqd.client().add_device("vm1", 4 * MiB)
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    bmigrate(breqd, "metrics", "--output", str(textfiles / "bmig.prom"), "--status-dir",
             str(tmp_path / "none"), "--manage-dir", str(tmp_path / "none"))
    port = free_port()
    daemon = subprocess.Popen([exporter, "--collector.disable-defaults",
                               "--collector.textfile",
                               f"--collector.textfile.directory={textfiles}",
                               f"--web.listen-address=127.0.0.1:{port}"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL)
    try:
        def scrape():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=5) as reply:
                    return reply.read().decode()
            except OSError:
                assert daemon.poll() is None, daemon.stderr.read().decode()
                return None
        text = wait_until(scrape, timeout=30, what="node_exporter to answer")
    finally:
        daemon.terminate()
        daemon.wait(timeout=30)
    assert "node_textfile_scrape_error 0" in text, text
    samples = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line.startswith("bmig_")}
    assert samples['bmig_dirty_bytes{device="vm1"}'] == 4 * MiB, samples
    assert samples['bmig_part_up{device="vm1",part="service"}'] == 0
    assert samples['bmig_role{device="vm1",role="primary"}'] == 1
    assert samples["bmig_breqd_up"] == 1


def test_the_summary_reads_breqd_again_when_the_receiver_never_answered(breqd, tmp_path,
                                                                       migrations):
    """The summary after SIGTERM says what breqd has dirty now, not the last number a
    pass left (none here: the receiver never answered)."""
    source = str(tmp_path / "src.img")
    with open(source, "wb") as f:
        f.truncate(MiB)
    breqd.client().add_device("d", MiB)                       # a new device: all dirty
    secret = write_secret(str(tmp_path / "secret"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        m = Background(breqd, "run", "d", "--source", source, "--to",
                       f"tcp://127.0.0.1:{s.getsockname()[1]}/d", "--secret-file", secret,
                       "--json", env={"BMIG_STATUS_DIR": str(tmp_path / "status")})
        migrations.append(m)
        failed = m.wait_event(lambda e: e["event"] == "change" and
                              e["status"]["state"] == "retrying", what="a failed attempt")
        assert failed["part"] == "service" and failed["severity"] == "warning"
        assert failed["status"]["lag_bytes"] == MiB
        assert m.stop() == 0, m.stderr
    summary = m.events[-1]
    assert summary["event"] == "summary" and summary["dirty_bytes"] == MiB, m.events[-3:]
    stopped = [e for e in m.events if e["event"] == "change"][-1]
    assert stopped["status"]["state"] == "stopped" and stopped["status"]["lag_bytes"] == MiB


class Lines:
    """A command's stdout, one JSON value per line, read by a thread as it comes."""

    def __init__(self, breqd, *args: str):
        import threading
        env = dict(os.environ, BMIG_CONTROL=breqd.control, PYTHONUNBUFFERED="1")
        self.proc = subprocess.Popen(bmigrate_argv(*args), env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.values: list = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.values.append(json.loads(line))

    def wait(self, predicate, what: str):
        def found():
            hit = next((v for v in list(self.values) if predicate(v)), None)
            assert hit is not None or self.proc.poll() is None, \
                f"ended ({self.proc.returncode}) before {what}: {self.proc.stderr.read()}"
            return hit
        return wait_until(found, timeout=30, what=what)

    def interrupt(self) -> int:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(timeout=30)
        self._reader.join(timeout=30)
        self.proc.stdout.close()
        self.proc.stderr.close()
        return code

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)


def test_status_watch_prints_again_until_interrupted(breqd, tmp_path):
    """Without NAME every device breqd tracks, as ``drbdadm status`` shows them."""
    breqd.client().add_device("vm2", 4 * MiB)
    breqd.client().add_device("vm1", 4 * MiB)
    breqd.client().clear_all("vm1", force=True)
    text = bmigrate(breqd, "status", "--status-dir", str(tmp_path), "--manage-dir",
                    str(tmp_path)).stdout
    assert re.findall(r"^(vm\d): primary; ", text, re.M) == ["vm1", "vm2"], text
    watch = Lines(breqd, "status", "--watch", "--interval", "0.1", "--json",
                  "--status-dir", str(tmp_path), "--manage-dir", str(tmp_path))
    try:
        first = watch.wait(lambda v: True, "a first look")
        assert [s["device"] for s in first] == ["vm1", "vm2"]
        assert first[0]["dirty_bytes"] == 0 and first[1]["dirty_bytes"] == 4 * MiB
        breqd.client().mark("vm1", [(0, 100)])
        again = watch.wait(lambda v: v[0]["dirty_bytes"] > 0, "a look that sees the mark")
        assert again[0]["service"] is None and again[0]["nbd"] is None
        assert watch.interrupt() == 0
    finally:
        watch.close()


def test_events_follow_devices_as_they_come_change_and_go(breqd, tmp_path):
    breqd.client().add_device("vm1", 4 * MiB)
    events = Lines(breqd, "events", "--interval", "0.1", "--statistics",
                   "--status-dir", str(tmp_path), "--manage-dir", str(tmp_path))
    try:
        first = events.wait(lambda e: e["event"] == "exists", "the first state")
        assert first["device"] == "vm1" and first["part"] == "tracker"
        assert first["status"]["role"] == "primary"
        breqd.client().add_device("vm2", 4 * MiB)
        events.wait(lambda e: e["event"] == "create" and e["device"] == "vm2",
                    "vm2 created")
        breqd.client().clear_all("vm1", force=True)
        change = events.wait(lambda e: e["event"] == "change" and e["device"] == "vm1",
                             "a change of vm1's dirty bytes (--statistics)")
        assert change["changed"]["dirty_bytes"] == [4 * MiB, 0]
        breqd.client().remove_device("vm2")
        events.wait(lambda e: e["event"] == "destroy" and e["device"] == "vm2", "vm2 gone")
        breqd.stop()
        error = events.wait(lambda e: e["event"] == "error", "breqd gone")
        assert "breqd" in error["message"]
        breqd.restart()
        assert events.interrupt() == 0
    finally:
        events.close()


def test_metrics_output_never_writes_through_a_planted_link(breqd, tmp_path):
    """The collector's directory is often writable by others: a link planted under the
    name of a temporary file neither gets the metrics nor changes its target's mode."""
    breqd.client().add_device("vm1", 4 * MiB)
    textfiles = tmp_path / "textfile"
    textfiles.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    os.chmod(victim, 0o600)
    os.symlink(victim, textfiles / ".bmig.prom.tmp")
    bmigrate(breqd, "metrics", "--output", str(textfiles / "bmig.prom"), "--status-dir",
             str(tmp_path / "none"), "--manage-dir", str(tmp_path / "none"))
    assert victim.read_text() == "precious\n"
    assert os.stat(victim).st_mode & 0o777 == 0o600
    written = textfiles / "bmig.prom"
    assert not written.is_symlink() and os.stat(written).st_mode & 0o777 == 0o644
    assert 'bmig_dirty_bytes{device="vm1"}' in written.read_text()
    assert sorted(os.listdir(textfiles)) == [".bmig.prom.tmp", "bmig.prom"]
