"""dmsetup and losetup as functions: one-line errors, a timeout on every call.

Only this module runs the device-mapper tools, so the rest of bmig.dm reads as the steps
it takes. Device names are dm names (``vg0-lv1``) or paths (``/dev/mapper/vg0-lv1``,
``/dev/dm-3``); ``dm_name`` turns either into the name.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass

from bmig.errors import InterceptError

TIMEOUT = 60.0


def run(*argv: str, timeout: float = TIMEOUT, stdin: str | None = None) -> str:
    """Run a tool; its stdout, or InterceptError with its first line of complaint."""
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                              input=stdin, stdin=None if stdin is not None
                              else subprocess.DEVNULL)
    except FileNotFoundError:
        raise InterceptError(f"{argv[0]} is not installed (Debian: apt-get install "
                             f"{PACKAGE.get(argv[0], argv[0])})") from None
    except subprocess.TimeoutExpired:
        raise InterceptError(f"{' '.join(argv)} did not finish within {timeout:g} s") from None
    if done.returncode != 0:
        why = [line.strip() for line in (done.stderr or done.stdout).splitlines()
               if line.strip() and line.strip() != "Command failed."]
        raise InterceptError(f"{' '.join(argv[:3])} failed: "
                             f"{why[0] if why else f'exit status {done.returncode}'}")
    return done.stdout


PACKAGE = {"dmsetup": "dmsetup", "losetup": "mount", "era_invalidate":
           "thin-provisioning-tools", "modprobe": "kmod", "nbd-client": "nbd-client"}


@dataclass(frozen=True)
class Info:
    name: str
    major: int
    minor: int
    suspended: bool
    live_table: bool
    inactive_table: bool
    open_count: int

    @property
    def devno(self) -> str:
        return f"{self.major}:{self.minor}"

    @property
    def path(self) -> str:
        return f"/dev/mapper/{self.name}"


def dm_name(device: str) -> str:
    """The dm name of ``device``: a name, /dev/mapper/NAME, or any path to a dm node."""
    if "/" not in device:
        return device
    if device.startswith("/dev/mapper/"):
        return device[len("/dev/mapper/"):]
    try:
        st = os.stat(device)
    except OSError as exc:
        raise InterceptError(f"{device}: {exc.strerror}") from None
    sys_name = f"/sys/dev/block/{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}/dm/name"
    try:
        with open(sys_name) as f:
            return f.read().strip()
    except OSError:
        raise InterceptError(f"{device} is not a device-mapper device (put it behind one: "
                             "see bmigrate(1), TRACKING A DEVICE IN USE)") from None


def info(name: str) -> Info | None:
    """The device's state, or None if there is no such dm device."""
    argv = ["dmsetup", "info", "-c", "--noheadings", "--separator", ";", "-o",
            "name,major,minor,suspended,tables_loaded,open", name]
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT,
                              stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        raise InterceptError("dmsetup is not installed (Debian: apt-get install "
                             "dmsetup)") from None
    except subprocess.TimeoutExpired:
        raise InterceptError(f"dmsetup info {name} did not finish") from None
    if done.returncode != 0:
        if "not exist" in done.stderr or "No such device" in done.stderr:
            return None
        why = [line for line in done.stderr.splitlines() if line.strip()]
        raise InterceptError(f"dmsetup info {name} failed: {why[0] if why else '?'}")
    out = done.stdout
    fields = out.strip().split(";")
    if len(fields) != 6:
        return None
    loaded = fields[4].lower()              # "Live", "Inactive" or "Live & Inactive"
    return Info(fields[0], int(fields[1]), int(fields[2]), fields[3].lower() == "suspended",
                "live" in loaded, "inactive" in loaded, int(fields[5]))


def table(name: str, inactive: bool = False) -> list[str]:
    out = run("dmsetup", "table", *(["--inactive"] if inactive else []), name)
    return [line.strip() for line in out.splitlines() if line.strip()]


def status(name: str) -> list[str]:
    return [line.strip() for line in run("dmsetup", "status", name).splitlines()
            if line.strip()]


def create(name: str, lines: list[str]) -> None:
    run("dmsetup", "create", name, stdin="\n".join(lines) + "\n")


def load(name: str, lines: list[str]) -> None:
    """Load the inactive table: the live one stays until the next resume."""
    run("dmsetup", "load", name, stdin="\n".join(lines) + "\n")


def clear(name: str) -> None:
    """Drop an inactive table that was loaded but not resumed."""
    run("dmsetup", "clear", name)


def suspend(name: str, lockfs: bool = False) -> None:
    """Hold new I/O and wait for every I/O in flight to complete. Without ``lockfs`` a
    file system on the device is not frozen (nothing is flushed that was not asked)."""
    run("dmsetup", "suspend", *([] if lockfs else ["--nolockfs"]), name)


def resume(name: str) -> None:
    run("dmsetup", "resume", name)


def remove(name: str) -> None:
    run("dmsetup", "remove", name)


def message(name: str, text: str) -> None:
    run("dmsetup", "message", name, "0", text)


def size_sectors(name: str) -> int:
    """The device's length from its live table (sectors of 512 bytes)."""
    total = 0
    for line in table(name):
        start, length = line.split()[:2]
        total = max(total, int(start) + int(length))
    return total


def targets() -> set[str]:
    return {line.split()[0] for line in run("dmsetup", "targets").splitlines() if line.strip()}


def ensure_target(target: str, module: str) -> None:
    """The kernel has the target, loading its module if need be."""
    if target in targets():
        return
    try:
        run("modprobe", module)
    except InterceptError:
        pass
    if target not in targets():
        raise InterceptError(f"the kernel has no {target} target (modprobe {module} failed: "
                             f"a kernel built with CONFIG_DM_{target.upper()} is needed)")


def loop_attach(path: str) -> str:
    """A loop device over ``path``, reusing one that is already there."""
    existing = run("losetup", "-j", path).strip()
    if existing:
        return existing.split(":", 1)[0]
    return run("losetup", "--find", "--show", path).strip()


def loop_detach(device: str) -> None:
    run("losetup", "-d", device)


def devno_of(path: str) -> str:
    st = os.stat(path)
    return f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
