"""bmig-nbd assembled: from its settings to a running server.

This room turns settings (what bmig.cli.nbd parsed from flags and the config file) into
a server: the TLS context, the backing files, each export's chain of layers after its
checks against breqd, bmig-nbd's own control socket, the listeners, and the run until
SIGTERM. The rules that decide what is served and how live here:

- a writable export is served only if breqd tracks its device at the backing's size and
  speaks control protocol 2 or later (holds and synchronous marks);
- a device breqd records as handed over (a cutover gave its lineage to the target) is
  served read-only, or a write here would fork the lineage (invariant 7);
- a device in the HA replication mode (breqd's lineage record says ``ha``) is served
  read-only until its role is confirmed: its target may have been promoted while this
  side was away, and only the HA replication (which finds the target still its
  secondary) or an operator can say it was not (bmig.nbd.manage ``confirm``);
- client authentication (a PSK, or certificates signed by a CA) only with TLS required,
  since offered TLS would let a client skip it.

It may not parse flags or files, print, or exit (bmig.cli.nbd does); nor reach into the
layers' or the server's workings: it builds them and hands them over. It is the only
module of bmig.nbd that names bmig.tracker: the layers see breqd through the Tracker
protocol of bmig.nbd.layers.track.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import ssl
from dataclasses import dataclass

import uvloop

from bmig import systemd
from bmig.errors import BmigError, ConfigError, UnknownDevice
from bmig.lineage import ROLE_HANDED_OVER, ROLE_PRIMARY, parse_id
from bmig.nbd.layers.control import ControlLayer
from bmig.nbd.layers.file import FileLayer
from bmig.nbd.layers.replicate import ReplicateLayer
from bmig.nbd.layers.track import TrackLayer
from bmig.nbd.manage import Managed, ManageServer, confirm_command
from bmig.nbd.server import Export, Listen, Server, Tls
from bmig.wire.client import SourceInfo
from bmig.tracker.write_path_client import AsyncTrackerClient
from bmig.wire.transports import server_tls_context

log = logging.getLogger("bmig-nbd")

TLS_MODES = ("require", "on", "off")
MIN_BREQD_VERSION = 2           # holds and synchronous marks


@dataclass(frozen=True)
class ExportSettings:
    """One export: breqd's device, the file or block device served, its NBD name."""

    device: str
    backing: str
    name: str
    read_only: bool = False
    description: str = ""


@dataclass(frozen=True)
class TlsSettings:
    """TLS as given (flags over file values), before it is checked and built."""

    mode: str | None = None
    cert: str | None = None
    key: str | None = None
    certificates: str | None = None     # a directory in nbdkit's layout
    verify_peer: bool = False
    client_ca: str | None = None
    psk: str | None = None


@dataclass(frozen=True)
class Settings:
    exports: list[ExportSettings]
    listen: list[Listen]
    control: str | None                 # breqd's control socket; None: no tracking
    read_only: bool
    max_connections: int
    tls: TlsSettings
    manage_dir: str
    hold_chunks: int


def activated_listeners() -> list[Listen]:
    """The listening sockets systemd handed over (socket activation), if any."""
    return [Listen(sock=sock) for sock in systemd.listen_sockets()]


def run(settings: Settings) -> None:
    """Check, assemble and serve until SIGTERM or SIGINT (blocking).

    The event loop is uvloop's (libuv): the same asyncio interface, with the transports'
    reads and writes and the wake-ups from other threads (the replica's acknowledgements)
    in C. Measured under 4 KiB random writes at iodepth 32 with protocol C (bench/
    cutover.py): about a sixth more writes per second for a little less of bmig-nbd's
    CPU; tracking only, no change."""
    tracker = (AsyncTrackerClient(settings.control, client="bmig-nbd")
               if settings.control is not None else None)
    tls = server_tls(settings.tls)
    opened = open_backings(settings.exports, settings.read_only)
    uvloop.run(_serve(opened, settings, tracker, tls))


def server_tls(settings: TlsSettings) -> Tls | None:
    """The TLS a client meets, checked: None when off."""
    cert, key, client_ca, psk = settings.cert, settings.key, settings.client_ca, settings.psk
    verify_peer = settings.verify_peer
    crl = None
    if settings.certificates:
        # nbdkit's and libnbd's layout of a certificates directory.
        certificates = str(settings.certificates)
        if not cert:
            cert = os.path.join(certificates, "server-cert.pem")
            key = key or os.path.join(certificates, "server-key.pem")
        if verify_peer and not client_ca:
            client_ca = os.path.join(certificates, "ca-cert.pem")
            crl = os.path.join(certificates, "ca-crl.pem")
            crl = crl if os.path.exists(crl) else None
    verify_peer = verify_peer or bool(client_ca)
    mode = settings.mode or ("require" if cert or psk else "off")
    if mode not in TLS_MODES:
        raise ConfigError(f"tls = {mode!r}: expected one of {', '.join(TLS_MODES)}")
    if (psk or verify_peer) and mode != "require":
        raise ConfigError(f"--tls-psk and --tls-verify-peer authenticate clients only with "
                          f"--tls require (the default for them), not --tls {mode}")
    if mode == "off":
        return None
    if psk:
        if cert or verify_peer:
            raise ConfigError("--tls-psk replaces certificates: give either --tls-psk or "
                              "--tls-cert/--tls-certificates, not both")
        from bmig.nbd.psk import PskContext     # pyOpenSSL only when it is used
        context = PskContext(str(psk))
        count = context.identities()
        return Tls(context, required=True,
                   clients=f"clients authenticated by a PSK of {psk} ({count} "
                           f"identit{'y' if count == 1 else 'ies'})")
    if not cert:
        raise ConfigError(f"--tls {mode} needs --tls-cert FILE, --tls-certificates DIR or "
                          f"--tls-psk FILE")
    if verify_peer and not client_ca:
        raise ConfigError("--tls-verify-peer needs the CA of the client certificates: "
                          "--tls-client-ca FILE, or ca-cert.pem in --tls-certificates DIR")
    context = server_tls_context(str(cert), str(key) if key else None,
                                 str(client_ca) if client_ca else None)
    if crl:
        try:
            context.load_verify_locations(crl)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the revocation list {crl}: {exc}") from None
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return Tls(context, required=mode == "require",
               clients=(f"client certificates signed by {client_ca}" if verify_peer
                        else "clients not authenticated"))


def open_backings(exports: list[ExportSettings],
                  read_only: bool) -> list[tuple[ExportSettings, FileLayer]]:
    """Open each export's backing (read-only if the export or the server is)."""
    opened: list[tuple[ExportSettings, FileLayer]] = []
    names: set[str] = set()
    for export in exports:
        if export.name in names:
            raise ConfigError(f"export {export.name!r} is given twice; name them with "
                              f"--export")
        names.add(export.name)
        try:
            layer = FileLayer(export.backing, read_only or export.read_only)
        except OSError as exc:
            raise ConfigError(f"cannot open {export.backing}: {exc.strerror}") from None
        opened.append((export, layer))
    return opened


async def _chains(opened: list[tuple[ExportSettings, FileLayer]],
                  tracker: AsyncTrackerClient | None, managed: list[Managed],
                  hold_limit: int, manage_dir: str) -> list[Export]:
    """Build each writable export's chain (control, tracking, replication, file), after
    checking it against breqd; ``managed`` gets what the control socket serves."""
    exports: list[Export] = []
    for spec, layer in opened:
        top = layer
        if tracker is not None and not layer.read_only:
            device = spec.device
            try:
                stats = await tracker.stats(device)
            except UnknownDevice:
                raise ConfigError(f"breqd does not track a device named {device!r}; add it "
                                  f"first: bmigrate track add {device} --size-of "
                                  f"{spec.backing}") from None
            if int(stats["size"]) != layer.size:
                raise ConfigError(f"{device}: breqd tracks {stats['size']} bytes but "
                                  f"{spec.backing} has {layer.size}")
            if tracker.version < MIN_BREQD_VERSION:
                raise ConfigError(f"breqd at {tracker.path} is too old (control protocol "
                                  f"{tracker.version}); bmig-nbd needs version "
                                  f"{MIN_BREQD_VERSION}")
            replicate = ReplicateLayer(layer, device)
            track = TrackLayer(replicate, tracker, device, int(stats["chunk_size"]),
                               hold_limit=hold_limit, mirror=replicate)
            top = ControlLayer(track, device)
            if stats.get("role") == ROLE_HANDED_OVER:
                # Handed over in a cutover: writing here would fork the lineage.
                top.read_only = True
                log.warning("%s: handed over to generation %s; serving it read-only (%s "
                            "makes it writable again)", device, stats.get("successor"),
                            confirm_command(device, manage_dir))
            awaiting = bool(stats.get("ha")) and stats.get("role") == ROLE_PRIMARY
            if awaiting:
                top.read_only = True
                log.warning("%s: replicated in the HA mode: serving it read-only until its "
                            "role is confirmed (the HA replication does when the target is "
                            "still its secondary; or an operator: %s)", device,
                            confirm_command(device, manage_dir))
            info = SourceInfo(device, parse_id(stats["device_id"], "device_id"),
                              parse_id(stats["generation"], "generation"), layer.size,
                              int(stats["chunk_size"]),
                              tuple(str(g) for g in stats.get("previous", [])))
            managed.append(Managed(device, spec.name, top, replicate, info,
                                   awaiting_confirmation=awaiting,
                                   role=functools.partial(_role, tracker, device),
                                   track=track))
        exports.append(Export(spec.name, top, spec.description))
    return exports


async def _role(tracker: AsyncTrackerClient, device: str) -> str:
    return str((await tracker.stats(device)).get("role"))


async def _serve(opened: list[tuple[ExportSettings, FileLayer]], settings: Settings,
                 tracker: AsyncTrackerClient | None, tls: Tls | None) -> None:
    managed: list[Managed] = []
    manage = None
    try:
        exports = await _chains(opened, tracker, managed, settings.hold_chunks,
                                settings.manage_dir)
        if managed:
            manage = ManageServer(settings.manage_dir, managed)
            await manage.start()
    except BmigError:
        if tracker is not None:
            await tracker.close()
        raise

    async def on_close() -> None:
        if manage is not None:
            await manage.stop()
        if tracker is not None:
            await tracker.close()

    server = Server(exports, settings.listen, settings.max_connections, on_close=on_close,
                    tls=tls)
    # WATCHDOG=1 from the loop that serves every request: a loop that stops turning (a
    # hung bmig-nbd is a hung VM) stops the pings, and systemd restarts bmig-nbd.
    watchdog = asyncio.get_running_loop().create_task(systemd.keep_alive())
    try:
        await server.run()
    finally:
        watchdog.cancel()
