"""Who authenticates whom on the replication wire, tried with the real programs.

The sender alone decides what it requires of the receiver: the shared secret, unless its
transport authenticated the receiver (SSH, or TLS with --trust-tls-server). An impostor
on HOST:PORT gets nothing and commits nothing; a receiver requires what it is configured
with (a TLS client certificate and the secret: both); a peer of an older wire version is
told to upgrade; a malformed proof is a failed authentication, never a traceback.
"""

from __future__ import annotations

import hashlib
import hmac
import os

import pytest

from bmig.wire import auth
from bmig.wire.channel import Channel
from bmig.wire.protocol import WIRE_VERSION, Message, T, decode_json
from tests.certs import make_certificates
from tests.integration.sync_helpers import (CHUNK, MiB, make_image, receivers,  # noqa: F401
                                            same_bytes, start_receiver, sync, track,
                                            write_secret)
from tests.integration.wire_helpers import (SECRET, FakeReceiver, HandSender,
                                            dirty_chunks, play_receiver)
from tests.relay import TamperingRelay

SIZE = 4 * MiB
EXIT_PROTOCOL, EXIT_AUTH = 7, 8


@pytest.fixture
def source(breqd, tmp_path) -> str:
    path = make_image(str(tmp_path / "src.img"), SIZE, "random")
    track(breqd, "d", path)
    write_secret(str(tmp_path / "secret"), SECRET.decode())
    return path


def all_dirty(breqd) -> bool:
    return len(dirty_chunks(breqd, "d", SIZE, CHUNK)) == SIZE // CHUNK


def _authenticated(channel: Channel) -> None:
    """After a hello that needs no more: full-size frames (what breceive does)."""
    if hasattr(channel, "authenticated"):
        channel.authenticated()


# -- impostors -------------------------------------------------------------------------------

def test_an_impostor_that_says_transport_gets_nothing_and_nothing_is_committed(
        breqd, tmp_path, source):
    received: list[int] = []

    def impostor(channel: Channel) -> None:
        hello = decode_json(channel.read())
        channel.send(Message(T.HELLO, {"version": hello.fields.get("version", 1),
                                       "server": "breceive", "features": [],
                                       "auth": "transport", "challenge": ""}).encode())
        _authenticated(channel)
        play_receiver(channel, received)

    fake = FakeReceiver(impostor)
    try:
        done = sync(breqd, "d", "--source", source, "--to", fake.url(), "--secret-file",
                    str(tmp_path / "secret"), check=False)
    finally:
        fake.stop()
    assert done.returncode == EXIT_AUTH, done.stderr
    assert "did not offer authentication by the shared secret" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    assert received == []                         # not even an OPEN
    assert all_dirty(breqd)


@pytest.mark.parametrize("proof", ["0" * 64, "zz" * 32, "\ud800" * 64, 12345, None])
def test_an_impostor_without_the_secret_is_refused(breqd, tmp_path, source, proof):
    received: list[int] = []

    def impostor(channel: Channel) -> None:
        decode_json(channel.read())
        channel.send(Message(T.HELLO, {"version": WIRE_VERSION, "server": "breceive",
                                       "features": [], "auth": auth.METHOD,
                                       "challenge": auth.new_nonce()}).encode())
        received.append(int(decode_json(channel.read()).type))
        channel.send(Message(T.AUTH_OK, {"proof": proof}).encode())
        _authenticated(channel)
        play_receiver(channel, received)

    fake = FakeReceiver(impostor)
    try:
        done = sync(breqd, "d", "--source", source, "--to", fake.url(), "--secret-file",
                    str(tmp_path / "secret"), check=False)
    finally:
        fake.stop()
    assert done.returncode == EXIT_AUTH, done.stderr
    assert "does not know the shared secret" in done.stderr
    assert "Traceback" not in done.stderr
    assert received == [T.AUTH]
    assert all_dirty(breqd)


def test_without_the_secret_tcp_is_refused_before_connecting(breqd, tmp_path, source):
    connections: list[int] = []
    fake = FakeReceiver(lambda channel: connections.append(1))
    try:
        done = sync(breqd, "d", "--source", source, "--to", fake.url(), check=False)
    finally:
        fake.stop()
    assert done.returncode == EXIT_AUTH, done.stderr
    assert "give --secret-file" in done.stderr and "--trust-tls-server" not in done.stderr
    assert connections == []


def test_a_hello_changed_on_the_way_fails_authentication(breqd, tmp_path, receivers,
                                                         source):
    """A man in the middle that rewrites the sender's hello (here: to ask for no
    secret, which would leave frames unsealed) breaks the proofs, which cover both
    hellos."""
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target})
    receivers.append(r)
    relay = TamperingRelay(("127.0.0.1", r.port), "rewrite", "up",
                           pick=lambda index, length: index == 0,
                           rewrite=lambda body: body.replace(b'"hmac-sha256"',
                                                             b'"transport"')).start()
    try:
        done = sync(breqd, "d", "--source", source, "--to", r.url("d", port=relay.port),
                    "--secret-file", r.secret_file, check=False)
    finally:
        relay.stop()
    assert relay.acted.is_set()
    assert done.returncode == EXIT_AUTH, done.stderr
    assert "secret does not match" in done.stderr
    assert all_dirty(breqd) and not os.path.exists(target)


# -- TLS: what the sender trusts, what the receiver requires ---------------------------------

@pytest.fixture
def certs(tmp_path):
    return make_certificates(str(tmp_path / "certs"))


def tls_args(certs, client: bool = True) -> list[str]:
    args = ["--tls-ca", certs.ca]
    if client:
        args += ["--tls-cert", certs.client_cert, "--tls-key", certs.client_key]
    return args


def test_a_trusted_tls_certificate_can_stand_for_the_secret_when_the_user_says_so(
        breqd, tmp_path, receivers, source, certs):
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target}, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key, "--tls-client-ca", certs.ca,
                       with_secret=False)
    receivers.append(r)
    args = ["d", "--source", source, "--to", r.url("d", "tls"), *tls_args(certs)]
    refused = sync(breqd, *args, check=False)
    assert refused.returncode == EXIT_AUTH, refused.stderr
    assert "--trust-tls-server" in refused.stderr
    assert all_dirty(breqd) and not os.path.exists(target)
    # With the secret but no --trust-tls-server: this receiver has no secret to prove.
    refused = sync(breqd, *args, "--secret-file", r.secret_file, check=False)
    assert refused.returncode == EXIT_AUTH, refused.stderr
    assert "this receiver has none" in refused.stderr
    sync(breqd, *args, "--trust-tls-server")
    assert same_bytes(source, target)
    assert "authenticated (by the transport)" in open(r.daemon.log_path).read()


def test_with_a_client_ca_and_a_secret_the_receiver_requires_both(breqd, tmp_path, receivers,
                                                                  source, certs):
    target = str(tmp_path / "tgt.img")
    r = start_receiver(tmp_path, {"d": target}, "--tls-cert", certs.server_cert,
                       "--tls-key", certs.server_key, "--tls-client-ca", certs.ca)
    receivers.append(r)
    url = r.url("d", "tls")
    no_secret = sync(breqd, "d", "--source", source, "--to", url, *tls_args(certs),
                     "--trust-tls-server", check=False)
    assert no_secret.returncode == EXIT_AUTH, no_secret.stderr
    assert "wants the shared secret" in no_secret.stderr
    no_certificate = sync(breqd, "d", "--source", source, "--to", url,
                          *tls_args(certs, client=False), "--secret-file", r.secret_file,
                          check=False)
    assert no_certificate.returncode != 0
    assert all_dirty(breqd) and not os.path.exists(target)
    sync(breqd, "d", "--source", source, "--to", url, *tls_args(certs), "--secret-file",
         r.secret_file)
    assert same_bytes(source, target)
    assert "frames sealed" in open(r.daemon.log_path).read()


# -- versions ------------------------------------------------------------------------------

def test_an_older_sender_is_told_to_upgrade(tmp_path, receivers):
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    raw = HandSender(r.port)
    answer = raw.hello(version=1)
    assert answer.type == T.ERROR, answer
    assert answer.fields["code"] == "protocol" and answer.fields["fatal"]
    assert "speaks wire version 1" in answer.fields["message"]
    assert "upgrade bmig on the sending host" in answer.fields["message"]
    assert raw.closed()


def _v1_proof(secret: bytes, label: bytes, first: str, second: str) -> str:
    """Version 1's proofs (bound to the nonces only)."""
    return hmac.new(secret, label + b"\0" + first.encode() + b"\0" + second.encode(),
                    hashlib.sha256).hexdigest()


def test_an_older_receiver_is_refused_with_an_upgrade_error(breqd, tmp_path, source):
    """A receiver of wire version 1, complete with its own authentication: the sender
    stops at its hello."""
    received: list[int] = []

    def old_receiver(channel: Channel) -> None:
        decode_json(channel.read())
        challenge = auth.new_nonce()
        channel.send(Message(T.HELLO, {"version": 1, "server": "breceive 0.0.1",
                                       "features": [], "auth": auth.METHOD,
                                       "challenge": challenge}).encode())
        answer = decode_json(channel.read())
        received.append(int(answer.type))
        nonce = str(answer.fields["nonce"])
        channel.send(Message(T.AUTH_OK, {"proof": _v1_proof(
            SECRET, b"bmig-server-v1", nonce, challenge)}).encode())
        _authenticated(channel)
        play_receiver(channel, received)

    fake = FakeReceiver(old_receiver)
    try:
        done = sync(breqd, "d", "--source", source, "--to", fake.url(), "--secret-file",
                    str(tmp_path / "secret"), check=False)
    finally:
        fake.stop()
    assert done.returncode == EXIT_PROTOCOL, done.stderr
    assert "speaks wire version 1" in done.stderr and "upgrade bmig on the receiving host" \
        in done.stderr
    assert received == []
    assert all_dirty(breqd)


# -- malformed authentication -------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("proof", "zz" * 32), ("proof", "\ud800" * 64), ("proof", "é" * 64), ("proof", 7),
    ("proof", ["a"]), ("proof", None), ("proof", "AB" * 32), ("nonce", "\ud800" * 64),
    ("nonce", 3), ("nonce", {"a": 1}),
])
def test_a_malformed_proof_is_an_authentication_failure(tmp_path, receivers, field, value):
    r = start_receiver(tmp_path, {"d": str(tmp_path / "tgt.img")})
    receivers.append(r)
    raw = HandSender(r.port)
    raw.hello()
    raw.auth(SECRET, **{field: value})
    answer = decode_json(raw.read())
    assert answer.type == T.ERROR and answer.fields["code"] == "auth-failed", answer
    assert raw.closed()
    log = open(r.daemon.log_path).read()
    assert "Traceback" not in log and "internal error" not in log
    HandSender(r.port).authenticate().close()        # and it still serves
