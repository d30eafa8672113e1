"""The target records in a receiver's state directory, as ``bmigrate status
--receiver-state-dir DIR`` shows them on the receiving host. Reading only: breceive
itself need not run, and nothing is locked or changed.
"""

from __future__ import annotations

import os

from bmig.errors import BmigError, ConfigError
from bmig.lineage import TARGET_SUFFIX, load_target


def receiver_status(state_dir: str) -> list[dict]:
    """Every target record in a receiver's state directory."""
    try:
        names = sorted(n[:-len(TARGET_SUFFIX)] for n in os.listdir(state_dir)
                       if n.endswith(TARGET_SUFFIX))
    except OSError as exc:
        raise ConfigError(f"cannot read {state_dir}: {exc.strerror}") from None
    out = []
    for export in names:
        try:
            out.append({"side": "target", **load_target(state_dir, export).to_json()})
        except BmigError as exc:
            out.append({"side": "target", "export": export, "error": exc.message})
    return out
