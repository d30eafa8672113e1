"""flock_within (bmig/statelock.py), the one wait for an flock, and its two users: a dm
device's lock and a receiver target's lock give up with their own error once the wait is
over, and take the lock once its holder lets go."""

from __future__ import annotations

import fcntl
import os

import pytest

from bmig.dm.state import DeviceLock
from bmig.errors import InterceptError, TargetBusy
from bmig.receiver.target import TargetLock
from bmig.statelock import flock_within


def hold(path: str) -> int:
    """Another holder: an open file description of its own with the flock taken."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


def test_flock_within_waits_then_gives_up_and_takes_a_free_lock(tmp_path):
    path = str(tmp_path / "x.lock")
    holder = hold(path)
    fd = os.open(path, os.O_RDWR)
    try:
        assert flock_within(fd, 0.1, poll=0.01) is False
        os.close(holder)
        holder = -1
        assert flock_within(fd, 0.0) is True
        with pytest.raises(BlockingIOError):        # it is held now, by fd
            fcntl.flock(os.open(path, os.O_RDWR), fcntl.LOCK_EX | fcntl.LOCK_NB)
    finally:
        os.close(fd)
        if holder >= 0:
            os.close(holder)


def test_device_lock_held_elsewhere_is_an_intercept_error(tmp_path):
    holder = hold(str(tmp_path / "vm1.lock"))
    try:
        with pytest.raises(InterceptError, match="held by another bmig process for more "
                                                 "than 0.1 s"):
            with DeviceLock(str(tmp_path), "vm1", timeout=0.1):
                pass
    finally:
        os.close(holder)
    with DeviceLock(str(tmp_path), "vm1", timeout=0.1) as lock:
        assert os.path.exists(lock.path)


def test_target_lock_held_elsewhere_is_target_busy(tmp_path):
    first = TargetLock(str(tmp_path), "disk0", "replica")
    first.acquire(0.0)
    try:
        with pytest.raises(TargetBusy, match="'disk0' is being replicated by another"):
            TargetLock(str(tmp_path), "disk0", "replica").acquire(0.1)
    finally:
        first.release()
    second = TargetLock(str(tmp_path), "disk0", "replica")
    second.acquire(0.0)
    second.release()
