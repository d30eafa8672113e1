"""The units of systemd/ under a real systemd, booted as PID 1 of a throw-away kernel.

tests/integration/test_kernel_vm.py boots the kernel with `run-in-vm.sh -s`: systemd is
PID 1 and these tests run in one of its services. They install bmig as an administrator
would (the commands in /usr/local/bin, the units copied to /etc/systemd/system as their
comments say, the files of /etc/bmig, daemons/examples/ where it has one) and drive the
units with systemctl: breqd, bmig-nbd@vm1 serving the kernel's NBD client (/dev/nbd1)
over a loop device, breceive started by breceive.socket, bmigrate@vm1 shipping to a
second loop device, then

- bmig-nbd stopped with SIGSTOP: its watchdog restarts it (the stacks in its journal);
- breqd restarted: no NBD client is dropped, nothing else restarts, the sockets stay;
- `systemctl reload bmigrate@vm1` lowers the bandwidth limit, and lifts it again;
- `systemctl stop bmigrate@vm1` in the middle of a pass: nothing is left in flight, no
  chunk that is on the target is still dirty, and every clean chunk is on the target;
- bmig-dm@ imports what dm-era recorded, within its sandbox.

The guest is thrown away afterwards; the tests still stop what they start and remove
what they installed. Drop-ins in /run/systemd/system (the test's own) shorten the
watchdogs so that a hang is noticed in seconds; everything else is as shipped.
"""

from __future__ import annotations

import mmap
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
from dataclasses import dataclass
from typing import Iterator

import pytest

from bmig.tracker.blocking_client import TrackerClient
from tests.daemon import wait_until
from tests.kernel.dm_helpers import Volume

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _systemd_is_pid_1() -> bool:
    try:
        with open("/proc/1/comm") as f:
            return f.read().strip() == "systemd"
    except OSError:
        return False


pytestmark = [
    pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                       reason="runs in a throw-away kernel"),
    pytest.mark.skipif(not _systemd_is_pid_1(),
                       reason="needs systemd as PID 1 (tests/kernel/run-in-vm.sh -s)"),
]

MiB = 1 << 20
CHUNK = 64 << 10
SIZE = 32 * MiB
BIN = "/usr/local/bin"
UNIT_DIR = "/etc/systemd/system"
DROP_IN_DIR = "/run/systemd/system"
ETC = "/etc/bmig"
CONTROL = "/run/bmig/breqd.sock"
NBD_SOCKET = "/run/bmig/vm1.nbd"            # daemons/examples/bmig-nbd.toml
MANAGE_SOCKET = "/run/bmig/nbd/vm1.sock"
NBD_DEVICE = "/dev/nbd1"
PORT = 10810                                  # breceive.socket's ListenStream
SLOW = "4K"                                   # a 4 MiB frame waits 1024 s at this rate
# Seconds: starting a unit, a pass, a restart, under a single-CPU kernel.
DEADLINE = 120
# The watchdogs as the test sets them (the units ship 60 s and 120 s).
DROP_INS = {
    "bmig-nbd@.service": "[Service]\nWatchdogSec=3s\nRestartSec=1s\n",
    # Long enough for any one step of a pass here, short enough that a pass whose waits
    # did not feed the watchdog (at 4 KiB/s a frame waits 1024 s) would be restarted.
    "bmigrate@.service": "[Service]\nWatchdogSec=15s\n",
}
# Seconds a frame waits at the limit while the test watches the watchdog being fed: longer
# than bmigrate@'s WatchdogSec above.
WATCHED_WAIT = 16
HOMES = ("/home/", "/root/", "/run/user/")


# -- commands ------------------------------------------------------------------------------

def sh(*argv: str, check: bool = True,
       timeout: float = DEADLINE) -> subprocess.CompletedProcess:
    done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} failed ({done.returncode}): "
                             f"{done.stdout}{done.stderr}")
    return done


def systemctl(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = sh("systemctl", "--no-pager", *args, check=False)
    if check and done.returncode != 0:
        units = [a for a in args[1:] if not a.startswith("-")]
        raise AssertionError(f"systemctl {' '.join(args)} failed ({done.returncode}): "
                             f"{done.stdout}{done.stderr}\n"
                             + "\n".join(f"-- {u}:\n"
                                         + sh("systemctl", "--no-pager", "status", u,
                                              check=False).stdout
                                         + journal(u) for u in units)
                             + "\n-- the journal:\n"
                             + sh("journalctl", "--no-pager", "-b", "-n", "60",
                                  check=False).stdout)
    return done


def show(unit: str) -> dict[str, str]:
    props = ("ActiveState", "SubState", "Result", "MainPID", "NRestarts", "ExecMainStatus",
             "WatchdogTimestampMonotonic")
    out = systemctl("show", unit, *(f"--property={p}" for p in props)).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def journal(unit: str) -> str:
    return sh("journalctl", "--no-pager", "-o", "cat", "-u", unit, check=False).stdout


def is_active(unit: str) -> bool:
    return show(unit)["ActiveState"] == "active"


def bmigrate(*args: str) -> subprocess.CompletedProcess:
    """The installed command, as an administrator runs it."""
    return sh(f"{BIN}/bmigrate", *args)


# -- the installation ----------------------------------------------------------------------

def _under_home(path: str) -> bool:
    return os.path.realpath(path).startswith(HOMES)


def _service_python(prefix: str) -> str:
    """An interpreter the services can run: ProtectHome=yes hides /root and /home, so
    one that lives there (a pyenv build) is replaced by the system's own of the same
    version in a virtual environment at ``prefix`` that sees our packages."""
    if not _under_home(sys.executable):
        return sys.executable
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    system = shutil.which(version, path="/usr/bin:/bin")
    assert system, f"the services need a {version} outside /root and /home (/usr/bin)"
    sh(system, "-m", "venv", "--without-pip", prefix)
    purelib = sysconfig.get_paths()["purelib"]
    done = sh(f"{prefix}/bin/python3", "-c", "import sysconfig; "
              "print(sysconfig.get_paths()['purelib'])")
    with open(os.path.join(done.stdout.strip(), "bmig-tests.pth"), "w") as f:
        f.write(f"import site; site.addsitedir({purelib!r})\n")
    return f"{prefix}/bin/python3"


@dataclass
class Installed:
    commands: list[str]
    units: list[str]
    drop_ins: list[str]
    prefix: str

    def remove(self) -> None:
        for path in self.commands + self.units:
            if os.path.exists(path):
                os.unlink(path)
        for path in self.drop_ins:
            shutil.rmtree(path, ignore_errors=True)
        for path in (ETC, self.prefix, "/var/lib/bmig"):
            shutil.rmtree(path, ignore_errors=True)
        systemctl("daemon-reload")


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Iterator[Installed]:
    prefix = "/opt/bmig-tests"
    python = _service_python(prefix)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    commands = []
    for name, entry in scripts.items():
        module, function = entry.split(":")
        path = os.path.join(BIN, name)
        with open(path, "w") as f:
            f.write(f"#!{python}\nfrom {module} import {function}\n{function}()\n")
        os.chmod(path, 0o755)
        commands.append(path)
    units = []
    for name in sorted(os.listdir(os.path.join(ROOT, "systemd"))):
        shutil.copy(os.path.join(ROOT, "systemd", name), os.path.join(UNIT_DIR, name))
        units.append(os.path.join(UNIT_DIR, name))
    drop_ins = dict(DROP_INS)
    if any(_under_home(p) for p in (python, sysconfig.get_paths()["purelib"], ROOT)):
        # The checkout itself lives in a home directory: it must stay readable.
        for unit in ("breqd.service", "bmig-nbd@.service", "breceive.service",
                     "bmigrate@.service", "bmig-dm@.service"):
            drop_ins[unit] = drop_ins.get(unit, "[Service]\n") + "ProtectHome=read-only\n"
    made = []
    for unit, text in drop_ins.items():
        directory = os.path.join(DROP_IN_DIR, unit + ".d")
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "test.conf"), "w") as f:
            f.write(text)
        made.append(directory)
    os.makedirs(os.path.join(ETC, "nbd"), exist_ok=True)
    os.makedirs(os.path.join(ETC, "migrate.d"), exist_ok=True)
    shutil.copy(os.path.join(ROOT, "daemons", "examples", "breqd.toml"), ETC)
    with open(os.path.join(ETC, "secret"), "w") as f:
        f.write(os.urandom(24).hex())
    os.chmod(os.path.join(ETC, "secret"), 0o600)
    systemctl("daemon-reload")
    done = Installed(commands, units, made, prefix)
    try:
        yield done
    finally:
        for unit in ("bmigrate@vm1.service", "bmig-dm@vm2.service", "bmig-nbd@vm1.service",
                     "breceive.service", "breceive.socket", "breqd.service"):
            systemctl("stop", unit, check=False)
        done.remove()


# -- devices -------------------------------------------------------------------------------

class Loops:
    """Loop devices over files of the test, detached at the end."""

    def __init__(self, directory: str):
        self.directory = directory
        self.devices: list[str] = []

    def new(self, name: str, size: int = SIZE) -> str:
        image = os.path.join(self.directory, name)
        with open(image, "wb") as f:
            f.truncate(size)
        device = sh("losetup", "--find", "--show", image).stdout.strip()
        self.devices.append(device)
        return device

    def close(self) -> None:
        for device in self.devices:
            sh("losetup", "-d", device, check=False)


@pytest.fixture
def loops(tmp_path) -> Iterator[Loops]:
    sh("modprobe", "loop")
    made = Loops(str(tmp_path))
    yield made
    made.close()


class NbdClient:
    """The kernel's NBD client on bmig-nbd's socket: the application's disk."""

    def __init__(self) -> None:
        sh("modprobe", "nbd", "nbds_max=2")
        self.connected = False

    def connect(self) -> None:
        sh("nbd-client", "-unix", NBD_SOCKET, NBD_DEVICE, "-N", "vm1")
        self.connected = True

    def alive(self) -> bool:
        return sh("nbd-client", "-c", NBD_DEVICE, check=False).returncode == 0

    def disconnect(self) -> None:
        sh("nbd-client", "-d", NBD_DEVICE, check=False)
        self.connected = False

    def write(self, offset: int, data: bytes) -> None:
        """O_DIRECT, then a flush: the write and a FLUSH reach bmig-nbd before this
        returns."""
        buf = mmap.mmap(-1, len(data))
        buf.write(data)
        fd = os.open(NBD_DEVICE, os.O_WRONLY | os.O_DIRECT)
        try:
            assert os.pwrite(fd, buf, offset) == len(data)
            os.fsync(fd)
        finally:
            os.close(fd)
            buf.close()


@pytest.fixture
def nbd() -> Iterator[NbdClient]:
    client = NbdClient()
    yield client
    client.disconnect()


def chunks(ranges: list[tuple[int, int]]) -> set[int]:
    out: set[int] = set()
    for offset, length in ranges:
        out.update(range(offset // CHUNK, (offset + length - 1) // CHUNK + 1))
    return out


class Tracker:
    """breqd as the test sees it (root, outside every sandbox)."""

    def stats(self, device: str = "vm1") -> dict:
        with TrackerClient(CONTROL, timeout=30) as client:
            return client.stats(device)

    def unshipped(self, device: str = "vm1") -> int:
        s = self.stats(device)
        return int(s["dirty_bytes"]) + int(s["inflight_bytes"])

    def dirty_chunks(self, device: str = "vm1", size: int = SIZE) -> set[int]:
        with TrackerClient(CONTROL, timeout=30) as client:
            runs: list[tuple[int, int]] = []
            offset = 0
            while offset < size:
                got, end = client.query(device, offset, size - offset)
                runs += got
                offset = end
        return chunks(runs)


def differing_chunks(a: str, b: str, size: int = SIZE) -> set[int]:
    out = set()
    with open(a, "rb") as fa, open(b, "rb") as fb:
        for index in range(size // CHUNK):
            if fa.read(CHUNK) != fb.read(CHUNK):
                out.add(index)
    return out


def converged(tracker: Tracker, source: str, target: str) -> None:
    """Until nothing is dirty or in flight and the target holds the source's bytes."""
    wait_until(lambda: tracker.unshipped() == 0 and not differing_chunks(source, target),
               timeout=DEADLINE, what="the target to catch up")


def migration_file(source: str, bwlimit: str | None = None,
                   window: str | None = None) -> None:
    """/etc/bmig/migrate.d/vm1.toml; ``window``: what a pass has in flight at most (one
    frame at "4M": each frame is flushed and committed on its own)."""
    text = (f'name = "vm1"\nsource = "{source}"\nto = "tcp://127.0.0.1:{PORT}/vm1"\n'
            f'secret_file = "{ETC}/secret"\ninterval = 0.2\n')
    if bwlimit is not None:
        text += f'bwlimit = "{bwlimit}"\n'
    if window is not None:
        text += f'window = "{window}"\n'
    with open(os.path.join(ETC, "migrate.d", "vm1.toml.new"), "w") as f:
        f.write(text)
    os.replace(os.path.join(ETC, "migrate.d", "vm1.toml.new"),
               os.path.join(ETC, "migrate.d", "vm1.toml"))


def reload_bwlimit(source: str, bwlimit: str) -> None:
    """Rewrite the migration file, `systemctl reload`, until the journal says it was
    read again."""
    before = journal("bmigrate@vm1.service").count("settings reloaded")
    migration_file(source, bwlimit)
    systemctl("reload", "bmigrate@vm1.service")
    wait_until(lambda: journal("bmigrate@vm1.service").count("settings reloaded") > before,
               timeout=DEADLINE, what="bmigrate@vm1 to reread its file")


def start_the_pipeline(installed: Installed, loops: Loops, nbd: NbdClient,
                       tracker: Tracker) -> tuple[str, str]:
    source, target = loops.new("source.img"), loops.new("target.img")
    systemctl("start", "breqd.service")
    assert is_active("breqd.service") and os.path.exists(CONTROL)
    bmigrate("track", "add", "vm1", "--size-of", source)
    with open(os.path.join(ROOT, "daemons", "examples", "bmig-nbd.toml")) as f:
        example = f.read()
    assert 'backing = "/dev/vg0/vm1"' in example and f'unix = "{NBD_SOCKET}"' in example
    with open(os.path.join(ETC, "nbd", "vm1.toml"), "w") as f:
        f.write(example.replace('backing = "/dev/vg0/vm1"', f'backing = "{source}"'))
    systemctl("start", "bmig-nbd@vm1.service")
    nbd.connect()
    nbd.write(0, os.urandom(4 * MiB))
    with open(os.path.join(ROOT, "daemons", "examples", "breceive.toml")) as f:
        example = f.read()
    assert 'path = "/dev/vg0/vm1"' in example and "listen = " in example
    with open(os.path.join(ETC, "breceive.toml"), "w") as f:
        f.write(example.replace('path = "/dev/vg0/vm1"', f'path = "{target}"'))
    systemctl("start", "breceive.socket")
    assert show("breceive.service")["ActiveState"] == "inactive"     # until a sender comes
    migration_file(source)
    systemctl("start", "bmigrate@vm1.service")
    converged(tracker, source, target)
    return source, target


# -- the tests -----------------------------------------------------------------------------

@pytest.mark.timeout(900)
def test_the_units_under_systemd(installed, loops, nbd):
    tracker = Tracker()
    source, target = start_the_pipeline(installed, loops, nbd, tracker)

    # breceive came up through breceive.socket, serving its socket instead of "listen".
    assert is_active("breceive.service") and show("breceive.service")["NRestarts"] == "0"
    assert re.search(r"serving the socket\(s\) systemd passed \(\S+:10810\), not listen = "
                     r"0\.0\.0\.0:10810", journal("breceive.service")), \
        journal("breceive.service")

    # A hung bmig-nbd: the watchdog restarts it.
    before = show("bmig-nbd@vm1.service")
    assert before["NRestarts"] == "0", journal("bmig-nbd@vm1.service")   # pings came
    hung = int(before["MainPID"])
    os.kill(hung, signal.SIGSTOP)
    def restarted() -> bool:
        now = show("bmig-nbd@vm1.service")
        return now["ActiveState"] == "active" and now["MainPID"] not in ("0", str(hung))
    wait_until(restarted, timeout=DEADLINE, what="the watchdog to restart bmig-nbd@vm1")
    after = show("bmig-nbd@vm1.service")
    assert int(after["NRestarts"]) == int(before["NRestarts"]) + 1
    log = journal("bmig-nbd@vm1.service")
    assert "Watchdog timeout" in log and "most recent call first" in log, log
    assert not os.path.exists(f"/proc/{hung}")
    nbd.disconnect()                      # the old connection died with the process
    nbd.connect()
    nbd.write(4 * MiB, os.urandom(MiB))
    converged(tracker, source, target)

    # breqd restarts: no NBD client is dropped, nothing else restarts, the sockets stay.
    clients = {u: show(u) for u in ("bmig-nbd@vm1.service", "bmigrate@vm1.service")}
    systemctl("restart", "breqd.service")
    assert is_active("breqd.service")
    for unit, was in clients.items():
        now = show(unit)
        assert (now["MainPID"], now["NRestarts"]) == (was["MainPID"], was["NRestarts"]), \
            unit
    assert os.path.exists(NBD_SOCKET) and os.path.exists(MANAGE_SOCKET)
    assert nbd.alive()

    def write_once_breqd_answers() -> bool:
        try:
            nbd.write(6 * MiB, os.urandom(MiB))
        except OSError:                   # EIO until bmig-nbd has reconnected to breqd
            return False
        return True
    wait_until(write_once_breqd_answers, timeout=DEADLINE, what="a write through bmig-nbd")
    assert nbd.alive()
    converged(tracker, source, target)

    # `systemctl reload` changes the bandwidth limit: down to a crawl, then lifted.
    # While a frame waits at the crawl, the pass's waits feed the watchdog.
    reload_bwlimit(source, SLOW)
    nbd.write(8 * MiB, os.urandom(8 * MiB))
    wait_until(lambda: tracker.stats()["inflight_bytes"], timeout=DEADLINE,
               what="a pass to check the writes out")
    # The frame waits at the limit: WATCHDOG=1 keeps coming meanwhile, for longer than
    # the unit's WatchdogSec (a wait that did not feed it would have been killed), and
    # nothing more than the limit lets through has gone.
    waiting = show("bmigrate@vm1.service")
    pinged = int(waiting["WatchdogTimestampMonotonic"])

    def pinged_for_long_enough() -> bool:
        now = show("bmigrate@vm1.service")
        assert (now["MainPID"], now["NRestarts"]) == (waiting["MainPID"],
                                                      waiting["NRestarts"]), \
            journal("bmigrate@vm1.service")          # killed by its watchdog meanwhile
        return int(now["WatchdogTimestampMonotonic"]) > pinged + WATCHED_WAIT * 1_000_000
    wait_until(pinged_for_long_enough, timeout=DEADLINE,
               what="WATCHDOG=1 while a frame waits at the limit")
    assert tracker.unshipped() >= 8 * MiB, "shipped faster than the limit"
    reload_bwlimit(source, "0")
    converged(tracker, source, target)

    # `systemctl stop` in the middle of a pass: what is durable on the target is
    # committed, what is not stays dirty, nothing stays in flight.
    systemctl("stop", "bmigrate@vm1.service")
    nbd.write(16 * MiB, os.urandom(16 * MiB))
    wait_until(lambda: tracker.stats()["held_bytes"] == 0, timeout=DEADLINE,
               what="bmig-nbd to let go of its holds")   # a held chunk stays dirty
    migration_file(source, "2M", window="4M")      # a frame every 2 s, each committed
    systemctl("start", "bmigrate@vm1.service")
    wait_until(lambda: tracker.unshipped() <= 14 * MiB, timeout=DEADLINE,
               what="a part of the pass to be committed")
    systemctl("stop", "bmigrate@vm1.service")
    stopped = show("bmigrate@vm1.service")
    assert (stopped["ActiveState"], stopped["Result"]) == ("inactive", "success"), stopped
    assert tracker.stats()["inflight_bytes"] == 0
    dirty, differing = tracker.dirty_chunks(), differing_chunks(source, target)
    assert dirty, "the pass ended before the stop: nothing was tested"
    assert dirty == differing, (f"dirty and on the target: {sorted(dirty - differing)}; "
                                f"clean and not on the target: {sorted(differing - dirty)}")

    # No other restart through all of it: bmigrate@vm1's watchdog was fed while a frame
    # waited at 4 KiB/s, bmig-nbd@vm1's restart was the SIGSTOP's.
    assert stopped["NRestarts"] == "0" and "Watchdog timeout" not in \
        journal("bmigrate@vm1.service")
    assert show("bmig-nbd@vm1.service")["NRestarts"] == "1"

    nbd.disconnect()
    for unit in ("bmig-nbd@vm1.service", "breceive.socket", "breceive.service",
                 "breqd.service"):
        systemctl("stop", unit)
        assert show(unit)["Result"] == "success", (unit, journal(unit))


@pytest.mark.timeout(300)
def test_bmig_dm_imports_what_dm_era_recorded_in_its_sandbox(installed, tmp_path):
    tracker = Tracker()
    systemctl("start", "breqd.service")
    volume = Volume("bmigtest-vm2", str(tmp_path / "vm2.img"), 8 * MiB)
    attached = False
    try:
        bmigrate("track", "attach", "vm2", "--dm", volume.path)
        attached = True
        bmigrate("track", "clear", "vm2", "--force")
        assert tracker.dirty_chunks("vm2", 8 * MiB) == set()
        fd = os.open(volume.path, os.O_WRONLY | os.O_DIRECT)
        buf = mmap.mmap(-1, CHUNK)
        buf.write(os.urandom(CHUNK))
        try:
            os.pwrite(fd, buf, 5 * CHUNK)
        finally:
            os.close(fd)
            buf.close()
        systemctl("start", "bmig-dm@vm2.service")       # READY=1 after the first import
        assert tracker.dirty_chunks("vm2", 8 * MiB) == {5}, journal("bmig-dm@vm2.service")
        systemctl("stop", "bmig-dm@vm2.service")
        stopped = show("bmig-dm@vm2.service")
        assert (stopped["Result"], stopped["NRestarts"]) == ("success", "0"), \
            journal("bmig-dm@vm2.service")
    finally:
        systemctl("stop", "bmig-dm@vm2.service", check=False)
        if attached:
            sh(f"{BIN}/bmigrate", "track", "detach", "vm2", check=False)
        volume.close()
        systemctl("stop", "breqd.service", check=False)
