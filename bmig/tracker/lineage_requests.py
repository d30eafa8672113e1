"""The lineage requests (invariant 7 on the source's side): SET_LINEAGE records a cutover
(the source's role, and the generation that took over), and ADD_DEVICE may carry a
lineage the new device continues (``adopted_lineage``: a promoted target adopted as a
source, with its generation and the ones before it).

The records and their file format are bmig.lineage's; this room only checks what a
request asks for and saves it. It may not change chunk state or the set of devices
(the ADD_DEVICE handler, device_requests.py, does that with what it gets from here).
"""

from __future__ import annotations

import logging

from bmig.errors import ConfigError, ProtocolError, RequestError
from bmig.lineage import (ROLE_PRIMARY, ROLES, SourceLineage, hex_id, new_generation, parse_id,
                          save_source)
from bmig.tracker.protocol import Message, Op, Reply, field_str
from bmig.tracker.registry import Registry
from bmig.tracker.sessions import Session

log = logging.getLogger("breqd")


def adopted_lineage(msg: Message, device_id: int) -> SourceLineage | None:
    """ADD_DEVICE with ``generation`` (and ``previous``): the device carries on a lineage
    that began elsewhere (a promoted target). None without ``generation``."""
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


class LineageRequests:
    def __init__(self, registry: Registry):
        self._registry = registry

    def set_lineage(self, session: Session, msg: Message) -> Reply:
        """Record a cutover on the source: its role, and the generation that took over.
        ``ha``: the HA replication mode starts or ends (bmig-nbd then starts the device
        read-only until its role is confirmed); ``new_generation``: a primary confirmed
        by force while its peer may be one too (a split brain is then told apart)."""
        device = self._registry.requested(msg)
        role = field_str(msg, "role")
        if role not in ROLES:
            raise RequestError(f"role {role!r}: one of {', '.join(ROLES)}")
        lineage = device.lineage
        if "ha" in msg.fields:
            if not isinstance(msg.fields["ha"], bool):
                raise ProtocolError("ha must be true or false")
            lineage.ha = msg.fields["ha"]
        if msg.fields.get("new_generation") is True:
            lineage.previous = [hex_id(lineage.generation)] + lineage.previous[:15]
            lineage.generation = new_generation()
        lineage.role = role
        if "successor" in msg.fields:
            try:
                lineage.successor = parse_id(msg.fields["successor"], "successor")
            except ConfigError as exc:
                raise ProtocolError(exc.message) from None
        save_source(self._registry.state_dir, device.name, lineage)
        log.warning("%s: role %s%s", device.name, role,
                    f", succeeded by generation {hex_id(lineage.successor)}"
                    if lineage.successor else "")
        return Message(Op.REPLY_OK, msg.request_id, device.stats())
