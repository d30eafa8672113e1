"""A receiver's resync offer is input from a peer (invariant 8): OPEN's ``resync`` (a
rejoining copy's own changes) and the RESYNC pages that follow are type-checked, capped
(bmig.limits.MAX_RESYNC_RANGES) and every range is checked against the device's size
before breqd hears of it. A hostile offer ends bmigrate sync with one error line (exit
7, no traceback) and nothing is fetched beyond what was offered.

The receiver here is a scripted one: the real handshake and sealed frames
(bmig.wire.handshake, Channel), then the answers a test chooses.
"""

from __future__ import annotations

import socket
import threading
from typing import Any

import pytest

from bmig.limits import MAX_RESYNC_RANGES
from bmig.wire import handshake
from bmig.wire.channel import Channel
from bmig.wire.protocol import Message, T, decode_json
from bmig.wire.transports import SocketStream
from tests.integration.sync_helpers import (CHUNK, MiB, error_lines, make_image, sync,
                                            track, write_secret)
from tests.integration.wire_helpers import SECRET

SIZE = 4 * MiB
EXIT_PROTOCOL = 7


class ScriptedReceiver:
    """One session on 127.0.0.1: the handshake, OPENED with ``offer`` as its resync,
    then each RESYNC_REQ answered with the next of ``pages``; the session ends at any
    other message (PASS_BEGIN) or when the pages run out. ``asked`` collects the starts
    the sender asked for."""

    def __init__(self, offer: Any, pages: list[dict]):
        self.offer, self.pages = offer, list(pages)
        self.asked: list[Any] = []
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(60)
        self.port = self.listener.getsockname()[1]
        self.failure: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            sock, _ = self.listener.accept()
        except OSError as exc:
            self.failure = exc
            return
        sock.settimeout(60)
        channel = Channel(SocketStream(sock, "sender"))
        try:
            handshake.receiver(channel, SECRET, False, "breceive scripted", [])
            opened = decode_json(channel.read())
            assert opened.type == T.OPEN, opened
            channel.send(Message(T.OPENED, {"relation": "rejoin", "target": {},
                                            "resync": self.offer}).encode())
            while True:                 # the session ends at anything but RESYNC_REQ
                request = decode_json(channel.read())
                if request.type != T.RESYNC_REQ or not self.pages:
                    break
                self.asked.append(request.fields.get("start"))
                channel.send(Message(T.RESYNC, self.pages.pop(0)).encode())
        except Exception as exc:        # the sender closing is an expected end
            self.failure = exc
        finally:
            channel.close()

    def stop(self) -> None:
        self.listener.close()
        self.thread.join(timeout=60)
        assert not self.thread.is_alive()


def run_against(breqd, tmp_path, offer: Any, pages: list[dict]):
    source = make_image(str(tmp_path / "src.img"), SIZE, "zeros")
    track(breqd, "d", source)
    secret = write_secret(str(tmp_path / "secret"), SECRET.decode())
    fake = ScriptedReceiver(offer, pages)
    try:
        done = sync(breqd, "d", "--source", source, "--to",
                    f"tcp://127.0.0.1:{fake.port}/d", "--secret-file", secret,
                    check=False, timeout=120)
    finally:
        fake.stop()
    return done, fake


def page(ranges: list, following: Any = None) -> dict:
    return {"ranges": ranges, "next": following}


@pytest.mark.parametrize("offer,pages,says", [
    ("all", [], "a bad resync offer"),
    ([1, 2], [], "a bad resync offer"),
    ({"all": "no"}, [], "a bad resync offer"),
    ({"all": False, "ranges": "many"}, [], "resync offer of 'many' ranges"),
    ({"all": False, "ranges": 1e999}, [], "not valid JSON"),
    ({"all": False, "ranges": MAX_RESYNC_RANGES + 1}, [], "resync offer of"),
    ({"all": False, "ranges": 1}, [page([[SIZE - CHUNK, 2 * CHUNK]])],
     "bad resync range"),
    ({"all": False, "ranges": 1}, [page([[1 << 63, 1 << 63]])], "bad resync range"),
    ({"all": False, "ranges": 1}, [page([[0, CHUNK], [CHUNK, CHUNK]])],
     "more resync ranges than the 1 offered"),
    ({"all": False, "ranges": 3}, [page([[0, CHUNK]], 1), page([], 2), page([], 3)],
     "bad resync page"),
    ({"all": False, "ranges": 3}, [page([[0, CHUNK]], 5)], "bad resync page"),
    ({"all": False, "ranges": 2}, [page([[0, CHUNK]])], "1 resync ranges, but 2"),
], ids=["string", "list", "all-not-bool", "count-string", "count-infinite", "count-above-cap",
        "past-the-end", "huge", "more-than-offered", "empty-pages", "skipping-page",
        "fewer-than-offered"])
def test_a_hostile_resync_offer_is_one_error_line(
        breqd, tmp_path, offer, pages, says):
    done, fake = run_against(breqd, tmp_path, offer, pages)
    assert done.returncode == EXIT_PROTOCOL, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = error_lines(done.stderr)
    assert len(errors) == 1 and says in errors[0], done.stderr
    assert len(fake.asked) <= len(pages)


def test_an_honest_offer_is_taken(breqd, tmp_path):
    """The same scripted receiver, honest: two pages, taken. (It then ends the session
    when the pass begins: what matters here is that the offer was taken.)"""
    offer = {"all": False, "ranges": 2}
    pages = [page([[0, CHUNK]], 1), page([[SIZE - CHUNK, CHUNK]])]
    done, fake = run_against(breqd, tmp_path, offer, pages)
    assert fake.asked == [0, 1]
    assert "changed 2 ranges alone" in done.stderr + done.stdout, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
