"""Who may talk to a KV server, and which KV servers a decode worker trusts.

A shared secret proves both ends of a KV connection to each other by challenge and response,
so the secret itself never crosses the wire: the server opens with a nonce, the client
answers with its own nonce and HMAC(secret, both nonces), and the server's reply carries an
HMAC the other way round. The secret is `--kv-secret` / $PDSERVE_KV_SECRET, or derived from
the worker's `--api-key` (every worker of one deployment shares that key). With neither, KV
connections are not authenticated: the decode side then dials only loopback peers (or the
`--kv-allowed-peers` list), and the prefill side warns at start.
"""
from __future__ import annotations

import hashlib
import hmac
import ipaddress
import os
import secrets
import socket

NONCE_HEX = 32   # 16 random bytes, as hex


def resolve_secret(explicit: str | None, api_key: str | None) -> bytes | None:
    """The KV secret of this worker: explicit, else from $PDSERVE_KV_SECRET, else derived
    from the API key (a key of its own, so a KV MAC says nothing about the API key)."""
    explicit = explicit or os.environ.get("PDSERVE_KV_SECRET") or None
    if explicit:
        return hashlib.sha256(b"pdserve-kv-secret\0" + explicit.encode()).digest()
    if api_key:
        return hmac.new(api_key.encode(), b"pdserve-kv-secret-from-api-key", hashlib.sha256).digest()
    return None


def nonce() -> str:
    return secrets.token_hex(NONCE_HEX // 2)


def mac(secret: bytes, side: str, first: str, second: str) -> str:
    """HMAC of a side's proof: `side` is "client" or "server", so one side's answer can never
    be replayed as the other's; the nonces make every connection's proofs new."""
    return hmac.new(secret, f"pdserve-kv-v1|{side}|{first}|{second}".encode(), hashlib.sha256).hexdigest()


def check_mac(secret: bytes, got, side: str, first: str, second: str) -> bool:
    return isinstance(got, str) and hmac.compare_digest(got, mac(secret, side, first, second))


def valid_nonce(v) -> bool:
    return isinstance(v, str) and len(v) == NONCE_HEX and all(c in "0123456789abcdef" for c in v)


def parse_peers(spec: str | list[str] | None) -> frozenset[str] | None:
    """'host:port,host:port' (or a list) -> a set of 'host:port'; None or '' -> None (no list)."""
    if not spec:
        return None
    items = spec.split(",") if isinstance(spec, str) else spec
    out = set()
    for item in (i.strip() for i in items):
        host, sep, port = item.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"--kv-allowed-peers wants host:port items, got {item!r}")
        out.add(f"{host.strip('[]')}:{int(port)}")
    return frozenset(out)


def is_loopback(host: str) -> bool:
    """True if every address `host` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def peer_refusal(host: str, port: int, allowed: frozenset[str] | None, secret: bytes | None) -> str | None:
    """Why a decode worker must not dial this KV server (None: it may). An allow-list is the
    whole rule when given; otherwise a peer must prove the secret, or, with no secret
    configured, be on this host."""
    if allowed is not None:
        if f"{host.strip('[]')}:{port}" in allowed:
            return None
        return f"{host}:{port} is not in --kv-allowed-peers"
    if secret is None and not is_loopback(host):
        return (f"{host}:{port} is not on this host, and without a KV secret (--kv-secret or --api-key) "
                f"this worker pulls only from loopback or --kv-allowed-peers")
    return None
