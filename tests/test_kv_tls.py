"""Optional TLS on the KV tcp transport (issue 11): a pull over TLS moves exactly the bytes a
plain one moves; a consumer whose CA did not sign the server's certificate, a plain consumer
and a TLS consumer of a plain server are all refused with an error that says why. The
certificates come from a CA made here with the openssl CLI; real sockets on loopback; the
producer behind the server is test_kv_unit's FakeProducer (the socket layer is under test)."""
from __future__ import annotations

import shutil
import ssl
import subprocess
from types import SimpleNamespace

import pytest
import torch

from pdserve.kv import auth
from pdserve.kv import server as kv_server
from pdserve.kv import tls as kv_tls
from pdserve.kv.client import KVClient, KVPullError
from pdserve.kv.layout import BlockPool
from pdserve.kv.server import KVServer
from pdserve.kv.wire import recv_msg
from test_kv_unit import SHAPE, FakeProducer, random_pool, remote, spec, wait_released

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

SECRET = auth.resolve_secret("the deployment's KV secret", None)


def openssl(*args: str, cwd) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_ca(d, name: str) -> None:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
            "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
            "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=d)


def make_cert(d, name: str, ca: str, san: str) -> None:
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
            f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
    (d / f"{name}.ext").write_text(f"subjectAltName={san}\nextendedKeyUsage=serverAuth\n")
    openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-days", "2", "-out", f"{name}.pem", "-extfile", f"{name}.ext", cwd=d)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A CA, a KV server certificate it signed for 127.0.0.1, and a second, unrelated CA."""
    d = tmp_path_factory.mktemp("pki")
    make_ca(d, "ca")
    make_ca(d, "other_ca")
    make_cert(d, "kv", "ca", "IP:127.0.0.1,DNS:localhost")
    return SimpleNamespace(ca=str(d / "ca.pem"), other_ca=str(d / "other_ca.pem"), cert=str(d / "kv.pem"),
                           key=str(d / "kv.key"))


def config(**kw) -> SimpleNamespace:
    return SimpleNamespace(**{"kv_tls_cert": None, "kv_tls_key": None, "kv_tls_ca": None, **kw})


CLIENTS: list[KVClient] = []   # closed after each test (a client keeps idle connections)


@pytest.fixture
def serve():
    servers = []

    def start(producer, **kw):
        s = KVServer(producer, "127.0.0.1", secret=SECRET, **kw).start()
        servers.append(s)
        return s
    yield start
    while CLIENTS:
        CLIENTS.pop().close()
    for s in servers:
        s.close()


def tls_server(serve, pki, producer):
    return serve(producer, tls=kv_tls.server_context(config(kv_tls_cert=pki.cert, kv_tls_key=pki.key)))


def tls_client(pool, ca: str) -> KVClient:
    return kept(KVClient(spec(), pool, secret=SECRET, tls=kv_tls.client_context(config(kv_tls_ca=ca))))


def kept(c: KVClient) -> KVClient:
    CLIENTS.append(c)
    return c


def test_a_pull_over_tls_equals_the_plain_one(serve, pki):
    src = random_pool()
    plain_prod, tls_prod = FakeProducer(src), FakeProducer(src)
    plain, secure = serve(plain_prod), tls_server(serve, pki, tls_prod)
    want, got = torch.zeros(SHAPE), torch.zeros(SHAPE)
    n_plain, t_plain = kept(KVClient(spec(), BlockPool(want), secret=SECRET)).pull(remote(plain.port), [7, 8, 2], [0, 1, 5])
    n_tls, t_tls = tls_client(BlockPool(got), pki.ca).pull(remote(secure.port), [7, 8, 2], [0, 1, 5])
    assert (n_tls, t_tls) == (n_plain, t_plain) and n_tls > 0 and t_tls == "tcp"
    assert torch.equal(got, want)                                   # the same bytes, in the same blocks
    assert torch.equal(got[:, :, [0, 1, 5]], src[:, :, [7, 8, 2]])  # and they are the producer's
    assert wait_released(tls_prod) == ["r1"]                        # `done` went over TLS too


def test_the_server_speaks_only_tls_and_the_challenge_runs_inside(serve, pki):
    srv = tls_server(serve, pki, FakeProducer(random_pool()))
    import socket
    ctx = kv_tls.client_context(config(kv_tls_ca=pki.ca))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=30) as raw:
        with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            assert s.version() in ("TLSv1.2", "TLSv1.3")
            challenge = recv_msg(s)
    assert challenge["op"] == "challenge" and challenge["auth"] is True


def test_a_client_without_the_ca_is_refused(serve, pki):
    prod = FakeProducer(random_pool())
    srv = tls_server(serve, pki, prod)
    dst = torch.zeros(SHAPE)
    with pytest.raises(KVPullError, match="certificate that --kv-tls-ca does not verify"):
        tls_client(BlockPool(dst), pki.other_ca).pull(remote(srv.port), [7, 8], [0, 1])
    assert not dst.any() and "r1" in prod.grants and not getattr(prod, "hellos", 0)   # nothing reached the producer


def test_a_plain_client_of_a_tls_server_hears_why(serve, pki, monkeypatch):
    monkeypatch.setattr(kv_server, "HANDSHAKE_S", 0.5)   # the server waits this long for a ClientHello
    prod = FakeProducer(random_pool())
    srv = tls_server(serve, pki, prod)
    with pytest.raises(KVPullError, match="may require TLS: give this worker --kv-tls-ca"):
        kept(KVClient(spec(), BlockPool(torch.zeros(SHAPE)), secret=SECRET)).pull(remote(srv.port), [7], [0])
    assert "r1" in prod.grants


def test_a_tls_client_of_a_plain_server_hears_why(serve, pki):
    srv = serve(FakeProducer(random_pool()))
    with pytest.raises(KVPullError, match=r"TLS handshake with the KV server at 127.0.0.1:\d+ failed"):
        tls_client(BlockPool(torch.zeros(SHAPE)), pki.ca).pull(remote(srv.port), [7], [0])


def test_release_over_tls(serve, pki):
    prod = FakeProducer(random_pool())
    srv = tls_server(serve, pki, prod)
    tls_client(BlockPool(torch.zeros(SHAPE)), pki.ca).release(remote(srv.port))
    assert wait_released(prod) == ["r1"]


def test_contexts_from_the_config(pki):
    assert kv_tls.server_context(config()) is None and kv_tls.client_context(config()) is None
    with pytest.raises(ValueError, match="--kv-tls-key needs --kv-tls-cert"):
        kv_tls.server_context(config(kv_tls_key=pki.key))
    ctx = kv_tls.client_context(config(kv_tls_ca=pki.ca))
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_a_large_pull_over_tls(serve, pki):
    """Views larger than one TLS write (wire.TLS_CHUNK) and many of them: every byte arrives."""
    big = dict(block_size=16, num_kv_heads=4, head_dim=1024, num_layers=2)   # 256 KiB per block per K/V
    shape = (2, 2, 12, 16, 4, 1024)
    src = random_pool(shape=shape)
    prod = FakeProducer(src)
    prod.spec = spec(**big)
    prod.grants = {"r1": ("tok", set(range(12)))}
    srv = tls_server(serve, pki, prod)
    dst = torch.zeros(shape)
    client = kept(KVClient(spec(**big), BlockPool(dst), secret=SECRET,
                           tls=kv_tls.client_context(config(kv_tls_ca=pki.ca))))
    ids = [0, 1, 2, 3, 4, 5, 9, 10]   # runs of 6 and 2 blocks: views of 1.5 MiB and 512 KiB
    n, _ = client.pull(remote(srv.port, ids=ids), ids, list(range(8)))
    assert n == 2 * 2 * len(ids) * 16 * 4 * 1024 * 4
    assert torch.equal(dst[:, :, :8], src[:, :, ids])
