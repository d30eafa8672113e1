"""bmig.wire.connect refuses, before connecting, what it could not authenticate with:
no shared secret where only it authenticates the receiver, a TLS CA or client
certificate that does not load (one line, not a traceback). Nothing reaches the port."""

from __future__ import annotations

import socket

import pytest

from bmig.errors import AuthError, ConfigError
from bmig.wire.connect import connect
from bmig.wire.options import ConnectOptions
from bmig.wire.urls import parse_target_url


@pytest.mark.parametrize("scheme,options,error,words", [
    ("tcp", ConnectOptions(), AuthError, "give --secret-file FILE"),
    ("tls", ConnectOptions(secret=b"s" * 32, tls_ca="/nonexistent/ca.pem"), ConfigError,
     "cannot load the CA /nonexistent/ca.pem"),
    ("tls", ConnectOptions(secret=b"s" * 32, tls_cert="/nonexistent/c.pem"), ConfigError,
     "cannot load the client certificate /nonexistent/c.pem"),
])
def test_refused_before_connecting(scheme, options, error, words):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        listener.setblocking(False)
        url = parse_target_url(f"{scheme}://127.0.0.1:{listener.getsockname()[1]}/d1")
        with pytest.raises(error) as raised:
            connect(url, options)
        with pytest.raises(BlockingIOError):
            listener.accept()                       # nothing connected
    assert words in raised.value.message and "\n" not in raised.value.message
