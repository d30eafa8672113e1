"""A real breceive on 127.0.0.1 and the images and commands the sync tests use; a
stand-in target for tests of a pass itself (``HeldTarget``)."""

from __future__ import annotations

import hashlib
import os
import random
import re
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from typing import Iterator

import pytest

from tests.daemon import Daemon, alive

SYNC_TIMEOUT = 300
MiB = 1 << 20
CHUNK = 64 << 10


def breceive_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from bmig.cli.breceive import main; main()", *args]


def bmigrate_argv(*args: str) -> list[str]:
    """bmigrate as installed: its entry pauses the collector and ends with os._exit."""
    return [sys.executable, "-c", "from bmig.cli.bmigrate import main; main()", *args]


@dataclass
class ReceiverInstance:
    daemon: Daemon
    port: int
    state_dir: str
    secret_file: str
    targets: dict[str, str] = field(default_factory=dict)

    def url(self, export: str, scheme: str = "tcp", port: int | None = None) -> str:
        return f"{scheme}://127.0.0.1:{port or self.port}/{export}"

    def record(self, export: str) -> dict:
        import json
        with open(os.path.join(self.state_dir, export + ".target")) as f:
            return json.load(f)


def write_secret(path: str, text: str = "a shared secret of thirty-two bytes!") -> str:
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, 0o600)
    return path


def start_receiver(tmp_path, targets: dict[str, str], *extra: str,
                   name: str = "breceive", with_secret: bool = True,
                   program=breceive_argv) -> ReceiverInstance:
    """breceive on an ephemeral 127.0.0.1 port; the port comes from its READY status.
    ``with_secret``: give it the shared secret (tmp_path/secret, made if missing);
    ``program`` makes the command line from the arguments (a breceive with faults)."""
    state = str(tmp_path / f"{name}-state")
    secret = str(tmp_path / "secret")
    if not os.path.exists(secret):
        write_secret(secret)
    argv = ["--listen", "127.0.0.1:0", "--state-dir", state, "--log-level", "debug"]
    if with_secret:
        argv += ["--secret-file", secret]
    for export, path in targets.items():
        argv += ["--target", f"{export}={path}"]
    daemon = Daemon(program(*argv, *extra), str(tmp_path / f"{name}.log")).start()
    port = None
    for note in daemon.notifications:
        match = re.search(r"STATUS=listening on 127\.0\.0\.1:(\d+)", note)
        if match:
            port = int(match.group(1))
    assert port, daemon.notifications
    return ReceiverInstance(daemon, port, state, secret, dict(targets))


@pytest.fixture
def receivers(tmp_path) -> Iterator[list[ReceiverInstance]]:
    """Receivers a test starts with ``start_receiver``; stopped at teardown."""
    started: list[ReceiverInstance] = []
    yield started
    for r in started:
        r.daemon.stop()


def make_image(path: str, size: int, kind: str, seed: int = 1) -> str:
    """zeros (sparse), random, text (compressible), or mixed (all three and holes)."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        if kind == "zeros":
            f.truncate(size)
        elif kind == "random":
            f.write(rng.randbytes(size))
        elif kind == "text":
            words = [rng.choice(["block", "device", "migrate", "chunk", "dirty", "target",
                                 "lineage", "\n"]) for _ in range(4096)]
            line = " ".join(words).encode()
            while f.tell() < size:
                f.write(line[:size - f.tell()])
        elif kind == "mixed":
            f.truncate(size)
            pos = 0
            while pos < size:
                n = min(rng.choice([4096, CHUNK, 3 * CHUNK + 100, MiB]), size - pos)
                what = rng.choice(["hole", "random", "text", "zero"])
                f.seek(pos)
                if what == "random":
                    f.write(rng.randbytes(n))
                elif what == "text":
                    f.write((b"mixed content %d " % pos * (n // 16 + 1))[:n])
                elif what == "zero":
                    f.write(bytes(n))
                pos += n
        else:
            raise ValueError(kind)
    return path


def digest(path: str, size: int | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        left = size if size is not None else os.fstat(f.fileno()).st_size
        while left:
            block = f.read(min(8 * MiB, left))
            if not block:
                break
            h.update(block)
            left -= len(block)
    return h.hexdigest()


def same_bytes(a: str, b: str) -> bool:
    size = os.path.getsize(a)
    return os.path.getsize(b) >= size and digest(a) == digest(b, size)


def sync(breqd, *args: str, timeout: float = SYNC_TIMEOUT, check: bool = True,
         ok: tuple[int, ...] = (0,), **kw) -> subprocess.CompletedProcess:
    """bmigrate sync ... against the test's breqd; ``ok``: the exit codes that pass (15:
    converged while the device is written)."""
    env = dict(os.environ, BMIG_CONTROL=breqd.control)
    done = subprocess.run(bmigrate_argv("sync", *args), env=env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, **kw)
    if check and done.returncode not in ok:
        raise AssertionError(f"bmigrate sync failed ({done.returncode}):\n{done.stderr}")
    return done


def track(breqd, name: str, path: str, chunk_size: int = CHUNK) -> None:
    client = breqd.client()
    client.add_device(name, os.path.getsize(path), chunk_size=chunk_size)
    client.close()


# -- bmigrate sync/run as background processes (appended for the SSH, NBD-target, run
# -- and concurrency tests) ------------------------------------------------------------

class Background:
    """``bmigrate sync|run ... --json`` as a child process; its JSON event lines and its
    stderr are collected by reader threads as they come, so a test waits for events
    (``wait_event``) instead of sleeping."""

    def __init__(self, breqd, command: str, *args: str, env: dict | None = None):
        # bmigrate run publishes its state beside the test's breqd, not in /run.
        status_dir = os.path.join(os.path.dirname(breqd.control), "status")
        full_env = dict(os.environ, BMIG_CONTROL=breqd.control, PYTHONUNBUFFERED="1",
                        BMIG_STATUS_DIR=status_dir)
        full_env.update(env or {})
        self.argv = bmigrate_argv(command, *args)
        self.proc = subprocess.Popen(self.argv, env=full_env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.events: list[dict] = []
        self.stdout_other: list[str] = []
        self.stderr_lines: list[str] = []
        self._children: list[int] = []
        self._readers = [threading.Thread(target=self._read_stdout, daemon=True),
                         threading.Thread(target=self._read_stderr, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_stdout(self) -> None:
        import json
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.append(json.loads(line))
            except ValueError:
                self.stdout_other.append(line.rstrip("\n"))

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr_lines.append(line.rstrip("\n"))

    @property
    def stderr(self) -> str:
        return "\n".join(self.stderr_lines)

    def errors(self) -> list[str]:
        """The one-line error messages (``bmigrate: ...``)."""
        return [line for line in self.stderr_lines if line.startswith("bmigrate: ")]

    def of(self, event: str) -> list[dict]:
        return [e for e in list(self.events) if e.get("event") == event]

    def _drained(self) -> None:
        for reader in self._readers:
            reader.join(timeout=30)

    def wait_event(self, predicate, timeout: float = 30.0, what: str = "an event") -> dict:
        """The first event that satisfies ``predicate``; fails at once if the process
        ended without printing one."""
        from tests.daemon import wait_until

        def found():
            for event in list(self.events):
                if predicate(event):
                    return event
            if self.proc.poll() is not None:
                self._drained()
                for event in list(self.events):
                    if predicate(event):
                        return event
                raise AssertionError(f"bmigrate exited with {self.proc.returncode} before "
                                     f"{what}:\n{self.stderr}\nevents: {self.events[-5:]}")
            return None

        return wait_until(found, timeout=timeout, what=what)

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float = 60.0) -> int:
        """Its exit status, once it ended by itself and its output is read."""
        self.proc.wait(timeout=timeout)
        self._drained()
        return self.proc.returncode

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM; SIGKILL if it does not end within ``timeout``."""
        import signal as _signal
        if self.proc.poll() is None:
            self.proc.send_signal(_signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        self._drained()
        return self.proc.returncode

    def kill9(self) -> None:
        """SIGKILL, then its children (ssh(1) runs in a process group of its own and
        would outlive it) once they had the chance to end by themselves."""
        from tests.sshd import descendants
        from tests.daemon import wait_until
        self._children = descendants(self.proc.pid)
        self.proc.kill()
        self.proc.wait(timeout=30)
        self._drained()
        try:
            wait_until(lambda: not _alive(self._children), timeout=15,
                       what="the children of a killed bmigrate to end")
        finally:
            _kill_all(self._children)

    def close(self) -> None:
        from tests.sshd import descendants
        if self.proc.poll() is None:
            self._children += descendants(self.proc.pid)
            self.proc.kill()
            self.proc.wait(timeout=30)
        _kill_all(self._children)
        self._drained()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


def _alive(pids: list[int]) -> list[int]:
    """The pids still running (zombies count as gone)."""
    return [pid for pid in pids if alive(pid)]


def _kill_all(pids: list[int]) -> None:
    import signal as _signal
    for pid in _alive(pids):
        try:
            os.kill(pid, _signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def migrations() -> Iterator[list[Background]]:
    """bmigrate processes a test starts in the background; killed at teardown if still
    running."""
    started: list[Background] = []
    yield started
    for m in reversed(started):
        m.close()


def start_background(migrations: list[Background], breqd, command: str,
                     *args: str) -> Background:
    m = Background(breqd, command, *args)
    migrations.append(m)
    return m


def summary_of(done: subprocess.CompletedProcess) -> dict:
    """The last JSON line of a finished ``bmigrate ... --json``."""
    import json
    return json.loads(done.stdout.splitlines()[-1])


# -- any bmigrate command, and JSON event lines (appended for the cutover tests) ----------

def bmigrate(breqd_or_control, *args: str, timeout: float = SYNC_TIMEOUT,
             check: bool = True) -> subprocess.CompletedProcess:
    """``bmigrate ARGS...`` against a breqd (a BreqdInstance or its control socket)."""
    control = getattr(breqd_or_control, "control", breqd_or_control)
    env = dict(os.environ, BMIG_CONTROL=str(control))
    done = subprocess.run(bmigrate_argv(*args), env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"bmigrate {' '.join(args[:2])} failed ({done.returncode}):\n"
                             f"{done.stderr}")
    return done


def json_lines(stdout: str) -> list:
    """Every line of a ``--json`` output, parsed (one event, object or array per line)."""
    import json
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def error_lines(stderr: str, prog: str = "bmigrate") -> list[str]:
    """The one-line error messages (``bmigrate: ...``) of a finished command."""
    return [line for line in stderr.splitlines() if line.startswith(f"{prog}: ")]


class HeldTarget:
    """A target that records everything and acknowledges only on the test's word."""

    compresses = False
    lineage = True
    description = "held target"

    def __init__(self):
        self.frames: list[tuple[int, int, int]] = []       # (seq, offset, length)
        self.flushes: list[int] = []
        self.ended: list[bool] = []                        # end_pass(complete) calls
        self.acks = None
        self.lock = threading.Lock()

    def set_acks(self, acks) -> None:
        self.acks = acks

    def begin_pass(self) -> None:
        pass

    def send_data(self, seq, offset, codec_id, payload, raw_length, digest) -> None:
        with self.lock:
            self.frames.append((seq, offset, raw_length))

    def send_zero(self, seq, offset, length) -> None:
        with self.lock:
            self.frames.append((seq, offset, length))

    def request_durable(self, seq: int) -> None:
        with self.lock:
            self.flushes.append(seq)

    def end_pass(self, complete: bool, consistent: bool | None = None) -> dict:
        self.ended.append(complete)
        return {}
