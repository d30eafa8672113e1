"""An asyncio client of breqd for the write path: pipelined, batched, reconnecting.

``mark`` calls made in the same event-loop turn for the same device travel as one MARK
message, and each caller is released when breqd says the whole batch is durable. Requests
reach breqd in the order they were made: a release of a chunk queued before a new hold of
it must arrive first, or breqd would drop the new hold (so batching merges only requests
of one kind that follow each other). A lost
connection fails the requests in flight (so the writes they guard fail) and the next
call connects again: a restarted breqd is picked up without a restart of the client.

Holds belong to a connection: ``session`` changes whenever a connection is made or lost,
so a caller that keeps holds knows they are gone when the number it saw has changed.

The room may speak only the control protocol, on its caller's event loop; it may not
decide what is held or for how long (the NBD tracking layer does).
"""

from __future__ import annotations

import asyncio
import itertools
from typing import Any, Sequence

from bmig import __version__
from bmig.constants import CONTROL_PROTOCOL_VERSION
from bmig.errors import BmigError, ProtocolError, UnreachableError, from_wire
from bmig.framing import read_frame, write_frame
from bmig.limits import MAX_CONTROL_FRAME, MAX_RANGES_PER_FRAME
from bmig.tracker.blocking_client import mark_fields, release_fields
from bmig.tracker.protocol import Message, Op, decode

Ranges = Sequence[tuple[int, int]]


class AsyncTrackerClient:
    def __init__(self, path: str, client: str = "bmig", connect_timeout: float = 5.0):
        self.path = path
        self._client = client
        self._timeout = connect_timeout
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future] = {}
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task | None = None
        self._connecting: asyncio.Lock | None = None
        self._batches: list[tuple[tuple, list[tuple[Ranges, asyncio.Future]]]] = []
        self._flush_scheduled = False
        self.session = 0          # changes on every connect and every loss
        self.version = 0          # the control protocol version of this connection

    # -- connection ------------------------------------------------------------------

    def _line(self) -> asyncio.Lock:
        """Locked while a request is written (and while connecting): requests reach breqd
        in the order they were made, a reconnection included."""
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        return self._connecting

    async def connect(self) -> None:
        async with self._line():
            await self._connect()

    async def _connect(self) -> None:
        """Connect unless connected; the caller holds the line."""
        if self._writer is not None:
            return
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(self.path, limit=MAX_CONTROL_FRAME + 64),
                self._timeout)
        except (OSError, asyncio.TimeoutError) as exc:
            raise UnreachableError(f"cannot reach breqd at {self.path}: "
                                   f"{getattr(exc, 'strerror', None) or exc}") from None
        hello = Message(Op.HELLO, next(self._ids),
                        {"version": CONTROL_PROTOCOL_VERSION,
                         "client": f"{self._client} {__version__}"})
        write_frame(writer, hello.encode())     # if it is gone, the read below says so
        try:
            reply = decode(await asyncio.wait_for(read_frame(reader, MAX_CONTROL_FRAME),
                                                  self._timeout))
        except (ProtocolError, OSError, asyncio.TimeoutError) as exc:
            writer.close()
            raise UnreachableError(f"breqd at {self.path} did not answer: {exc}") from None
        _raise_if_error(reply)
        self.version = int(reply.fields.get("version", 1))
        self.session += 1
        self._writer = writer
        self._reader_task = asyncio.get_running_loop().create_task(self._read(reader))

    async def _read(self, reader: asyncio.StreamReader) -> None:
        why: BmigError = UnreachableError(f"lost breqd at {self.path}")
        try:
            while True:
                msg = decode(await read_frame(reader, MAX_CONTROL_FRAME))
                future = self._waiting.pop(msg.request_id, None)
                if future is not None and not future.done():
                    future.set_result(msg)
        except (ProtocolError, OSError) as exc:
            why = UnreachableError(f"lost breqd at {self.path}: {exc}")
        finally:
            self._drop(why)

    @property
    def connected(self) -> bool:
        return self._writer is not None

    def _drop(self, why: BmigError) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self.session += 1
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_exception(why)

    def _send(self, msg: Message) -> None:
        """Write on the connection, or drop it as lost (UnreachableError): a connection
        breqd reset is closed by the loop before the reader hears of it."""
        assert self._writer is not None
        if not write_frame(self._writer, msg.encode()):
            why = UnreachableError(f"lost breqd at {self.path}")
            self._drop(why)
            raise why

    async def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
            try:
                await self._reader_task
            except asyncio.CancelledError:
                pass
            self._reader_task = None
        self._drop(UnreachableError("client closed"))

    # -- requests --------------------------------------------------------------------

    async def call(self, op: Op, fields: dict[str, Any] | None = None,
                   ranges: Ranges = ()) -> Message:
        async with self._line():
            await self._connect()
            assert self._writer is not None
            request_id = next(self._ids)
            future = asyncio.get_running_loop().create_future()
            self._send(Message(op, request_id, fields or {}, ranges))
            self._waiting[request_id] = future      # no reply can come before we wait
            session = self.session
        reply = await future
        _raise_if_error(reply)
        reply.session = session
        return reply

    async def mark(self, device: str, ranges: Ranges, hold: bool = False,
                   sync: bool = False) -> int:
        """Returns when the chunks of ``ranges`` are durable in breqd; with ``hold`` they
        stay dirty until released by ``mark_completed`` or the end of the connection
        (``sync``: the writes go to the target too). Returns the ``session`` of the
        connection that recorded them."""
        reply = await self._enqueue(Op.MARK, mark_fields(device, hold, sync), ranges)
        return reply.session

    async def mark_sync(self, device: str, ranges: Ranges) -> tuple[int, list[tuple[int, int]]]:
        """``mark`` with ``hold`` and ``sync``; also returns the byte ranges breqd says are
        mirrored now (the reply's ranges; of every mark that travelled in the same
        message, so a caller looks up only its own chunks in them)."""
        reply = await self._enqueue(Op.MARK, mark_fields(device, True, True), ranges)
        return reply.session, list(reply.ranges)

    async def mark_completed(self, device: str, ranges: Ranges, synced: bool = False) -> None:
        """Mark again after the write; releases this connection's holds on the ranges."""
        await self.release(device, ranges, synced)

    def release(self, device: str, ranges: Ranges, synced: bool = False) -> asyncio.Future:
        """``mark_completed`` queued now, in the caller's place in line: a hold taken after
        this call reaches breqd after the release. The future has the outcome (the reply)."""
        return self._enqueue(Op.MARK_COMPLETED, release_fields(device, synced), ranges)

    async def query(self, device: str, offset: int,
                    length: int) -> tuple[list[tuple[int, int]], int]:
        """Byte runs in the range that may differ from the target, and where the answer
        ends (see TrackerClient.query)."""
        reply = await self.call(Op.QUERY, {"device": device}, [(offset, length)])
        return list(reply.ranges), int(reply.fields.get("end", offset + length))

    def _enqueue(self, op: Op, fields: dict[str, Any], ranges: Ranges) -> asyncio.Future:
        """Queue a request for the end of this loop turn. Requests with the same op and
        fields that follow each other travel as one message; order is kept."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        key = (op, tuple(sorted(fields.items())))
        if self._batches and self._batches[-1][0] == key:
            self._batches[-1][1].append((ranges, future))
        else:
            self._batches.append((key, [(ranges, future)]))
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self._send_batches)
        return future

    def _send_batches(self) -> None:
        """One task per message, made in order: each writes its message at its first
        step (or after the connection is made, which waiters take in turn)."""
        self._flush_scheduled = False
        batches, self._batches = self._batches, []
        loop = asyncio.get_running_loop()
        for (op, key_fields), items in batches:
            for group in _groups(items, MAX_RANGES_PER_FRAME):
                loop.create_task(self._send_group(op, dict(key_fields), group))

    async def _send_group(self, op: Op, fields: dict[str, Any],
                          group: list[tuple[Ranges, asyncio.Future]]) -> None:
        ranges = [r for rs, _ in group for r in rs]
        try:
            reply = await self.call(op, fields, ranges)
        except Exception as exc:            # whatever it was, each waiter hears it
            for _, future in group:
                if not future.done():
                    future.set_exception(exc)
        else:
            for _, future in group:
                if not future.done():
                    future.set_result(reply)

    async def stats(self, device: str) -> dict:
        return (await self.call(Op.STATS, {"device": device})).fields


def _groups(items: list, cap: int) -> list[list]:
    """Consecutive items whose ranges add up to at most ``cap`` (one oversize item alone)."""
    groups: list[list] = []
    current: list = []
    total = 0
    for item in items:
        n = len(item[0])
        if current and total + n > cap:
            groups.append(current)
            current, total = [], 0
        current.append(item)
        total += n
    if current:
        groups.append(current)
    return groups


def _raise_if_error(msg: Message) -> None:
    if msg.op == Op.REPLY_ERROR:
        raise from_wire(str(msg.fields.get("code", "error")),
                        str(msg.fields.get("message", "unknown error")))
