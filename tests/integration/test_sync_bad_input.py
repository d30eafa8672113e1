"""breceive against bad input and bad conditions: clear errors, nothing acknowledged that
was not written, and the daemon keeps serving.

Raw frames are built with bmig.wire's own packers and sent by a hand-driven sender
(tests/integration/wire_helpers.py: sealed after authentication, like the real one), so
each test can send what a well-behaved sender never would.
"""

from __future__ import annotations

import json
import os
import struct

import pytest
import zstandard

from bmig.wire import codec
from bmig.limits import MAX_FRAME
from bmig.wire.protocol import (DATA_HEAD, Message, T, decode_json, pack_data, pack_seq,
                                pack_zero, type_of, unpack_seq)
from bmig.wire.seal import TAG_BYTES
from tests.integration.sync_helpers import (CHUNK, MiB, make_image, receivers,  # noqa: F401
                                            same_bytes, start_receiver, sync, track,
                                            write_secret)
from tests.integration.wire_helpers import SECRET, HandSender


Raw = HandSender


@pytest.fixture
def receiver(tmp_path, receivers):
    target = str(tmp_path / "tgt.img")
    write_secret(str(tmp_path / "secret"), SECRET.decode())
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    return r


def authenticated(receiver) -> Raw:
    return Raw(receiver.port).authenticate()


def error_of(body: bytes | Message) -> dict:
    message = body if isinstance(body, Message) else decode_json(body)
    assert message.type == T.ERROR, message
    return message.fields


def still_serving(receiver, tmp_path) -> None:
    """A well-behaved session works after the abuse."""
    raw = authenticated(receiver)
    assert raw.open("d", MiB).type == T.OPENED
    raw.close()


@pytest.mark.parametrize("first", [
    b"\x00" * 12,                                      # not a message type
    Message(T.OPEN, {"export": "d"}).encode(),         # OPEN before HELLO
    pack_data(codec.RAW, 0, 4, 1, 0, codec.checksum(b"abcd")) + b"abcd",   # data at once
    Message(T.HELLO, {"version": "x"}).encode(),       # bad field
])
def test_a_peer_that_does_not_say_hello_properly_is_dropped(receiver, tmp_path, first):
    raw = Raw(receiver.port)
    raw.send_body(first)
    assert raw.closed()
    still_serving(receiver, tmp_path)


def test_a_frame_above_the_preauth_cap_is_refused_before_it_is_read(receiver, tmp_path):
    raw = Raw(receiver.port)
    raw.send_raw(struct.pack("<I", 1 << 30))          # a 1 GiB frame: never allocated
    assert raw.closed()
    still_serving(receiver, tmp_path)


def test_an_unauthenticated_peer_gets_nothing_past_auth(receiver, tmp_path):
    raw = Raw(receiver.port)
    raw.handshake(secret=b"not the secret at all, sorry!!")
    assert error_of(raw.read())["code"] == "auth-failed"
    assert raw.closed()
    # And data without AUTH is never parsed: the peer is dropped.
    raw = Raw(receiver.port)
    raw.hello()
    raw.send(Message(T.OPEN, {"export": "d"}))
    assert error_of(raw.read())["code"] == "auth-failed"
    assert raw.closed()
    still_serving(receiver, tmp_path)


def test_an_unconfigured_export_is_refused(receiver, tmp_path):
    raw = authenticated(receiver)
    fields = error_of(raw.open("etc-passwd", MiB))
    assert fields["code"] == "unknown-export" and not fields["fatal"]
    raw.close()
    assert not os.path.exists(tmp_path / "etc-passwd")


def test_bad_chunks_are_refused_one_by_one_and_nothing_of_them_is_written(receiver, tmp_path):
    raw = authenticated(receiver)
    assert raw.open("d", MiB).type == T.OPENED
    raw.send(Message(T.PASS_BEGIN, {}))
    good = os.urandom(4096)
    bad = [
        pack_data(codec.RAW, 0, 4096, 1, 0, codec.checksum(good) ^ 1) + good,   # checksum
        pack_data(codec.ZSTD, 0, 4096, 2, 4096, codec.checksum(good)) + b"junk" * 10,
        pack_data(codec.RAW, 0, 4096, 3, MiB - 100, codec.checksum(good)) + good,  # past end
        pack_data(9, 0, 4096, 4, 8192, codec.checksum(good)) + good,            # codec 9
        pack_data(codec.RAW, 0, 4096, 5, 12288, codec.checksum(good)) + good[:100],  # short
        pack_data(codec.ZSTD, 0, 4096, 6, 16384, codec.checksum(good))
        + zstandard.ZstdCompressor().compress(bytes(1 << 20)),                  # a bomb
        pack_zero(7, MiB - 10, 4096),                                           # past end
    ]
    for body in bad:
        raw.send_body(body)
    raw.send_body(pack_data(codec.RAW, 0, 4096, 8, 20480, codec.checksum(good)) + good)
    raw.send_body(pack_seq(T.FLUSH, 8))
    errors = {}
    while True:
        body = raw.read()
        if type_of(body) == T.DURABLE:
            assert unpack_seq(body) == 8
            break
        fields = error_of(body)
        assert not fields["fatal"], fields
        errors[fields["seq"]] = fields
    assert sorted(errors) == [1, 2, 3, 4, 5, 6, 7]
    assert errors[1]["code"] == "checksum"
    with open(tmp_path / "tgt.img", "rb") as f:
        data = f.read()
    assert data[20480:24576] == good                       # the good one landed
    assert data[:20480] == bytes(20480)                    # none of the bad ones did
    raw.close()
    still_serving(receiver, tmp_path)


def test_a_frame_above_the_cap_ends_the_session(receiver, tmp_path):
    raw = authenticated(receiver)
    assert raw.open("d", MiB).type == T.OPENED
    raw.send_raw(struct.pack("<I", MAX_FRAME + TAG_BYTES + 1)
                 + DATA_HEAD.pack(T.DATA, 0, 0, 1, 1, 0, 0))
    assert raw.closed()
    still_serving(receiver, tmp_path)


def test_data_outside_a_pass_ends_the_session(receiver, tmp_path):
    raw = authenticated(receiver)
    assert raw.open("d", MiB).type == T.OPENED
    raw.send_body(pack_data(codec.RAW, 0, 4, 1, 0, codec.checksum(b"abcd")) + b"abcd")
    assert error_of(raw.read())["fatal"]
    assert raw.closed()


def test_a_second_session_on_a_busy_target_is_refused(receiver, tmp_path):
    first = authenticated(receiver)
    assert first.open("d", MiB).type == T.OPENED
    second = authenticated(receiver)
    assert error_of(second.open("d", MiB))["code"] == "busy"
    first.close()
    second.close()


def test_another_lineage_is_refused_unless_discarding_is_allowed(breqd, tmp_path, receivers):
    source = make_image(str(tmp_path / "src.img"), 4 * MiB, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    # Another device already lives on the target.
    raw = authenticated_with(r)
    assert raw.open("d", 4 * MiB, generation=1, device_id=2).type == T.OPENED
    raw.send(Message(T.PASS_BEGIN, {}))
    raw.send(Message(T.PASS_END, {}))
    assert decode_json(raw.read()).type == T.PASS_DONE
    raw.close()
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file]
    refused = sync(breqd, *args, check=False)
    assert refused.returncode == 9, refused.stderr
    assert "--discard-target-data d" in refused.stderr
    refused = sync(breqd, *args, "--discard-target-data", "d", check=False)
    assert refused.returncode == 9 and "allow_discard" in refused.stderr
    r.daemon.stop()
    receivers.remove(r)
    r = start_receiver(tmp_path, {"d": target}, "--allow-discard")
    receivers.append(r)
    sync(breqd, "d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file,
         "--discard-target-data", "d")
    assert same_bytes(source, target)


def authenticated_with(r) -> Raw:
    with open(r.secret_file, "rb") as f:
        return Raw(r.port).authenticate(f.read().strip())


def test_a_full_target_is_a_clear_error_and_nothing_unwritten_is_committed(breqd, tmp_path,
                                                                            receivers, mounts):
    small = mounts.tmpfs(str(tmp_path / "small"), "6m")
    source = make_image(str(tmp_path / "src.img"), 16 * MiB, "random")
    target = os.path.join(small, "tgt.img")
    with open(target, "wb") as f:        # sparse, larger than its file system: breceive
        f.truncate(16 * MiB)             # would not grow it so far itself (max_size)
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    done = sync(breqd, "d", "--source", source, "--to", r.url("d"), "--secret-file",
                r.secret_file, "--window", "4M", check=False)
    assert done.returncode == 11, done.stderr
    assert "No space left" in done.stderr and "Traceback" not in done.stderr
    # Every chunk breqd no longer has dirty was really written to the target.
    client = breqd.client()
    runs, _ = client.query("d", 0, 16 * MiB)
    dirty = {c for o, n in runs for c in range(o // CHUNK, (o + n - 1) // CHUNK + 1)}
    assert len(dirty) < 256                               # some of it did get there
    with open(source, "rb") as a, open(target, "rb") as b:
        for chunk in range(256):
            want = a.read(CHUNK)
            got = b.read(CHUNK)
            if chunk not in dirty:
                assert got == want, chunk
    assert r.daemon.proc.poll() is None
    assert json.loads(json.dumps(r.record("d")))["state"] == "inconsistent"
