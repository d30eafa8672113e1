"""Where a device stands on the source side, as ``bmigrate status NAME`` shows it:
breqd's view (role, generation, what is dirty, in flight, held, being replicated),
bmig-nbd's (replication, freeze, a failed source) when one serves the device, and the
target's record when a target is given. Gathering only: bmig.cli.status prints.
"""

from __future__ import annotations

from typing import Any, Mapping

from bmig.errors import UnreachableError
from bmig.nbd.manage_client import ManageClient
from bmig.sender.targets import target_status
from bmig.tracker.blocking_client import TrackerClient
from bmig.wire.options import ConnectOptions
from bmig.wire.urls import parse_target_url


def source_status(name: str, control: str, to: str | None, connection: Mapping[str, Any],
                  manage_dir: str | None = None) -> dict:
    """This side's view of NAME (breqd; bmig-nbd's, when one serves NAME in
    ``manage_dir``), and the target's record when --to is given."""
    with TrackerClient(control, client="bmigrate") as client:
        stats = client.stats(name)
    out: dict[str, Any] = {"device": name, "side": "source", "role": stats["role"],
                           "generation": stats["generation"], "device_id": stats["device_id"],
                           "dirty_bytes": stats["dirty_bytes"],
                           "inflight_bytes": stats["inflight_bytes"],
                           "held_bytes": stats["held_bytes"],
                           "mirrored_bytes": stats["mirrored_bytes"],
                           "successor": stats["successor"]}
    if manage_dir is not None:
        out["nbd"] = nbd_status(manage_dir, name)
    if to:
        url = parse_target_url(to)
        status = target_status(url, ConnectOptions.from_dict(connection))
        records = [t for t in status.get("targets", []) if t.get("export") == url.export]
        out["target"] = records[0] if records else None
    return out


def nbd_status(manage_dir: str, name: str) -> dict | None:
    """What the bmig-nbd serving NAME says of itself (replication, freeze, a failed
    source), or None when none serves it."""
    try:
        with ManageClient(manage_dir, name, timeout=10) as client:
            status = client.call("status")
    except UnreachableError:
        return None
    return {k: v for k, v in status.items() if k != "ok"}
