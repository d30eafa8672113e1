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
from tests.integration.sync_helpers import bmigrate_argv

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


def test_bmig_nbd_reads_the_variables_bmigrate_reads(breqd, tmp_path):
    """BMIG_NBD_DIR and BMIG_CONTROL mean the same to bmig-nbd as to bmigrate: set once,
    bmigrate finds the control socket bmig-nbd made (no "no bmig-nbd serves d1")."""
    import json

    from tests.daemon import Daemon
    from tests.integration.sync_helpers import bmigrate

    size = 1 << 20
    client = breqd.client()
    client.add_device("d1", size)
    client.close()
    manage = str(tmp_path / "sockets")
    daemon = Daemon(nbd_argv("--device", "d1", "--backing", backing(tmp_path, size),
                             "--unix", str(tmp_path / "nbd.sock")),
                    str(tmp_path / "nbd.log"),
                    env={"BMIG_NBD_DIR": manage, "BMIG_CONTROL": breqd.control}).start()
    try:
        assert os.path.exists(os.path.join(manage, "d1.sock")), os.listdir(tmp_path)
        env_done = subprocess.run(
            [*bmigrate_argv("replicate", "d1", "--status", "--json")], capture_output=True,
            text=True, timeout=60, env=dict(os.environ, BMIG_NBD_DIR=manage,
                                            BMIG_CONTROL=breqd.control))
        assert env_done.returncode == 0, env_done.stderr
        assert json.loads(env_done.stdout)["device"] == "d1"
    finally:
        assert daemon.stop() == 0
