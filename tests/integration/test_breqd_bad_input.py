"""Bad input on breqd's control socket: the right reply, the right fate for the connection.

Broken framing or a malformed message (docs/control-protocol.md, Errors) is answered with
REPLY_ERROR `protocol` or `frame-too-large` and the connection is closed; a well-formed
request that cannot be honoured is answered with its own code and the connection goes
on. In every case other clients, connected before or after, keep working.
"""

from __future__ import annotations

import socket
import struct

import pytest

from bmig.constants import CONTROL_PROTOCOL_VERSION
from bmig.errors import RequestError
from bmig.framing import LENGTH
from bmig.limits import MAX_CONTROL_FRAME, MAX_CONTROL_JSON, MAX_RANGES_PER_FRAME
from bmig.tracker.protocol import Op
from tests.daemon import wait_until
from tests.integration.breqd_helpers import (MiB, add_clean_device, assert_closed,
                                             assert_error, bmigrate, body, client,
                                             fd_count, fresh_client_works, frame, hello,
                                             one_line_error, raw_connect, read_until_closed,
                                             receive, request, send, works)

DEVICE = "d1"
SIZE = 64 * MiB
CHUNK = 4096


@pytest.fixture
def setup(breqd):
    """breqd with one clean device and a witness client connected before the abuse."""
    with client(breqd.control) as c:
        add_clean_device(c, DEVICE, SIZE, CHUNK)
    witness = client(breqd.control)
    works(witness, DEVICE)
    yield breqd, witness
    witness.close()


def still_fine(breqd, witness, offset: int = 8192) -> None:
    """The witness (connected before) and a new client both mark and read stats."""
    assert breqd.daemon.proc.poll() is None, breqd.daemon.log()
    works(witness, DEVICE, offset)
    fresh_client_works(breqd.control, DEVICE, offset + 4096)


# -- framing -------------------------------------------------------------------------

@pytest.mark.parametrize("length", [MAX_CONTROL_FRAME + 1, 0xFFFFFFFF])
@pytest.mark.parametrize("after_hello", [False, True], ids=["before-hello", "after-hello"])
def test_oversized_frame_length_is_refused_and_the_connection_closed(setup, length,
                                                                      after_hello):
    breqd, witness = setup
    s = raw_connect(breqd.control)
    if after_hello:
        hello(s)
    s.sendall(LENGTH.pack(length))   # breqd must answer without waiting for the body
    reply = receive(s)
    assert_error(reply, "frame-too-large", request_id=0)
    assert str(length) in reply.fields["message"]
    assert_closed(s)
    s.close()
    still_fine(breqd, witness)


def test_a_frame_of_exactly_the_cap_is_read(setup):
    """The cap is inclusive: a MAX_CONTROL_FRAME body is decoded (and found malformed)."""
    breqd, witness = setup
    s = raw_connect(breqd.control)
    hello(s)
    send(s, body(Op.STATS, 3, doc=b"{}", tail=b"\0" * (MAX_CONTROL_FRAME - 18)))
    assert_error(receive(s), "protocol", request_id=0)   # range block not a multiple of 16
    assert_closed(s)
    s.close()
    still_fine(breqd, witness)


def _device_doc(**extra) -> dict:
    return {"device": DEVICE, **extra}


# (id, HELLO first?, body, request id of the reply, words of the message)
MALFORMED = [
    ("empty-body", True, b"", 0, "shorter than its header"),
    ("short-header", True, b"\x07\0\0\0\0", 0, "shorter than its header"),
    ("short-header-before-hello", False, b"\x01" * 15, 0, "shorter than its header"),
    ("bad-json", True, body(Op.STATS, 4, doc=b'{"device": '), 0, "not valid JSON"),
    ("bad-utf8", True, body(Op.STATS, 4, doc=b'{"device": "\xff\xfe"}'), 0, "not valid JSON"),
    ("json-list", True, body(Op.STATS, 4, doc=b"[]"), 0, "JSON object"),
    ("json-number", True, body(Op.STATS, 4, doc=b"42"), 0, "JSON object"),
    ("json-string", True, body(Op.STATS, 4, doc=b'"d1"'), 0, "JSON object"),
    ("json-null", True, body(Op.STATS, 4, doc=b"null"), 0, "JSON object"),
    ("huge-integer", True, body(Op.CHECKOUT, 4, doc=b'{"device":"d1","max_bytes":1'
                                + b"0" * 5000 + b"}"), 0, "not valid JSON"),
    ("ranges-15", True, body(Op.MARK, 4, _device_doc(), tail=b"\0" * 15), 0,
     "not a multiple of 16"),
    ("ranges-17", True, body(Op.MARK, 4, _device_doc(), [(0, 4096)], tail=b"\0"), 0,
     "not a multiple of 16"),
    ("too-many-ranges", True,
     body(Op.MARK, 4, _device_doc(), [(0, 4096)] * (MAX_RANGES_PER_FRAME + 1)), 0,
     "too many ranges"),
    ("json-len-past-end", True, body(Op.STATS, 4, doc=b"{}", json_len=100), 0, "does not fit"),
    ("json-len-over-cap", True,
     body(Op.STATS, 4, doc=b"{}", json_len=MAX_CONTROL_JSON + 1), 0, "does not fit"),
    ("unknown-type-0", True, body(0, 4, {}), 0, "unknown message type"),
    ("unknown-type-99", True, body(99, 4, _device_doc()), 0, "unknown message type"),
    ("unknown-type-before-hello", False, body(99, 4, {}), 0, "unknown message type"),
    ("reply-ok-as-request", True, body(Op.REPLY_OK, 4, {}), 4, "not a request"),
    ("reply-error-as-request", True, body(Op.REPLY_ERROR, 4, {"code": "x"}), 4,
     "not a request"),
    ("request-before-hello", False, body(Op.STATS, 9, _device_doc()), 9, "expected HELLO"),
    ("mark-before-hello", False, body(Op.MARK, 9, _device_doc(), [(0, 4096)]), 9,
     "expected HELLO"),
    ("hello-version-0", False, body(Op.HELLO, 9, {"version": 0}), 9, "not supported"),
    ("hello-version-negative", False, body(Op.HELLO, 9, {"version": -1}), 9, "not supported"),
    ("hello-version-string", False, body(Op.HELLO, 9, {"version": "1"}), 9, "version"),
    ("hello-version-bool", False, body(Op.HELLO, 9, {"version": True}), 9, "version"),
    ("hello-version-float", False, body(Op.HELLO, 9, {"version": 1.0}), 9, "version"),
    ("hello-without-version", False, body(Op.HELLO, 9, {}), 9, "version"),
    ("second-hello", True, body(Op.HELLO, 9, {"version": 1}), 9, "not a request"),
    ("device-missing", True, body(Op.MARK, 9, {}, [(0, 4096)]), 9, "device"),
    ("device-number", True, body(Op.STATS, 9, {"device": 5}), 9, "device"),
    ("device-empty", True, body(Op.STATS, 9, {"device": ""}), 9, "device"),
    ("max-bytes-string", True, body(Op.CHECKOUT, 9, _device_doc(max_bytes="10")), 9,
     "max_bytes"),
    ("max-bytes-bool", True, body(Op.CHECKOUT, 9, _device_doc(max_bytes=True)), 9,
     "max_bytes"),
    ("max-bytes-float", True, body(Op.CHECKOUT, 9, _device_doc(max_bytes=1e9)), 9,
     "max_bytes"),
    ("force-string", True, body(Op.CLEAR_ALL, 9, _device_doc(force="yes")), 9, "force"),
    ("add-size-string", True, body(Op.ADD_DEVICE, 9, {"name": "x", "size": "1G"}), 9, "size"),
]


@pytest.mark.parametrize("after_hello,data,request_id,words",
                         [case[1:] for case in MALFORMED], ids=[case[0] for case in MALFORMED])
def test_malformed_message_gets_a_protocol_error_and_the_connection_closed(
        setup, after_hello, data, request_id, words):
    breqd, witness = setup
    s = raw_connect(breqd.control)
    if after_hello:
        hello(s)
    send(s, data)
    reply = receive(s)
    assert_error(reply, "protocol", request_id=request_id)
    assert words in reply.fields["message"], reply
    assert_closed(s)
    s.close()
    still_fine(breqd, witness)
    assert "Traceback" not in breqd.daemon.log()


def test_deeply_nested_json_gets_a_protocol_error(setup):
    breqd, witness = setup
    s = raw_connect(breqd.control)
    hello(s)
    send(s, body(Op.STATS, 4, doc=b"[" * 100_000 + b"]" * 100_000))
    s.shutdown(socket.SHUT_WR)
    replies = read_until_closed(s)
    s.close()
    still_fine(breqd, witness)
    assert "Traceback" not in breqd.daemon.log()
    assert len(replies) == 1
    assert_error(replies[0], "protocol", request_id=0)


def test_a_protocol_error_gives_back_the_connections_checkouts(setup):
    breqd, witness = setup
    witness.mark(DEVICE, [(1 * MiB, 64 * 1024)])
    before = witness.stats(DEVICE)
    s = raw_connect(breqd.control)
    hello(s)
    reply = request(s, Op.CHECKOUT, 2, {"device": DEVICE, "max_bytes": 1 << 40})
    assert reply.op == Op.REPLY_OK and reply.ranges
    assert witness.stats(DEVICE)["inflight_bytes"] == before["dirty_bytes"]
    send(s, b"\0" * 3)
    assert_error(receive(s), "protocol", request_id=0)
    assert_closed(s)
    s.close()
    wait_until(lambda: witness.stats(DEVICE)["inflight_bytes"] == 0, timeout=10,
               what="the checkouts to be aborted")
    assert witness.stats(DEVICE)["dirty_bytes"] == before["dirty_bytes"]
    still_fine(breqd, witness)


# -- connections that end inside a frame ---------------------------------------------

CUTS = [
    ("inside-length-before-hello", False, b"\x1d\0"),
    ("inside-hello", False, frame(body(Op.HELLO, 1, {"version": 1}))[:20]),
    ("inside-length", True, b"\x30"),
    ("inside-header", True, LENGTH.pack(48) + b"\x02\0\0\0"),
    ("inside-fields", True, frame(body(Op.MARK, 2, {"device": DEVICE}, [(0, 4096)]))[:28]),
    ("inside-ranges", True, frame(body(Op.MARK, 2, {"device": DEVICE}, [(0, 4096)]))[:-8]),
    ("announced-4MiB-sent-1", True, LENGTH.pack(MAX_CONTROL_FRAME) + b"\x02"),
]


@pytest.mark.parametrize("after_hello,data", [c[1:] for c in CUTS], ids=[c[0] for c in CUTS])
@pytest.mark.parametrize("how", ["close", "half-close"])
def test_a_frame_cut_off_half_way(setup, after_hello, data, how):
    breqd, witness = setup
    s = raw_connect(breqd.control)
    if after_hello:
        hello(s)
    s.sendall(data)
    if how == "close":
        s.close()
    else:  # breqd sees the end inside a frame and says so before it closes
        s.shutdown(socket.SHUT_WR)
        replies = read_until_closed(s)
        s.close()
        assert len(replies) == 1, replies
        assert_error(replies[0], "protocol", request_id=0)
        assert "closed inside a frame" in replies[0].fields["message"]
    still_fine(breqd, witness)
    assert "Traceback" not in breqd.daemon.log()


def test_a_clean_close_between_frames_is_not_an_error(setup):
    breqd, witness = setup
    s = raw_connect(breqd.control)
    hello(s)
    s.shutdown(socket.SHUT_WR)
    assert read_until_closed(s) == []
    s.close()
    still_fine(breqd, witness)


# -- requests that are refused: same connection goes on -------------------------------

REFUSED = [
    # (op, fields, ranges, code)
    (Op.STATS, {"device": "nope"}, [], "unknown-device"),
    (Op.MARK, {"device": "nope"}, [(0, 4096)], "unknown-device"),
    (Op.CHECKOUT, {"device": "nope", "max_bytes": 4096}, [], "unknown-device"),
    (Op.REMOVE_DEVICE, {"device": "nope"}, [], "unknown-device"),
    (Op.MARK, {"device": DEVICE}, [(SIZE, 4096)], "bad-range"),
    (Op.MARK, {"device": DEVICE}, [(SIZE - 4096, 8192)], "bad-range"),
    (Op.MARK, {"device": DEVICE}, [(2**64 - 4096, 8192)], "bad-range"),
    (Op.MARK, {"device": DEVICE}, [(2**64 - 1, 2**64 - 1)], "bad-range"),
    (Op.MARK, {"device": DEVICE}, [(0, 0)], "bad-range"),
    (Op.MARK_COMPLETED, {"device": DEVICE}, [(4096, 0)], "bad-range"),
    (Op.MARK, {"device": DEVICE}, [], "refused"),
    (Op.COMMIT, {"device": DEVICE}, [(0, 4096)], "not-checked-out"),
    (Op.ABORT, {"device": DEVICE}, [(0, 4096)], "not-checked-out"),
    (Op.COMMIT, {"device": DEVICE}, [(SIZE, 1)], "bad-range"),
    (Op.COMMIT, {"device": DEVICE}, [], "refused"),
    (Op.CHECKOUT, {"device": DEVICE, "max_bytes": 0}, [], "refused"),
    (Op.CHECKOUT, {"device": DEVICE, "max_bytes": -4096}, [], "refused"),
    (Op.CLEAR_ALL, {"device": DEVICE}, [], "refused"),
    (Op.CLEAR_ALL, {"device": DEVICE, "force": False}, [], "refused"),
    (Op.ADD_DEVICE, {"name": DEVICE, "size": SIZE}, [], "device-exists"),
    (Op.ADD_DEVICE, {"name": "../etc", "size": SIZE}, [], "config"),
    (Op.ADD_DEVICE, {"name": ".hidden", "size": SIZE}, [], "config"),
    (Op.ADD_DEVICE, {"name": "x" * 65, "size": SIZE}, [], "config"),
    (Op.ADD_DEVICE, {"name": "new", "size": 0}, [], "config"),
    (Op.ADD_DEVICE, {"name": "new", "size": 2**60 + 1}, [], "config"),
    (Op.ADD_DEVICE, {"name": "new", "size": SIZE, "chunk_size": 3000}, [], "config"),
    (Op.ADD_DEVICE, {"name": "new", "size": SIZE, "chunk_size": 2048}, [], "config"),
    (Op.ADD_DEVICE, {"name": "new", "size": SIZE, "chunk_size": 32 * MiB}, [], "config"),
]


def test_refused_requests_get_their_code_and_the_connection_goes_on(setup):
    """Every refusal is answered under its own request id, pipelined on one connection,
    and leaves the state as it was; a good request after each is answered too."""
    breqd, witness = setup
    witness.mark(DEVICE, [(0, 4096), (2 * MiB, 64 * 1024)])
    before = witness.stats(DEVICE)
    s = raw_connect(breqd.control)
    hello(s)
    expected = {}
    for n, (op, fields, ranges, code) in enumerate(REFUSED):
        bad, good = 100 + 2 * n, 101 + 2 * n
        send(s, body(op, bad, fields, ranges))
        send(s, body(Op.STATS, good, {"device": DEVICE}))
        expected[bad] = code
        expected[good] = None
    replies = {}
    for _ in expected:
        reply = receive(s)
        assert reply.request_id not in replies
        replies[reply.request_id] = reply
    for rid, code in expected.items():
        if code is None:
            assert replies[rid].op == Op.REPLY_OK and replies[rid].fields["name"] == DEVICE
        else:
            assert_error(replies[rid], code, request_id=rid)
    after = request(s, Op.STATS, 1000, {"device": DEVICE}).fields
    for key in ("dirty_bytes", "inflight_bytes", "size", "chunk_size", "device_id"):
        assert after[key] == before[key], key
    reply = request(s, Op.MARK, 1001, {"device": DEVICE}, [(4 * MiB, 4096)])
    assert reply.op == Op.REPLY_OK
    names = [d["name"] for d in request(s, Op.LIST, 1002).fields["devices"]]
    assert names == [DEVICE]
    s.close()
    still_fine(breqd, witness)
    assert "Traceback" not in breqd.daemon.log()


def test_a_request_with_one_bad_range_changes_nothing(setup):
    breqd, witness = setup
    before = witness.stats(DEVICE)["dirty_bytes"]
    s = raw_connect(breqd.control)
    hello(s)
    reply = request(s, Op.MARK, 2, {"device": DEVICE}, [(8 * MiB, 4096), (SIZE, 4096)])
    assert_error(reply, "bad-range", request_id=2)
    assert witness.stats(DEVICE)["dirty_bytes"] == before
    # Commit of two runs, one held and one not: refused whole, the held one stays held.
    witness.mark(DEVICE, [(16 * MiB, 4096)])
    runs = request(s, Op.CHECKOUT, 3, {"device": DEVICE, "max_bytes": 1 << 40}).ranges
    held = witness.stats(DEVICE)["inflight_bytes"]
    assert held > 0
    reply = request(s, Op.COMMIT, 4, {"device": DEVICE}, [runs[0], (SIZE - 4096, 4096)])
    assert_error(reply, "not-checked-out", request_id=4)
    assert witness.stats(DEVICE)["inflight_bytes"] == held
    reply = request(s, Op.COMMIT, 5, {"device": DEVICE}, runs)
    assert reply.op == Op.REPLY_OK
    assert witness.stats(DEVICE)["inflight_bytes"] == 0
    s.close()
    still_fine(breqd, witness)


def test_commit_on_another_connection_than_the_checkout_is_refused(setup):
    breqd, witness = setup
    witness.mark(DEVICE, [(0, 4096)])
    with client(breqd.control) as sender:
        runs = sender.checkout(DEVICE, 4096)
        assert runs == [(0, 4096)]
        with pytest.raises(RequestError) as refused:
            witness.commit(DEVICE, runs)
        assert refused.value.wire_code == "not-checked-out"
        sender.commit(DEVICE, runs)
    still_fine(breqd, witness)


def test_clear_all_without_force_is_refused(setup):
    breqd, witness = setup
    witness.mark(DEVICE, [(0, 4096)])
    before = witness.stats(DEVICE)["dirty_bytes"]
    with pytest.raises(RequestError) as refused:
        witness.clear_all(DEVICE)
    assert refused.value.wire_code == "refused" and "force" in refused.value.message
    assert witness.stats(DEVICE)["dirty_bytes"] == before
    result = bmigrate(breqd.control, "track", "clear", DEVICE)
    assert result.returncode == 5, result
    assert "force" in one_line_error(result)
    assert witness.stats(DEVICE)["dirty_bytes"] == before
    still_fine(breqd, witness)


# -- many connections ----------------------------------------------------------------

def _drop_kind(k: int) -> bytes | None:
    """What the k-th dropped connection sends before it goes (None: HELLO first)."""
    return [b"", b"\x10", LENGTH.pack(200) + b"x" * 50, None,
            frame(body(Op.HELLO, 1, {"version": 1}))[:9],
            LENGTH.pack(MAX_CONTROL_FRAME + 1), b"\xff" * 64][k % 7]


def test_a_thousand_connections_opened_and_dropped(setup):
    breqd, witness = setup
    pid = breqd.daemon.pid
    baseline = fd_count(pid)
    for batch in range(10):   # a hundred open at a time
        sockets = []
        for k in range(100):
            s = raw_connect(breqd.control)
            sockets.append(s)
            data = _drop_kind(batch * 100 + k)
            if data is None:
                hello(s)
                s.sendall(frame(body(Op.MARK, 2, {"device": DEVICE}, [(0, 4096)]))[:30])
            else:
                s.sendall(data)
        for s in sockets:
            s.close()
        works(witness, DEVICE, batch * 4096)
    still_fine(breqd, witness)
    wait_until(lambda: fd_count(pid) <= baseline, timeout=20,
               what=f"breqd's descriptors to fall back to {baseline}")
    assert "Traceback" not in breqd.daemon.log()


def test_a_client_that_never_reads_stalls_only_itself(setup):
    """Requests without reading replies: breqd stops reading that connection when its
    output backs up (bounded memory) and serves everyone else."""
    breqd, witness = setup
    s = raw_connect(breqd.control)
    hello(s)
    s.setblocking(False)
    stats = frame(body(Op.STATS, 7, {"device": DEVICE}))
    sent = 0
    pending = b""
    while sent < 64 * MiB:
        if not pending:
            pending = stats * 256
        try:
            n = s.send(pending)
        except BlockingIOError:
            break   # both socket buffers are full: breqd has stopped reading us
        pending = pending[n:]
        sent += n
    assert sent < 64 * MiB, "breqd kept reading requests whose replies nobody reads"
    still_fine(breqd, witness)
    s.close()
    still_fine(breqd, witness, offset=3 * MiB)
    assert "Traceback" not in breqd.daemon.log()


def test_pipelined_requests_are_all_answered(setup):
    breqd, witness = setup
    s = raw_connect(breqd.control)
    hello(s)
    n = 2000
    s.sendall(b"".join(frame(body(Op.MARK, rid, {"device": DEVICE},
                                  [((rid * 4096) % SIZE, 4096)]))
                       for rid in range(10, 10 + n)))
    seen = set()
    for _ in range(n):
        reply = receive(s)
        assert reply.op == Op.REPLY_OK, reply
        seen.add(reply.request_id)
    assert seen == set(range(10, 10 + n))
    s.close()
    still_fine(breqd, witness)


def test_ranges_per_message_at_the_limit_are_accepted(setup):
    breqd, witness = setup
    ranges = [(k * 1024, 512) for k in range(MAX_RANGES_PER_FRAME)]
    witness.mark(DEVICE, ranges)
    assert witness.stats(DEVICE)["dirty_bytes"] >= MAX_RANGES_PER_FRAME * 1024 // 4
    still_fine(breqd, witness)


def test_unknown_fields_flags_and_reserved_bits_are_ignored(setup):
    breqd, witness = setup
    s = raw_connect(breqd.control)
    send(s, body(Op.HELLO, 1, {"version": 99, "client": "future 9", "extra": [1, 2]},
                 flags=0xff, reserved=0xffff))
    reply = receive(s)
    assert reply.op == Op.REPLY_OK and reply.fields["version"] == CONTROL_PROTOCOL_VERSION
    reply = request(s, Op.STATS, 2, {"device": DEVICE, "whatever": {"a": 1}})
    assert reply.op == Op.REPLY_OK
    s.close()
    still_fine(breqd, witness)


def test_length_prefix_is_little_endian(setup):
    """A big-endian length (a classic client bug) is a huge frame: refused, not awaited."""
    breqd, witness = setup
    s = raw_connect(breqd.control)
    data = body(Op.HELLO, 1, {"version": 1})
    s.sendall(struct.pack(">I", len(data)) + data)
    assert_error(receive(s), "frame-too-large", request_id=0)
    assert_closed(s)
    s.close()
    still_fine(breqd, witness)


def test_a_checkout_reply_carries_at_most_the_run_limit(breqd):
    """A fragmented bitmap: one CHECKOUT hands out 65536 runs (one frame), the next the
    rest; committing them all in one message works."""
    runs_wanted = MAX_RANGES_PER_FRAME + 1000
    with client(breqd.control) as c:
        add_clean_device(c, "frag", 2 * runs_wanted * CHUNK, CHUNK)
        every_other = [(2 * k * CHUNK, CHUNK) for k in range(runs_wanted)]
        for lo in range(0, runs_wanted, MAX_RANGES_PER_FRAME):
            c.mark("frag", every_other[lo:lo + MAX_RANGES_PER_FRAME])
        first = c.checkout("frag", 1 << 62)
        assert len(first) == MAX_RANGES_PER_FRAME
        second = c.checkout("frag", 1 << 62)
        assert len(second) == 1000
        assert sorted(first + second) == every_other
        c.commit("frag", first)
        c.commit("frag", second)
        s = c.stats("frag")
        assert s["dirty_bytes"] == 0 and s["inflight_bytes"] == 0


def test_one_mark_of_many_whole_device_ranges_does_not_stall_breqd(breqd):
    size = 1 << 40
    with client(breqd.control) as c:
        c.add_device("big", size, CHUNK)
    s = raw_connect(breqd.control, timeout=5)
    answered = False
    try:
        hello(s)
        send(s, body(Op.MARK, 2, {"device": "big"}, [(0, size)] * MAX_RANGES_PER_FRAME))
        send(s, body(Op.STATS, 3, {"device": "big"}))
        replies = {receive(s).request_id, receive(s).request_id}   # 5 s each at most
        answered = True
        assert replies == {2, 3}
        fresh_client_works(breqd.control, "big")
    finally:
        s.close()
        if not answered:   # breqd is still busy and would not even hear SIGTERM
            breqd.daemon.kill9()
