"""What breceive lets a sender do: the configured targets and nothing else (deny by
default), each with what may be done to its data (``TargetConfig``), the state directory
and the secret (``Policy``). Plain data, built by bmig.cli.breceive; the session
(bmig.receiver.session) and the OPEN decision (bmig.receiver.opening) consult it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TargetConfig:
    export: str
    path: str
    allow_discard: bool = False
    max_size: int | None = None          # a file target grows to this at most (None: the
    allow_discard_primary: bool = False  # size of its file system); a primary's data may
                                         # be discarded (a promoted target: never by default)


@dataclass(frozen=True)
class Policy:
    """What a peer may do: the configured targets and nothing else (deny by default)."""

    targets: dict[str, TargetConfig]
    state_dir: str
    secret: bytes | None = None
