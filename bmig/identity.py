"""What a target is: the identity its record binds to (DESIGN.md, invariant 9).

A target record says "this file or device holds generation G of device D". That is only
true of the very file or device the record was written for, at the size it had then: a
file deleted and created again, replaced by another, truncated or grown, a logical
volume removed and created again, a /dev/sdX that names another disk after a reboot, all
hold something else. The receiver compares the identity saved in the record with what it
opens; a target that does not match is not "the same" copy, whatever the record says.

    file   st_dev and st_ino, the inode generation where the file system keeps one
           (FS_IOC_GETVERSION: ext4, xfs, btrfs...), and the size
    block  a stable id where the kernel gives one (a device-mapper uuid, such as an
           LVM volume's; a disk's wwid or serial; a loop device's backing file; for a
           partition, its disk's id, number and start), otherwise the device number
           (major:minor); and the size

The limits of each are in docs/state-format.md ("The target's identity").
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

from bmig.limits import MAX_SYSFS_ID as _MAX_ID

FS_IOC_GETVERSION = 0x80087601      # _IOR('v', 1, long)
LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII")   # lo_device, lo_inode, lo_rdevice, lo_offset,
_LOOP_INFO64_SIZE = 232                      # lo_sizelimit, lo_number, ... (of 232 bytes)
SYSFS_BLOCK = "/sys/dev/block"

KIND_FILE = "file"
KIND_BLOCK = "block"


@dataclass(frozen=True)
class TargetIdentity:
    kind: str                           # "file" or "block"
    size: int                           # bytes, as the target has them
    dev: int = 0                        # file: st_dev of its file system
    ino: int = 0                        # file: st_ino
    inode_generation: int | None = None  # file: FS_IOC_GETVERSION, where there is one
    rdev: str = ""                      # block: "major:minor"
    stable_id: str = ""                 # block: see the module docstring; "" if none

    def to_json(self) -> dict[str, Any]:
        if self.kind == KIND_FILE:
            return {"kind": self.kind, "size": self.size, "dev": self.dev, "ino": self.ino,
                    "inode_generation": self.inode_generation}
        return {"kind": self.kind, "size": self.size, "rdev": self.rdev,
                "stable_id": self.stable_id}

    @classmethod
    def from_json(cls, raw: object) -> "TargetIdentity":
        """ValueError when ``raw`` is not an identity this module wrote."""
        if not isinstance(raw, dict):
            raise ValueError(f"identity must be an object, not {raw!r}")
        kind = raw.get("kind")
        size = _int(raw, "size")
        if kind == KIND_FILE:
            generation = raw.get("inode_generation")
            if generation is not None and (not isinstance(generation, int)
                                           or isinstance(generation, bool)
                                           or not -(1 << 63) <= generation < 1 << 63):
                raise ValueError(f"identity: inode_generation {generation!r}")
            return cls(KIND_FILE, size, dev=_int(raw, "dev"), ino=_int(raw, "ino"),
                       inode_generation=generation)
        if kind == KIND_BLOCK:
            rdev, stable = raw.get("rdev"), raw.get("stable_id", "")
            if not isinstance(rdev, str) or not isinstance(stable, str):
                raise ValueError("identity: rdev and stable_id must be strings")
            return cls(KIND_BLOCK, size, rdev=rdev, stable_id=stable)
        raise ValueError(f"identity: unknown kind {kind!r}")

    def describe(self) -> str:
        if self.kind == KIND_FILE:
            return f"file {_dev(self.dev)} inode {self.ino}, {self.size} bytes"
        return (f"block device {self.stable_id or self.rdev}, {self.size} bytes")

    def mismatch(self, found: "TargetIdentity | None") -> str | None:
        """Why ``found`` (what the target is now; None: it does not exist) is not the
        target this identity was taken of, or None when it is."""
        if found is None:
            return "it no longer exists"
        if found.kind != self.kind:
            return f"it was a {_kind(self.kind)} and is a {_kind(found.kind)} now"
        if self.kind == KIND_FILE:
            if (found.dev, found.ino) != (self.dev, self.ino):
                return (f"it is another file (inode {found.ino} on {_dev(found.dev)}, "
                        f"not {self.ino} on {_dev(self.dev)})")
            if found.inode_generation != self.inode_generation:
                return "it is another file (its inode number was used again)"
        elif self.stable_id or found.stable_id:
            if found.stable_id != self.stable_id:
                return (f"it is another device ({found.stable_id or 'no id'}, not "
                        f"{self.stable_id or 'no id'})")
        elif found.rdev != self.rdev:
            return f"it is another device ({found.rdev}, not {self.rdev})"
        if found.size != self.size:
            how = "grew" if found.size > self.size else "shrank"
            return f"it {how} from {self.size} to {found.size} bytes"
        return None


def identify(fd: int) -> TargetIdentity:
    """The identity of the open file or block device ``fd``. ValueError for anything
    else (a directory, a FIFO...)."""
    st = os.fstat(fd)
    if stat.S_ISREG(st.st_mode):
        return TargetIdentity(KIND_FILE, st.st_size, dev=st.st_dev, ino=st.st_ino,
                              inode_generation=_inode_generation(fd))
    if stat.S_ISBLK(st.st_mode):
        major, minor = os.major(st.st_rdev), os.minor(st.st_rdev)
        return TargetIdentity(KIND_BLOCK, os.lseek(fd, 0, os.SEEK_END),
                              rdev=f"{major}:{minor}",
                              stable_id=stable_block_id(major, minor, fd))
    raise ValueError("neither a file nor a block device")


def _inode_generation(fd: int) -> int | None:
    try:
        raw = fcntl.ioctl(fd, FS_IOC_GETVERSION, bytes(8))
    except OSError:
        return None                     # the file system keeps none (tmpfs, NFS...)
    return struct.unpack("q", raw)[0]


def stable_block_id(major: int, minor: int, fd: int | None = None,
                    sysfs: str = SYSFS_BLOCK) -> str:
    """An id of the block device major:minor that outlives a reboot and a renumbering
    and changes when the device is replaced by another; "" when the kernel gives none."""
    base = os.path.join(sysfs, f"{major}:{minor}")
    number = _read(os.path.join(base, "partition"))
    if number:
        disk = os.path.dirname(os.path.realpath(base))
        disk_dev = _read(os.path.join(disk, "dev"))
        if not disk_dev or ":" not in disk_dev:
            return ""
        disk_major, _, disk_minor = disk_dev.partition(":")
        try:
            disk_id = stable_block_id(int(disk_major), int(disk_minor), None, sysfs)
        except ValueError:
            return ""
        start = _read(os.path.join(base, "start"))
        return f"{disk_id}/part{number}@{start}" if disk_id else ""
    for name, path in (("dm-uuid", "dm/uuid"), ("md-uuid", "md/uuid"), ("wwid", "wwid"),
                       ("wwid", "device/wwid")):
        value = _read(os.path.join(base, path))
        if value:
            return f"{name}:{value}"
    if os.path.isdir(os.path.join(base, "loop")):
        return _loop_id(fd) if fd is not None else ""
    serial = _read(os.path.join(base, "serial")) or _read(os.path.join(base, "device",
                                                                        "serial"))
    if serial:
        nsid = _read(os.path.join(base, "nsid"))       # NVMe: namespaces share a serial
        return f"serial:{serial}" + (f"/ns{nsid}" if nsid else "")
    return ""


def _loop_id(fd: int) -> str:
    """A loop device by its backing file (device and inode) and the window onto it."""
    try:
        raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64_SIZE))
    except OSError:
        return ""                       # not bound to a file
    device, inode, _, offset, limit = _LOOP_INFO64.unpack_from(raw)[:5]
    return f"loop:{_dev(device)}:{inode}@{offset}+{limit}"


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            text = f.read(_MAX_ID + 1)
    except OSError:
        return ""
    return text[:_MAX_ID].decode("ascii", "replace").strip().replace("\x00", "")


def _int(raw: dict, key: str) -> int:
    """A field the kernel gave as an unsigned 64-bit number (st_dev, st_ino, a size)."""
    value = raw.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 1 << 64:
        raise ValueError(f"identity: {key} {value!r}")
    return value


def _dev(dev: int) -> str:
    return f"{os.major(dev)}:{os.minor(dev)}"


def _kind(kind: str) -> str:
    return "file" if kind == KIND_FILE else "block device"
