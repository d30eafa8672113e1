import pytest
from hypothesis import given, strategies as st

from bmig.errors import ProtocolError
from bmig.limits import MAX_CONTROL_JSON, MAX_RANGES_PER_FRAME
from bmig.tracker.protocol import Message, Op, decode

u64 = st.integers(0, 2**64 - 1)


@given(st.sampled_from(list(Op)), u64,
       st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
       st.lists(st.tuples(u64, u64), max_size=20))
def test_round_trip(op, request_id, fields, ranges):
    msg = decode(Message(op, request_id, fields, ranges).encode())
    assert (msg.op, msg.request_id, msg.fields, list(msg.ranges)) == (op, request_id, fields, ranges)


@given(st.binary(max_size=200))
def test_decode_never_fails_with_anything_but_protocol_error(body):
    try:
        decode(body)
    except ProtocolError:
        pass


def _body(op=Op.MARK, json_len=2, doc=b"{}", tail=b""):
    import struct
    return struct.pack("<BBHIQ", op, 0, 0, json_len, 1) + doc + tail


@pytest.mark.parametrize("body,why", [
    (b"\x02" * 5, "shorter than its header"),
    (_body(op=0x55), "unknown message type"),
    (_body(json_len=100), "does not fit"),
    (_body(json_len=MAX_CONTROL_JSON + 1), "does not fit"),
    (_body(tail=b"x" * 15), "not a multiple of 16"),
    (_body(doc=b"[]"), "JSON object"),
    (_body(doc=b"\xff\xfe"), "not valid JSON"),
])
def test_malformed_bodies_say_what_is_wrong(body, why):
    with pytest.raises(ProtocolError, match=why):
        decode(body)


def test_encode_refuses_too_many_ranges():
    with pytest.raises(ProtocolError):
        Message(Op.MARK, 1, {}, [(0, 1)] * (MAX_RANGES_PER_FRAME + 1)).encode()


def test_decoded_ranges_behave_as_a_sequence_of_pairs():
    ranges = [(0, 4096), (1 << 40, 65536), ((1 << 64) - 2, 1)]
    got = decode(Message(Op.MARK, 7, {"device": "d"}, ranges).encode()).ranges
    assert len(got) == 3 and got[1] == ranges[1] and got[-1] == ranges[-1]
    assert list(got) == ranges and got == ranges and got[1:] == ranges[1:]
    with pytest.raises(IndexError):
        got[3]
