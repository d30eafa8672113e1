"""bmig-nbd's own control socket: replication, freeze and read-only, at run time.

One Unix socket per device, ``DIR/DEVICE.sock`` (mode 0600), so that ``bmigrate
replicate NAME`` and ``bmigrate cutover NAME`` find the bmig-nbd that serves NAME. Frames
as everywhere (bmig.framing, capped); each body is a JSON object: a request
``{"op": ..., ...}`` and its reply ``{"ok": true, ...}`` or ``{"ok": false, "code": ...,
"message": ...}``. The first request is ``hello`` with the client's ``version``. Requests:

    hello       {version}                      → {version, server}
    status      {}                             → {device, export, replicating, ...}
    replicate   {url, protocol, policy, options...} → connect and switch to synchronous
    stop        {}                             → back to tracking only
    freeze      {lease}                        → new writes wait; returns once none runs
    thaw        {}                             → writes go on (whoever froze them)
    flush       {}                             → durable on both sides
    read-only   {value}                        → refuse writes (after a handover); false:
                                                 writable at once, whoever asked, and
                                                 an HA device's role counts as confirmed
    confirm     {}                             → the device's role as primary is
                                                 confirmed (an HA device's target is
                                                 still its secondary, or an operator
                                                 said so): writable, unless an open
                                                 connection still asks for read-only or
                                                 breqd's role is not primary now
    ha-state    {state, lag_bytes, ...}        → what the HA replication (bmigrate
                                                 replicate --keep) says it does; shown in
                                                 status as "ha" while its connection lasts

A freeze is a lease held by the connection that asked for it: it ends when that
connection closes (the client died, say), or ``lease`` seconds after it was taken, if
given; writes go on once no connection holds one. When a lease runs out, its connection
gets an error frame and is closed, and nothing it sent after is done: a client that
took a freeze never goes on as if its writes were still held back.

Read-only is held by the connections that asked for it, each on its own: one closing
leaves the device read-only while another open one still asks for it. Once the last
closes (a cutover killed before it recorded the handover, say), breqd is asked, before
any freeze of that connection ends, and the device is writable again unless it is
handed over there or awaits the confirmation of its role (invariant 7: the record, not
a connection, decides). Should breqd not answer, the device stays read-only (the safe
side), and the log says how to make it writable.

It may only start and stop replication (the replication layer) and freeze, thaw or make
read-only (the control layer); it may not touch holds, the tracking layer or breqd.

docs/architecture.md shows where this sits; bmigrate(1) documents the commands.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

from bmig import __version__
from bmig.constants import REPLICATION_POLICIES, REPLICATION_PROTOCOLS
from bmig.errors import BmigError, ConfigError, ProtocolError, RequestError
from bmig.framing import ConnectionClosed, read_frame, write_frame
from bmig.limits import MAX_MANAGE_FRAME
from bmig.lineage import ROLE_HANDED_OVER, ROLE_PRIMARY, hex_id, parse_id
from bmig.nbd.manage_client import MANAGE_VERSION, socket_path
from bmig.nbd.layers.control import ControlLayer
from bmig.nbd.layers.replicate import ReplicateLayer
from bmig.nbd.layers.track import TrackLayer
from bmig.nbd.replica import ACK_TIMEOUT, open_replica
from bmig.wire.client import SourceInfo
from bmig.wire.options import ConnectOptions

log = logging.getLogger("bmig-nbd")

MAX_LEASE = 7 * 24 * 3600.0     # seconds a freeze may be asked to last
# What an ha-state request may say (bmig.sender.ha), shown as status["ha"].
HA_FIELDS = ("state", "lag_bytes", "lag_seconds", "since", "target", "retry_in", "error",
             "protocol")
ROLE_TIMEOUT = 10.0             # seconds breqd may take to say a device's role


@dataclass
class Managed:
    """One device served by this bmig-nbd, as its control socket sees it."""

    device: str
    export: str
    control: ControlLayer
    replicate: ReplicateLayer
    source: SourceInfo      # from breqd
    # An HA device started read-only until its role is confirmed (bmig.nbd.service).
    awaiting_confirmation: bool = False
    ha: dict | None = None  # the HA replication's last word, while its connection lasts
    ha_client: Any = None
    role: Callable[[], Awaitable[str]] | None = None   # breqd's role of the device, now
    track: TrackLayer | None = None   # its holds: a flush lets go of the settled ones


class _Client:
    """One control connection, and the freeze it holds, if any."""

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.freezes: set[str] = set()            # devices this connection froze
        self.read_only: set[str] = set()          # devices this connection made read-only
        self.timers: dict[str, asyncio.TimerHandle] = {}
        self.ended = False                        # a lease ran out: nothing more is done


def _reply(writer: asyncio.StreamWriter, reply: dict) -> None:
    """One reply frame; ConnectionResetError when the client's connection is closed
    already (uvloop's transport raises RuntimeError on a write after that, asyncio's
    drops it)."""
    if not write_frame(writer, json.dumps(reply).encode()):
        raise ConnectionResetError("the client's connection is closed")


class ManageServer:
    def __init__(self, directory: str, devices: list[Managed]):
        self.directory = directory
        self.devices = {d.device: d for d in devices}
        self._servers: list[asyncio.AbstractServer] = []
        self._frozen_by: dict[str, set[_Client]] = {}   # device -> connections holding it
        self._read_only_by: dict[str, set[_Client]] = {}  # device -> connections asking

    async def start(self) -> None:
        try:
            os.makedirs(self.directory, mode=0o755, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"cannot create {self.directory}: {exc.strerror}") from None
        old = os.umask(0o177)
        try:
            for name, managed in self.devices.items():
                path = socket_path(self.directory, name)
                if os.path.exists(path):
                    if not stat.S_ISSOCK(os.lstat(path).st_mode):
                        raise ConfigError(f"{path} exists and is not a socket")
                    os.unlink(path)
                self._servers.append(await asyncio.start_unix_server(
                    lambda r, w, m=managed: self._serve(m, r, w), path=path))
        finally:
            os.umask(old)

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for name in self.devices:
            try:
                os.unlink(socket_path(self.directory, name))
            except OSError:
                pass

    async def _serve(self, managed: Managed, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        greeted = False
        client = _Client(writer)
        try:
            while True:
                try:
                    body = await read_frame(reader, MAX_MANAGE_FRAME)
                    if client.ended:
                        return
                    request = json.loads(body)
                except ConnectionClosed:
                    return
                except ValueError as exc:
                    raise ProtocolError(f"not JSON: {exc}") from None
                if not isinstance(request, dict) or not isinstance(request.get("op"), str):
                    raise ProtocolError("a request is an object with an op")
                op = request["op"]
                if not greeted and op != "hello":
                    raise ProtocolError("the first request must be hello")
                try:
                    reply = await self._handle(managed, op, request, client)
                    reply = {"ok": True, **reply}
                except BmigError as exc:
                    reply = {"ok": False, "code": exc.wire_code, "message": exc.message}
                greeted = True
                if client.ended:
                    return
                _reply(writer, reply)
                await writer.drain()
        except ProtocolError as exc:
            try:
                _reply(writer, {"ok": False, "code": exc.wire_code, "message": exc.message})
            except ConnectionError:
                pass
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()
            if managed.ha_client is client:
                managed.ha, managed.ha_client = None, None
            for device in list(client.read_only):
                await self._read_only_without_client(self.devices[device], client)
            for device in list(client.freezes):
                self._end_freeze(self.devices[device], client, "the client that froze "
                                 "its writes is gone")

    # -- freezes: leases held by connections ------------------------------------------------

    async def _freeze(self, m: Managed, client: _Client, lease: Any) -> None:
        if lease is not None and (isinstance(lease, bool)
                                  or not isinstance(lease, (int, float))
                                  or not 0 < lease <= MAX_LEASE):
            raise ProtocolError(f"lease must be a number of seconds up to {MAX_LEASE:g}")
        holders = self._frozen_by.setdefault(m.device, set())
        holders.add(client)
        client.freezes.add(m.device)
        old = client.timers.pop(m.device, None)
        if old is not None:
            old.cancel()
        if lease is not None:
            client.timers[m.device] = asyncio.get_running_loop().call_later(
                lease, self._lease_ran_out, m, client, lease)
        await m.control.freeze()

    def _end_freeze(self, m: Managed, client: _Client, why: str) -> None:
        """``client`` no longer holds the freeze of ``m``; thaw once nobody does."""
        client.freezes.discard(m.device)
        timer = client.timers.pop(m.device, None)
        if timer is not None:
            timer.cancel()
        holders = self._frozen_by.get(m.device, set())
        holders.discard(client)
        if holders:
            log.info("%s: %s; %d other client(s) still hold the freeze", m.device, why,
                     len(holders))
        elif m.control.frozen:
            log.warning("%s: %s: writes thawed", m.device, why)
            m.control.thaw()

    def _lease_ran_out(self, m: Managed, client: _Client, lease: float) -> None:
        client.timers.pop(m.device, None)
        why = f"the freeze lease of {lease:g} s ran out"
        self._end_freeze(m, client, why)
        client.ended = True
        try:
            _reply(client.writer, {"ok": False, "code": RequestError.wire_code,
                                   "message": f"{m.device}: {why}; writes were thawed"})
        except ConnectionError:
            pass
        client.writer.close()

    async def _read_only_without_client(self, m: Managed, client: _Client) -> None:
        """A connection that made ``m`` read-only is gone: while another open one still
        asks for it, it stays; after the last, breqd's record decides."""
        client.read_only.discard(m.device)
        holders = self._read_only_by.get(m.device, set())
        holders.discard(client)
        if holders:
            log.info("%s: a client that made it read-only is gone; %d other client(s) "
                     "still ask for it: it stays read-only", m.device, len(holders))
            return
        if not m.control.read_only:
            return
        try:
            role = await self._breqd_role(m)
        except (BmigError, OSError, asyncio.TimeoutError) as exc:
            log.error("%s: the client that made it read-only is gone, and breqd could not "
                      "be asked whether it is handed over (%s): it stays read-only; if "
                      "no cutover handed it over: %s", m.device,
                      getattr(exc, "message", None) or str(exc) or type(exc).__name__,
                      confirm_command(m.device, self.directory))
            return
        if m.control.read_only is False or self._read_only_by.get(m.device):
            return                          # changed while breqd was asked
        if role == ROLE_HANDED_OVER:
            log.info("%s: the client that made it read-only is gone; breqd records it as "
                     "handed over: it stays read-only", m.device)
            return
        if m.awaiting_confirmation:         # an HA device whose role nobody confirmed
            log.info("%s: the client that made it read-only is gone; its role as primary "
                     "is not confirmed: it stays read-only", m.device)
            return
        m.control.read_only = False
        log.warning("%s: the client that made it read-only is gone before breqd recorded "
                    "a handover (role %s): writable again", m.device, role)

    async def _breqd_role(self, m: Managed) -> str:
        if m.role is None:
            raise BmigError("no breqd to ask")
        return await asyncio.wait_for(m.role(), ROLE_TIMEOUT)

    async def _confirm(self, m: Managed) -> None:
        """The role of ``m`` as primary is confirmed: writable, unless an open connection
        still asks for read-only or breqd's role is not primary now."""
        if m.awaiting_confirmation:
            m.awaiting_confirmation = False
            log.warning("%s: its role as primary is confirmed", m.device)
        if not m.control.read_only:
            return
        holders = self._read_only_by.get(m.device)
        if holders:
            log.warning("%s: confirmed, but %d client(s) still ask for read-only (a cutover "
                        "or rejoin in progress): it stays read-only", m.device, len(holders))
            return
        try:
            role = await self._breqd_role(m)
        except (BmigError, OSError, asyncio.TimeoutError) as exc:
            raise RequestError(f"{m.device}: breqd could not be asked its role ("
                               f"{getattr(exc, 'message', None) or exc}): it stays "
                               "read-only") from None
        if role != ROLE_PRIMARY:
            log.warning("%s: confirmed, but breqd records it as %s: it stays read-only",
                        m.device, role)
            return
        m.control.read_only = False
        log.warning("%s: its role as primary is confirmed: writable", m.device)

    def _set_read_only(self, m: Managed, client: _Client, value: bool) -> None:
        """``read-only`` from ``client``: true holds it for that connection; false makes
        the device writable at once, whoever asked, and confirms its role."""
        holders = self._read_only_by.setdefault(m.device, set())
        if value:
            holders.add(client)
            client.read_only.add(m.device)
        else:
            for holder in holders:
                holder.read_only.discard(m.device)
            holders.clear()
            m.awaiting_confirmation = False
        m.control.read_only = value

    def _thaw_all(self, m: Managed) -> None:
        """An explicit thaw ends every connection's freeze of the device."""
        for client in list(self._frozen_by.get(m.device, ())):
            client.freezes.discard(m.device)
            timer = client.timers.pop(m.device, None)
            if timer is not None:
                timer.cancel()
        self._frozen_by.pop(m.device, None)
        m.control.thaw()

    async def _handle(self, m: Managed, op: str, request: dict, client: _Client) -> dict:
        if op == "hello":
            version = request.get("version")
            if not isinstance(version, int) or version < 1:
                raise ProtocolError("hello needs an integer version")
            return {"version": min(version, MANAGE_VERSION), "server": f"bmig-nbd {__version__}"}
        if op == "status":
            return self.status(m)
        if op == "replicate":
            await self._replicate(m, request)
            return self.status(m)
        if op == "stop":
            await m.replicate.stop()
            return self.status(m)
        if op == "freeze":
            await self._freeze(m, client, request.get("lease"))
            return self.status(m)
        if op == "thaw":
            self._thaw_all(m)
            return self.status(m)
        if op == "flush":
            try:
                await m.control.flush()
            except OSError as exc:
                raise RequestError(f"{m.device}: flush failed: {exc.strerror}") from None
            if m.track is not None:
                m.track.let_go_settled()    # durable there now: a cutover waits for them
            return {**self.status(m), "durable_seq": m.replicate.durable_seq}
        if op == "confirm":
            await self._confirm(m)
            return self.status(m)
        if op == "ha-state":
            state = request.get("state")
            if not isinstance(state, str) or len(state) > 64:
                raise ProtocolError("ha-state needs a state")
            ha = {k: v for k, v in request.items()
                  if k in HA_FIELDS and isinstance(v, (str, int, float, type(None)))}
            if any(isinstance(v, float) and not math.isfinite(v) for v in ha.values()):
                raise ProtocolError("ha-state: numbers must be finite (no NaN, Infinity)")
            m.ha = ha
            m.ha_client = client
            return self.status(m)
        if op == "read-only":
            value = request.get("value")
            if not isinstance(value, bool):
                raise ProtocolError("read-only needs value true or false")
            self._set_read_only(m, client, value)
            log.warning("%s: %s", m.device, "read-only now: writes are refused" if value
                        else "writable again")
            return self.status(m)
        raise RequestError(f"unknown request {op!r}")

    @staticmethod
    def status(m: Managed) -> dict:
        replica = m.replicate.replica
        return {"device": m.device, "export": m.export, "replicating": replica is not None,
                "protocol": replica.protocol if replica else None,
                "policy": m.replicate.policy, "target": replica.description if replica else None,
                "failed": m.replicate.failed, "blocked": m.replicate.blocked,
                "frozen": m.control.frozen, "read_only": m.control.read_only,
                "source_failed": m.control.failure,
                "bytes_written": m.control.bytes_written,
                # What the replica has been answered for and the target not written
                # (protocol A's queue), and what may be answered so (its window).
                "replica_lag_bytes": replica.lag_bytes if replica else 0,
                "replica_window": replica.window if replica else 0,
                "awaiting_confirmation": m.awaiting_confirmation,
                "ha": m.ha}

    async def _replicate(self, m: Managed, request: dict) -> None:
        url = request.get("url")
        protocol = request.get("protocol", "C")
        policy = request.get("policy", "degrade")
        if not isinstance(url, str):
            raise ProtocolError("replicate needs a url")
        if protocol not in REPLICATION_PROTOCOLS:
            raise ConfigError(f"protocol {protocol!r}: one of {', '.join(REPLICATION_PROTOCOLS)}")
        if policy not in REPLICATION_POLICIES:
            raise ConfigError(f"policy {policy!r}: one of {', '.join(REPLICATION_POLICIES)}")
        o = request.get("options", {})
        if not isinstance(o, dict):
            raise ProtocolError("options must be an object")
        options = ConnectOptions.from_dict(o)
        ack_timeout = request.get("ack_timeout", ACK_TIMEOUT)
        if isinstance(ack_timeout, bool) or not isinstance(ack_timeout, (int, float)) \
                or not 0.1 <= ack_timeout <= MAX_LEASE:
            raise ProtocolError("ack_timeout must be a number of seconds")
        # A target that stops answering is given up on as soon when connecting.
        options = dataclasses.replace(options, timeout=min(options.timeout,
                                                           max(2.0, 2 * float(ack_timeout))))
        if m.replicate.active:             # one replication session per target
            await m.replicate.stop()
        source = m.source
        if "generation" in request:         # the lineage as breqd has it now
            try:
                generation = parse_id(request["generation"], "generation")
                previous = request.get("previous", [])
                if not isinstance(previous, list):
                    raise ConfigError("previous must be a list")
                previous = tuple(hex_id(parse_id(g, "previous")) for g in previous[:16])
            except ConfigError as exc:
                raise ProtocolError(exc.message) from None
            source = m.source = dataclasses.replace(source, generation=generation,
                                                    previous=previous)
        loop = asyncio.get_running_loop()
        replica = await asyncio.to_thread(open_replica, url, options, source, protocol, loop,
                                          float(ack_timeout))
        m.replicate.start(replica, policy)


def confirm_command(device: str, manage_dir: str) -> str:
    """The command that makes ``device`` the primary and tells its bmig-nbd."""
    return f"bmigrate track set-role {device} primary --manage-dir {manage_dir}"
