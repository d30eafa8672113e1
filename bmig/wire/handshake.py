"""The replication protocol's handshake, both halves: hellos, authentication, keys.

Each side decides for itself what it requires of the other (DESIGN.md, invariant 10):

- The sender requires the shared secret unless its own transport authenticated the
  receiver: SSH (the host key checked against known_hosts), or TLS with a verified
  server certificate when the user said so (``--trust-tls-server``). Its HELLO says
  which (``auth``: ``hmac-sha256`` or ``transport``); a receiver that offers less is
  refused before anything else is sent.
- The receiver requires the secret whenever the sender asks for it, and whenever its
  own transport did not authenticate the sender: SSH (``breceive --stdio`` runs as the
  user SSH logged in) or a TLS client certificate, the latter only when no secret is
  configured (with both configured, both are required).

When the sender required the secret, every frame after the handshake is sealed with
keys derived from the secret and both nonces (bmig.wire.seal), whatever the transport
under it; otherwise the transport the sender trusted (SSH, TLS) protects the frames.

Both hellos travel in the clear and are bound into the proofs and the keys (the
transcript), so a hello changed on the way (a lower version, another ``auth``) makes
authentication fail. Nothing but HELLO and AUTH is read from a peer that has not
authenticated, each capped at MAX_PREAUTH_FRAME by the channel.

It reads and writes HELLO and AUTH only; what follows is the session's
(bmig.receiver.session) or the WireTarget's (bmig.wire.client).
"""

from __future__ import annotations

from dataclasses import dataclass

from bmig import __version__
from bmig.errors import AuthError, ProtocolError
from bmig.framing import ConnectionClosed
from bmig.wire import auth
from bmig.wire.channel import Channel
from bmig.wire.protocol import (OLDEST_WIRE_VERSION, WIRE_VERSION, Message, T, decode_json,
                                error_from)
from bmig.wire.seal import derive_keys, transcript

MAX_VERSION_FIELD = 1 << 16


@dataclass(frozen=True)
class Agreed:
    """What the handshake settled."""

    version: int
    peer: str              # the other side's "client" or "server" string
    method: str            # auth.METHOD or auth.TRANSPORT: how the peer authenticated
    sealed: bool           # frames from now on are sealed (bmig.wire.seal)
    features: tuple[str, ...] = ()


def _read(channel: Channel, what: str) -> tuple[bytes, Message]:
    """The next pre-authentication frame, its bytes kept for the transcript."""
    try:
        body = bytes(channel.read())
    except ConnectionClosed:
        raise ConnectionClosed(f"{channel.description} closed the connection during the "
                               "handshake, before " + what) from None
    return body, decode_json(body)


# -- the sender --------------------------------------------------------------------------

def sender(channel: Channel, secret: bytes | None, receiver_verified: bool,
           hint: str = "", client: str = f"bmigrate {__version__}") -> Agreed:
    """The sender's half. ``receiver_verified``: the transport has authenticated the
    receiver (SSH host key, or a TLS certificate the user said to trust). ``hint`` ends
    the error that refuses a receiver offering less (what else the user could do)."""
    where = channel.description
    wants = auth.TRANSPORT if receiver_verified else auth.METHOD
    if wants == auth.METHOD and secret is None:
        raise AuthError(f"{where}: only the shared secret can authenticate the receiver "
                        f"here: give --secret-file FILE{hint}")
    mine = Message(T.HELLO, {"version": WIRE_VERSION, "client": client,
                             "auth": wants}).encode()
    channel.send(mine)
    theirs, hello = _read(channel, "its HELLO")
    if hello.type == T.ERROR:
        raise error_from(hello)
    if hello.type != T.HELLO:
        raise ProtocolError(f"{where}: expected HELLO, got {hello.type.name}")
    version = hello.int("version", 1, 1, MAX_VERSION_FIELD)
    server = hello.str("server", "breceive")
    if version < OLDEST_WIRE_VERSION:
        raise ProtocolError(f"{where} ({server}) speaks wire version {version}; this "
                            f"bmigrate ({client}) speaks version {WIRE_VERSION}: upgrade "
                            "bmig on the receiving host")
    if version > WIRE_VERSION:
        raise ProtocolError(f"{where} answered wire version {version}, above what this "
                            f"bmigrate speaks ({WIRE_VERSION})")
    features = tuple(str(f) for f in hello.list("features"))
    method = hello.str("auth", "")
    if method == auth.TRANSPORT:
        if wants == auth.METHOD:
            raise AuthError(f"{where} did not offer authentication by the shared secret, so "
                            "it may not be the receiver you meant and nothing was sent; "
                            f"check that breceive there has --secret-file{hint}")
        channel.authenticated()
        return Agreed(version, server, method, False, features)
    if method != auth.METHOD:
        raise AuthError(f"{where} asks for authentication by {method!r}, which this "
                        "bmigrate does not know")
    if secret is None:
        raise AuthError(f"{where} wants the shared secret: give --secret-file FILE")
    challenge = hello.fields.get("challenge")
    if not auth.valid_nonce(challenge):
        raise ProtocolError(f"{where} sent a malformed challenge")
    assert isinstance(challenge, str)
    nonce = auth.new_nonce()
    hellos = transcript(mine, theirs)
    channel.send(Message(T.AUTH, {"method": auth.METHOD, "nonce": nonce, "proof":
                                  auth.client_proof(secret, challenge, nonce, hellos)}).encode())
    _, ok = _read(channel, "its AUTH_OK")
    if ok.type == T.ERROR:
        raise error_from(ok)
    if ok.type != T.AUTH_OK:
        raise ProtocolError(f"{where}: expected AUTH_OK, got {ok.type.name}")
    if not auth.matches(auth.server_proof(secret, challenge, nonce, hellos),
                        ok.fields.get("proof")):
        raise AuthError(f"{where} does not know the shared secret: it is not the receiver "
                        "you meant")
    sealed = wants == auth.METHOD
    if sealed:
        keys = derive_keys(secret, bytes.fromhex(challenge), bytes.fromhex(nonce), hellos)
        channel.authenticated((keys.sender_to_receiver, keys.receiver_to_sender))
    else:
        channel.authenticated()
    return Agreed(version, server, method, sealed, features)


# -- the receiver ------------------------------------------------------------------------

def receiver(channel: Channel, secret: bytes | None, sender_verified: bool,
             server: str, features: list[str]) -> Agreed:
    """The receiver's half. ``sender_verified``: the transport alone authenticated the
    sender (SSH; a TLS client certificate where no secret is configured)."""
    theirs, hello = _read(channel, "its HELLO")
    if hello.type != T.HELLO:
        raise ProtocolError(f"expected HELLO, got {hello.type.name}")
    version = hello.int("version", 1, 1, MAX_VERSION_FIELD)
    client = hello.str("client", "bmigrate")
    if version < OLDEST_WIRE_VERSION:
        raise ProtocolError(f"the sender ({client}) speaks wire version {version}; this "
                            f"receiver ({server}) speaks version {WIRE_VERSION}: upgrade "
                            "bmig on the sending host")
    version = min(version, WIRE_VERSION)
    asked = hello.str("auth", auth.METHOD)
    if asked not in (auth.METHOD, auth.TRANSPORT):
        raise ProtocolError(f"HELLO: unknown authentication {asked!r}")
    need = asked == auth.METHOD or not sender_verified
    if need and secret is None:
        raise AuthError("the sender requires the shared secret (its transport did not "
                        "authenticate this receiver) and this receiver has none: give "
                        "breceive --secret-file, or the sender --trust-tls-server"
                        if asked == auth.METHOD else
                        "this receiver has no way to authenticate the sender (no secret "
                        "file, no client certificates)")
    challenge = auth.new_nonce() if need else ""
    mine = Message(T.HELLO, {"version": version, "server": server, "features": features,
                             "auth": auth.METHOD if need else auth.TRANSPORT,
                             "challenge": challenge}).encode()
    channel.send(mine)
    if not need:
        channel.authenticated()
        return Agreed(version, client, auth.TRANSPORT, False)
    assert secret is not None
    _, answer = _read(channel, "its AUTH")
    if answer.type != T.AUTH:
        raise AuthError(f"expected AUTH, got {answer.type.name}")
    nonce = answer.fields.get("nonce")
    hellos = transcript(theirs, mine)
    if not (auth.valid_nonce(nonce) and auth.matches(
            auth.client_proof(secret, challenge, str(nonce), hellos),
            answer.fields.get("proof"))):
        raise AuthError("authentication failed: the sender's secret does not match the "
                        "receiver's")
    assert isinstance(nonce, str)
    channel.send(Message(T.AUTH_OK, {"proof": auth.server_proof(secret, challenge, nonce,
                                                                hellos)}).encode())
    sealed = asked == auth.METHOD
    if sealed:
        keys = derive_keys(secret, bytes.fromhex(challenge), bytes.fromhex(nonce), hellos)
        channel.authenticated((keys.receiver_to_sender, keys.sender_to_receiver))
    else:
        channel.authenticated()
    return Agreed(version, client, auth.METHOD, sealed)
