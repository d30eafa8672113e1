"""bmigrate cutover --check, with the real daemons: every precondition tested, nothing
changed, each failure one line with an exit status of its own.

- Everything in place: exit 0, every check "ok", and afterwards breqd, bmig-nbd and the
  receiver are exactly as before (no checkout, no claim, no record written, not
  replicating, frozen or read-only) and no hook ran.
- Each precondition broken in turn (breqd away, the source missing, no bmig-nbd, the
  slot held by a cutover, a hook that cannot run, no receiver, a wrong secret, another
  lineage): the check that failed says why in one line, the ones that need it are
  skipped, and the exit status is that check's own (20 to 27).
- A running ``bmigrate run`` does not fail the slot check: it gives the device up.
"""

from __future__ import annotations

import json
import os
import socket

import pytest

from bmig.errors import (EXIT_CHECK_AUTH, EXIT_CHECK_BREQD, EXIT_CHECK_HOOK,
                         EXIT_CHECK_INTERCEPT, EXIT_CHECK_LINEAGE, EXIT_CHECK_RECEIVER,
                         EXIT_CHECK_SLOT, EXIT_CHECK_SOURCE)
from bmig.tracker.blocking_client import TrackerClient
from tests import sshd as sshd_fixture
from tests.sshd import write_known_hosts
from tests.integration.nbd_helpers import start_nbd
from tests.integration.sync_helpers import (MiB, bmigrate, json_lines,  # noqa: F401
                                            make_image, migrations, receivers,
                                            start_background, start_receiver, sync, track,
                                            write_secret)

sshd = sshd_fixture.sshd      # the fixture: a real sshd per test
CHECKS = ["breqd", "source", "intercept", "slot", "hooks", "receiver", "auth", "lineage"]


@pytest.fixture
def rig(breqd, tmp_path, receivers):
    server = start_nbd(breqd, tmp_path, 2 * MiB)
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d1": target})
    receivers.append(r)
    yield server, r, target
    server.daemon.stop()


def check(breqd, server, r, *extra: str, to: str | None = None,
          secret: str | None = None, as_json: bool = True, control=None):
    args = ["cutover", "d1", "--check", "--source", server.backing,
            "--to", to or r.url("d1"), "--secret-file", secret or r.secret_file,
            "--manage-dir", server.manage_dir, *extra]
    done = bmigrate(control or breqd, *args, *(["--json"] if as_json else []), check=False)
    return done, json_lines(done.stdout) if as_json else []


def by_check(events: list[dict]) -> dict[str, dict]:
    return {e["check"]: e for e in events if e["event"] == "check"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def state_of(breqd, server, r) -> dict:
    """What a check must not change."""
    tracker = breqd.client()
    try:
        stats = tracker.stats("d1")
    finally:
        tracker.close()
    status = json.loads(bmigrate(breqd, "replicate", "d1", "--status", "--manage-dir",
                                 server.manage_dir, "--json").stdout)
    records = sorted(os.listdir(r.state_dir)) if os.path.isdir(r.state_dir) else []
    return {"stats": {k: stats[k] for k in ("dirty_bytes", "inflight_bytes", "role",
                                            "generation", "sender", "claimed_by",
                                            "marks", "flushes")},
            "nbd": {k: status[k] for k in ("replicating", "frozen", "read_only")},
            "records": [n for n in records if not n.endswith(".lock")]}


def test_everything_in_place_passes_and_changes_nothing(breqd, rig, tmp_path):
    server, r, target = rig
    before = state_of(breqd, server, r)
    ran = tmp_path / "hook-ran"
    done, events = check(breqd, server, r, "--pre-handover", f"touch {ran}",
                         "--post-handover", f"touch {ran}")
    assert done.returncode == 0, done.stderr
    checks = by_check(events)
    assert list(checks) == CHECKS
    assert all(c["ok"] is True and c["exit_code"] is None for c in checks.values()), checks
    assert "does not exist: the cutover creates it" in checks["lineage"]["message"]
    assert events[-1] == {**events[-1], "event": "checked", "ok": True, "exit_code": 0}
    assert all(isinstance(e["time"], float) and e["device"] == "d1" for e in events)
    assert not ran.exists()
    assert not os.path.exists(target)
    assert state_of(breqd, server, r) == before
    assert not done.stderr.strip(), done.stderr


def test_the_text_report_is_one_line_per_check(breqd, rig):
    server, r, _ = rig
    done, _ = check(breqd, server, r, "--pre-handover", "/nonexistent/stop-the-vm",
                    as_json=False)
    assert done.returncode == EXIT_CHECK_HOOK, done.stderr
    lines = done.stdout.splitlines()
    assert [line.split()[1] for line in lines] == CHECKS, lines
    hooks = next(line for line in lines if line.split()[1] == "hooks")
    assert hooks.startswith("FAILED") and "/nonexistent/stop-the-vm: no such file" in hooks
    errors = done.stderr.splitlines()
    assert len(errors) == 1 and errors[0].startswith("bmigrate: cutover --check: hooks: ")


def failing(name: str, code: int, done, events: list[dict], *why: str) -> dict:
    """The check ``name`` failed with ``code``, every check before it held."""
    assert done.returncode == code, (done.returncode, done.stderr, events)
    checks = by_check(events)
    failed = checks[name]
    assert failed["ok"] is False and failed["exit_code"] == code, failed
    for word in why:
        assert word in failed["message"], failed["message"]
    assert "\n" not in failed["message"]
    assert events[-1]["event"] == "checked" and events[-1]["exit_code"] == code
    first = [c for c in checks.values() if c["ok"] is False][0]
    assert first["check"] == name, checks
    return checks


def test_breqd_away(breqd, rig, tmp_path):
    server, r, _ = rig
    done, events = check(breqd, server, r, control=str(tmp_path / "nothing.sock"))
    checks = failing("breqd", EXIT_CHECK_BREQD, done, events, "cannot reach breqd")
    assert checks["source"]["ok"] is None and checks["slot"]["ok"] is None


def test_an_untracked_device(breqd, rig):
    server, r, _ = rig
    tracker = breqd.client()
    tracker.remove_device("d1")
    tracker.close()
    done, events = check(breqd, server, r)
    failing("breqd", EXIT_CHECK_BREQD, done, events, "d1")


def test_the_source_missing(breqd, rig, tmp_path):
    server, r, _ = rig
    done, events = bmigrate(breqd, "cutover", "d1", "--check", "--source",
                            str(tmp_path / "gone.img"), "--to", r.url("d1"),
                            "--secret-file", r.secret_file, "--manage-dir",
                            server.manage_dir, "--json", check=False), None
    failing("source", EXIT_CHECK_SOURCE, done, json_lines(done.stdout), "gone.img")


def test_no_bmig_nbd(breqd, rig, tmp_path):
    server, r, _ = rig
    done, events = check(breqd, server, r, "--manage-dir", str(tmp_path / "elsewhere"))
    failing("intercept", EXIT_CHECK_INTERCEPT, done, events, "no bmig-nbd serves d1")


def test_the_slot_held_by_another_cutover(breqd, rig):
    server, r, _ = rig
    other = TrackerClient(breqd.control, timeout=30, client="another cutover")
    try:
        other.claim("d1", 5)
        done, events = check(breqd, server, r)
    finally:
        other.close()
    failing("slot", EXIT_CHECK_SLOT, done, events, "another cutover", "holds d1")


def test_a_hook_with_a_syntax_error(breqd, rig):
    server, r, _ = rig
    done, events = check(breqd, server, r, "--post-handover", "if then fi (")
    failing("hooks", EXIT_CHECK_HOOK, done, events, "--post-handover", "syntax error")


def test_a_hook_whose_command_is_not_found(breqd, rig):
    server, r, _ = rig
    done, events = check(breqd, server, r, "--pre-handover", "no-such-command-here --now")
    failing("hooks", EXIT_CHECK_HOOK, done, events, "no-such-command-here: command not found")


def test_no_receiver(breqd, rig):
    server, r, _ = rig
    done, events = check(breqd, server, r, to=f"tcp://127.0.0.1:{free_port()}/d1")
    checks = failing("receiver", EXIT_CHECK_RECEIVER, done, events, "127.0.0.1")
    assert checks["auth"]["ok"] is None and checks["lineage"]["ok"] is None


def test_an_export_the_receiver_does_not_serve(breqd, rig):
    server, r, _ = rig
    done, events = check(breqd, server, r, to=r.url("nope"))
    failing("receiver", EXIT_CHECK_RECEIVER, done, events, "nope")


def test_a_wrong_secret(breqd, rig, tmp_path):
    server, r, _ = rig
    wrong = write_secret(str(tmp_path / "wrong"), "another secret, thirty-two bytes long")
    done, events = check(breqd, server, r, secret=wrong)
    checks = failing("auth", EXIT_CHECK_AUTH, done, events)
    assert checks["receiver"]["ok"] is True and checks["lineage"]["ok"] is None


def test_no_secret_file_fails_auth_before_anything_connects(breqd, rig):
    """A setting this sender lacks is its own failure, found before connecting: the
    receiver is not said to answer (nothing connected to it), auth fails and says what
    to give."""
    server, r, _ = rig
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        done = bmigrate(breqd, "cutover", "d1", "--check", "--source", server.backing,
                        "--to", f"tcp://127.0.0.1:{port}/d1", "--manage-dir",
                        server.manage_dir, "--json", check=False)
        with pytest.raises(BlockingIOError):
            listener.accept()                          # no connection was made
    events = json_lines(done.stdout)
    checks = failing("auth", EXIT_CHECK_AUTH, done, events, "this sender's settings",
                     "--secret-file")
    assert checks["receiver"]["ok"] is None, checks["receiver"]
    assert "not tried" in checks["receiver"]["message"]
    assert checks["lineage"]["ok"] is None


def test_an_unusable_client_certificate_fails_auth_before_connecting(breqd, rig, tmp_path):
    server, r, _ = rig
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        done = bmigrate(breqd, "cutover", "d1", "--check", "--source", server.backing,
                        "--to", f"tls://127.0.0.1:{port}/d1", "--secret-file",
                        r.secret_file, "--tls-cert", str(tmp_path / "no-cert.pem"),
                        "--manage-dir", server.manage_dir, "--json", check=False)
        with pytest.raises(BlockingIOError):
            listener.accept()
    checks = failing("auth", EXIT_CHECK_AUTH, done, json_lines(done.stdout),
                     "no-cert.pem")
    assert checks["receiver"]["ok"] is None, checks["receiver"]


def test_a_source_handed_over_already(breqd, rig):
    server, r, _ = rig
    tracker = breqd.client()
    tracker.set_lineage("d1", "handed-over", "00000000000000ab")
    tracker.close()
    done, events = check(breqd, server, r)
    failing("lineage", EXIT_CHECK_LINEAGE, done, events, "handed-over", "not the primary")


def test_a_running_run_is_no_obstacle(breqd, rig, migrations):
    server, r, target = rig
    m = start_background(migrations, breqd, "run", "d1", "--source", server.backing,
                         "--to", r.url("d1"), "--secret-file", r.secret_file, "--json",
                         "--interval", "0.1")
    m.wait_event(lambda e: e["event"] == "lag" and e["dirty_bytes"] == 0, timeout=30,
                 what="the run to be idle")
    # The run holds the slot only once it has checked something out: write, wait for it.
    with open(server.backing, "r+b") as f:
        f.write(b"x")
    tracker = breqd.client()
    tracker.mark("d1", [(0, 1)])
    tracker.close()
    m.wait_event(lambda e: e["event"] == "pass", timeout=30, what="a pass")
    done, events = check(breqd, server, r)
    assert done.returncode == 0, (done.stderr, events)
    slot = by_check(events)["slot"]
    assert slot["ok"] and "bmigrate run" in slot["message"] and "gives it up" in \
        slot["message"], slot
    assert "same" in by_check(events)["lineage"]["message"] or \
        "holds this lineage" in by_check(events)["lineage"]["message"]
    assert m.proc.poll() is None                       # the check took nothing from it
    assert m.stop() == 0


def test_a_target_of_another_lineage(breqd, rig, tmp_path):
    server, r, _ = rig
    other = make_image(str(tmp_path / "other.img"), 2 * MiB, "random")
    track(breqd, "d2", other)
    sync(breqd, "d2", "--source", other, "--to", r.url("d1"), "--secret-file",
         r.secret_file, "--threshold", "0")
    done, events = check(breqd, server, r)
    checks = failing("lineage", EXIT_CHECK_LINEAGE, done, events, "holds generation",
                     "--discard-target-data")
    assert checks["receiver"]["ok"] and checks["auth"]["ok"]


def test_a_rehearsal_over_ssh_saves_no_host_key(breqd, rig, tmp_path, sshd):
    """--accept-new-host-key does not apply to --check: an unknown host key fails the
    auth check, and known_hosts stays as it was (here: not there at all)."""
    import shlex

    from tests.integration.sync_helpers import breceive_argv

    server, _, _ = rig
    known = str(tmp_path / "known_hosts")
    remote = shlex.join(breceive_argv("--stdio", "--target", f"d1={tmp_path / 'ssh.img'}",
                                      "--state-dir", str(tmp_path / "ssh-state")))
    done = bmigrate(breqd, "cutover", "d1", "--check", "--source", server.backing,
                    "--to", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/d1",
                    "--ssh-command", remote, "--known-hosts", known,
                    "--identity", sshd.identity, "--accept-new-host-key",
                    "--manage-dir", server.manage_dir, "--json", check=False)
    events = json_lines(done.stdout)
    failing("auth", EXIT_CHECK_AUTH, done, events, "is not known")
    assert not os.path.exists(known)
    # With the key known, the same rehearsal passes (and writes nothing either).
    write_known_hosts(known, "127.0.0.1", sshd.port, sshd.host_key.public_line)
    with open(known) as f:
        before = f.read()
    done = bmigrate(breqd, "cutover", "d1", "--check", "--source", server.backing,
                    "--to", f"ssh://{sshd.user}@127.0.0.1:{sshd.port}/d1",
                    "--ssh-command", remote, "--known-hosts", known,
                    "--identity", sshd.identity, "--manage-dir", server.manage_dir,
                    "--json", check=False)
    assert done.returncode == 0, (done.stderr, json_lines(done.stdout))
    with open(known) as f:
        assert f.read() == before
    assert not os.path.exists(tmp_path / "ssh.img")
