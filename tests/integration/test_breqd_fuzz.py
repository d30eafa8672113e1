"""Fuzz one running breqd with random and nearly-valid frames (hypothesis).

Each example opens a fresh connection, optionally says HELLO, sends one to four frames
(random bytes, or well-formed messages with a field, a length or a range broken), closes
its sending side and reads until breqd closes. Whatever breqd answers must be valid
replies with known codes; afterwards breqd must still be running, free of internal
errors, and a client connected since the start and a new one must both be served.

Sizes in generated ADD_DEVICE requests stay small: a device of any size breqd accepts
costs its bitmap in memory and on disk, and that cost is not what this test is about.
BMIG_FUZZ_EXAMPLES (default 200) sets the number of examples; BMIG_FUZZ_RANDOM=1 draws
new examples on every run instead of the fixed, reproducible sequence.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bmig.errors import BY_WIRE_CODE, RequestError
from bmig.framing import LENGTH
from bmig.tracker.blocking_client import TrackerClient
from bmig.tracker.protocol import Op
from tests.daemon import Daemon, wait_until
from tests.integration.breqd_helpers import (HEAD, MiB, add_clean_device, breqd_daemon,
                                             client, raw_connect, read_until_closed, works)

EXAMPLES = int(os.environ.get("BMIG_FUZZ_EXAMPLES", "200"))
WITNESS = "witness"
FZ = "fz"
FZ_SIZE = 8 * MiB + 512          # a short last chunk
HEALTH_TIMEOUT = 10.0
SENT_CODES = set(BY_WIRE_CODE) - {"state-locked", "unreachable", "error"}


class Target:
    def __init__(self, daemon: Daemon, control: str):
        self.daemon = daemon
        self.control = control
        self.witness: TrackerClient | None = None
        self.log_seen = 0

    def new_log(self) -> str:
        text = self.daemon.log()
        new, self.log_seen = text[self.log_seen:], len(text)
        return new


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> Iterator[Target]:
    root = str(tmp_path_factory.mktemp("fuzz"))
    daemon = breqd_daemon(root)
    try:
        daemon.start()
        t = Target(daemon, os.path.join(root, "breqd.sock"))
        with client(t.control) as c:
            add_clean_device(c, WITNESS, 64 * MiB, 4096)
            c.add_device(FZ, FZ_SIZE, 4096)
        t.witness = client(t.control)
        yield t
        t.witness.close()
    finally:
        daemon.stop()


# -- strategies ----------------------------------------------------------------------

u64 = st.integers(0, 2**64 - 1)
edges = st.sampled_from([0, 1, 511, 4095, 4096, 4097, FZ_SIZE - 4096, FZ_SIZE - 1, FZ_SIZE,
                         FZ_SIZE + 1, 2**31, 2**32, 2**63 - 1, 2**63, 2**64 - 4096,
                         2**64 - 1])
offsets = edges | u64
ints = st.sampled_from([0, 1, -1, 4096, 65536, 2**31, 2**63, 2**64, -2**63, 2**70]) | st.integers()
small_sizes = st.integers(-10, 16 * MiB) | st.sampled_from([0, -1, 2**60 + 1, 2**64, 2**100])
names = (st.sampled_from([FZ, "fz2", "nope", "", ".x", "-x", "a/b", "x" * 65, "fz\0"])
         | st.text(max_size=12)).filter(lambda s: s != WITNESS)
not_ints = st.one_of(st.none(), st.booleans(), st.floats(), st.text(max_size=10),
                     st.lists(st.integers(), max_size=3),
                     st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
junk = ints | not_ints


# What each request needs, with valid-looking values (docs/control-protocol.md).
NEEDS = {
    Op.HELLO: {"version": st.sampled_from([1, 1, 2, 0, -1])},
    Op.MARK: {"device": st.just(FZ)},
    Op.MARK_COMPLETED: {"device": st.just(FZ)},
    Op.CHECKOUT: {"device": st.just(FZ), "max_bytes": st.sampled_from([1, 4096, 1 << 62])
                  | st.integers(-10, 1 << 30)},
    Op.COMMIT: {"device": st.just(FZ)},
    Op.ABORT: {"device": st.just(FZ)},
    Op.STATS: {"device": st.just(FZ) | names},
    Op.SET_ALL_DIRTY: {"device": st.just(FZ)},
    Op.CLEAR_ALL: {"device": st.just(FZ), "force": st.booleans()},
    Op.LIST: {},
    Op.ADD_DEVICE: {"name": st.sampled_from([FZ, "fz2"]) | names, "size": small_sizes,
                    "chunk_size": st.sampled_from([4096, 65536, 16 * MiB, 2048, 3000,
                                                   32 * MiB, 0, -4096])},
    Op.REMOVE_DEVICE: {"device": st.sampled_from([FZ, "fz2"]) | names},
}


@st.composite
def field_sets(draw, op: int) -> dict:
    """The fields ``op`` needs, then maybe one dropped or replaced, plus unknown ones."""
    needs = NEEDS.get(op, {})
    fields = {key: draw(strategy) for key, strategy in needs.items()}
    if fields and draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(sorted(fields)))
        if draw(st.booleans()):
            del fields[key]
        else:
            fields[key] = draw(not_ints if key == "size" else junk)
    if draw(st.integers(0, 3)) == 0:
        extra = draw(st.dictionaries(st.text(max_size=8), junk, max_size=3))
        fields = {**extra, **fields}
    return fields


REQUESTS = [int(op) for op in Op if op not in (Op.HELLO, Op.REPLY_OK, Op.REPLY_ERROR)]


@st.composite
def structured_body(draw) -> bytes:
    pick = draw(st.integers(0, 19))
    op = (draw(st.integers(0, 255)) if pick == 0 else
          draw(st.sampled_from([Op.HELLO, Op.REPLY_OK, Op.REPLY_ERROR])) if pick == 1 else
          draw(st.sampled_from(REQUESTS)))
    fields = draw(field_sets(op))
    doc = json.dumps(fields).encode()
    how = draw(st.sampled_from(["exact"] * 36 + ["truncated", "flipped", "not-object",
                                                 "empty"]))
    if how == "truncated" and doc:
        doc = doc[:draw(st.integers(0, len(doc) - 1))]
    elif how == "flipped" and doc:
        i = draw(st.integers(0, len(doc) - 1))
        doc = doc[:i] + bytes([draw(st.integers(0, 255))]) + doc[i + 1:]
    elif how == "not-object":
        doc = json.dumps(draw(junk)).encode()
    elif how == "empty":
        doc = b""
    json_len = len(doc)
    if draw(st.integers(0, 19)) == 0:
        json_len = max(0, json_len + draw(st.integers(-20, 20)))
    if draw(st.integers(0, 39)) == 0:
        json_len = draw(st.integers(0, 2**32 - 1))
    ranges = draw(st.lists(st.tuples(offsets, offsets), max_size=12))
    if draw(st.booleans()):   # ranges inside the device
        ranges = draw(st.lists(st.tuples(st.integers(0, FZ_SIZE - 1),
                                         st.integers(1, 1 << 20)).filter(
                                             lambda r: r[0] + r[1] <= FZ_SIZE),
                               min_size=1, max_size=12))
    tail = draw(st.binary(max_size=20)) if draw(st.integers(0, 19)) == 0 else b""
    flags = draw(st.integers(0, 255)) if draw(st.booleans()) else 0
    reserved = draw(st.integers(0, 65535)) if draw(st.booleans()) else 0
    return (HEAD.pack(op, flags, reserved, json_len, draw(u64)) + doc
            + b"".join(struct.pack("<QQ", o, n) for o, n in ranges) + tail)


@st.composite
def wire_frame(draw) -> bytes:
    data = draw(structured_body()) if draw(st.integers(0, 9)) else draw(st.binary(max_size=300))
    how = draw(st.sampled_from(["exact"] * 36 + ["short-length", "long-length", "cut",
                                                  "huge-length"]))
    if how == "short-length":
        return LENGTH.pack(max(0, len(data) - draw(st.integers(1, 20)))) + data
    if how == "long-length":
        return LENGTH.pack(len(data) + draw(st.integers(1, 20))) + data
    if how == "cut":
        whole = LENGTH.pack(len(data)) + data
        return whole[:draw(st.integers(0, len(whole)))]
    if how == "huge-length":
        return LENGTH.pack(draw(st.integers(4 * MiB + 1, 2**32 - 1))) + data
    return LENGTH.pack(len(data)) + data


HELLO = LENGTH.pack(29) + HEAD.pack(Op.HELLO, 0, 0, 13, 1) + b'{"version":1}'


# -- the test ------------------------------------------------------------------------

def healthy(t: Target) -> None:
    assert t.daemon.proc.poll() is None, f"breqd died:\n{t.daemon.log()[-5000:]}"
    assert t.witness is not None
    works(t.witness, WITNESS)
    with TrackerClient(t.control, timeout=HEALTH_TIMEOUT) as c:
        assert c.stats(WITNESS)["name"] == WITNESS
    log = t.new_log()
    assert "Traceback" not in log and "internal error" not in log, log[-5000:]


def ensure_fz(t: Target) -> None:
    """Put back the fuzzed device if an example removed it (examples may add it again)."""
    assert t.witness is not None
    if any(d["name"] == FZ for d in t.witness.list_devices()):
        return

    def added() -> bool:
        try:
            t.witness.add_device(FZ, FZ_SIZE, 4096)
        except RequestError as exc:   # still being closed after the removal
            assert exc.wire_code == "refused", exc
            return False
        return True

    wait_until(added, timeout=HEALTH_TIMEOUT, what=f"{FZ} to be added again")


@settings(max_examples=EXAMPLES, deadline=None,
          derandomize=os.environ.get("BMIG_FUZZ_RANDOM") != "1",
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(say_hello=st.sampled_from([True, True, True, False]),
       frames=st.lists(wire_frame(), min_size=1, max_size=6))
def test_random_frames_never_hurt_breqd(target, say_hello, frames):
    ensure_fz(target)
    s = raw_connect(target.control, timeout=HEALTH_TIMEOUT)
    try:
        try:
            s.sendall((HELLO if say_hello else b"") + b"".join(frames))
            s.shutdown(socket.SHUT_WR)
        except (BrokenPipeError, ConnectionResetError):
            pass   # breqd already closed on an earlier frame
        replies = read_until_closed(s)   # breqd closes within the timeout
    finally:
        s.close()
    for reply in replies:
        assert reply.op in (Op.REPLY_OK, Op.REPLY_ERROR), reply
        assert not reply.ranges or reply.op == Op.REPLY_OK, reply
        if reply.op == Op.REPLY_ERROR:
            assert reply.fields.get("code") in SENT_CODES, reply
            assert isinstance(reply.fields.get("message"), str), reply
    healthy(target)
