"""send_all: every byte of several buffers goes out, in order, however little each
sendmsg or writev takes, and nothing is joined on the way."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from bmig.vectored import send_all


class Stingy:
    """A ``send`` that takes at most ``most`` bytes per call, and records what it got."""

    def __init__(self, most: int):
        self.most = most
        self.out = bytearray()
        self.calls: list[list[int]] = []

    def __call__(self, views: list[memoryview]) -> int:
        self.calls.append([len(v) for v in views])
        left = self.most
        for view in views:
            n = min(left, len(view))
            self.out += view[:n]
            left -= n
            if not left:
                break
        return self.most - left


@pytest.mark.parametrize("most", [1, 3, 7, 4096, 1 << 20])
def test_every_byte_goes_out_in_order_however_little_each_call_takes(most):
    parts = [b"head", bytearray(b"x" * 10), memoryview(b"payload" * 100), b"", b"tail"]
    send = Stingy(most)
    send_all(send, parts)
    assert bytes(send.out) == b"".join(bytes(p) for p in parts)
    assert all(n > 0 for call in send.calls for n in call)     # empty parts are skipped


def test_a_call_that_stops_inside_a_buffer_goes_on_from_there():
    send = Stingy(5)
    send_all(send, [b"abc", b"defghij"])
    # abc + de, then fghij: the second call starts at "f", not again at "d".
    assert send.calls == [[3, 7], [5]]
    assert bytes(send.out) == b"abcdefghij"


def test_nothing_to_send_makes_no_call():
    send = Stingy(1)
    send_all(send, [b"", bytearray()])
    assert send.calls == []


def test_through_a_real_socket_and_a_real_pipe():
    payload = os.urandom(3 << 20)                 # more than the socket buffer holds
    ours, theirs = socket.socketpair()
    got = bytearray()

    def read() -> None:
        while chunk := theirs.recv(1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=read)
    reader.start()
    with ours, theirs:
        send_all(ours.sendmsg, [b"HDR:", payload])
        ours.shutdown(socket.SHUT_WR)
        reader.join(timeout=30)
    assert not reader.is_alive() and bytes(got) == b"HDR:" + payload

    r, w = os.pipe()
    got.clear()

    def drain() -> None:
        while chunk := os.read(r, 1 << 16):
            got.extend(chunk)

    reader = threading.Thread(target=drain)
    reader.start()
    send_all(lambda views: os.writev(w, views), [b"HDR:", payload])
    os.close(w)
    reader.join(timeout=30)
    os.close(r)
    assert not reader.is_alive() and bytes(got) == b"HDR:" + payload
