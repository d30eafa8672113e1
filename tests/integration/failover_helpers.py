"""What the failover tests share: the HA replication as a background process, a relay
that stops forwarding (a partition), a second "host" (breqd and bmig-nbd on directories
of their own), and the union of two sides' dirty chunks."""

from __future__ import annotations

import os

from tests.conftest import BreqdInstance
from tests.daemon import Daemon, breqd_argv
from tests.integration.nbd_helpers import NbdServer, nbd_argv
from tests.integration.sync_helpers import CHUNK, start_background
from tests.relay import Relay


# The relay of tests.relay stops forwarding (``partition``) and goes on (``heal``).
PartitionRelay = Relay


def keep_replicating(migrations, breqd, server: NbdServer, url: str, secret_file: str,
                     *extra: str):
    """``bmigrate replicate d1 --keep`` in the background, with JSON events."""
    return start_background(migrations, breqd, "replicate", "d1", "--keep", "--to", url,
                            "--source", server.backing, "--secret-file", secret_file,
                            "--manage-dir", server.manage_dir, "--control", breqd.control,
                            "--json", *extra)


def wait_state(ha, state: str, after: int = 0, timeout: float = 60.0) -> dict:
    """The first ``note`` event of the HA replication in ``state``, from event ``after``
    on; its index is in ``ha.seen``."""
    def found(event) -> bool:
        return event.get("state") == state and ha.events.index(event) >= after
    event = ha.wait_event(found, timeout=timeout, what=f"the state {state}")
    ha.seen = ha.events.index(event)
    return event


def second_host(tmp_path, name: str = "host2") -> BreqdInstance:
    """breqd on directories of its own: the other host's."""
    root = tmp_path / name
    root.mkdir(exist_ok=True)
    state, config, control = str(root / "state"), str(root / "devices.d"), str(root / "breqd.sock")
    daemon = Daemon(breqd_argv(state, config, control), str(root / "breqd.log")).start()
    return BreqdInstance(daemon, state, config, control)


def serve(breqd: BreqdInstance, backing: str, root: str, name: str = "nbd") -> NbdServer:
    """bmig-nbd serving d1 (already tracked by ``breqd``) from ``backing``."""
    sock = os.path.join(root, f"{name}.sock")
    manage = os.path.join(root, f"{name}-manage")
    daemon = Daemon(nbd_argv("--device", "d1", "--backing", backing, "--unix", sock,
                             "--control", breqd.control, "--manage-dir", manage,
                             "--log-level", "debug"),
                    os.path.join(root, f"{name}.log")).start()
    return NbdServer(daemon, sock, backing, "d1", manage)


def dirty_chunks(breqd: BreqdInstance, size: int) -> set[int]:
    client = breqd.client()
    try:
        out: set[int] = set()
        offset = 0
        while offset < size:
            runs, end = client.query("d1", offset, size - offset)
            for o, n in runs:
                out.update(range(o // CHUNK, (o + n - 1) // CHUNK + 1))
            offset = end
        return out
    finally:
        client.close()
