"""bmig.identity: what a target record binds to (invariant 9), without a daemon.

Files are identified on the test's own file system; block devices by stable ids read
from a sysfs tree the test builds (the real ones are exercised with loop devices in
tests/integration/test_sync_target_identity.py).
"""

from __future__ import annotations

import json
import os

import pytest

from bmig.errors import StateError
from bmig.identity import TargetIdentity, identify, stable_block_id
from bmig.lineage import TargetRecord, load_target, save_target, target_path


def identity_of(path) -> TargetIdentity:
    fd = os.open(path, os.O_RDONLY)
    try:
        return identify(fd)
    finally:
        os.close(fd)


@pytest.fixture
def image(tmp_path):
    path = tmp_path / "t.img"
    path.write_bytes(os.urandom(8192))
    return path


def test_the_same_file_matches_itself_also_after_writes_in_place(image):
    before = identity_of(image)
    with open(image, "r+b") as f:
        f.write(b"changed in place")
    assert before.mismatch(identity_of(image)) is None
    os.link(image, str(image) + ".link")           # another name, the same inode
    assert before.mismatch(identity_of(str(image) + ".link")) is None


def test_a_file_that_is_gone_replaced_truncated_or_grown_does_not_match(image):
    before = identity_of(image)
    assert before.mismatch(None) == "it no longer exists"
    other = image.parent / "other.img"
    other.write_bytes(os.urandom(8192))
    os.rename(other, image)
    assert "another file" in before.mismatch(identity_of(image))
    now = identity_of(image)
    os.truncate(image, 4096)
    assert now.mismatch(identity_of(image)) == "it shrank from 8192 to 4096 bytes"
    os.truncate(image, 16384)
    assert "grew from 8192 to 16384" in now.mismatch(identity_of(image))


def test_an_inode_number_used_again_does_not_match():
    """A file deleted and created again may get the same inode number; the inode
    generation tells them apart where the file system keeps one."""
    before = TargetIdentity("file", 8192, dev=64768, ino=12, inode_generation=1111)
    again = TargetIdentity("file", 8192, dev=64768, ino=12, inode_generation=2222)
    assert "number was used again" in before.mismatch(again)
    unknown = TargetIdentity("file", 8192, dev=64768, ino=12, inode_generation=None)
    assert before.mismatch(unknown) is not None                 # cannot tell: not same


def test_block_devices_match_by_stable_id_when_there_is_one_else_by_number():
    lv = TargetIdentity("block", 1 << 30, rdev="253:3", stable_id="dm-uuid:LVM-abc")
    renumbered = TargetIdentity("block", 1 << 30, rdev="253:7", stable_id="dm-uuid:LVM-abc")
    assert lv.mismatch(renumbered) is None                      # after a reboot
    recreated = TargetIdentity("block", 1 << 30, rdev="253:3", stable_id="dm-uuid:LVM-xyz")
    assert "another device" in lv.mismatch(recreated)           # lvremove + lvcreate
    bare = TargetIdentity("block", 1 << 30, rdev="43:0")
    assert bare.mismatch(TargetIdentity("block", 1 << 30, rdev="43:0")) is None
    assert "another device" in bare.mismatch(TargetIdentity("block", 1 << 30, rdev="43:1"))
    assert "grew" in bare.mismatch(TargetIdentity("block", 2 << 30, rdev="43:0"))
    file = TargetIdentity("file", 1 << 30, dev=1, ino=2)
    assert bare.mismatch(file) == "it was a block device and is a file now"


def make_sysfs(root, entries: dict[str, str]) -> str:
    """A sysfs tree: ``devices/...`` files, and ``dev/block/MAJ:MIN`` symlinks to the
    directories that have a ``dev`` file."""
    for rel, text in entries.items():
        path = os.path.join(root, "devices", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    links = os.path.join(root, "dev", "block")
    os.makedirs(links)
    for rel, text in entries.items():
        if os.path.basename(rel) == "dev":
            os.symlink(os.path.join(root, "devices", os.path.dirname(rel)),
                       os.path.join(links, text))
    return links


def test_stable_ids_from_sysfs(tmp_path):
    sysfs = make_sysfs(str(tmp_path), {
        "virtual/block/dm-3/dev": "253:3", "virtual/block/dm-3/dm/uuid": "LVM-abcdef",
        "virtual/block/dm-4/dev": "253:4", "virtual/block/dm-4/dm/uuid": "",
        "pci/block/sda/dev": "8:0", "pci/block/sda/device/wwid": "naa.5000c500a1b2c3d4",
        "pci/block/sda/sda2/dev": "8:2", "pci/block/sda/sda2/partition": "2",
        "pci/block/sda/sda2/start": "2048",
        "pci/block/vda/dev": "254:0", "pci/block/vda/serial": "disk-7",
        "pci/block/nvme0n2/dev": "259:1", "pci/block/nvme0n2/device/serial": "S4EW",
        "pci/block/nvme0n2/nsid": "2",
        "virtual/block/nbd0/dev": "43:0",
    })
    assert stable_block_id(253, 3, sysfs=sysfs) == "dm-uuid:LVM-abcdef"
    assert stable_block_id(253, 4, sysfs=sysfs) == ""           # dm without a uuid
    assert stable_block_id(8, 0, sysfs=sysfs) == "wwid:naa.5000c500a1b2c3d4"
    assert stable_block_id(8, 2, sysfs=sysfs) == "wwid:naa.5000c500a1b2c3d4/part2@2048"
    assert stable_block_id(254, 0, sysfs=sysfs) == "serial:disk-7"
    assert stable_block_id(259, 1, sysfs=sysfs) == "serial:S4EW/ns2"
    assert stable_block_id(43, 0, sysfs=sysfs) == ""            # nbd: nothing stable
    assert stable_block_id(1, 99, sysfs=sysfs) == ""            # no such device


def test_identity_round_trips_through_json_and_bad_ones_are_refused(image):
    for identity in (identity_of(image),
                     TargetIdentity("block", 4096, rdev="7:0", stable_id="loop:1:2@0+0")):
        assert TargetIdentity.from_json(json.loads(json.dumps(identity.to_json()))) == \
            identity
    for bad in ([], {"kind": "tape", "size": 1}, {"kind": "file", "size": -1, "dev": 1,
                                                  "ino": 1},
                {"kind": "file", "size": 1, "dev": "1", "ino": 1},
                {"kind": "block", "size": 1, "rdev": 7}):
        with pytest.raises(ValueError):
            TargetIdentity.from_json(bad)


def test_the_target_record_keeps_its_identity_and_a_damaged_one_is_not_guessed_at(
        tmp_path, image):
    record = TargetRecord("t", 9, 7, "consistent", identity=identity_of(image))
    save_target(str(tmp_path), record)
    loaded = load_target(str(tmp_path), "t")
    assert loaded.identity == record.identity
    assert loaded.not_bound_to(identity_of(image)) is None
    assert TargetRecord("t", 9, 7, "consistent").not_bound_to(identity_of(image)) == \
        "its record does not say which file or device it describes"
    path = target_path(str(tmp_path), "t")
    with open(path) as f:
        raw = json.load(f)
    raw["identity"] = {"kind": "file", "size": "big"}
    with open(path, "w") as f:
        json.dump(raw, f)
    with pytest.raises(StateError, match="damaged"):
        load_target(str(tmp_path), "t")
