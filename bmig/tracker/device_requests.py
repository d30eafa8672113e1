"""The requests about devices as a whole: which are tracked (LIST, STATS), adding and
removing one (ADD_DEVICE, REMOVE_DEVICE: the definition file is written or deleted here,
then the registry tracks or untracks at once), and a device's dirty state all at once
(QUERY, SET_ALL_DIRTY, CLEAR_ALL).

The room may write and delete definition files and change a whole device's chunk state;
it may not touch what a session has checked out or holds (sessions.py) or a lineage
record beyond saving the one ADD_DEVICE adopts (lineage_requests.py checks it).
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable

from bmig.constants import DEFAULT_CHUNK_SIZE
from bmig.errors import DeviceExists, RequestError, StateError
from bmig.limits import MAX_QUERY_RUNS
from bmig.lineage import hex_id, save_source
from bmig.tracker.definitions import (SUFFIX, DeviceDefinition, check_geometry, check_name,
                                      new_device_id)
from bmig.tracker.lineage_requests import adopted_lineage
from bmig.tracker.protocol import (Message, Op, Reply, field_bool, field_int, field_str,
                                   reply_after)
from bmig.tracker.registry import Registry
from bmig.tracker.sessions import Session
from bmig.tracker.tracked import TrackedDevice

log = logging.getLogger("breqd")


class DeviceRequests:
    """``slot`` gives a device's sender slot for its status (Sessions.slot)."""

    def __init__(self, registry: Registry, slot: Callable[[str], dict[str, Any]]):
        self._registry = registry
        self._slot = slot

    # -- what is tracked -------------------------------------------------------------

    def _status(self, device: TrackedDevice) -> dict[str, Any]:
        return {**device.stats(), **self._slot(device.name)}

    def stats(self, session: Session, msg: Message) -> Reply:
        return Message(Op.REPLY_OK, msg.request_id, self._status(self._registry.requested(msg)))

    def list_devices(self, session: Session, msg: Message) -> Reply:
        devices = self._registry.devices
        return Message(Op.REPLY_OK, msg.request_id,
                       {"devices": [self._status(devices[name]) for name in sorted(devices)]})

    # -- adding and removing ---------------------------------------------------------

    def add_device(self, session: Session, msg: Message) -> Reply:
        registry = self._registry
        name = check_name(field_str(msg, "name"))
        size = field_int(msg, "size")
        chunk_size = field_int(msg, "chunk_size", DEFAULT_CHUNK_SIZE)
        check_geometry(size, chunk_size)
        path = os.path.join(registry.config_dir, name + SUFFIX)
        if registry.closing(name):
            raise RequestError(f"device {name!r} is still being removed; try again")
        if name in registry.devices or os.path.exists(path):
            raise DeviceExists(f"device {name!r} is already defined ({path})")
        definition = DeviceDefinition(name, size, chunk_size, new_device_id())
        adopted = adopted_lineage(msg, definition.device_id)
        try:
            definition.save(registry.config_dir)
            if adopted is not None:
                save_source(registry.state_dir, name, adopted)
        except OSError as exc:
            raise StateError(f"cannot write {path}: {exc.strerror}") from None
        try:
            device = registry.track(definition)
        except BaseException:
            os.unlink(path)
            raise
        if device is None:
            os.unlink(path)
            raise StateError(f"{name}: cannot create its bitmap in {registry.state_dir}")
        if adopted is None or not field_bool(msg, "clean"):
            return Message(Op.REPLY_OK, msg.request_id, self._status(device))
        # An adopted copy that equals its source at the handover starts clean: from now
        # on what is written here is what a fail-back ships.
        log.warning("%s: adopted generation %s with a clean bitmap", name,
                    hex_id(adopted.generation))
        device.chunks.clear_all()
        device.recovered = None       # nothing was set dirty: "no saved bitmap" would lie
        device.committer.lazy(device.all_pages())
        flushed = device.committer.flush_lazy()
        ok = Message(Op.REPLY_OK, msg.request_id, self._status(device))
        return ok if flushed is None else reply_after(flushed, ok)

    def remove_device(self, session: Session, msg: Message) -> Reply:
        device = self._registry.requested(msg)
        path = os.path.join(self._registry.config_dir, device.name + SUFFIX)
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise StateError(f"cannot remove {path}: {exc.strerror}") from None
        self._registry.untrack(device.name)
        return Message(Op.REPLY_OK, msg.request_id, {"state_file": device.bitmap.path})

    # -- a device's dirty state at once ----------------------------------------------

    def query(self, session: Session, msg: Message) -> Reply:
        """The byte runs inside one range that may differ from the target."""
        device = self._registry.requested(msg)
        spans = device.spans(msg.ranges)
        if len(spans) != 1:
            raise RequestError("QUERY takes exactly one range")
        first, end = spans[0]
        runs, done = device.chunks.differing_runs(first, end, MAX_QUERY_RUNS)
        offset, length = msg.ranges[0]
        covered = min(offset + length, device.chunks.chunk_bytes(0, done)[1])
        return Message(Op.REPLY_OK, msg.request_id, {"end": covered},
                       [device.chunks.chunk_bytes(a, b) for a, b in runs])

    def set_all_dirty(self, session: Session, msg: Message) -> Reply:
        device = self._registry.requested(msg)
        device.chunks.set_all_dirty()
        log.info("%s: every chunk set dirty on request", device.name)
        return reply_after(device.committer.require(device.all_pages()),
                           Message(Op.REPLY_OK, msg.request_id))

    def clear_all(self, session: Session, msg: Message) -> Reply:
        device = self._registry.requested(msg)
        if not field_bool(msg, "force"):
            raise RequestError(f"{device.name}: clearing every dirty chunk needs the force "
                               "flag: the copy is only right if the target already equals "
                               "the source")
        device.chunks.clear_all()
        log.warning("%s: every dirty chunk cleared on request", device.name)
        device.committer.lazy(device.all_pages())
        flushed = device.committer.flush_lazy()
        ok = Message(Op.REPLY_OK, msg.request_id)
        return ok if flushed is None else reply_after(flushed, ok)
