"""The tests that need a real kernel of their own (tests/kernel), run in a throw-away one.

This machine's kernel has no nbd or device-mapper modules; tests/kernel/run-in-vm.sh boots
a Debian kernel (User-Mode Linux, or qemu with linux-image-amd64) that sees this file system
read-only under a tmpfs overlay, and runs the kernel tests inside it, in two boots.
systemd is the guest's PID 1 (-s), so that tests/kernel/test_kernel_systemd.py can drive
the units of systemd/ with systemctl; the tests run in one of its services.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(ROOT, "tests", "kernel", "run-in-vm.sh")
# A guard against a hung guest, not a budget: the dm intercept tests take about 6 minutes
# under UML, systemd's start and the units' tests 1.5 more on an idle machine (4.5 on a
# loaded one).
GUEST_TIMEOUT = 1200


def backend() -> str | None:
    """uml when the user-mode-linux package is there (boots in ~3 s, runs code at native
    speed), else qemu with a Debian kernel, else None."""
    if shutil.which("linux.uml") and glob.glob("/usr/lib/uml/modules/*"):
        return "uml"
    if shutil.which("qemu-system-x86_64") and glob.glob("/boot/vmlinuz-*"):
        return "qemu"
    return None


# Two boots, each within GUEST_TIMEOUT: the cutovers under ext4 (slow links, minutes each)
# in one, every other kernel test in the other.
CUTOVERS = ["tests/kernel/test_kernel_dm_ext4.py", "tests/kernel/test_kernel_dm_via_nbd.py"]
GROUPS = {"cutovers": CUTOVERS,
          "the rest": ["tests/kernel", *(f"--ignore={path}" for path in CUTOVERS)]}


@pytest.mark.timeout(GUEST_TIMEOUT + 120)
@pytest.mark.parametrize("group", list(GROUPS))
def test_the_kernel_tests_pass_in_a_throw_away_kernel(group):
    chosen = backend()
    if chosen is None:
        pytest.skip("no kernel to boot: install user-mode-linux (make deb-deps, as root)")
    for tool in ("nbd-client", "modprobe", "mkfs.ext4", "e2fsck", "era_invalidate", "fio",
                 "systemctl"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (make deb-deps, as root)")
    done = subprocess.run(
        # -w: the checkout itself, which the guest would not see under its fresh /tmp.
        [SCRIPT, "-b", chosen, "-s", "-t", str(GUEST_TIMEOUT), "-w", ROOT, "--",
         sys.executable, "-m", "pytest", "-q", "-rs", "--color=no",
         "-p", "no:cacheprovider", "--durations=0", *GROUPS[group]],
        cwd=ROOT, capture_output=True, text=True, timeout=GUEST_TIMEOUT + 60,
        stdin=subprocess.DEVNULL)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert " passed" in output and "skipped" not in output, output
