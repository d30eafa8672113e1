"""The client side of bmig-nbd's control socket (bmig.nbd.manage has the server and the
requests): what bmigrate replicate, cutover and sync use to reach the bmig-nbd that serves
a device. Blocking, and light to import: no asyncio, no NBD layers."""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from bmig.errors import ProtocolError, UnreachableError, from_wire
from bmig.framing import ConnectionClosed, pack_frame, recv_frame
from bmig.limits import MAX_MANAGE_FRAME

MANAGE_VERSION = 1
DEFAULT_MANAGE_DIR = "/run/bmig/nbd"


def socket_path(directory: str, device: str) -> str:
    return os.path.join(directory, device + ".sock")


class ManageClient:
    """The blocking client bmigrate uses; one request at a time."""

    def __init__(self, directory: str, device: str, timeout: float = 120.0):
        self.path = socket_path(directory, device)
        self.device = device
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise UnreachableError(f"no bmig-nbd serves {device} ({self.path}: "
                                   f"{exc.strerror or exc}); start it, or give "
                                   "--manage-dir") from None
        self._sock = sock
        self.hello = self.call("hello", version=MANAGE_VERSION)

    def call(self, op: str, **fields: Any) -> dict:
        try:
            self._sock.sendall(pack_frame(json.dumps({"op": op, **fields}).encode()))
        except OSError as exc:
            # bmig-nbd may have said why it closed the connection (a freeze lease ran
            # out): that frame is still here to read.
            try:
                reply = self._receive()
            except UnreachableError:
                raise UnreachableError(f"lost bmig-nbd at {self.path}: {exc}") from None
        else:
            reply = self._receive()
        if not reply.get("ok"):
            raise from_wire(str(reply.get("code", "error")),
                            f"bmig-nbd: {reply.get('message', 'failed')}")
        return reply

    def _receive(self) -> dict:
        try:
            reply = json.loads(recv_frame(self._sock, MAX_MANAGE_FRAME))
        except (OSError, ConnectionClosed) as exc:
            raise UnreachableError(f"lost bmig-nbd at {self.path}: {exc}") from None
        except ValueError as exc:
            raise ProtocolError(f"bmig-nbd at {self.path} answered something else: {exc}") \
                from None
        if not isinstance(reply, dict):
            raise ProtocolError(f"bmig-nbd at {self.path} answered something else")
        return reply

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "ManageClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
