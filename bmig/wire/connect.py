"""Reaching breceive: a tcp://, tls:// or ssh:// target URL to an authenticated
``WireTarget``.

The sender alone decides what it requires of the receiver (invariant 10): the shared
secret, unless the transport authenticated the receiver (SSH's host key, or tls:// with
``--trust-tls-server``). That is decided here, before anything is sent. nbd:// targets
are not breceive: bmig.sender.targets opens those.
"""

from __future__ import annotations

from typing import Callable

from bmig.errors import AuthError, ConfigError, ProtocolError, UnreachableError
from bmig.wire.client import WireTarget
from bmig.wire.options import ConnectOptions
from bmig.wire.transports import SocketStream, Stream, client_tls_context, connect_tcp, keepalive
from bmig.wire.urls import TargetUrl

TLS_HINT = ", or --trust-tls-server to let its verified certificate authenticate it"


def connect(url: TargetUrl, options: ConnectOptions) -> WireTarget:
    """Connect and authenticate (the handshake); the target is not opened yet."""
    if url.kind == "nbd":
        raise ConfigError(f"{url} is an NBD server, not breceive")
    check_settings(url, options)
    if url.kind == "ssh":
        return _connect_ssh(url, options)
    verified = url.kind == "tls" and options.trust_tls_server
    hint = TLS_HINT if url.kind == "tls" and not verified else ""
    sock = connect_tcp(url.host, url.port, options.timeout)
    try:
        if url.kind == "tls":
            import ssl      # here: only tls:// needs it, and it is a few ms of a start
            context = client_tls_context(options.tls_ca, options.tls_cert, options.tls_key)
            try:
                sock = context.wrap_socket(sock, server_hostname=url.host)
            except ssl.SSLCertVerificationError as exc:
                raise AuthError(f"the certificate of {url.host}:{url.port} is not trusted: "
                                f"{exc.verify_message}; give its CA with --tls-ca") from None
            except (ssl.SSLError, OSError) as exc:
                raise UnreachableError(f"TLS with {url.host}:{url.port} failed: {exc}") from None
        sock.settimeout(options.timeout)
        stream = SocketStream(sock, str(url))
        target = WireTarget(stream, url, options, verified, hint)
        sock.settimeout(None)
        keepalive(sock)
        return target
    except BaseException:
        sock.close()
        raise


def check_settings(url: TargetUrl, options: ConnectOptions) -> None:
    """Refuse, before connecting, what ``connect`` could not authenticate with: no shared
    secret where only it authenticates the receiver (AuthError), a TLS certificate or
    SSH identity that cannot be used (ConfigError)."""
    if url.kind == "ssh":
        from bmig.wire.ssh.hints import check_identity
        from bmig.wire.ssh.target import SshTarget
        check_identity(SshTarget(host=url.host, port=url.port, identity=options.identity))
        return
    verified = url.kind == "tls" and options.trust_tls_server
    if url.kind in ("tcp", "tls") and not verified and options.secret is None:
        hint = TLS_HINT if url.kind == "tls" else ""
        raise AuthError(f"{url}: only the shared secret can authenticate the receiver here: "
                        f"give --secret-file FILE{hint}")
    if url.kind == "tls" or url.nbd_uri.startswith("nbds"):
        import ssl
        try:
            client_tls_context(options.tls_ca, options.tls_cert, options.tls_key)
        except (OSError, ssl.SSLError) as exc:       # the CA file
            raise ConfigError(f"cannot load the CA {options.tls_ca}: {exc}") from None


def _connect_ssh(url: TargetUrl, options: ConnectOptions) -> WireTarget:
    # Here, not at the top: paramiko takes longer to import than the rest of bmigrate,
    # and only ssh:// needs it.
    from bmig.wire import ssh

    target = ssh.SshTarget(host=url.host, port=url.port, user=url.user,
                           command=options.ssh_command, known_hosts=options.known_hosts,
                           accept_new_host_key=options.accept_new_host_key,
                           identity=options.identity, cipher=options.ssh_cipher,
                           connect_timeout=options.timeout)
    command = options.ssh_command
    opener: Callable[..., Stream] = (ssh.open_openssh if options.ssh_program == "openssh"
                                     else ssh.open_paramiko)
    stream = opener(target, command)
    try:
        return WireTarget(stream, url, options, receiver_verified=True)
    except (UnreachableError, ProtocolError) as exc:
        hint = ssh.failure_hint(stream)
        stream.close()
        if hint:
            raise UnreachableError(hint) from None
        raise exc
    except BaseException:
        stream.close()
        raise
