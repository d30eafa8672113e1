"""TLS (NBD_OPT_STARTTLS) with a real client: libnbd's nbdinfo and qemu-io over GnuTLS."""

from __future__ import annotations

import json

import pytest

from tests.certs import make_certificates
from tests.integration.nbd_helpers import require, start_nbd, tool

MiB = 1 << 20


@pytest.fixture
def tls_server(breqd, tmp_path):
    certs = make_certificates(str(tmp_path / "certs"))
    server = start_nbd(breqd, tmp_path, 4 * MiB, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key)
    yield server, certs
    assert server.daemon.stop() == 0


def tls_uri(server, certs) -> str:
    return (f"nbds+unix:///{server.device}?socket={server.socket}"
            f"&tls-certificates={certs.directory}")


def test_nbdinfo_over_tls_sees_the_export(tls_server):
    require("nbdinfo")
    server, certs = tls_server
    info = json.loads(tool("nbdinfo", "--json", tls_uri(server, certs)).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 4 * MiB


def test_a_client_without_tls_is_refused_when_tls_is_required(tls_server):
    require("nbdinfo")
    server, _ = tls_server
    result = tool("nbdinfo", server.uri, check=False)
    assert result.returncode != 0
    assert server.daemon.proc.poll() is None


def test_writes_over_tls_reach_the_backing_and_are_tracked(tls_server, breqd):
    require("nbdcopy")
    server, certs = tls_server
    breqd.client().clear_all("d1", force=True)
    data = bytes(range(256)) * 4096          # 1 MiB
    source = server.backing + ".src"
    with open(source, "wb") as f:
        f.write(data + bytes(3 * MiB))
    tool("nbdcopy", "--flush", source, tls_uri(server, certs))
    with open(server.backing, "rb") as f:
        assert f.read(MiB) == data
    assert breqd.client().stats("d1")["dirty_bytes"] >= MiB

