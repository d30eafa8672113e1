"""A copy is named by what it is (DESIGN.md, invariant 9), through the real programs.

A target's record binds to the file or device it describes: a target deleted, truncated,
replaced by another file or grown behind breceive's back is never "same"; the next
``bmigrate sync`` ships everything again, and both sides say why. breceive creates or
extends a file only for a "new" relation, never beyond the target's cap, and syncs the
directory after creating one. A block device in use (mounted, or opened exclusively by
another program) is refused; the sessions of one export share the claim.
"""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import threading

import pytest

from bmig.lineage import hex_id
from bmig.receiver import target as target_module
from bmig.receiver.policy import Policy, TargetConfig
from bmig.receiver.session import Session
from bmig.wire import handshake
from bmig.wire.channel import Channel
from bmig.wire.protocol import Message, T, decode_json
from bmig.wire.transports import SocketStream
from tests.integration.sync_helpers import (CHUNK, MiB, digest, make_image,  # noqa: F401
                                            receivers, same_bytes, start_receiver,
                                            summary_of, sync, track)
from tests.integration.test_sync_bad_input import authenticated_with, error_of

SIZE = 4 * MiB


def log_of(r) -> str:
    with open(r.daemon.log_path) as f:
        return f.read()


@pytest.fixture
def synced(breqd, tmp_path, receivers):
    """A source, synced once to tgt.img through a real breceive (relation "new", then
    "same"); (source, target, receiver, sync arguments)."""
    source = make_image(str(tmp_path / "src.img"), SIZE, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file,
            "--threshold", "0", "--json"]
    assert summary_of(sync(breqd, *args))["relation"] == "new"
    again = summary_of(sync(breqd, *args))
    assert again["relation"] == "same" and again["passes"] == 0
    assert same_bytes(source, target)
    return source, target, r, args


def delete(target: str) -> None:
    os.unlink(target)


def truncate(target: str) -> None:
    os.truncate(target, SIZE // 2)


def grow(target: str) -> None:
    with open(target, "ab") as f:
        f.write(os.urandom(CHUNK))


def replace(target: str) -> None:
    """Another file of the same size renamed over it (another inode, other bytes)."""
    make_image(target + ".new", SIZE, "random", seed=99)
    os.rename(target + ".new", target)


def recreate(target: str) -> None:
    """Deleted and created again at the same size: the file system may hand out the
    same inode number again (ext4 does), but not the same inode generation."""
    os.unlink(target)
    make_image(target, SIZE, "zeros")


@pytest.mark.parametrize("change", [delete, truncate, grow, replace, recreate],
                         ids=lambda f: f.__name__)
def test_a_target_changed_behind_breceives_back_is_never_same(breqd, synced, change):
    source, target, r, args = synced
    change(target)
    done = sync(breqd, *args)
    summary = summary_of(done)
    assert summary["relation"] == "new", summary
    assert summary["converged"] and summary["dirty_bytes"] == 0
    assert summary["bytes_committed"] == SIZE           # everything, again
    assert same_bytes(source, target)
    # Both sides say why.
    notes = [json.loads(line) for line in done.stdout.splitlines()]
    why = [n for n in notes if n.get("event") == "note" and n.get("why")]
    assert len(why) == 1 and "not the copy its record describes" in why[0]["message"], notes
    assert "not the copy its record describes" in log_of(r)
    # The record is bound to the target as it is now, and the next sync is "same" again.
    record = r.record("d")
    st = os.stat(target)
    assert record["identity"]["kind"] == "file"
    assert (record["identity"]["dev"], record["identity"]["ino"]) == (st.st_dev, st.st_ino)
    assert record["identity"]["size"] == st.st_size
    again = summary_of(sync(breqd, *args))
    assert again["relation"] == "same" and again["passes"] == 0


def test_a_record_without_an_identity_is_not_trusted(breqd, synced):
    """A record that does not say which target it describes (an older breceive wrote
    it) proves nothing: everything is shipped again, once."""
    source, target, r, args = synced
    path = os.path.join(r.state_dir, "d.target")
    with open(path) as f:
        record = json.load(f)
    del record["identity"]
    with open(path, "w") as f:
        json.dump(record, f)
    assert summary_of(sync(breqd, *args))["relation"] == "new"
    assert summary_of(sync(breqd, *args))["relation"] == "same"


def test_checksum_mode_compares_a_replaced_target_instead_of_trusting_it(breqd, synced):
    """--checksum after a replacement: every chunk is compared, only those that differ
    travel."""
    source, target, r, args = synced
    with open(target, "rb") as f:
        copy = f.read()
    with open(target + ".new", "wb") as f:              # the same bytes, another file,
        f.write(copy[:SIZE - CHUNK] + os.urandom(CHUNK))  # the last chunk different
    os.rename(target + ".new", target)
    summary = summary_of(sync(breqd, *args, "--checksum"))
    assert summary["relation"] == "new"
    assert summary["bytes_same"] == SIZE - CHUNK and summary["bytes_committed"] == SIZE
    assert summary["bytes_sent"] <= CHUNK + 4096
    assert same_bytes(source, target)


# -- never created or grown unless new, never beyond the cap ------------------------------

def open_raw(r, size: int, generation: int = 7, device_id: int = 9, **fields) -> Message:
    raw = authenticated_with(r)
    raw.send(Message(T.OPEN, {"export": "d", "device_id": hex_id(device_id),
                              "generation": hex_id(generation), "size": size, **fields}))
    reply = decode_json(raw.read())
    raw.close()
    return reply


def one_pass(r, size: int, generation: int = 7, device_id: int = 9) -> None:
    raw = authenticated_with(r)
    raw.send(Message(T.OPEN, {"export": "d", "device_id": hex_id(device_id),
                              "generation": hex_id(generation), "size": size}))
    assert decode_json(raw.read()).type == T.OPENED
    raw.send(Message(T.PASS_BEGIN, {}))
    raw.send(Message(T.PASS_END, {}))
    assert decode_json(raw.read()).type == T.PASS_DONE
    raw.close()


def test_a_same_target_is_never_extended(tmp_path, receivers):
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    one_pass(r, MiB)
    assert os.path.getsize(target) == MiB
    # The same lineage, declaring a larger device: the copy is not made to look like one.
    error = error_of(open_raw(r, 2 * MiB))
    assert error["code"] == "target-io" and f"has {MiB} bytes" in error["message"], error
    assert os.path.getsize(target) == MiB
    assert r.record("d")["state"] == "consistent"


def test_an_absurd_size_does_not_grow_a_file_beyond_its_cap(tmp_path, receivers):
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    error = error_of(open_raw(r, 1 << 43))              # 8 TiB, on a file system of less
    assert error["code"] == "target-io" and "size of its file system" in error["message"]
    assert not os.path.exists(target)
    with open(target, "wb") as f:
        f.truncate(MiB)
    error = error_of(open_raw(r, 1 << 43))
    assert error["code"] == "target-io"
    assert os.path.getsize(target) == MiB
    assert open_raw(r, 2 * MiB).type == T.OPENED        # a sensible size is fine
    assert os.path.getsize(target) == 2 * MiB


def test_max_size_caps_a_file_target(tmp_path, receivers):
    target = str(tmp_path / "tgt.img")
    config = tmp_path / "breceive.toml"
    config.write_text(f'[targets.d]\npath = "{target}"\nmax_size = "3M"\n')
    r = start_receiver(tmp_path, {}, "--config", str(config))
    receivers.append(r)
    error = error_of(open_raw(r, 4 * MiB))
    assert error["code"] == "target-io" and "max_size" in error["message"], error
    assert not os.path.exists(target)
    assert open_raw(r, 3 * MiB).type == T.OPENED
    assert os.path.getsize(target) == 3 * MiB


def test_a_created_target_is_in_its_directory_durably(tmp_path, monkeypatch):
    """After creating a file target, breceive fsyncs the file and its directory before
    it answers OPENED."""
    directory = tmp_path / "targets"
    directory.mkdir()
    synced_dirs: list[str] = []
    real_fsync = os.fsync

    def observed_fsync(fd):
        real_fsync(fd)
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            synced_dirs.append(os.readlink(f"/proc/self/fd/{fd}"))

    monkeypatch.setattr(target_module.os, "fsync", observed_fsync)
    secret = b"an in-process secret, 32 bytes!!"
    target = str(directory / "t.img")
    a, b = socket.socketpair()
    policy = Policy({"t": TargetConfig("t", target)}, str(tmp_path), secret)
    receiver = Session(Channel(SocketStream(a, "sender")), policy, False, "test")
    server = threading.Thread(target=receiver.run)
    server.start()
    sender = Channel(SocketStream(b, "receiver"))
    try:
        handshake.sender(sender, secret, receiver_verified=False)   # sealed from here
        sender.send(Message(T.OPEN, {"export": "t", "device_id": "00000000000000aa",
                                     "generation": "00000000000000bb",
                                     "size": MiB}).encode())
        assert decode_json(sender.read()).type == T.OPENED
        assert synced_dirs == [str(directory)]
        assert os.path.getsize(target) == MiB
    finally:
        sender.close()
        server.join(timeout=30)
    assert not server.is_alive()


# -- block devices ---------------------------------------------------------------------

def losetup(mounts, image: str, *device: str) -> str:
    done = subprocess.run(["losetup", "--show", *(device or ("--find",)), image],
                          capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        pytest.skip(f"cannot set up a loop device: {done.stderr.strip()}")
    loop = done.stdout.strip()
    mounts.loops.append(loop)                   # detached at teardown
    return loop


def test_a_mounted_block_device_is_refused(breqd, tmp_path, receivers, mounts):
    mounts.ext4_loop(str(tmp_path / "mnt"), str(tmp_path / "fs.img"), 8)
    device = mounts.loops[-1]
    source = make_image(str(tmp_path / "src.img"), 8 * MiB, "random")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": device})
    receivers.append(r)
    done = sync(breqd, "d", "--source", source, "--to", r.url("d"), "--secret-file",
                r.secret_file, check=False)
    assert done.returncode == 17, done.stderr             # busy
    assert "in use" in done.stderr and device in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    assert not os.path.exists(os.path.join(r.state_dir, "d.target"))
    assert os.path.ismount(str(tmp_path / "mnt"))


def test_a_block_device_opened_exclusively_elsewhere_is_refused_until_it_is_free(
        breqd, tmp_path, receivers, mounts):
    source = make_image(str(tmp_path / "src.img"), 4 * MiB, "random")
    device = losetup(mounts, make_image(str(tmp_path / "disk.img"), 4 * MiB, "zeros"))
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": device})
    receivers.append(r)
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file,
            "--threshold", "0", "--json"]
    holder = os.open(device, os.O_RDONLY | os.O_EXCL)   # another program claims it
    try:
        done = sync(breqd, *args, check=False)
    finally:
        os.close(holder)
    assert done.returncode == 17 and "in use" in done.stderr, done.stderr
    summary = summary_of(sync(breqd, *args))
    assert summary["relation"] == "new" and summary["converged"]
    assert digest(device, 4 * MiB) == digest(source)
    identity = r.record("d")["identity"]
    assert identity["kind"] == "block" and identity["size"] == 4 * MiB
    assert identity["stable_id"].startswith("loop:"), identity


def test_the_replication_and_pass_sessions_of_a_block_device_share_its_claim(
        breqd, tmp_path, receivers, mounts):
    """bmig-nbd's replication session holds the device; the sync beside it is not
    refused for that (its own claim), but a program from outside still is."""
    source = make_image(str(tmp_path / "src.img"), 4 * MiB, "random")
    device = losetup(mounts, make_image(str(tmp_path / "disk.img"), 4 * MiB, "zeros"))
    track(breqd, "d", source)
    stats = breqd.client().stats("d")
    r = start_receiver(tmp_path, {"d": device})
    receivers.append(r)
    replica = authenticated_with(r)
    replica.send(Message(T.OPEN, {"export": "d", "device_id": stats["device_id"],
                                  "generation": stats["generation"], "size": 4 * MiB,
                                  "mode": "replicate"}))
    assert decode_json(replica.read()).type == T.OPENED
    with pytest.raises(OSError):                       # the replication session claims it
        os.close(os.open(device, os.O_RDONLY | os.O_EXCL))
    summary = summary_of(sync(breqd, "d", "--source", source, "--to", r.url("d"),
                              "--secret-file", r.secret_file, "--threshold", "0", "--json"))
    assert summary["relation"] == "new" and summary["converged"]
    assert digest(device, 4 * MiB) == digest(source)
    replica.close()


def test_a_loop_device_bound_to_another_file_is_never_same(breqd, tmp_path, receivers,
                                                           mounts):
    """The same /dev/loopN (major:minor), the same size, another backing file: what a
    renumbered /dev/sdX or a replaced logical volume looks like."""
    source = make_image(str(tmp_path / "src.img"), 4 * MiB, "random")
    first = make_image(str(tmp_path / "disk1.img"), 4 * MiB, "zeros")
    device = losetup(mounts, first)
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": device})
    receivers.append(r)
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file,
            "--threshold", "0", "--json"]
    assert summary_of(sync(breqd, *args))["relation"] == "new"
    assert summary_of(sync(breqd, *args))["relation"] == "same"
    subprocess.run(["losetup", "--detach", device], check=True, timeout=60)
    mounts.loops.remove(device)
    second = make_image(str(tmp_path / "disk2.img"), 4 * MiB, "zeros")
    done = subprocess.run(["losetup", device, second], capture_output=True, text=True,
                          timeout=60)
    if done.returncode != 0:
        pytest.skip(f"{device} was taken meanwhile: {done.stderr.strip()}")
    mounts.loops.append(device)
    summary = summary_of(sync(breqd, *args))
    assert summary["relation"] == "new" and summary["bytes_committed"] == 4 * MiB
    assert digest(second) == digest(source)
    assert "another device" in log_of(r)
