"""The dm intercept in a real kernel: dm-era attached under a live device, imports, detach.

These tests run only inside a throw-away kernel (RUN_IN_VM is set by run-in-vm.sh);
tests/integration/test_kernel_vm.py boots one and runs this directory in it. Devices
are a few MiB: a linear dm device over a loop device, as an LVM volume looks.
"""

from __future__ import annotations

import json
import os
import random

import pytest

from tests.kernel.dm_helpers import (CHUNK, MiB, Volume, bmig_dm_argv, bmigrate,
                                     detach_metadata_loops, dirty_chunks, exists, record,
                                     run, table, write_at)

pytestmark = pytest.mark.skipif(not os.environ.get("RUN_IN_VM"),
                                reason="needs device-mapper: runs in a VM")

# Not a multiple of the chunk size: dm-era's last block and breqd's last chunk are partial.
SIZE = 8 * MiB + 36 * 1024


@pytest.fixture
def dm_modules():
    run("modprobe", "-a", "dm-era", "dm-flakey", "loop")


@pytest.fixture
def volume(tmp_path, dm_modules):
    vol = Volume(f"bmigt{os.getpid() % 1000}", str(tmp_path / "vol.img"), SIZE)
    yield vol
    vol.close()


@pytest.fixture
def dm_state(tmp_path):
    directory = str(tmp_path / "dm")
    yield directory
    detach_metadata_loops(directory)


def clear(breqd, name: str) -> None:
    client = breqd.client()
    client.clear_all(name, force=True)
    client.close()


def import_once(breqd, dm_state: str, name: str = "d1") -> None:
    run(*bmig_dm_argv(breqd, dm_state, "--once", name))


def test_attach_records_every_write_and_detach_restores_the_table(breqd, volume, dm_state):
    bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", volume.path)
    era_dev = "bmig-d1-era"
    assert exists(era_dev) and exists("bmig-d1-origin")
    assert table("bmig-d1-origin") == volume.original
    assert table(volume.name)[0].split()[2] == "linear"
    assert len(dirty_chunks(breqd, "d1", SIZE)) == -(-SIZE // CHUNK)    # new: all dirty
    clear(breqd, "d1")
    import_once(breqd, dm_state)             # what was written before the clear
    clear(breqd, "d1")
    offsets = [0, 5 * CHUNK + 4096, 17 * CHUNK - 512, SIZE - 512]        # the partial tail
    for offset in offsets:
        write_at(volume.path, offset - offset % 512, os.urandom(512))
    run("blkdiscard", "-o", str(40 * CHUNK), "-l", str(CHUNK), volume.path)
    assert dirty_chunks(breqd, "d1", SIZE) == set()                      # not imported yet
    import_once(breqd, dm_state)
    expected = {o // CHUNK for o in offsets} | {40}
    assert dirty_chunks(breqd, "d1", SIZE) == expected
    first = record(dm_state, "d1")["imported_era"]
    import_once(breqd, dm_state)                      # nothing new: same chunks, next era
    assert dirty_chunks(breqd, "d1", SIZE) == expected
    assert record(dm_state, "d1")["imported_era"] > first
    status = bmigrate(breqd, dm_state, "track", "status", "d1", "--json").stdout
    assert '"kind": "dm"' in status and '"state": "attached"' in status
    bmigrate(breqd, dm_state, "track", "detach", "d1")
    assert table(volume.name) == volume.original
    assert not exists(era_dev) and not exists("bmig-d1-origin")
    assert record(dm_state, "d1")["state"] == "detached"
    done = run(*bmig_dm_argv(breqd, dm_state, "--once", "d1"), check=False)
    assert done.returncode == 1 and "detached" in done.stderr


def test_errors_are_one_line_and_change_nothing(breqd, volume, dm_state, tmp_path):
    def refused(*args: str, text: str) -> None:
        done = bmigrate(breqd, dm_state, "track", "attach", "d1", *args, check=False)
        assert done.returncode != 0, done.stdout
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and text in lines[0], done.stderr
        assert table(volume.name) == volume.original
        assert not exists("bmig-d1-era") and not exists("bmig-d1-origin")

    refused("--dm", "/dev/mapper/no-such-device", text="no such device-mapper device")
    small = str(tmp_path / "small.img")
    with open(small, "wb") as f:
        f.truncate(1 * MiB)
    loop = run("losetup", "--find", "--show", small).stdout.strip()
    try:
        refused("--dm", volume.path, "--metadata", loop, text="too small")
    finally:
        run("losetup", "-d", loop)
    client = breqd.client()
    client.remove_device("d1") if "d1" in [d["name"] for d in client.list_devices()] else None
    client.close()
    bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", volume.path)
    attached = table(volume.name)
    done = bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", volume.path,
                    check=False)
    assert done.returncode != 0 and "already tracked" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
    done = bmigrate(breqd, dm_state, "track", "attach", "d2", "--dm", volume.path,
                    check=False)
    assert done.returncode != 0 and "already tracked" in done.stderr
    assert table(volume.name) == attached
    bmigrate(breqd, dm_state, "track", "detach", "d1")


@pytest.mark.timeout(300)
def test_attach_and_detach_under_fio_lose_no_write(breqd, volume, dm_state, tmp_path):
    """fio writes with verification the whole time; attach, an import and detach happen
    under it: no I/O error, and every block fio wrote reads back as written."""
    job = ["fio", "--name=w", f"--filename={volume.path}", "--rw=randwrite", "--bs=4k",
           "--direct=1", "--ioengine=psync", f"--size={SIZE // 4096 * 4096}",
           "--verify=crc32c", "--verify_fatal=1", "--do_verify=1", "--loops=3",
           "--randseed=7", "--verify_state_save=0", "--output-format=terse"]
    import subprocess

    fio = subprocess.Popen(job, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(2):
            bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", volume.path)
            import_once(breqd, dm_state)
            bmigrate(breqd, dm_state, "track", "detach", "d1")
        out, err = fio.communicate(timeout=240)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, out + err
    assert table(volume.name) == volume.original


def test_a_replaced_table_is_a_gap_and_every_chunk_becomes_dirty(breqd, volume, dm_state):
    """lvextend reloads the volume's table (larger) without knowing bmig's layer: writes
    bypass dm-era from then on. The next import finds the table replaced, sets every
    chunk dirty, says so in one line and stops; status shows the intercept lost."""
    bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", volume.path)
    clear(breqd, "d1")
    import_once(breqd, dm_state)
    clear(breqd, "d1")
    with open(volume.image, "r+b") as f:
        f.truncate(SIZE + 4 * MiB)
    run("losetup", "-c", volume.loop)
    grown = (SIZE + 4 * MiB) // 512
    run("dmsetup", "load", volume.name, "--table", f"0 {grown} linear {volume.loop} 0")
    run("dmsetup", "suspend", volume.name)
    run("dmsetup", "resume", volume.name)
    write_at(volume.path, 3 * CHUNK, os.urandom(4096))     # untracked
    done = run(*bmig_dm_argv(breqd, dm_state, "--once", "d1"), check=False)
    assert done.returncode == 1
    assert len(done.stderr.strip().splitlines()) == 1 and "replaced" in done.stderr
    assert len(dirty_chunks(breqd, "d1", SIZE)) == -(-SIZE // CHUNK)
    assert record(dm_state, "d1")["state"] == "lost"
    status = bmigrate(breqd, dm_state, "track", "status").stdout
    assert "(lost)" in status
    run("dmsetup", "remove", "bmig-d1-era")
    run("dmsetup", "remove", "bmig-d1-origin")


def lost_to_all_dirty(breqd, dm_state: str, volume: Volume) -> None:
    """A write after the gap; then the import sets every chunk dirty and says why."""
    write_at(volume.path, 7 * CHUNK, os.urandom(4096))
    done = run(*bmig_dm_argv(breqd, dm_state, "--once", "d1"), check=False)
    assert done.returncode == 1, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "era" in done.stderr
    assert len(dirty_chunks(breqd, "d1", SIZE)) == -(-SIZE // CHUNK)
    assert record(dm_state, "d1")["state"] == "lost"


def attached_some_eras_ago(breqd, dm_state: str, volume: Volume) -> int:
    """Attached, imported a few times, nothing dirty: the era imported last."""
    bmigrate(breqd, dm_state, "track", "attach", "d1", "--dm", volume.path)
    for _ in range(4):
        import_once(breqd, dm_state)
    clear(breqd, "d1")
    return record(dm_state, "d1")["imported_era"]


def test_a_record_ahead_of_dm_era_is_a_gap_and_every_chunk_becomes_dirty(breqd, volume,
                                                                         dm_state):
    """The record says eras were imported that dm-era has not reached (a record from
    another attach, or restored from a copy): era_invalidate from there would list
    nothing written since. The import sets every chunk dirty instead."""
    imported = attached_some_eras_ago(breqd, dm_state, volume)
    path = os.path.join(dm_state, "d1.json")
    with open(path) as f:
        raw = json.load(f)
    raw["imported_era"] = imported + 100
    with open(path, "w") as f:
        json.dump(raw, f)
    lost_to_all_dirty(breqd, dm_state, volume)
    bmigrate(breqd, dm_state, "track", "detach", "d1")


def test_dm_era_on_new_metadata_is_a_gap_and_every_chunk_becomes_dirty(breqd, volume,
                                                                      dm_state, tmp_path):
    """The era device's table reloaded onto a fresh metadata device: dm-era counts eras
    from 1 again, below the era imported last, and era_invalidate from that era would
    miss the writes made since. The import sets every chunk dirty instead."""
    imported = attached_some_eras_ago(breqd, dm_state, volume)
    fresh = str(tmp_path / "fresh.era-metadata")
    with open(fresh, "wb") as f:
        f.truncate(os.path.getsize(record(dm_state, "d1")["metadata_file"]))
    loop = run("losetup", "--find", "--show", fresh).stdout.strip()
    try:
        line = table("bmig-d1-era")[0].split()
        line[3] = loop                                      # era METADATA ORIGIN BLOCK
        run("dmsetup", "load", "bmig-d1-era", "--table", " ".join(line))
        run("dmsetup", "suspend", "bmig-d1-era")
        run("dmsetup", "resume", "bmig-d1-era")
        era_now = int(run("dmsetup", "status", "bmig-d1-era").stdout.split()[5])
        assert era_now <= imported
        lost_to_all_dirty(breqd, dm_state, volume)
        run("dmsetup", "load", volume.name, "--table", "\n".join(volume.original))
        run("dmsetup", "suspend", volume.name)
        run("dmsetup", "resume", volume.name)
        run("dmsetup", "remove", "bmig-d1-era")
        run("dmsetup", "remove", "bmig-d1-origin")
    finally:
        run("losetup", "-d", loop, check=False)
