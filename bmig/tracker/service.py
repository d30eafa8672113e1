"""breqd: its rooms put together, started in order and stopped in reverse.

The rooms, and the requests each one answers (the table in ``Breqd.__init__``):

    control.py           the control socket, connections, HELLO, dispatch, replies
    sessions.py          a connection's checkouts and holds, and its end (invariant 3):
                         MARK, MARK_COMPLETED, CHECKOUT, COMMIT, ABORT; the sender
                         slot: CLAIM
    registry.py          the tracked devices, the config directory, its watcher, rescans
    device_requests.py   LIST, STATS, ADD_DEVICE, REMOVE_DEVICE, QUERY, SET_ALL_DIRTY,
                         CLEAR_ALL
    lineage_requests.py  SET_LINEAGE, and the lineage ADD_DEVICE may adopt

This module owns what is the daemon's as a whole: the state directory's lock, the thread
pool for bitmap writes, the timers (lazy flush, STATUS, WATCHDOG), the signals, and the
order of start and stop. It may not answer a request itself.

All chunk state changes happen on the event loop thread, in the order requests arrive on
a connection; only bitmap writes run in worker threads (bmig.tracker.committer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from bmig import __version__, systemd
from bmig.errors import StateError
from bmig.limits import DEFAULT_ACTIVITY_LOG
from bmig.statelock import StateLock
from bmig.tracker.control import ControlServer
from bmig.tracker.device_requests import DeviceRequests
from bmig.tracker.lineage_requests import LineageRequests
from bmig.tracker.protocol import Op
from bmig.tracker.registry import Registry
from bmig.tracker.sessions import Sessions

log = logging.getLogger("breqd")

LAZY_FLUSH_SECONDS = 2.0
STATUS_SECONDS = 10.0


@dataclass
class Settings:
    state_dir: str
    config_dir: str
    control: str
    socket_mode: int = 0o600
    activity_log_chunks: int = DEFAULT_ACTIVITY_LOG


class Breqd:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="bitmap")
        self._lock = StateLock(settings.state_dir, f"breqd (control socket {settings.control})")
        self._stopping = asyncio.Event()
        self.registry = Registry(settings.config_dir, settings.state_dir, self._executor,
                                 settings.activity_log_chunks)
        self.sessions = Sessions(self.registry)
        self.registry.untrack_listeners.append(self.sessions.forget_device)
        devices = DeviceRequests(self.registry, self.sessions.slot)
        lineage = LineageRequests(self.registry)
        self.control = ControlServer(settings.control, settings.socket_mode, self.sessions, {
            Op.MARK: self.sessions.mark, Op.MARK_COMPLETED: self.sessions.mark_completed,
            Op.QUERY: devices.query,
            Op.CHECKOUT: self.sessions.checkout, Op.COMMIT: self.sessions.commit,
            Op.ABORT: self.sessions.abort, Op.CLAIM: self.sessions.claim,
            Op.STATS: devices.stats, Op.LIST: devices.list_devices,
            Op.SET_ALL_DIRTY: devices.set_all_dirty, Op.CLEAR_ALL: devices.clear_all,
            Op.ADD_DEVICE: devices.add_device, Op.REMOVE_DEVICE: devices.remove_device,
            Op.SET_LINEAGE: lineage.set_lineage,
        })

    # -- life cycle ------------------------------------------------------------------

    async def run(self) -> None:
        """Serve until SIGTERM or SIGINT, then stop cleanly."""
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGHUP, self.registry.schedule_rescan)
        tasks = [loop.create_task(self._lazy_flusher()), loop.create_task(self._status())]
        interval = systemd.watchdog_interval()
        if interval:
            tasks.append(loop.create_task(self._watchdog(interval)))
        systemd.notify("READY=1", f"STATUS={self._status_line()}")
        log.info("breqd %s ready on %s, tracking %d device(s)", __version__,
                 self.settings.control, len(self.registry.devices))
        try:
            await self._stopping.wait()
        finally:
            systemd.notify("STOPPING=1")
            for task in tasks:
                task.cancel()
            await self.stop()

    async def start(self) -> None:
        """Take the state directory, track what the config directory defines, listen."""
        s = self.settings
        for directory in (s.state_dir, s.config_dir):
            try:
                os.makedirs(directory, mode=0o700, exist_ok=True)
            except OSError as exc:
                raise StateError(f"cannot create {directory}: {exc.strerror}") from None
        self._lock.acquire()
        try:
            self.registry.start()
            await self.control.listen()
        except BaseException:
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stop listening, end every connection (their checkouts go back to dirty), write
        and close every bitmap, let go of the state directory."""
        self.registry.stop_watching()
        self.control.close()
        await self.control.drop_connections()
        self.sessions.end_all()
        await self.registry.close()
        self._executor.shutdown(wait=True)
        self._lock.release()
        log.info("breqd stopped")

    # -- timers ----------------------------------------------------------------------

    async def _lazy_flusher(self) -> None:
        while True:
            await asyncio.sleep(LAZY_FLUSH_SECONDS)
            for device in list(self.registry.devices.values()):
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
        devices = self.registry.devices
        dirty = sum(d.chunks.dirty_bytes() for d in devices.values())
        return f"tracking {len(devices)} device(s), {dirty} bytes dirty"
