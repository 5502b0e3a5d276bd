"""Optional TLS around KV connections, for tcp across hosts where the network is not trusted.

The prefill worker's KV server presents a certificate (`--kv-tls-cert`, `--kv-tls-key`); a
decode worker given `--kv-tls-ca` dials over TLS and accepts only a server whose certificate
that CA signed for the host it dials (the host name or IP must be in the certificate). The
HMAC challenge of auth.py still runs inside the TLS channel: TLS keeps the bytes private and
proves the server, the KV secret proves both ends belong to one deployment.
"""
from __future__ import annotations

import socket
import ssl


def server_context(config) -> ssl.SSLContext | None:
    """The KV server's TLS context (None: plain tcp) from a KVTransferConfig."""
    if not config.kv_tls_cert:
        if config.kv_tls_key:
            raise ValueError("--kv-tls-key needs --kv-tls-cert")
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(config.kv_tls_cert, config.kv_tls_key or None)
    return ctx


def client_context(config) -> ssl.SSLContext | None:
    """A decode worker's TLS context (None: plain tcp): verifies the server against --kv-tls-ca."""
    if not config.kv_tls_ca:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=config.kv_tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def wrap(ctx: ssl.SSLContext, sock: socket.socket, timeout: float, server_hostname: str | None = None,
         server_side: bool = False) -> ssl.SSLSocket:
    """sock inside TLS, the handshake done within `timeout` seconds (a silent peer cannot hold
    a connection open past it). If this raises, the connection is closed (wrapping took the
    descriptor from sock)."""
    tls = ctx.wrap_socket(sock, server_side=server_side, server_hostname=server_hostname,
                          do_handshake_on_connect=False)
    try:
        tls.settimeout(max(0.01, timeout))
        tls.do_handshake()
    except BaseException:
        tls.close()
        raise
    return tls
