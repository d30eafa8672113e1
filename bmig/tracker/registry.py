"""The device registry: the devices breqd tracks, kept in line with its config directory.

``rescan`` compares the directory with what is tracked: a new file starts tracking
(``TrackedDevice`` opens or creates its bitmap), a removed file stops it (``untrack``: the
device is closed in a background task, and a name being closed cannot be tracked again
until it is), a changed definition is refused with an error and the old one stays, and an
invalid file is reported once per distinct error. A rescan runs at start, RESCAN_DELAY
after the watcher reports a change, and on SIGHUP; ADD_DEVICE and REMOVE_DEVICE track and
untrack at once, so the rescan their own file change causes finds nothing to do.

The room may open and close devices and read the config directory; it may not change
chunk state, and it knows nothing of connections: whoever keeps per-device state of its
own (the sessions) registers in ``untrack_listeners`` to forget a device when it goes.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from typing import Callable

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from bmig.chunkmath import chunk_count
from bmig.errors import BmigError, ConfigError, UnknownDevice
from bmig.limits import DEFAULT_ACTIVITY_LOG
from bmig.tracker.definitions import SUFFIX, DeviceDefinition, scan
from bmig.tracker.protocol import Message, field_str
from bmig.tracker.tracked import TrackedDevice

log = logging.getLogger("breqd")

RESCAN_DELAY = 0.05      # seconds from a change in the directory to the rescan


class ConfigWatcher:
    """Calls ``notify`` (from watchdog's observer thread) whenever the directory changes."""

    def __init__(self, config_dir: str, notify: Callable[[], None]):
        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                if event.event_type not in ("opened", "closed_no_write"):
                    notify()

        self._observer = Observer()
        self._observer.schedule(Handler(), config_dir, recursive=False)

    def start(self) -> None:
        self._observer.start()

    def stop(self) -> None:
        self._observer.stop()
        self._observer.join(timeout=5)


class Registry:
    """``log_chunks``: the size of each device's activity log (bmig.tracker.activity)."""

    def __init__(self, config_dir: str, state_dir: str, executor: Executor,
                 log_chunks: int = DEFAULT_ACTIVITY_LOG):
        self.config_dir = config_dir
        self.state_dir = state_dir
        self.devices: dict[str, TrackedDevice] = {}
        self.untrack_listeners: list[Callable[[str], None]] = []
        self._executor = executor
        self._log_chunks = log_chunks
        self._loop: asyncio.AbstractEventLoop | None = None
        self._watcher: ConfigWatcher | None = None
        self._rescan_handle: asyncio.TimerHandle | None = None
        self._bad_files: dict[str, str] = {}
        self._refused: dict[str, DeviceDefinition] = {}
        self._closing: dict[str, asyncio.Task] = {}

    def requested(self, msg: Message) -> TrackedDevice:
        """The device a request names in its ``device`` field."""
        name = field_str(msg, "device")
        device = self.devices.get(name)
        if device is None:
            raise UnknownDevice(f"no tracked device named {name!r}")
        return device

    def closing(self, name: str) -> bool:
        """True while the bitmap of an untracked device ``name`` is still being closed."""
        return name in self._closing

    # -- life cycle ------------------------------------------------------------------

    def start(self) -> None:
        """Watch the config directory and track what it defines (on the event loop)."""
        self._loop = asyncio.get_running_loop()
        self._watcher = ConfigWatcher(self.config_dir, self._from_watcher_thread)
        self._watcher.start()
        self.rescan()

    def stop_watching(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
            self._watcher = None

    async def close(self) -> None:
        """Close every device, and wait for those being closed already."""
        for device in list(self.devices.values()):
            await device.close()
        self.devices.clear()
        for task in list(self._closing.values()):
            await task

    # -- the config directory --------------------------------------------------------

    def _from_watcher_thread(self) -> None:
        loop = self._loop
        try:
            if loop is not None:
                loop.call_soon_threadsafe(self.schedule_rescan)
        except RuntimeError:  # loop closed during shutdown
            pass

    def schedule_rescan(self) -> None:
        if self._rescan_handle is None:
            self._rescan_handle = asyncio.get_running_loop().call_later(
                RESCAN_DELAY, self.rescan)

    def rescan(self) -> None:
        """Bring the tracked set in line with the config directory."""
        self._rescan_handle = None
        try:
            found, errors = scan(self.config_dir)
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
                self.track(definition)
            elif current.definition != definition:
                self._refuse_change(current.definition, definition)
            else:
                self._refused.pop(name, None)
        for name in list(self.devices):
            if name not in found and name not in errors:
                self.untrack(name)

    def track(self, definition: DeviceDefinition) -> TrackedDevice | None:
        """Start tracking ``definition``; None (logged) if its bitmap cannot be opened."""
        closing = self._closing.get(definition.name)
        if closing is not None:  # its bitmap is still being closed: retry once it is
            closing.add_done_callback(lambda _: self.schedule_rescan())
            return None
        try:
            device = TrackedDevice(definition, self.state_dir, self._executor,
                                   self._log_chunks)
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

    def untrack(self, name: str) -> None:
        """Stop tracking ``name``: the listeners forget it, its bitmap is closed later."""
        device = self.devices.pop(name)
        for forget in self.untrack_listeners:
            forget(name)
        self._refused.pop(name, None)
        log.info("%s: no longer tracked; its bitmap stays in %s", name, device.bitmap.path)
        task = asyncio.get_running_loop().create_task(device.close())
        self._closing[name] = task
        task.add_done_callback(lambda _: self._closing.pop(name, None))
