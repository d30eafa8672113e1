"""Programs that bmig's own tools start, watch and stop: the demo, the benchmarks, the tests.

One way to do it, so that the three stay alike:

- ``child_env``: the environment a child gets: ours without what belongs to our own
  service manager (NOTIFY_SOCKET, LISTEN_*, WATCHDOG_*) or points bmig's commands at our
  own daemons (BMIG_CONTROL, BMIG_NBD_DIR); unbuffered Python.
- ``Child``: one program, in our process group, one of its own or a session of its own
  (``Group``); with ``notify`` it gets a NOTIFY_SOCKET of its own, and a thread reads that
  socket for as long as the child is watched. A daemon's sd_notify never waits
  (bmig/systemd.py drops a message the socket cannot queue), so a socket nobody reads would
  lose its STATUS lines; read all the time, every notification is kept (``notifications``)
  and ``wait_ready`` waits for READY=1 with a deadline. ``stop`` sends SIGTERM (to the
  process group when the child has one of its own), SIGKILL after a timeout, then SIGKILL
  to whatever is left in that group; ``kill9`` is a crash.
- ``Children``: every child started and not stopped yet, newest last, so that none outlives
  the program; and SIGINT, SIGTERM and SIGHUP turned into exceptions in the main thread
  (``KeyboardInterrupt``, ``Stopped``), never between a child's start and its listing: a
  signal that comes meanwhile waits until the child is on the list.

The daemons do not import this module (their end of the notify socket is bmig/systemd.py).
It touches nothing of a migration (devices, state, protocols) and imports only the
standard library.
"""

from __future__ import annotations

import contextlib
import enum
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from typing import Any, Callable, Iterator, Mapping, TypeVar

T = TypeVar("T")

START_TIMEOUT = 30.0            # seconds for READY=1
STOP_TIMEOUT = 20.0             # seconds between SIGTERM and SIGKILL
EXIT_POLL = 0.2                 # how often a wait looks whether the child has exited
NOTIFY_DATAGRAM = 65536         # read size of one notification (they are a few lines)
MAX_NOTIFICATIONS = 10_000      # kept per child; the oldest go first
_SYNC = b"\0bmig-processes-sync "   # our own marker on a child's notify socket

# Variables that are ours and not a child's: our service manager's (a child that saw them
# would notify our manager, or take our sockets), and the defaults that point bmig's
# commands at our own breqd and bmig-nbd.
MANAGER_VARIABLES = ("NOTIFY_SOCKET", "LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES",
                     "WATCHDOG_USEC", "WATCHDOG_PID")
BMIG_VARIABLES = ("BMIG_CONTROL", "BMIG_NBD_DIR")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def child_env(extra: Mapping[str, str] | None = None, *,
              drop: tuple[str, ...] = MANAGER_VARIABLES + BMIG_VARIABLES,
              import_path: str | None = None) -> dict[str, str]:
    """Our environment for a child: without ``drop``, PYTHONUNBUFFERED=1, ``import_path``
    first on PYTHONPATH (when given), then ``extra``."""
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONUNBUFFERED"] = "1"
    if import_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            [import_path, *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra or {})
    return env


class Group(enum.Enum):
    """Where a child runs, and so what a signal to it reaches."""

    SHARED = "shared"       # our process group: Ctrl-C reaches it too; stop() signals it alone
    OWN = "own"             # a process group of its own in our session; stop() takes the group
    SESSION = "session"     # a session of its own: no controlling terminal (ssh cannot prompt)


class Stopped(Exception):
    """SIGTERM or SIGHUP reached the program (SIGINT raises KeyboardInterrupt)."""


class NotReady(Exception):
    """A child exited, or did not send what was waited for in time. ``returncode`` is its
    exit status, None when it still runs."""

    def __init__(self, message: str, returncode: int | None):
        super().__init__(message)
        self.returncode = returncode


class Children:
    """The children started and not stopped yet, and the signals that stop the program."""

    def __init__(self) -> None:
        self.running: list[Child] = []
        self._starting = 0
        self._pending: int | None = None

    def install_signal_handlers(self) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, self._on_signal)

    def ignore_signals(self) -> None:
        """While cleaning up: a second Ctrl-C must not leave things behind."""
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)

    @contextlib.contextmanager
    def starting(self) -> Iterator[None]:
        """Around a start and its listing: a signal that comes meanwhile is acted on (its
        exception raised) once the block is over, when cleanup can find the child. Only
        the main thread, where the handlers raise, holds signals back."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        self._starting += 1
        try:
            yield
        finally:
            self._starting -= 1
            if not self._starting and self._pending is not None:
                pending, self._pending = self._pending, None
                _raise_for(pending)

    def stop_all(self, timeout: float = STOP_TIMEOUT) -> None:
        """Stop every child still listed, newest first."""
        for child in reversed(list(self.running)):
            child.stop(timeout)

    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._starting:
            self._pending = signum
        else:
            _raise_for(signum)


def _raise_for(signum: int) -> None:
    if signum == signal.SIGINT:
        raise KeyboardInterrupt
    raise Stopped(signal.Signals(signum).name)


CHILDREN = Children()           # the program's one list: signals are per process too


class Child:
    """One program started by the demo, a benchmark or a test; see the module docstring."""

    def __init__(self, argv: list[str], *, name: str | None = None,
                 log_path: str | None = None, group: Group = Group.OWN,
                 children: Children = CHILDREN):
        self.argv = list(argv)
        self.name = name or os.path.basename(argv[0])
        self.log_path = log_path        # stdout and stderr, appended, unless start() says
        self.group = group
        self.children = children
        self.proc: subprocess.Popen | None = None
        self.notifications: list[str] = []      # each datagram received, in order
        self._cond = threading.Condition()
        self._notify: socket.socket | None = None
        self._notify_path: str | None = None
        self._notify_dir: str | None = None     # a directory of ours, removed at close
        self._reader: threading.Thread | None = None
        self._syncs = 0                         # our markers sent, and seen by the reader
        self._synced = 0
        self._closed = False

    # -- starting --------------------------------------------------------------------------

    def start(self, env: Mapping[str, str] | None = None, *, notify: bool = False,
              notify_dir: str | None = None, stdin: Any = subprocess.DEVNULL,
              stdout: Any = None, stderr: Any = None, **popen: Any) -> "Child":
        """Start it, listed in ``children`` before a signal can stop the program.

        ``env`` None: ours, as Popen has it. ``notify``: a NOTIFY_SOCKET of its own, in
        ``notify_dir`` (else a private temporary directory), read from now on. ``stdout``
        and ``stderr`` None: the log when there is one, else ours."""
        assert self.proc is None, f"{self.name} was started already"
        env = dict(os.environ if env is None else env)
        if notify:
            env["NOTIFY_SOCKET"] = self._open_notify(notify_dir)
        try:
            with contextlib.ExitStack() as stack:
                log = (stack.enter_context(open(self.log_path, "ab"))
                       if self.log_path and (stdout is None or stderr is None) else None)
                group = {Group.SHARED: {}, Group.OWN: {"process_group": 0},
                         Group.SESSION: {"start_new_session": True}}[self.group]
                with self.children.starting():
                    self.proc = subprocess.Popen(
                        self.argv, env=env, stdin=stdin,
                        stdout=log if stdout is None else stdout,
                        stderr=log if stderr is None else stderr, **group, **popen)
                    self.children.running.append(self)
        except BaseException:
            if self.proc is None:
                self._close_notify()
            raise
        return self

    def _open_notify(self, directory: str | None) -> str:
        if directory is None:
            directory = self._notify_dir = tempfile.mkdtemp(prefix="bmig-notify-")
        path = os.path.join(directory, re.sub(r"[^\w.-]", "_", self.name) + ".notify")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)
        except BaseException:
            sock.close()
            raise
        self._notify, self._notify_path = sock, path
        self._reader = threading.Thread(target=self._read_notifications, args=(sock,),
                                        name=f"notify-{self.name}", daemon=True)
        self._reader.start()
        return path

    def _read_notifications(self, sock: socket.socket) -> None:
        """Every datagram into ``notifications`` until the socket is shut down: so the
        child's sd_notify always finds room and nothing it says is lost."""
        while True:
            try:
                data = sock.recv(NOTIFY_DATAGRAM)
            except OSError:
                break
            with self._cond:
                if not data and self._closed:
                    break
                if data.startswith(_SYNC):
                    self._synced = int(data[len(_SYNC):])
                elif data:
                    self._notified(data.decode(errors="replace"))
                self._cond.notify_all()

    def _notified(self, text: str) -> None:
        """One notification, with the lock held."""
        self.notifications.append(text)
        if len(self.notifications) > MAX_NOTIFICATIONS:
            del self.notifications[:len(self.notifications) - MAX_NOTIFICATIONS]

    # -- waiting ----------------------------------------------------------------------------

    def wait_notified(self, found: Callable[[list[str]], T], what: str,
                      timeout: float) -> T:
        """``found(notifications)`` once it is truthy; NotReady if the child exits first
        or ``timeout`` seconds pass."""
        assert self.proc is not None and self._notify is not None
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                result = found(self.notifications)
                if result:
                    return result
                if self.proc.poll() is not None:
                    raise NotReady(f"{self.name} exited with status {self.proc.returncode} "
                                   f"before {what}", self.proc.returncode)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise NotReady(f"{self.name}: no {what} in {timeout:g} s", None)
                self._cond.wait(min(left, EXIT_POLL))

    def wait_for(self, line: str, timeout: float = START_TIMEOUT) -> str:
        """The first notification that has ``line`` as one of its lines."""
        return self.wait_notified(
            lambda notes: next((n for n in notes if line in n.split("\n")), None),
            line, timeout)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> str:
        return self.wait_for("READY=1", timeout)

    def status_lines(self) -> list[str]:
        """The values of the STATUS= lines received, oldest first."""
        with self._cond:
            return [line[len("STATUS="):] for note in self.notifications
                    for line in note.split("\n") if line.startswith("STATUS=")]

    def sync_notifications(self, timeout: float = STOP_TIMEOUT) -> None:
        """Return once everything sent to the notify socket before this call is in
        ``notifications`` (a marker of ours, sent now, has come through after it)."""
        if self._notify is None or self._notify_path is None:
            return
        with self._cond:
            self._syncs += 1
            mine = self._syncs
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.settimeout(timeout)
            s.sendto(_SYNC + str(mine).encode(), self._notify_path)
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._synced < mine:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self.name}: notifications not read in {timeout:g} s")
                self._cond.wait(left)

    # -- state --------------------------------------------------------------------------------

    @property
    def listening(self) -> bool:
        """Its notify socket is open (from start(notify=True) until it is stopped)."""
        return self._notify is not None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if not self.log_path:
            return ""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # -- stopping -----------------------------------------------------------------------------

    def signal(self, sig: int) -> None:
        """``sig`` to the child, or to its whole group when it has one of its own."""
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if self.group is Group.SHARED:
                if self.proc.poll() is None:
                    self.proc.send_signal(sig)
            else:
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM, SIGKILL after ``timeout`` seconds; what is left of a group of its own
        is killed; its notify socket is read to the end and closed. The exit status."""
        if self.proc is None:
            return None
        if self._closed:
            return self.proc.returncode
        if self.proc.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout=timeout)
        self._close(timeout)
        return self.proc.returncode

    def kill9(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGKILL to the process alone, as a crash would; then closed as by stop()."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait(timeout=timeout)
        self._close(timeout)
        return self.proc.returncode

    def _close(self, timeout: float) -> None:
        """After the child exited: its group's leftovers, its pipes, its notify socket
        (what it sent before it died is read first), off the list."""
        assert self.proc is not None
        if self._closed:
            return
        if self.group is not Group.SHARED:
            self.signal(signal.SIGKILL)
        for pipe in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        with contextlib.suppress(OSError, TimeoutError):
            self.sync_notifications(timeout)
        self._close_notify()
        if self in self.children.running:
            self.children.running.remove(self)

    def _close_notify(self) -> None:
        with self._cond:
            self._closed = True
        if self._notify is not None:
            with contextlib.suppress(OSError):
                self._notify.shutdown(socket.SHUT_RDWR)   # wakes the reader: recv gives b""
            if self._reader is not None:
                self._reader.join(timeout=STOP_TIMEOUT)
            self._notify.close()
            self._notify = None
        if self._notify_path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._notify_path)
            self._notify_path = None
        if self._notify_dir is not None:
            shutil.rmtree(self._notify_dir, ignore_errors=True)
            self._notify_dir = None


def run(argv: list[str], *, timeout: float, env: Mapping[str, str] | None = None,
        group: Group = Group.SHARED, name: str | None = None,
        stop_timeout: float = STOP_TIMEOUT,
        children: Children = CHILDREN) -> subprocess.CompletedProcess:
    """A short command to its end: subprocess.run(capture_output=True, text=True), but
    listed while it runs and stopped (not left running) when the wait ends early."""
    child = Child(argv, name=name, group=group, children=children)
    child.start(env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert child.proc is not None
    try:
        out, err = child.proc.communicate(timeout=timeout)
    finally:
        child.stop(stop_timeout)
    return subprocess.CompletedProcess(argv, child.proc.returncode, out, err)
