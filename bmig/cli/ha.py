"""``bmigrate replicate NAME --keep``: the HA replication mode as a long-running command
(bmig.sender.ha does the work; this builds it from flags and the migration file, hands
its state to systemd, and maps the end to an exit code).
"""

from __future__ import annotations

from typing import Any

from bmig import systemd
from bmig.cli.sync import EXIT_INTERRUPTED, prepare
from bmig.errors import EXIT_OK
from bmig.sender.ha import HaReplication, HaSettings
from bmig.sender.settings import replica_options


def keep(name: str, protocol: str, ack_timeout: float, manage_dir: str,
         config_file: str | None, as_json: bool, flags: dict[str, Any]) -> int:
    """Run the HA mode until SIGTERM (0) or an error that does not mend itself."""
    migration, _, signals, _ = prepare(
        "replicate", config_file, {"name": name, "manage_dir": manage_dir, **flags}, as_json)
    values = {k: v for k, v in flags.items() if v is not None}
    ha = HaReplication(migration, HaSettings(
        manage_dir=str(migration.settings.manage_dir or manage_dir), protocol=protocol,
        ack_timeout=ack_timeout, replicate_options=replica_options(values)),
        on_state=lambda report: systemd.notify(
            f"STATUS={migration.name}: {report['state']}"
            + (f", {report['lag_bytes']} bytes behind" if report.get("lag_bytes") else "")))
    systemd.notify("READY=1", f"STATUS={migration.name}: connecting to {migration.url}")
    try:
        ha.run()
    finally:
        systemd.notify("STOPPING=1")
        migration.close()
    return EXIT_INTERRUPTED if signals.interrupted else EXIT_OK
