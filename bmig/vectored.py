"""Sending several buffers as one stream of bytes, without joining them.

``sendmsg`` and ``writev`` may take fewer bytes than offered; ``send_all`` goes on from
where they stopped until every byte is out. Used wherever a frame header and its payload
leave together: bmig.wire.transports (sockets and pipes) and bmig.nbdclient. It knows
nothing of frames, sockets or errors: those belong to its callers.
"""

from __future__ import annotations

from typing import Callable, Sequence

Buffer = bytes | bytearray | memoryview


def send_all(send: Callable[[list[memoryview]], int], parts: Sequence[Buffer]) -> None:
    """Call ``send`` (``sock.sendmsg``, or ``lambda views: os.writev(fd, views)``) until
    every byte of ``parts`` is sent; empty parts are skipped."""
    views = [memoryview(p).cast("B") for p in parts if len(p)]
    while views:
        sent = send(views)
        while views and sent >= len(views[0]):
            sent -= len(views[0])
            views.pop(0)
        if views and sent:
            views[0] = views[0][sent:]
