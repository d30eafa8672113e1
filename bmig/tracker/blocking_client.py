"""A blocking client of breqd's control socket, for bmigrate, the command line and tests.

``call`` sends one request and waits for its reply. ``send`` and ``receive`` pipeline:
many requests in flight on one connection, replies matched by request id. The room may
not import asyncio or anything of breqd beyond the control protocol (commands start fast
with it); the write path has its own client (write_path_client.py).
"""

from __future__ import annotations

import itertools
import socket
from typing import Any, Sequence

from bmig import __version__
from bmig.constants import CONTROL_PROTOCOL_VERSION
from bmig.errors import ProtocolError, UnreachableError, from_wire
from bmig.framing import pack_frame, recv_frame
from bmig.limits import MAX_CONTROL_FRAME
from bmig.tracker.protocol import Message, Op, decode

Ranges = Sequence[tuple[int, int]]


class TrackerClient:
    def __init__(self, path: str, timeout: float | None = 60.0, client: str = "bmig"):
        self.path = path
        self._ids = itertools.count(1)
        self._early: dict[int, Message] = {}
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        sock.settimeout(timeout)
        try:
            sock.connect(path)
        except OSError as exc:
            sock.close()
            raise UnreachableError(
                f"cannot reach breqd at {path}: {exc.strerror or exc} (is breqd running? "
                "give its socket with --control or BMIG_CONTROL)") from None
        self._sock = sock
        hello = self.call(Op.HELLO, {"version": CONTROL_PROTOCOL_VERSION,
                                     "client": f"{client} {__version__}"})
        self.server = str(hello.fields.get("server", "breqd"))
        self.version = int(hello.fields.get("version", 1))

    def close(self) -> None:
        self._sock.close()

    def __enter__(self) -> "TrackerClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- messages --------------------------------------------------------------------

    def send(self, op: Op, fields: dict | None = None, ranges: Ranges = ()) -> int:
        request_id = next(self._ids)
        body = Message(op, request_id, fields or {}, ranges).encode()
        try:
            self._sock.sendall(pack_frame(body))
        except OSError as exc:
            raise UnreachableError(f"lost breqd at {self.path}: {exc.strerror or exc}") from None
        return request_id

    def receive(self, request_id: int | None = None) -> Message:
        """The reply to ``request_id`` (or the next reply); raises the server's error."""
        if request_id is not None and request_id in self._early:
            return _checked(self._early.pop(request_id))
        while True:
            try:
                msg = decode(recv_frame(self._sock, MAX_CONTROL_FRAME))
            except ProtocolError as exc:
                raise UnreachableError(f"lost breqd at {self.path}: {exc.message}") from None
            except OSError as exc:
                raise UnreachableError(
                    f"lost breqd at {self.path}: {exc.strerror or exc}") from None
            if request_id is None or msg.request_id == request_id or msg.request_id == 0:
                return _checked(msg)
            self._early[msg.request_id] = msg

    def call(self, op: Op, fields: dict | None = None, ranges: Ranges = ()) -> Message:
        return self.receive(self.send(op, fields, ranges))

    # -- requests --------------------------------------------------------------------

    def mark(self, device: str, ranges: Ranges, hold: bool = False, sync: bool = False) -> None:
        """Returns once the chunks are durable in breqd (mark before write). With
        ``hold`` they stay dirty, whatever a sender commits, until released; with
        ``sync`` too, the writes also go to the target (see ChunkMap.mirrored)."""
        self.call(Op.MARK, mark_fields(device, hold, sync), ranges)

    def mark_completed(self, device: str, ranges: Ranges, synced: bool = False) -> None:
        """Mark again after the write; releases this connection's holds on the ranges.
        ``synced``: every write under the holds reached the target too."""
        self.call(Op.MARK_COMPLETED, release_fields(device, synced), ranges)

    def query(self, device: str, offset: int, length: int) -> tuple[list[tuple[int, int]], int]:
        """Byte runs in [offset, offset + length) that may differ from the target, and the
        offset up to which the answer is complete."""
        reply = self.call(Op.QUERY, {"device": device}, [(offset, length)])
        return list(reply.ranges), int(reply.fields.get("end", offset + length))

    def checkout(self, device: str, max_bytes: int,
                 settled: bool = False) -> list[tuple[int, int]]:
        """Dirty chunks, now in flight; with ``settled``, none a writer holds."""
        fields: dict = {"device": device, "max_bytes": max_bytes}
        if settled:
            fields["settled"] = True
        return list(self.call(Op.CHECKOUT, fields).ranges)

    def claim(self, device: str, wait: float) -> str | None:
        """Become the device's sender (a cutover): at once if nobody ships it, else once
        its sender gives it up, within ``wait`` seconds (DeviceBusy after that). Returns
        who gave it up (None if nobody had it)."""
        if self.version < 3:
            raise ProtocolError(f"{self.server} at {self.path} cannot hand a device's sender "
                                "over (control protocol 3); stop the device's sender "
                                "(bmigrate run) first, or upgrade breqd")
        wait_ms = max(0, int(wait * 1000))
        timeout = self._sock.gettimeout()
        if timeout is not None:
            self._sock.settimeout(max(timeout, wait + 30))
        try:
            reply = self.call(Op.CLAIM, {"device": device, "wait_ms": wait_ms})
        finally:
            self._sock.settimeout(timeout)
        yielded = reply.fields.get("yielded_by")
        return str(yielded) if yielded else None

    def commit(self, device: str, ranges: Ranges) -> None:
        self.call(Op.COMMIT, {"device": device}, ranges)

    def abort(self, device: str, ranges: Ranges) -> None:
        self.call(Op.ABORT, {"device": device}, ranges)

    def stats(self, device: str) -> dict:
        return self.call(Op.STATS, {"device": device}).fields

    def list_devices(self) -> list[dict]:
        return list(self.call(Op.LIST).fields.get("devices", []))

    def add_device(self, name: str, size: int, chunk_size: int | None = None,
                   lineage: dict | None = None, clean: bool = False) -> dict:
        """``lineage``: {generation, previous} to carry on (a promoted target adopted);
        ``clean``: start with nothing dirty (only with a lineage)."""
        fields: dict[str, Any] = {"name": name, "size": size}
        if chunk_size is not None:
            fields["chunk_size"] = chunk_size
        if lineage is not None:
            fields.update(generation=lineage["generation"],
                          previous=list(lineage.get("previous", [])), clean=clean)
        return self.call(Op.ADD_DEVICE, fields).fields

    def set_lineage(self, device: str, role: str, successor: str | None = None,
                    ha: bool | None = None, new_generation: bool = False) -> dict:
        fields: dict[str, Any] = {"device": device, "role": role}
        if successor is not None:
            fields["successor"] = successor
        if ha is not None:
            fields["ha"] = ha
        if new_generation:
            fields["new_generation"] = True
        return self.call(Op.SET_LINEAGE, fields).fields

    def remove_device(self, name: str) -> dict:
        return self.call(Op.REMOVE_DEVICE, {"name": name, "device": name}).fields

    def set_all_dirty(self, device: str) -> None:
        self.call(Op.SET_ALL_DIRTY, {"device": device})

    def clear_all(self, device: str, force: bool = False) -> None:
        self.call(Op.CLEAR_ALL, {"device": device, "force": force})


def mark_fields(device: str, hold: bool = False, sync: bool = False) -> dict[str, Any]:
    fields: dict[str, Any] = {"device": device}
    if hold:
        fields["hold"] = True
    if sync:
        fields["sync"] = True
    return fields


def release_fields(device: str, synced: bool = False) -> dict[str, Any]:
    return {"device": device, "synced": True} if synced else {"device": device}


def _checked(msg: Message) -> Message:
    if msg.op == Op.REPLY_ERROR:
        raise from_wire(str(msg.fields.get("code", "error")),
                        str(msg.fields.get("message", "unknown error")))
    if msg.op != Op.REPLY_OK:
        raise ProtocolError(f"expected a reply, got {msg.op.name}")
    return msg

