"""A promoted target (a primary) and the sessions around it (DESIGN.md, invariant 7).

- A source that meets a primary is told so and pointed to fail-back, never offered to
  discard it; ``--discard-target-data`` against a primary is refused unless the receiver
  allows exactly that (``allow_discard_primary``; ``allow_discard`` is not enough).
- A replication session ends when the lineage of its target changes under it: a
  PROMOTE by the pass session beside it, or another lineage's data taking the target
  over (a discard). No write of the old lineage lands after the change, also when the
  session is idle at the time.
"""

from __future__ import annotations

import os

from bmig.wire import codec
from bmig.wire.protocol import Message, T, decode_json, pack_data, pack_seq, type_of
from tests.integration.sync_helpers import (MiB, error_lines, make_image,  # noqa: F401
                                            receivers, same_bytes, start_receiver,
                                            summary_of, sync, track)
from tests.integration.test_sync_bad_input import Raw, authenticated_with, error_of

SIZE = 4 * MiB


def opened(raw: Raw, lineage: tuple[str, str], mode: str = "pass",
           **fields) -> Message:
    device_id, generation = lineage
    raw.send(Message(T.OPEN, {"export": "d", "device_id": device_id,
                              "generation": generation, "size": SIZE, "mode": mode,
                              **fields}))
    return decode_json(raw.read())


def pass_then_promote(r, lineage: tuple[str, str], new: str = "00000000000000ee") -> dict:
    """A complete (empty) pass of ``lineage``, then PROMOTE: the target is primary."""
    raw = authenticated_with(r)
    assert opened(raw, lineage).type == T.OPENED
    raw.send(Message(T.PASS_BEGIN, {}))
    raw.send(Message(T.PASS_END, {}))
    assert decode_json(raw.read()).type == T.PASS_DONE
    raw.send(Message(T.PROMOTE, {"generation": new}))
    reply = decode_json(raw.read())
    assert reply.type == T.PROMOTED, reply
    raw.close()
    return reply.fields["target"]


def lineage_of(breqd, name: str = "d") -> tuple[str, str]:
    stats = breqd.client().stats(name)
    return stats["device_id"], stats["generation"]


# -- item: a primary is never offered for discarding ---------------------------------------

def test_a_source_that_meets_a_primary_is_pointed_to_fail_back(breqd, tmp_path, receivers):
    source = make_image(str(tmp_path / "src.img"), SIZE, "random")
    target = str(tmp_path / "tgt.img")
    track(breqd, "d", source)
    r = start_receiver(tmp_path, {"d": target}, "--allow-discard")
    receivers.append(r)
    pass_then_promote(r, lineage_of(breqd))
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file]

    refused = sync(breqd, *args, check=False)
    assert refused.returncode == 9, refused.stderr
    (line,) = error_lines(refused.stderr)
    assert "is the primary" in line and "--adopt" in line and "fail back" in line, line
    assert "discard" not in refused.stderr

    # allow_discard is not enough for a primary.
    refused = sync(breqd, *args, "--discard-target-data", "d", check=False)
    assert refused.returncode == 9, refused.stderr
    (line,) = error_lines(refused.stderr)
    assert "allow_discard_primary" in line, line
    assert r.record("d")["role"] == "primary"
    assert not same_bytes(source, target)

    r.daemon.stop()
    receivers.remove(r)
    config = tmp_path / "breceive.toml"
    config.write_text(f'[targets.d]\npath = "{target}"\nallow_discard_primary = true\n')
    r = start_receiver(tmp_path, {}, "--config", str(config))
    receivers.append(r)
    args = ["d", "--source", source, "--to", r.url("d"), "--secret-file", r.secret_file]
    refused = sync(breqd, *args, check=False)            # asked to discard, or nothing
    assert refused.returncode == 9 and "discard" not in refused.stderr, refused.stderr
    done = sync(breqd, *args, "--discard-target-data", "d", "--json")
    assert summary_of(done)["relation"] == "new"
    assert same_bytes(source, target)
    record = r.record("d")
    assert record["role"] == "secondary" and record["generation"] == lineage_of(breqd)[1]


# -- item: replication sessions end when their lineage changes ------------------------------

A = ("00000000000000aa", "00000000000000a1")
B = ("00000000000000bb", "00000000000000b1")


def send_data(raw: Raw, seq: int, offset: int, data: bytes) -> None:
    raw.send_body(pack_data(codec.RAW, 0, len(data), seq, offset, codec.checksum(data)) + data)


def replicating(r, lineage: tuple[str, str], **fields) -> Raw:
    """A replication session opened with OPEN's ``fields`` besides the lineage."""
    raw = authenticated_with(r)
    reply = opened(raw, lineage, mode="replicate", **fields)
    assert reply.type == T.OPENED, reply
    return raw


def durable(raw: Raw, seq: int) -> None:
    raw.send_body(pack_seq(T.FLUSH, seq))
    body = raw.read()
    assert type_of(body) == T.DURABLE, decode_json(body)


def refused_and_closed(raw: Raw, what: str) -> None:
    fields = error_of(raw.read())
    assert fields["code"] == "lineage" and fields["fatal"], fields
    assert what in fields["message"], fields
    assert raw.closed()


def read_at(path: str, offset: int, n: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(offset)
        return f.read(n)


def test_a_replication_session_ends_when_the_target_is_promoted(tmp_path, receivers):
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    writer = replicating(r, A)
    before = os.urandom(4096)
    send_data(writer, 1, 0, before)
    durable(writer, 1)
    pass_then_promote(r, A)           # the pass session beside it promotes the target
    send_data(writer, 2, 8192, os.urandom(4096))
    refused_and_closed(writer, "is the primary now")
    assert read_at(target, 0, 4096) == before
    assert read_at(target, 8192, 4096) == bytes(4096)       # nothing of it landed
    assert r.daemon.proc.poll() is None


def test_an_idle_replication_session_ends_too(tmp_path, receivers):
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    idle = replicating(r, A)
    pass_then_promote(r, A)
    # It says nothing, and still hears of it (within about a second; the read waits up
    # to the socket's timeout).
    refused_and_closed(idle, "is the primary now")


def test_a_replication_session_ends_when_another_lineage_takes_the_target_over(
        tmp_path, receivers):
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target}, "--allow-discard")
    receivers.append(r)
    raw = authenticated_with(r)                     # lineage A holds the target
    assert opened(raw, A).type == T.OPENED
    raw.send(Message(T.PASS_BEGIN, {}))
    raw.send(Message(T.PASS_END, {}))
    assert decode_json(raw.read()).type == T.PASS_DONE
    raw.close()
    writer = replicating(r, A)
    send_data(writer, 1, 0, os.urandom(4096))
    durable(writer, 1)
    other = authenticated_with(r)                   # B discards A's data
    reply = opened(other, B, discard_target_data=True)
    assert reply.type == T.OPENED and reply.fields["relation"] == "new", reply
    other.send(Message(T.PASS_BEGIN, {}))
    mine = os.urandom(4096)
    send_data(other, 1, 8192, mine)
    durable(other, 1)
    send_data(writer, 2, 8192, os.urandom(4096))    # A's next write must not land
    refused_and_closed(writer, "holds another lineage now")
    assert read_at(target, 8192, 4096) == mine
    other.send(Message(T.PASS_END, {}))
    assert decode_json(other.read()).type == T.PASS_DONE
    other.close()
    assert r.record("d")["source_device_id"] == B[0]
