"""breqd: the control socket, client sessions, device registry and shutdown.

All chunk state changes happen on the event loop thread, in the order requests arrive
on a connection; only bitmap writes run in worker threads (bmig.tracker.committer).
A reply that depends on durability is sent when the flush it joined completes, so
replies may overtake each other: clients match them by request id.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import stat
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Awaitable, Callable

from bmig import __version__, systemd
from bmig.chunkmath import chunk_count
from bmig.constants import CONTROL_PROTOCOL_VERSION, DEFAULT_CHUNK_SIZE
from bmig.errors import (BmigError, ConfigError, DeviceBusy, DeviceExists, NotCheckedOut,
                         ProtocolError, RequestError, StateError, UnknownDevice)
from bmig.framing import ConnectionClosed, pack_frame, read_frame
from bmig.limits import (MARK_PIECE, MAX_CHECKOUT_RUNS, MAX_CONTROL_FRAME, MAX_HELD_RUNS,
                         MAX_QUERY_RUNS)
from bmig.statelock import StateLock
from bmig.tracker.committer import pages_of
from bmig.tracker.tracked import TrackedDevice
from bmig.tracker.definitions import (SUFFIX, ConfigWatcher, DeviceDefinition, check_geometry,
                                  check_name, new_device_id, scan)
from bmig.lineage import ROLE_PRIMARY, ROLES, SourceLineage, hex_id, parse_id, save_source
from bmig.tracker.intervals import IntervalSet, merge_spans
from bmig.tracker.protocol import Message, Op, decode, field_bool, field_int, field_str

log = logging.getLogger("breqd")

LAZY_FLUSH_SECONDS = 2.0
STATUS_SECONDS = 10.0
RESCAN_DELAY = 0.05


@dataclass
class Settings:
    state_dir: str
    config_dir: str
    control: str
    socket_mode: int = 0o600


class Session:
    """One client connection: the chunk runs it has checked out and the runs it holds
    (marked with ``hold`` and not yet released), per device."""

    def __init__(self, peer: str):
        self.peer = peer
        self.checkouts: dict[str, IntervalSet] = {}
        self.holds: dict[str, IntervalSet] = {}


Reply = Message | Awaitable[Message]


class Breqd:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.devices: dict[str, TrackedDevice] = {}
        self.sessions: set[Session] = set()
        self._connections: set[asyncio.Task] = set()
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bitmap")
        self._lock = StateLock(settings.state_dir, f"breqd (control socket {settings.control})")
        self._server: asyncio.AbstractServer | None = None
        self._watcher: ConfigWatcher | None = None
        self._rescan_handle: asyncio.TimerHandle | None = None
        self._stopping = asyncio.Event()
        self._bad_files: dict[str, str] = {}
        self._refused: dict[str, DeviceDefinition] = {}
        self._closing: dict[str, asyncio.Task] = {}
        self._senders: dict[str, Session] = {}     # device -> the session that checks out
        self._handlers: dict[Op, Callable[[Session, Message], Reply]] = {
            Op.MARK: self._mark, Op.MARK_COMPLETED: self._mark_completed,
            Op.QUERY: self._query,
            Op.CHECKOUT: self._checkout, Op.COMMIT: self._commit, Op.ABORT: self._abort,
            Op.STATS: self._stats, Op.LIST: self._list,
            Op.SET_ALL_DIRTY: self._set_all_dirty, Op.CLEAR_ALL: self._clear_all,
            Op.ADD_DEVICE: self._add_device, Op.REMOVE_DEVICE: self._remove_device,
            Op.SET_LINEAGE: self._set_lineage,
        }

    # -- life cycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self._schedule_rescan)
        tasks = [loop.create_task(self._lazy_flusher()), loop.create_task(self._status())]
        interval = systemd.watchdog_interval()
        if interval:
            tasks.append(loop.create_task(self._watchdog(interval)))
        systemd.notify("READY=1", f"STATUS={self._status_line()}")
        log.info("breqd %s ready on %s, tracking %d device(s)", __version__,
                 self.settings.control, len(self.devices))
        try:
            await self._stopping.wait()
        finally:
            systemd.notify("STOPPING=1")
            for task in tasks:
                task.cancel()
            await self.stop()

    async def start(self) -> None:
        s = self.settings
        for directory in (s.state_dir, s.config_dir):
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StateError(f"cannot create {directory}: {exc.strerror}") from None
        self._lock.acquire()
        self._loop = asyncio.get_running_loop()
        try:
            self._watcher = ConfigWatcher(s.config_dir, self._from_watcher_thread)
            self._watcher.start()
            self._rescan()
            self._server = await self._listen()
        except BaseException:
            await self.stop()
            raise

    async def _listen(self) -> asyncio.AbstractServer:
        path = self.settings.control
        directory = os.path.dirname(path) or "."
        try:
            os.makedirs(directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {directory} for the control socket: "
                              f"{exc.strerror}") from None
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.lstat(path).st_mode):
                raise ConfigError(f"control path {path} exists and is not a socket")
            if _socket_answers(path):
                raise StateError(f"control socket {path} is in use by another process")
            os.unlink(path)
        old = os.umask(0o777 & ~self.settings.socket_mode)
        try:
            return await asyncio.start_unix_server(self._serve, path=path)
        finally:
            os.umask(old)

    async def stop(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None
        if self._server is not None:
            self._server.close()
            self._server = None
            try:
                os.unlink(self.settings.control)
            except OSError:
                pass
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)
        for session in list(self.sessions):
            self._abort_session(session)
        for device in list(self.devices.values()):
            await device.close()
        self.devices.clear()
        for task in list(self._closing.values()):
            await task
        self._executor.shutdown(wait=True)
        self._lock.release()
        log.info("breqd stopped")

    async def _lazy_flusher(self) -> None:
        while True:
            await asyncio.sleep(LAZY_FLUSH_SECONDS)
            for device in list(self.devices.values()):
                device.committer.flush_lazy()

    async def _status(self) -> None:
        while True:
            await asyncio.sleep(STATUS_SECONDS)
            systemd.notify(f"STATUS={self._status_line()}")

    async def _watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    def _status_line(self) -> str:
        dirty = sum(d.chunks.dirty_bytes() for d in self.devices.values())
        return f"tracking {len(self.devices)} device(s), {dirty} bytes dirty"

    # -- configuration directory -----------------------------------------------------

    def _from_watcher_thread(self) -> None:
        try:
            self._loop.call_soon_threadsafe(self._schedule_rescan)
        except RuntimeError:  # loop closed during shutdown
            pass

    def _schedule_rescan(self) -> None:
        if self._rescan_handle is None:
            self._rescan_handle = asyncio.get_running_loop().call_later(
                RESCAN_DELAY, self._rescan)

    def _rescan(self) -> None:
        """Bring the tracked set in line with the config directory."""
        self._rescan_handle = None
        try:
            found, errors = scan(self.settings.config_dir)
        except ConfigError as exc:
            log.error("%s", exc.message)
            return
        for name, why in errors.items():
            if self._bad_files.get(name) != why:
                kept = " (the previous definition stays in force)" if name in self.devices else ""
                log.error("%s%s", why, kept)
        self._bad_files = errors
        for name, definition in found.items():
            current = self.devices.get(name)
            if current is None:
                self._track(definition)
            elif current.definition != definition:
                self._refuse_change(current.definition, definition)
            else:
                self._refused.pop(name, None)
        for name in list(self.devices):
            if name not in found and name not in errors:
                self._untrack(name)

    def _track(self, definition: DeviceDefinition) -> TrackedDevice | None:
        closing = self._closing.get(definition.name)
        if closing is not None:  # its bitmap is still being closed: retry once it is
            closing.add_done_callback(lambda _: self._schedule_rescan())
            return None
        try:
            device = TrackedDevice(definition, self.settings.state_dir, self._executor)
        except BmigError as exc:
            log.error("%s: cannot track: %s", definition.name, exc.message)
            return None
        except MemoryError:
            log.error("%s: cannot track: not enough memory for a bitmap of %d chunks",
                      definition.name, chunk_count(definition.size, definition.chunk_size))
            return None
        self.devices[definition.name] = device
        log.info("%s: tracking %d bytes in %d-byte chunks, %d bytes dirty", definition.name,
                 definition.size, definition.chunk_size, device.chunks.dirty_bytes())
        return device

    def _refuse_change(self, old: DeviceDefinition, new: DeviceDefinition) -> None:
        if self._refused.get(old.name) == new:
            return
        self._refused[old.name] = new
        changes = [f"{key} {getattr(old, key)} -> {getattr(new, key)}"
                   for key in ("size", "chunk_size", "device_id")
                   if getattr(old, key) != getattr(new, key)]
        log.error("%s%s: change refused (%s); the previous definition stays in force. "
                  "To change it, remove the device and add it again (everything becomes "
                  "dirty).", old.name, SUFFIX, ", ".join(changes))

    def _untrack(self, name: str) -> None:
        device = self.devices.pop(name)
        self._senders.pop(name, None)
        for session in self.sessions:
            session.checkouts.pop(name, None)
            session.holds.pop(name, None)
        self._refused.pop(name, None)
        log.info("%s: no longer tracked; its bitmap stays in %s", name, device.bitmap.path)
        task = asyncio.get_running_loop().create_task(device.close())
        self._closing[name] = task
        task.add_done_callback(lambda _: self._closing.pop(name, None))

    # -- connections -----------------------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        session = Session(_peer_name(writer))
        self.sessions.add(session)
        task = asyncio.current_task()
        self._connections.add(task)
        request_id = 0
        try:
            hello = decode(await read_frame(reader, MAX_CONTROL_FRAME))
            request_id = hello.request_id
            writer.write(pack_frame(self._hello(hello).encode()))
            while True:
                request_id = 0
                msg = decode(await read_frame(reader, MAX_CONTROL_FRAME))
                request_id = msg.request_id
                self._dispatch(session, msg, writer)
                await writer.drain()
        except ConnectionClosed:
            pass
        except ProtocolError as exc:
            log.warning("control client %s: %s; closing the connection", session.peer,
                        exc.message)
            _send(writer, _error_reply(request_id, exc))
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            # breqd is stopping. The handler ends normally: asyncio's stream callback
            # would log a cancelled handler as an error with a traceback.
            pass
        except Exception:
            log.exception("control client %s: internal error; closing the connection",
                          session.peer)
        finally:
            self._connections.discard(task)
            self.sessions.discard(session)
            self._abort_session(session)
            writer.close()

    def _hello(self, msg: Message) -> Message:
        if msg.op != Op.HELLO:
            raise ProtocolError(f"expected HELLO, got {msg.op.name}")
        version = field_int(msg, "version")
        if version < 1:
            raise ProtocolError(f"protocol version {version} is not supported "
                                f"(this breqd speaks 1 to {CONTROL_PROTOCOL_VERSION})")
        return Message(Op.REPLY_OK, msg.request_id,
                       {"version": min(version, CONTROL_PROTOCOL_VERSION),
                        "server": f"breqd {__version__}"})

    def _dispatch(self, session: Session, msg: Message, writer: asyncio.StreamWriter) -> None:
        handler = self._handlers.get(msg.op)
        if handler is None:
            raise ProtocolError(f"{msg.op.name} is not a request")
        try:
            reply = handler(session, msg)
        except ProtocolError:
            raise
        except BmigError as exc:
            _send(writer, _error_reply(msg.request_id, exc))
            return
        if isinstance(reply, Message):
            _send(writer, reply)
        else:
            asyncio.get_running_loop().create_task(_reply_later(msg.request_id, reply, writer))

    def _abort_session(self, session: Session) -> None:
        """A connection ended: its checkouts go back to dirty, its holds are let go
        (the held chunks stay dirty: a write may have reached the source)."""
        for name, held in session.checkouts.items():
            device = self.devices.get(name)
            if device is None:
                continue
            for first, end in held:
                device.chunks.abort(first, end)
        session.checkouts.clear()
        for name in [n for n, owner in self._senders.items() if owner is session]:
            del self._senders[name]
        holds, session.holds = session.holds, {}
        for name, runs in holds.items():
            device = self.devices.get(name)
            if device is not None:
                for first, end in runs:
                    self._release(device, session, first, end)

    def _release(self, device: TrackedDevice, session: Session, first: int, end: int,
                 synced: bool = False) -> None:
        """Drop ``session``'s hold on [first, end); other sessions' holds stay. Mirrored
        chunks nobody holds any more become clean if ``synced``, plain dirty if not."""
        device.chunks.set_held(first, end, False)
        for other in self.sessions:
            runs = other.holds.get(device.name) if other is not session else None
            if runs:
                for a, b in runs.overlapping(first, end):
                    device.chunks.set_held(a, b, True)
        if device.chunks.release_mirrored(first, end, synced):
            device.committer.lazy(pages_of(first, end))

    # -- requests --------------------------------------------------------------------

    def _device(self, msg: Message) -> TrackedDevice:
        name = field_str(msg, "device")
        device = self.devices.get(name)
        if device is None:
            raise UnknownDevice(f"no tracked device named {name!r}")
        return device

    @staticmethod
    def _spans(device: TrackedDevice, msg: Message) -> list[tuple[int, int]]:
        if not msg.ranges:
            raise RequestError("no ranges given")
        return [device.chunks.span(offset, length) for offset, length in msg.ranges]

    def _mark(self, session: Session, msg: Message) -> Reply:
        """Mark (and hold) the ranges. What one MARK allocates is bounded (invariant 8):
        its ranges, up to 65536 of them and each perhaps the whole device, are merged
        first, and each run is marked in pieces of at most MARK_PIECE chunks, so no bit
        array built on the way grows with the ranges or with the device."""
        device = self._device(msg)
        spans = merge_spans(self._spans(device, msg))
        hold = field_bool(msg, "hold")
        sync = field_bool(msg, "sync")
        if sync and not hold:
            raise RequestError("sync needs hold: a synchronous write holds its chunks")
        if hold:
            runs = session.holds.setdefault(device.name, IntervalSet())
            if len(runs) + len(spans) > MAX_HELD_RUNS:
                raise RequestError(f"{device.name}: more than {MAX_HELD_RUNS} held runs on "
                                   "one connection; release some first")
        pending: list[Awaitable] = []
        pieces = 0
        for first, end in spans:
            for start in range(first, end, MARK_PIECE):
                stop = min(end, start + MARK_PIECE)
                # Which chunks were clean, before the mark makes them dirty: those a
                # synchronous write makes mirrored.
                mirror = device.chunks.clean(start, stop) if sync else None
                flushed = device.mark_spans([(start, stop)], keep_mirrored=sync)
                pieces += 1
                if flushed is not None and flushed not in pending:
                    pending.append(flushed)
                if hold:
                    device.chunks.hold(start, stop, mirror)
            if hold:
                runs.add(first, end)
        device.marks += len(msg.ranges) - pieces      # it counts the ranges sent
        ok = Message(Op.REPLY_OK, msg.request_id)
        if not pending:
            return ok
        return _then(pending[0] if len(pending) == 1 else asyncio.gather(*pending), ok)

    def _mark_completed(self, session: Session, msg: Message) -> Reply:
        """Mark again after the write, and let go of this connection's holds there. With
        ``synced`` every write under the holds reached the target as well: no mark again,
        and mirrored chunks become clean."""
        device = self._device(msg)
        spans = self._spans(device, msg)
        synced = field_bool(msg, "synced")
        pending = None if synced else device.mark_spans(spans)
        runs = session.holds.get(device.name)
        if runs:
            for first, end in spans:
                if runs.overlapping(first, end):
                    runs.remove(first, end)
                    self._release(device, session, first, end, synced)
        ok = Message(Op.REPLY_OK, msg.request_id)
        if pending is None:
            return ok
        return _then(pending, ok)

    def _query(self, session: Session, msg: Message) -> Reply:
        """The byte runs inside one range that may differ from the target."""
        device = self._device(msg)
        spans = self._spans(device, msg)
        if len(spans) != 1:
            raise RequestError("QUERY takes exactly one range")
        first, end = spans[0]
        runs, done = device.chunks.differing_runs(first, end, MAX_QUERY_RUNS)
        offset, length = msg.ranges[0]
        covered = min(offset + length, device.chunks.chunk_bytes(0, done)[1])
        return Message(Op.REPLY_OK, msg.request_id, {"end": covered},
                       [device.chunks.chunk_bytes(a, b) for a, b in runs])

    def _checkout(self, session: Session, msg: Message) -> Reply:
        device = self._device(msg)
        owner = self._senders.get(device.name)
        if owner is not None and owner is not session and owner in self.sessions:
            raise DeviceBusy(f"{device.name} is being shipped by another sender "
                             f"({owner.peer}); one sender at a time")
        self._senders[device.name] = session
        max_bytes = field_int(msg, "max_bytes")
        if max_bytes <= 0:
            raise RequestError(f"max_bytes must be positive, not {max_bytes}")
        runs = device.chunks.checkout(max(1, max_bytes // device.definition.chunk_size),
                                      max_runs=MAX_CHECKOUT_RUNS)
        held = session.checkouts.setdefault(device.name, IntervalSet())
        for first, end in runs:
            held.add(first, end)
        ranges = [device.chunks.chunk_bytes(first, end) for first, end in runs]
        return Message(Op.REPLY_OK, msg.request_id, {}, ranges)

    def _held_spans(self, session: Session, msg: Message) -> tuple[TrackedDevice, list]:
        device = self._device(msg)
        spans = self._spans(device, msg)
        held = session.checkouts.get(device.name)
        for (first, end), (offset, length) in zip(spans, msg.ranges):
            if held is None or not held.contains(first, end):
                raise NotCheckedOut(f"{device.name}: range {offset}+{length} is not checked "
                                    "out by this client")
        return device, spans

    def _commit(self, session: Session, msg: Message) -> Reply:
        device, spans = self._held_spans(session, msg)
        held = session.checkouts[device.name]
        for first, end in spans:
            device.chunks.commit(first, end)
            held.remove(first, end)
            device.committer.lazy(pages_of(first, end))
        return Message(Op.REPLY_OK, msg.request_id)

    def _abort(self, session: Session, msg: Message) -> Reply:
        device, spans = self._held_spans(session, msg)
        held = session.checkouts[device.name]
        for first, end in spans:
            device.chunks.abort(first, end)
            held.remove(first, end)
        return Message(Op.REPLY_OK, msg.request_id)

    def _stats(self, session: Session, msg: Message) -> Reply:
        return Message(Op.REPLY_OK, msg.request_id, self._device(msg).stats())

    def _list(self, session: Session, msg: Message) -> Reply:
        devices = [self.devices[name].stats() for name in sorted(self.devices)]
        return Message(Op.REPLY_OK, msg.request_id, {"devices": devices})

    def _set_all_dirty(self, session: Session, msg: Message) -> Reply:
        device = self._device(msg)
        device.chunks.set_all_dirty()
        log.info("%s: every chunk set dirty on request", device.name)
        return _then(device.committer.require(device.all_pages()),
                     Message(Op.REPLY_OK, msg.request_id))

    def _clear_all(self, session: Session, msg: Message) -> Reply:
        device = self._device(msg)
        if not field_bool(msg, "force"):
            raise RequestError(f"{device.name}: clearing every dirty chunk needs the force "
                               "flag: the copy is only right if the target already equals "
                               "the source")
        device.chunks.clear_all()
        log.warning("%s: every dirty chunk cleared on request", device.name)
        device.committer.lazy(device.all_pages())
        flushed = device.committer.flush_lazy()
        ok = Message(Op.REPLY_OK, msg.request_id)
        return ok if flushed is None else _then(flushed, ok)

    def _add_device(self, session: Session, msg: Message) -> Reply:
        name = check_name(field_str(msg, "name"))
        size = field_int(msg, "size")
        chunk_size = field_int(msg, "chunk_size", DEFAULT_CHUNK_SIZE)
        check_geometry(size, chunk_size)
        path = os.path.join(self.settings.config_dir, name + SUFFIX)
        if name in self._closing:
            raise RequestError(f"device {name!r} is still being removed; try again")
        if name in self.devices or os.path.exists(path):
            raise DeviceExists(f"device {name!r} is already defined ({path})")
        definition = DeviceDefinition(name, size, chunk_size, new_device_id())
        adopted = self._adopted_lineage(msg, definition.device_id)
        try:
            definition.save(self.settings.config_dir)
            if adopted is not None:
                save_source(self.settings.state_dir, name, adopted)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc.strerror}") from None
        try:
            device = self._track(definition)
        except BaseException:
            os.unlink(path)
            raise
        if device is None:
            os.unlink(path)
            raise StateError(f"{name}: cannot create its bitmap in {self.settings.state_dir}")
        if adopted is None or not field_bool(msg, "clean"):
            return Message(Op.REPLY_OK, msg.request_id, device.stats())
        # An adopted copy that equals its source at the handover starts clean: from now
        # on what is written here is what a fail-back ships.
        log.warning("%s: adopted generation %s with a clean bitmap", name,
                    hex_id(adopted.generation))
        device.chunks.clear_all()
        device.committer.lazy(device.all_pages())
        flushed = device.committer.flush_lazy()
        ok = Message(Op.REPLY_OK, msg.request_id, device.stats())
        return ok if flushed is None else _then(flushed, ok)

    @staticmethod
    def _adopted_lineage(msg: Message, device_id: int) -> SourceLineage | None:
        """ADD_DEVICE with ``generation`` (and ``previous``): the device carries on a
        lineage that began elsewhere (a promoted target)."""
        if "generation" not in msg.fields:
            return None
        try:
            generation = parse_id(msg.fields["generation"], "generation")
            previous = msg.fields.get("previous", [])
            if not isinstance(previous, list):
                raise ConfigError("previous must be a list of generations")
            for g in previous:
                parse_id(g, "previous")
        except ConfigError as exc:
            raise ProtocolError(exc.message) from None
        return SourceLineage(device_id, generation, ROLE_PRIMARY,
                             [str(g) for g in previous][:16])

    def _set_lineage(self, session: Session, msg: Message) -> Reply:
        """Record a cutover on the source: its role, and the generation that took over."""
        device = self._device(msg)
        role = field_str(msg, "role")
        if role not in ROLES:
            raise RequestError(f"role {role!r}: one of {', '.join(ROLES)}")
        lineage = device.lineage
        lineage.role = role
        if "successor" in msg.fields:
            try:
                lineage.successor = parse_id(msg.fields["successor"], "successor")
            except ConfigError as exc:
                raise ProtocolError(exc.message) from None
        save_source(self.settings.state_dir, device.name, lineage)
        log.warning("%s: role %s%s", device.name, role,
                    f", succeeded by generation {hex_id(lineage.successor)}"
                    if lineage.successor else "")
        return Message(Op.REPLY_OK, msg.request_id, device.stats())

    def _remove_device(self, session: Session, msg: Message) -> Reply:
        device = self._device(msg)
        path = os.path.join(self.settings.config_dir, device.name + SUFFIX)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror}") from None
        self._untrack(device.name)
        return Message(Op.REPLY_OK, msg.request_id, {"state_file": device.bitmap.path})


async def _then(pending: Awaitable, reply: Message) -> Message:
    await pending
    return reply


async def _reply_later(request_id: int, reply: Awaitable[Message],
                       writer: asyncio.StreamWriter) -> None:
    try:
        message = await reply
    except BmigError as exc:
        message = _error_reply(request_id, exc)
    _send(writer, message)


def _send(writer: asyncio.StreamWriter, msg: Message) -> None:
    if not writer.is_closing():
        writer.write(pack_frame(msg.encode()))


def _error_reply(request_id: int, exc: BmigError) -> Message:
    return Message(Op.REPLY_ERROR, request_id, {"code": exc.wire_code, "message": exc.message})


def _peer_name(writer: asyncio.StreamWriter) -> str:
    sock = writer.get_extra_info("socket")
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        pid = int.from_bytes(creds[:4], "little")
        return f"pid {pid}"
    except (OSError, AttributeError):
        return "unknown"


def _socket_answers(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(1.0)
        try:
            probe.connect(path)
        except OSError:
            return False
    return True
