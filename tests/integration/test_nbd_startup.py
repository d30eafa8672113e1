"""bmig-nbd's checks before it serves a writable export (bmig.nbd.service).

A device breqd does not track, or tracks at another size, would be served with writes
nobody marks or marks that land on the wrong chunks: bmig-nbd refuses to start, with one
line that says what to do and the configuration exit code, and leaves no socket behind.
"""

from __future__ import annotations

import os
import subprocess

from bmig.errors import EXIT_CONFIG
from tests.integration.nbd_helpers import nbd_argv

TIMEOUT = 60


def start(breqd, tmp_path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(nbd_argv("--unix", str(tmp_path / "nbd.sock"),
                                   "--control", breqd.control,
                                   "--manage-dir", str(tmp_path / "manage"), *args),
                          capture_output=True, text=True, timeout=TIMEOUT)


def refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert "Traceback" not in done.stderr, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    for word in words:
        assert word in lines[0], lines[0]
    assert done.returncode == EXIT_CONFIG, done


def backing(tmp_path, size: int) -> str:
    path = str(tmp_path / "backing.img")
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def test_a_device_breqd_does_not_track_is_refused(breqd, tmp_path):
    done = start(breqd, tmp_path, "--device", "nowhere", "--backing",
                 backing(tmp_path, 1 << 20))
    refused(done, "breqd does not track a device named 'nowhere'",
            "bmigrate track add nowhere --size-of")
    assert not os.path.exists(tmp_path / "nbd.sock")


def test_a_backing_of_another_size_than_breqd_tracks_is_refused(breqd, tmp_path):
    client = breqd.client()
    client.add_device("d1", 2 << 20)
    client.close()
    done = start(breqd, tmp_path, "--device", "d1", "--backing", backing(tmp_path, 1 << 20))
    refused(done, f"d1: breqd tracks {2 << 20} bytes but", f"has {1 << 20}")
    assert not os.path.exists(tmp_path / "nbd.sock")


def test_an_export_name_given_twice_is_refused(breqd, tmp_path):
    path = backing(tmp_path, 1 << 20)
    done = start(breqd, tmp_path, "--device", "d1", "--backing", path,
                 "--device", "d2", "--backing", path, "--export", "x", "--export", "x")
    refused(done, "export 'x' is given twice")
