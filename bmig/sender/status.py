"""Where devices stand on the source side, as ``bmigrate status``, ``events`` and
``metrics`` show them: one status object per device in bmig.devicestate's shape.

    tracker   breqd's view: role, generation, what is dirty, in flight, held, being
              replicated (one LIST for every device, or STATS for one)
    nbd       what the bmig-nbd serving the device says of itself (its control socket in
              the manage directory; null when none serves it, "not answering" when its
              socket is there but it does not answer in NBD_TIMEOUT)
    service   what the device's ``bmigrate run`` published (bmig.sender.statusfile;
              null when none ever ran)
    target    only when a target is given: its record, null when it has none of this
              export, or ``unreachable`` with the error, the rest still shown

Gathering only: bmig.cli prints. A part that cannot be asked never hides the others.
"""

from __future__ import annotations

import os
import time
from typing import Any, Mapping

from bmig.errors import BmigError, UnreachableError
from bmig.framing import ConnectionClosed
from bmig.nbd.manage_client import ManageClient, socket_path
from bmig.sender import statusfile
from bmig.sender.targets import export_record
from bmig.tracker.blocking_client import TrackerClient
from bmig.wire.options import ConnectOptions
from bmig.wire.urls import parse_target_url

NBD_TIMEOUT = 5.0          # seconds a bmig-nbd has to answer before "not answering"
TRACKER_FIELDS = ("role", "generation", "successor", "device_id", "size", "dirty_bytes",
                  "inflight_bytes", "held_bytes", "mirrored_bytes")


def statuses(control: str, names: list[str] | None, manage_dir: str | None,
             status_dir: str | None) -> list[dict[str, Any]]:
    """Every device breqd tracks (``names`` None), or those named, in name order.
    UnreachableError when breqd does not answer; UnknownDevice for a name it lacks."""
    with TrackerClient(control, client="bmigrate") as client:
        if names is None:
            stats = client.list_devices()
        else:
            stats = [client.stats(name) for name in names]
    now = time.time()
    out = []
    for s in sorted(stats, key=lambda s: str(s.get("name"))):
        name = str(s["name"])
        status: dict[str, Any] = {"device": name, "side": "source", "time": round(now, 3),
                                  **{k: s.get(k) for k in TRACKER_FIELDS}}
        if manage_dir is not None:
            status["nbd"] = nbd_status(manage_dir, name)
        if status_dir is not None:
            status["service"] = statusfile.read(status_dir, name)
        out.append(status)
    return out


def source_status(name: str, control: str, to: str | None, connection: Mapping[str, Any],
                  manage_dir: str | None = None, status_dir: str | None = None) -> dict:
    """NAME's status, and the target's record when ``to`` is given (a target that
    cannot be asked is said so in the part, the rest still gathered)."""
    status, = statuses(control, [name], manage_dir, status_dir)
    if to:
        status["target"] = target_record(to, connection)
    return status


def target_record(to: str, connection: Mapping[str, Any]) -> dict[str, Any] | None:
    url = parse_target_url(to)
    try:
        return export_record(url, ConnectOptions.from_dict(connection))
    except BmigError as exc:
        return {"export": url.export,
                "state": "unreachable" if isinstance(exc, (UnreachableError, ConnectionClosed))
                else "error",
                "error": exc.message}


def nbd_status(manage_dir: str, name: str) -> dict | None:
    """What the bmig-nbd serving NAME says of itself (replication, freeze, a failed
    source), with its ``state``; None when none serves it (no control socket)."""
    if not os.path.exists(socket_path(manage_dir, name)):
        return None
    try:
        with ManageClient(manage_dir, name, timeout=NBD_TIMEOUT) as client:
            status = client.call("status")
    except BmigError as exc:
        return {"device": name, "state": "not answering", "error": exc.message}
    out = {k: v for k, v in status.items() if k != "ok"}
    out.setdefault("state", nbd_state(out))
    if "replication" not in out and (out.get("replicating") or out.get("failed")):
        out["replication"] = "connected" if out.get("replicating") else "degraded"
    return out


def nbd_state(nbd: Mapping[str, Any]) -> str:
    """bmig-nbd's state, from its status: the gravest thing about it."""
    if nbd.get("source_failed"):
        return "source failed"
    if nbd.get("blocked"):
        return "writes blocked"
    if nbd.get("read_only"):
        return "read-only"
    if nbd.get("frozen"):
        return "frozen"
    return "replicating" if nbd.get("replicating") else "tracking"
