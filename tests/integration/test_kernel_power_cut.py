"""A power cut under a dm-tracked device: the throw-away kernel killed while writes run.

The guest's disks are files in a directory shared with this host (run-in-vm.sh -w), so
they outlive the kernel as a machine's disks outlive a power cut: what the guest had
not written back is lost, what it had is there. The first boot attaches the intercept,
makes a full copy and writes, each write flushed to the host's file, while bmig-dm
imports; then bmig-dm is killed and writes go on to blocks breqd never heard of; this
host kills every process of that kernel with SIGKILL while they run. The second boot
sets the volume up again: the first import must find the tracking broken and set every
chunk dirty (invariant 4), and the copy brought up to date from breqd must equal the
volume (tests/kernel/power_cut_guest.py is the guest's side).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.integration.test_kernel_vm import ROOT, SCRIPT, backend

BOOT_TIMEOUT = 240           # seconds one boot may take (the guest's limit is below)
WAIT_POLL = 0.1
KILL_TIMEOUT = 30.0


def guest(directory: str, phase: str) -> list[str]:
    return [SCRIPT, "-b", "uml", "-t", str(BOOT_TIMEOUT - 30), "-w", directory, "--",
            sys.executable, "-m", "tests.kernel.power_cut_guest", phase, directory]


def processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (parent pid, session id)."""
    found = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        found[int(entry)] = (int(fields[1]), int(fields[3]))
    return found


def boot_processes(root: int, sessions: set[int]) -> set[int]:
    """The processes of the boot started as ``root``: its descendants, and every process
    of their sessions (User-Mode Linux's kernel makes a session of its own, and its
    processes outlive the script and timeout that started it)."""
    table = processes()
    tree, grew = {root}, True
    while grew:
        grew = False
        for pid, (parent, _) in table.items():
            if parent in tree and pid not in tree:
                tree.add(pid)
                grew = True
    sessions.update(table[pid][1] for pid in tree if pid in table)
    return {pid for pid, (_, sid) in table.items() if pid in tree or sid in sessions}


def cut_power(proc: subprocess.Popen) -> None:
    """SIGKILL to every process of the boot, the kernel's among them, until none is left
    (a process of the kernel's may take a moment to go)."""
    sessions: set[int] = {proc.pid}
    deadline = time.monotonic() + KILL_TIMEOUT
    while True:
        members = boot_processes(proc.pid, sessions) - {proc.pid}
        if proc.poll() is None:
            members.add(proc.pid)
        if not members:
            break
        assert time.monotonic() < deadline, f"still running after SIGKILL: {members}"
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.poll() is None:
            proc.wait(KILL_TIMEOUT)
        time.sleep(WAIT_POLL)


@pytest.mark.timeout(2 * BOOT_TIMEOUT + 60)
def test_after_a_power_cut_under_writes_the_copy_is_made_identical(tmp_path):
    if backend() != "uml":
        pytest.skip("needs User-Mode Linux (make deb-deps, as root)")
    directory = str(tmp_path)
    env = dict(os.environ, TMPDIR=directory)      # run-in-vm.sh's work dir, left by the kill
    marker = os.path.join(directory, "writing")
    with open(os.path.join(directory, "boot1.log"), "wb") as log:
        first = subprocess.Popen(guest(directory, "before"), cwd=ROOT, env=env,
                                 stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
    try:
        deadline = time.monotonic() + BOOT_TIMEOUT
        while not os.path.exists(marker):
            assert first.poll() is None, open(os.path.join(directory, "boot1.log")).read()
            assert time.monotonic() < deadline, "the writes did not start in time"
            time.sleep(WAIT_POLL)
    finally:
        cut_power(first)
    second = subprocess.Popen(guest(directory, "after"), cwd=ROOT, env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = second.communicate(timeout=BOOT_TIMEOUT)
    finally:
        cut_power(second)           # nothing of it left, whatever happened
    assert second.returncode == 0, out + err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["imports_before_cut"] >= 3
    # The tables did not survive: the first import says so in one line, every chunk dirty.
    assert result["first_import_rc"] == 1, result
    assert len(result["first_import_stderr"].splitlines()) == 1, result
    assert result["state_after_import"] == "lost", result
    assert result["all_dirty_after_import"], result
    assert result["identical"], result
