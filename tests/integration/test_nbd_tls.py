"""TLS (NBD_OPT_STARTTLS) with real clients: libnbd's nbdinfo and nbdcopy, qemu-io and
qemu-img over GnuTLS. Server certificates; client certificates (--tls-verify-peer);
pre-shared keys (--tls-psk, psktool's file format); the refusal of clients without TLS
or without credentials; the Unix socket's mode; one-line errors for bad TLS settings."""

from __future__ import annotations

import json
import os
import socket
import stat
import struct

import pytest

from bmig.nbd import protocol as p
from tests.certs import client_directory, make_certificates, write_psk_file
from tests.daemon import wait_until
from tests.integration.nbd_helpers import nbd_argv, require, start_nbd, tool

MiB = 1 << 20


@pytest.fixture
def tls_server(breqd, tmp_path):
    certs = make_certificates(str(tmp_path / "certs"))
    server = start_nbd(breqd, tmp_path, 4 * MiB, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key)
    yield server, certs
    assert server.daemon.stop() == 0


@pytest.fixture
def verifying_server(breqd, tmp_path):
    """TLS required, and a client certificate signed by the CA in --tls-certificates."""
    certs = make_certificates(str(tmp_path / "certs"))
    server = start_nbd(breqd, tmp_path, 4 * MiB, "--tls-certificates", certs.directory,
                       "--tls-verify-peer")
    yield server, certs
    assert server.daemon.stop() == 0


@pytest.fixture
def psk_server(breqd, tmp_path):
    """TLS-PSK with one identity, alice; returns the server and the key file."""
    keys = write_psk_file(str(tmp_path / "server-keys"), "alice")
    server = start_nbd(breqd, tmp_path, 4 * MiB, "--tls-psk", keys)
    yield server, keys
    assert server.daemon.stop() == 0


def tls_uri(server, certs_dir: str) -> str:
    return (f"nbds+unix:///{server.device}?socket={server.socket}"
            f"&tls-certificates={certs_dir}")


def psk_uri(server, keys: str, identity: str = "alice") -> str:
    return (f"nbds+unix://{identity}@/{server.device}?socket={server.socket}"
            f"&tls-psk-file={keys}")


def qemu_io(server, creds: str, *commands: str, check: bool = True):
    """qemu-io on the export through the TLS credentials object ``creds`` (id tls0)."""
    args = ["qemu-io", "--object", creds, "--image-opts",
            f"driver=nbd,path={server.socket},export={server.device},tls-creds=tls0,"
            f"tls-hostname=localhost"]
    for command in commands:
        args += ["-c", command]
    return tool(*args, check=check)


def logged(server, text: str) -> None:
    """Wait for bmig-nbd to log ``text`` (it logs a refusal after closing the socket)."""
    wait_until(lambda: text in server.daemon.log(), timeout=10, what=repr(text))


def refused(result) -> bool:
    """A client gave up: non-zero exit, or qemu-io's "could not open" and no I/O done."""
    return result.returncode != 0 and "wrote" not in result.stdout


# -- server certificate only ----------------------------------------------------------

def test_nbdinfo_over_tls_sees_the_export(tls_server):
    require("nbdinfo")
    server, certs = tls_server
    info = json.loads(tool("nbdinfo", "--json", tls_uri(server, certs.directory)).stdout)
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
    tool("nbdcopy", "--flush", source, tls_uri(server, certs.directory))
    with open(server.backing, "rb") as f:
        assert f.read(MiB) == data
    assert breqd.client().stats("d1")["dirty_bytes"] >= MiB


# -- before STARTTLS: nothing but NBD_REP_ERR_TLS_REQD ---------------------------------

def _greeted(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(30)
    sock.connect(path)
    magic, opt_magic, _flags = p.SERVER_GREETING.unpack(_recv(sock, p.SERVER_GREETING.size))
    assert (magic, opt_magic) == (p.NBDMAGIC, p.IHAVEOPT)
    sock.sendall(p.CLIENT_FLAGS.pack(p.FLAG_C_FIXED_NEWSTYLE | p.FLAG_C_NO_ZEROES))
    return sock


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        more = sock.recv(n - len(data))
        if not more:
            raise EOFError(f"closed after {len(data)} of {n} bytes")
        data += more
    return data


def _option(sock: socket.socket, opt: int, data: bytes = b"") -> tuple[int, int, bytes]:
    sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, opt, len(data)) + data)
    magic, got_opt, rep, length = p.OPTION_REPLY.unpack(_recv(sock, p.OPTION_REPLY.size))
    assert magic == p.REPLY_MAGIC_OPT
    return got_opt, rep, _recv(sock, length)


def _name(name: bytes) -> bytes:
    return struct.pack(">I", len(name)) + name


OPTIONS_BEFORE_TLS = [
    (p.Opt.LIST, b""),
    (p.Opt.LIST, b"garbage"),
    (p.Opt.INFO, _name(b"d1") + struct.pack(">HH", 1, p.Info.NAME)),
    (p.Opt.INFO, _name(b"no-such-export") + struct.pack(">H", 0)),
    (p.Opt.INFO, b"\xff"),                        # malformed
    (p.Opt.STRUCTURED_REPLY, b""),
    (p.Opt.LIST_META_CONTEXT, _name(b"d1") + struct.pack(">I", 0)),
    (p.Opt.SET_META_CONTEXT, _name(b"d1") + struct.pack(">I", 1) + _name(b"base:")),
    (p.Opt.EXTENDED_HEADERS, b""),
    (p.Opt.PEEK_EXPORT, b""),
    (999, b"unknown"),
    (p.Opt.GO, _name(b"d1") + struct.pack(">H", 0)),
]


@pytest.mark.parametrize("kind", ["certificate", "psk"])
def test_before_starttls_every_option_gets_only_tls_reqd(kind, breqd, tmp_path):
    """What nbdkit --tls=require does: each option but STARTTLS and ABORT is answered
    NBD_REP_ERR_TLS_REQD and nothing else (no export name, size or context); ABORT is
    acknowledged; NBD_OPT_EXPORT_NAME, which cannot be refused, closes the connection."""
    if kind == "psk":
        extra = ("--tls-psk", write_psk_file(str(tmp_path / "keys"), "alice"))
    else:
        certs = make_certificates(str(tmp_path / "certs"))
        extra = ("--tls-certificates", certs.directory, "--tls-verify-peer")
    server = start_nbd(breqd, tmp_path, 4 * MiB, *extra)
    try:
        with _greeted(server.socket) as sock:
            for opt, data in OPTIONS_BEFORE_TLS:
                got_opt, rep, message = _option(sock, opt, data)
                assert (got_opt, rep) == (opt, p.Rep.ERR_TLS_REQD), p.name(p.Opt, opt)
                assert b"d1" not in message and str(4 * MiB).encode() not in message
            assert _option(sock, p.Opt.ABORT)[1] == p.Rep.ACK
        with _greeted(server.socket) as sock:
            sock.sendall(p.OPTION_HEADER.pack(p.IHAVEOPT, p.Opt.EXPORT_NAME, 2) + b"d1")
            assert sock.recv(4096) == b""
    finally:
        assert server.daemon.stop() == 0


@pytest.mark.parametrize("kind", ["certificate", "psk"])
def test_garbage_instead_of_a_tls_handshake_ends_only_that_connection(kind, breqd, tmp_path):
    require("nbdinfo")
    keys = write_psk_file(str(tmp_path / "keys"), "alice")
    certs = make_certificates(str(tmp_path / "certs"))
    extra = ("--tls-psk", keys) if kind == "psk" else ("--tls-certificates", certs.directory)
    server = start_nbd(breqd, tmp_path, 4 * MiB, *extra)
    try:
        with _greeted(server.socket) as sock:
            assert _option(sock, p.Opt.STARTTLS)[1] == p.Rep.ACK
            sock.sendall(b"\x16\x03\x01\x00\x05hello" + bytes(64))
            while sock.recv(4096):          # an alert, perhaps, then the end
                pass
        logged(server, "TLS handshake failed" if kind == "certificate"
               else "TLS-PSK handshake failed, no PSK identity offered")
        uri = psk_uri(server, keys) if kind == "psk" else tls_uri(server, certs.directory)
        assert tool("nbdinfo", "--size", uri).stdout.strip() == str(4 * MiB)
    finally:
        assert server.daemon.stop() == 0


# -- client certificates (--tls-verify-peer) --------------------------------------------

def test_nbdinfo_with_a_client_certificate_is_served(verifying_server, tmp_path):
    require("nbdinfo")
    server, certs = verifying_server
    mine = client_directory(str(tmp_path / "client"), certs, certs)
    info = json.loads(tool("nbdinfo", "--json", tls_uri(server, mine)).stdout)
    assert info["TLS"] is True
    logged(server, ", client certificate CN=bmig-client)")


@pytest.mark.parametrize("credentials", ["none", "another CA"])
def test_nbdinfo_without_a_trusted_client_certificate_is_refused(credentials,
                                                                  verifying_server, tmp_path):
    require("nbdinfo")
    server, certs = verifying_server
    other = make_certificates(str(tmp_path / "other"), ca_name="another CA") \
        if credentials == "another CA" else None
    theirs = client_directory(str(tmp_path / "client"), certs, other)
    result = tool("nbdinfo", "--json", tls_uri(server, theirs), check=False)
    assert result.returncode != 0
    assert "export-size" not in result.stdout
    logged(server, "TLS handshake failed")
    assert server.daemon.proc.poll() is None


def test_qemu_io_with_a_client_certificate_writes_and_reads(verifying_server, tmp_path):
    require("qemu-io")
    server, certs = verifying_server
    mine = client_directory(str(tmp_path / "client"), certs, certs)
    creds = f"tls-creds-x509,id=tls0,dir={mine},endpoint=client"
    qemu_io(server, creds, "write -P 0x5a 0 1M", "flush")
    with open(server.backing, "rb") as f:
        assert f.read(MiB) == b"\x5a" * MiB
    result = qemu_io(server, creds, "read -P 0x5a 0 1M")
    assert "read 1048576/1048576" in result.stdout


def test_qemu_io_without_a_client_certificate_is_refused(verifying_server, tmp_path):
    require("qemu-io")
    server, certs = verifying_server
    theirs = client_directory(str(tmp_path / "client"), certs)
    result = qemu_io(server, f"tls-creds-x509,id=tls0,dir={theirs},endpoint=client",
                     "write -P 0x5a 0 1M", check=False)
    assert refused(result), result.stdout + result.stderr
    with open(server.backing, "rb") as f:
        assert f.read(MiB) == bytes(MiB)


# -- TLS-PSK ----------------------------------------------------------------------------

def test_nbdinfo_with_the_psk_is_served(psk_server):
    require("nbdinfo")
    server, keys = psk_server
    info = json.loads(tool("nbdinfo", "--json", psk_uri(server, keys)).stdout)
    assert info["TLS"] is True
    assert info["exports"][0]["export-size"] == 4 * MiB
    logged(server, ", PSK identity 'alice')")


@pytest.mark.parametrize("wrong", ["key", "identity"])
def test_nbdinfo_with_a_wrong_key_or_unknown_identity_is_refused(wrong, psk_server,
                                                                  tmp_path):
    require("nbdinfo")
    server, keys = psk_server
    with open(keys) as f:
        key = bytes.fromhex(f.read().split(":")[1])
    if wrong == "key":
        theirs = write_psk_file(str(tmp_path / "theirs"), "alice", bytes(32))
        identity, expected = "alice", "PSK identity 'alice' (a wrong key?)"
    else:
        theirs = write_psk_file(str(tmp_path / "theirs"), "mallory", key)
        identity, expected = "mallory", "unknown PSK identity 'mallory'"
    result = tool("nbdinfo", "--json", psk_uri(server, theirs, identity), check=False)
    assert result.returncode != 0
    assert "export-size" not in result.stdout
    logged(server, expected)
    assert server.daemon.proc.poll() is None


def test_nbdinfo_without_tls_is_refused_by_a_psk_server(psk_server):
    require("nbdinfo")
    server, _ = psk_server
    result = tool("nbdinfo", "--json", server.uri, check=False)
    assert result.returncode != 0 and "export-size" not in result.stdout


@pytest.mark.parametrize("version", ["TLS1.3", "TLS1.2"])
def test_qemu_io_with_the_psk_writes_and_reads(version, psk_server, tmp_path):
    require("qemu-io")
    server, keys = psk_server
    creds = f"tls-creds-psk,id=tls0,dir={os.path.dirname(keys)},username=alice," \
            f"endpoint=client"
    if version == "TLS1.2":           # GnuTLS without TLS 1.3: a TLS 1.2 PSK suite
        creds += ",priority=NORMAL:-VERS-TLS1.3"
    qemu_io(server, creds, "write -P 0xc3 1M 2M", "flush")
    with open(server.backing, "rb") as f:
        f.seek(MiB)
        assert f.read(2 * MiB) == b"\xc3" * (2 * MiB)
    assert "read 2097152/2097152" in qemu_io(server, creds, "read -P 0xc3 1M 2M").stdout
    logged(server, f"TLS active ({version.replace('TLS', 'TLSv')} ")


def test_qemu_img_with_a_wrong_psk_is_refused(psk_server, tmp_path):
    require("qemu-img")
    server, _ = psk_server
    theirs = write_psk_file(str(tmp_path / "theirs"), "alice", bytes(range(32)))
    result = tool("qemu-img", "info", "--object",
                  f"tls-creds-psk,id=tls0,dir={os.path.dirname(theirs)},username=alice,"
                  f"endpoint=client", "--image-opts",
                  f"driver=nbd,path={server.socket},export={server.device},tls-creds=tls0",
                  check=False)
    assert result.returncode != 0
    assert "virtual size" not in result.stdout
    logged(server, "a wrong key?")


def test_psk_carries_a_large_copy_intact_and_tracked(breqd, tmp_path):
    """Many requests in flight through the PSK layer, with marks that make writes wait:
    flow control and payloads received in place, then read back the same way."""
    require("nbdcopy")
    size = 96 * MiB
    keys = write_psk_file(str(tmp_path / "keys"), "alice")
    server = start_nbd(breqd, tmp_path, size, "--tls-psk", keys)
    try:
        breqd.client().clear_all("d1", force=True)
        source = str(tmp_path / "source.img")
        with open(source, "wb") as f:
            f.write(os.urandom(size))
        tool("nbdcopy", "--flush", source, psk_uri(server, keys))
        with open(source, "rb") as a, open(server.backing, "rb") as b:
            assert a.read() == b.read()
        copy = str(tmp_path / "copy.img")
        tool("nbdcopy", psk_uri(server, keys), copy)
        with open(source, "rb") as a, open(copy, "rb") as b:
            assert a.read() == b.read()
        assert breqd.client().stats("d1")["dirty_bytes"] == size
    finally:
        assert server.daemon.stop() == 0


# -- the Unix socket's mode ---------------------------------------------------------------

def _mode(path: str) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_the_unix_socket_is_0600_whatever_the_umask(breqd, tmp_path):
    old = os.umask(0)                   # the daemon inherits it
    try:
        server = start_nbd(breqd, tmp_path, 4 * MiB)
    finally:
        os.umask(old)
    try:
        assert _mode(server.socket) == 0o600
    finally:
        assert server.daemon.stop() == 0


@pytest.mark.parametrize("where", ["flag", "file"])
def test_unix_mode_from_the_flag_or_the_file(where, breqd, tmp_path):
    if where == "flag":
        args: tuple[str, ...] = ("--unix-mode", "0660")
    else:
        config = tmp_path / "nbd.toml"
        config.write_text("unix_mode = 0o660\n")
        args = ("--config", str(config))
    old = os.umask(0o077)
    try:
        server = start_nbd(breqd, tmp_path, 4 * MiB, *args)
    finally:
        os.umask(old)
    try:
        assert _mode(server.socket) == 0o660
    finally:
        assert server.daemon.stop() == 0


def test_psk_from_the_config_file(breqd, tmp_path):
    """The TOML keys mirror the flags: a client without the key is refused."""
    require("nbdinfo")
    keys = write_psk_file(str(tmp_path / "keys"), "alice")
    config = tmp_path / "nbd.toml"
    config.write_text(f'tls_psk = "{keys}"\n')
    server = start_nbd(breqd, tmp_path, 4 * MiB, "--config", str(config))
    try:
        assert tool("nbdinfo", "--size", psk_uri(server, keys)).stdout.strip() == str(4 * MiB)
        assert tool("nbdinfo", "--size", server.uri, check=False).returncode != 0
    finally:
        assert server.daemon.stop() == 0


def test_verify_peer_from_the_config_file(breqd, tmp_path):
    require("nbdinfo")
    certs = make_certificates(str(tmp_path / "certs"))
    config = tmp_path / "nbd.toml"
    config.write_text(f'tls_certificates = "{certs.directory}"\ntls_verify_peer = true\n')
    server = start_nbd(breqd, tmp_path, 4 * MiB, "--config", str(config))
    try:
        theirs = client_directory(str(tmp_path / "client"), certs)
        assert tool("nbdinfo", "--size", tls_uri(server, theirs), check=False).returncode != 0
        mine = client_directory(str(tmp_path / "mine"), certs, certs)
        assert tool("nbdinfo", "--size", tls_uri(server, mine)).stdout.strip() == str(4 * MiB)
    finally:
        assert server.daemon.stop() == 0


# -- bad TLS settings: one line naming the file, exit 3 ---------------------------------

def _start_fails(tmp_path, *args: str, as_nobody: bool = False):
    backing = tmp_path / "bad.img"
    backing.write_bytes(bytes(4096))
    argv = nbd_argv("--no-track", "--device", "d", "--backing", str(backing),
                    "--unix", str(tmp_path / "bad.sock"), *args)
    if as_nobody:
        argv = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *argv]
    result = tool(*argv, check=False, cwd="/")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 3, result.stderr
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / "bad.sock")
    return lines[0]


def _psk_file(tmp_path, text: str, mode: int = 0o600) -> str:
    path = tmp_path / "keys.psk"
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


GOOD_KEY = "00112233445566778899aabbccddeeff"


@pytest.mark.parametrize("text, mode, expected", [
    (f"alice:{GOOD_KEY}\n", 0o644, "can be read by others (mode 0644)"),
    (f"alice:{GOOD_KEY}\n", 0o640, "can be read by others (mode 0640)"),
    (f"alice {GOOD_KEY}\n", 0o600, "line 1: expected IDENTITY:HEXKEY"),
    (f"alice:{GOOD_KEY}\nbob:xyz\n", 0o600, "line 2: expected IDENTITY:HEXKEY"),
    (f"alice:{GOOD_KEY}0\n", 0o600, "line 1: expected IDENTITY:HEXKEY"),
    (f":{GOOD_KEY}\n", 0o600, "line 1: expected IDENTITY:HEXKEY"),
    ("alice:00112233\n", 0o600, "line 1: the key has 4 bytes"),
    (f"alice:{GOOD_KEY}\nalice:{GOOD_KEY}\n", 0o600, "line 2: identity 'alice' is given twice"),
    ("\n\n", 0o600, "holds no key"),
])
def test_a_bad_psk_file_is_one_line_naming_it(text, mode, expected, tmp_path):
    path = _psk_file(tmp_path, text, mode)
    line = _start_fails(tmp_path, "--tls-psk", path)
    assert path in line and expected in line, line


def test_a_missing_or_unreadable_psk_file_is_one_line_naming_it(tmp_path):
    missing = str(tmp_path / "missing.psk")
    line = _start_fails(tmp_path, "--tls-psk", missing)
    assert missing in line and "no such file" in line, line
    if os.geteuid() != 0:
        pytest.skip("needs root to try the file as another user")
    os.chmod(tmp_path, 0o755)
    path = _psk_file(tmp_path, f"alice:{GOOD_KEY}\n")
    line = _start_fails(tmp_path, "--tls-psk", path, as_nobody=True)
    assert path in line and "permission denied" in line, line


def test_a_missing_client_ca_is_one_line_naming_it(tmp_path):
    certs = make_certificates(str(tmp_path / "certs"))
    os.unlink(certs.ca)
    line = _start_fails(tmp_path, "--tls-certificates", certs.directory, "--tls-verify-peer")
    assert certs.ca in line and "client CA" in line, line
    missing = str(tmp_path / "missing-ca.pem")
    line = _start_fails(tmp_path, "--tls-cert", certs.server_cert, "--tls-key",
                        certs.server_key, "--tls-client-ca", missing)
    assert missing in line, line
    line = _start_fails(tmp_path, "--tls-cert", certs.server_cert, "--tls-key",
                        certs.server_key, "--tls-verify-peer")
    assert "--tls-verify-peer needs the CA" in line, line


@pytest.mark.parametrize("args, expected", [
    (("--tls", "on", "--tls-psk", "PSK"), "only with --tls require"),
    (("--tls", "off", "--tls-psk", "PSK"), "only with --tls require"),
    (("--tls", "on", "--tls-certificates", "CERTS", "--tls-verify-peer"),
     "only with --tls require"),
    (("--tls-psk", "PSK", "--tls-certificates", "CERTS"), "give either --tls-psk"),
    (("--unix-mode", "0999"), "expected an octal mode"),
    (("--unix-mode", "rw"), "expected an octal mode"),
])
def test_contradictory_tls_settings_are_refused(args, expected, tmp_path):
    certs = make_certificates(str(tmp_path / "certs"))
    psk = _psk_file(tmp_path, f"alice:{GOOD_KEY}\n")
    args = tuple(psk if a == "PSK" else certs.directory if a == "CERTS" else a for a in args)
    assert expected in _start_fails(tmp_path, *args)


@pytest.mark.parametrize("text, expected", [
    ('tls_verify_peer = "yes"\n', 'tls_verify_peer: expected true or false, got "yes"'),
    ("unix_mode = 600\n", "unix_mode: expected an octal mode"),
])
def test_bad_tls_keys_in_the_config_file_are_refused(text, expected, tmp_path):
    config = tmp_path / "nbd.toml"
    config.write_text(text)
    assert expected in _start_fails(tmp_path, "--config", str(config))
