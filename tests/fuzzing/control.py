"""Driver for breqd's control protocol: frames fed to a real Breqd's connection handler
(``ControlServer._serve``: framing, decode, HELLO, dispatch to every request handler) over an
in-memory stream, with two tracked devices on tmpfs.

One Breqd serves every input (starting one costs milliseconds); it is started again
from a saved copy of its directories whenever an input changed the set of devices, and
every 5000 inputs, so that what one input did to the dirty bits weighs little on the
next. ``--replay`` and the tests run an input against a fresh one.
"""

from __future__ import annotations

import asyncio
import os

from bmig.limits import MAX_CONTROL_FRAME
from bmig.errors import RequestError
from bmig.framing import pack_frame
from bmig.chunkmath import chunk_count
from bmig.tracker.definitions import DeviceDefinition
from bmig.tracker.protocol import Message, Op, decode, field_int
from bmig.tracker.service import Breqd, Settings
from tests.fuzzing.engine import Driver, Field, Frame, Seed, normalize, seed

RESTART_EVERY = 5000
MAX_FUZZ_CHUNKS = 1 << 22     # a larger ADD_DEVICE is answered by the harness (see below)
DEVICES = (("vm1", 64 << 20, 65536, 0xA1), ("vm2", 1 << 30, 4096, 0xA2))

CONTROL_TOKENS = [b'"device":"vm1"', b'"device":"vm2"', b'"device":"nope"', b'"hold":true',
                  b'"sync":true', b'"synced":true', b'"force":true', b'"clean":true',
                  b'"max_bytes":', b'"version":2', b'"name":"new1"', b'"size":',
                  b'"chunk_size":', b'"generation":"00000000000000a1"', b'"previous":[]',
                  b'"role":"handed-over"', b'"successor":"0000000000000001"', b"1e999",
                  b"-1", b"null", b"[[[[[[[[[[", b"{}", b"18446744073709551616", b'"\\ud800"',
                  b"\xff\xff\xff\xff\xff\xff\xff\xff"]


def frame(op: Op, fields: dict | None = None, ranges=(), request_id: int = 1) -> Frame:
    body = Message(op, request_id, fields or {}, list(ranges)).encode()
    json_len = int.from_bytes(body[4:8], "little")
    fields_at = (Field(0, 4), Field(4, 1), Field(5, 1), Field(6, 2), Field(8, 4), Field(12, 8))
    ranges_at = tuple(Field(4 + 16 + json_len + 8 * i, 8) for i in range(2 * len(ranges)))
    return Frame(pack_frame(body), fields_at + ranges_at)


HELLO = frame(Op.HELLO, {"version": 2, "client": "fuzz"})


class _Writer:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closing = False

    def write(self, data: bytes) -> None:
        self.out += data

    async def drain(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def get_extra_info(self, name, default=None):
        return default


class Control(Driver):
    name = "control"
    what = "breqd's control protocol: decode and every request handler (bmig/tracker/)"
    allowed = ()               # breqd answers an error or closes; it never raises
    dictionary = CONTROL_TOKENS
    max_size = 128 * 1024
    time_limit = 5.0

    def __init__(self, workdir: str):
        super().__init__(workdir)
        self.settings = Settings(os.path.join(workdir, "state"), os.path.join(workdir, "config"),
                                 os.path.join(workdir, "breqd.sock"))
        self._loop = asyncio.new_event_loop()
        self._saved: dict[str, bytes] | None = None
        self._breqd: Breqd | None = None
        self._served = 0
        self._fresh = False

    # -- a Breqd without its socket and watcher -------------------------------------------

    async def _start(self) -> Breqd:
        s = self.settings
        for directory in (s.state_dir, s.config_dir):
            os.makedirs(directory, exist_ok=True)
        if self._saved is None:
            for name, size, chunk, device_id in DEVICES:
                DeviceDefinition(name, size, chunk, device_id).save(s.config_dir)
        else:
            self._restore()
        breqd = Breqd(s)
        breqd._lock.acquire()
        breqd.registry.rescan()                    # what start() does, without a watcher
        handlers = breqd.control._handlers
        handler = handlers[Op.ADD_DEVICE]

        def add_device(session, msg):
            # An authorized client may have breqd allocate up to 2^32 chunks per device
            # (breqd(8), SECURITY): the fuzzer keeps to devices it can afford by the
            # million. Nothing is sent back that breqd would not send.
            size, chunk = msg.fields.get("size"), msg.fields.get("chunk_size", 65536)
            if isinstance(size, int) and isinstance(chunk, int) and chunk > 0 \
                    and chunk_count(size, chunk) > MAX_FUZZ_CHUNKS:
                field_int(msg, "size")
                raise RequestError("(fuzz harness) device too large to fuzz with")
            return handler(session, msg)

        handlers[Op.ADD_DEVICE] = add_device
        if self._saved is None:
            await self._settle(breqd)
            await breqd.stop()
            self._saved = self._snapshot()
            return await self._start()
        return breqd

    def _files(self):
        for directory in (self.settings.state_dir, self.settings.config_dir):
            for name in os.listdir(directory):
                yield os.path.join(directory, name)

    def _snapshot(self) -> dict[str, bytes]:
        out = {}
        for path in self._files():
            with open(path, "rb") as f:
                out[path] = f.read()
        return out

    def _restore(self) -> None:
        assert self._saved is not None
        for path in list(self._files()):
            os.unlink(path)
        for path, data in self._saved.items():
            with open(path, "wb") as f:
                f.write(data)

    @staticmethod
    async def _settle(breqd: Breqd) -> None:
        """Every reply and bitmap write started by the input, finished."""
        me = asyncio.current_task()
        while True:
            others = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
            if not others:
                return
            await asyncio.gather(*others, return_exceptions=True)

    async def _restart(self) -> None:
        if self._breqd is not None:
            await self._breqd.stop()
        self._breqd = await self._start()
        self._served = 0

    # -- an input -------------------------------------------------------------------------

    def seeds(self) -> list[Seed]:
        vm1 = {"device": "vm1"}
        return [
            seed("hello", HELLO),
            seed("mark-release", HELLO, frame(Op.MARK, {**vm1, "hold": True},
                                              [(0, 4096), (1 << 20, 70000)], 2),
                 frame(Op.MARK_COMPLETED, vm1, [(0, 4096), (1 << 20, 70000)], 3),
                 frame(Op.MARK, {**vm1, "hold": True, "sync": True}, [(4096, 1)], 4),
                 frame(Op.MARK_COMPLETED, {**vm1, "synced": True}, [(4096, 1)], 5),
                 frame(Op.QUERY, vm1, [(0, 64 << 20)], 6)),
            seed("checkout-commit", HELLO, frame(Op.MARK, {"device": "vm2"}, [(0, 1 << 20)], 2),
                 frame(Op.CHECKOUT, {"device": "vm2", "max_bytes": 1 << 20}, (), 3),
                 frame(Op.COMMIT, {"device": "vm2"}, [(0, 65536)], 4),
                 frame(Op.ABORT, {"device": "vm2"}, [(65536, 65536)], 5),
                 frame(Op.STATS, {"device": "vm2"}, (), 6), frame(Op.LIST, {}, (), 7)),
            seed("all", HELLO, frame(Op.SET_ALL_DIRTY, vm1, (), 2),
                 frame(Op.CLEAR_ALL, {**vm1, "force": True}, (), 3),
                 frame(Op.CLEAR_ALL, vm1, (), 4),
                 frame(Op.SET_LINEAGE, {**vm1, "role": "handed-over",
                                        "successor": "00000000000000b1"}, (), 5)),
            seed("add-remove", HELLO,
                 frame(Op.ADD_DEVICE, {"name": "new1", "size": 1 << 20, "chunk_size": 4096,
                                       "generation": "00000000000000c1", "previous": [],
                                       "clean": True}, (), 2),
                 frame(Op.STATS, {"device": "new1"}, (), 3),
                 frame(Op.REMOVE_DEVICE, {"device": "new1"}, (), 4)),
            seed("refused", HELLO, frame(Op.MARK, {"device": "nope"}, [(0, 1)], 2),
                 frame(Op.MARK, vm1, [(64 << 20, 1)], 3), frame(Op.COMMIT, vm1, [(0, 1)], 4),
                 frame(Op.REPLY_OK, {}, (), 5), frame(Op.CHECKOUT, {**vm1, "max_bytes": 0}, (), 6)),
            seed("bad-hello", frame(Op.HELLO, {"version": 0}), frame(Op.LIST)),
        ]

    def run(self, data: bytes) -> str | None:
        try:
            return self._loop.run_until_complete(self._one(data))
        except BaseException:
            self._reset()
            raise

    def _reset(self) -> None:
        """After an interrupted input: a new loop and a new Breqd."""
        try:
            for task in asyncio.all_tasks(self._loop):
                task.cancel()
            if self._breqd is not None:
                self._breqd._executor.shutdown(wait=True)
                for device in self._breqd.registry.devices.values():
                    device.bitmap.close(clean=False)
                self._breqd._lock.release()
            self._loop.close()
        except Exception:    # noqa: BLE001 - interrupted anywhere
            pass
        self._breqd = None
        self._loop = asyncio.new_event_loop()

    async def _one(self, data: bytes) -> str | None:
        if self._breqd is None or self._served >= RESTART_EVERY:
            await self._restart()
        breqd = self._breqd
        assert breqd is not None
        names = dict(breqd.registry.devices)
        reader = asyncio.StreamReader(limit=2 * MAX_CONTROL_FRAME)
        reader.feed_data(data)
        reader.feed_eof()
        writer = _Writer()
        await breqd.control._serve(reader, writer)
        await self._settle(breqd)
        self._served += 1
        if breqd.registry.devices != names or breqd.registry._closing:
            await self._settle(breqd)
            await self._restart()
        return _first_error(writer.out)

    def close(self) -> None:
        if self._breqd is not None:
            self._loop.run_until_complete(self._breqd.stop())
        self._loop.close()


def _first_error(out: bytes) -> str | None:
    pos = 0
    while pos + 4 <= len(out):
        length = int.from_bytes(out[pos:pos + 4], "little")
        msg = decode(out[pos + 4:pos + 4 + length])
        pos += 4 + length
        if msg.op == Op.REPLY_ERROR:
            return f"{msg.fields.get('code')}: {normalize(str(msg.fields.get('message')))}"
    return None


DRIVERS = (Control,)
