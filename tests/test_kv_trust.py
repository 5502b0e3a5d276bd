"""Trust on the KV path without a model (issue 11, findings 2, 3, 6, 7): the KV server
authenticates before it spends, bounds its connections and frames, says nothing to an
unproven peer; the consumer dials only trusted peers, proves them, and has one deadline per
pull; held blocks have a renewable lease. Real sockets on loopback; the producer behind the
server is test_kv_unit's FakeProducer (the server is what is under test)."""
from __future__ import annotations

import logging
import mmap
import os
import socket
import struct
import threading

import pytest
import torch

from pdserve.engine.block_manager import BlockManager
from pdserve.engine.request import SamplingParams, Sequence
from pdserve.engine.scheduler import Scheduler, SchedulerConfig
from pdserve.kv import auth
from pdserve.kv import server as kv_server
from pdserve.kv.client import KVClient, KVPullError
from pdserve.kv.layout import BlockPool
from pdserve.kv.params import RemotePrefill
from pdserve.kv.server import KVServer
from pdserve.kv.shm import ShmAttachment, ShmPoolAllocator
from pdserve.kv.spec import KVHandshakeError
from pdserve.kv.wire import recv_msg, send_msg
from kv_fakes import FakeKVPeer, wait_for
from test_kv_unit import SHAPE, FakeProducer, random_pool, remote, spec, wait_released

SECRET = auth.resolve_secret("the deployment's KV secret", None)


@pytest.fixture
def serve():
    servers = []

    def start(producer, **kw):
        s = KVServer(producer, "127.0.0.1", **kw).start()
        servers.append(s)
        return s
    yield start
    for s in servers:
        s.close()


def raw(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    return s


def closed_by_peer(sock: socket.socket) -> bool:
    """Read until the peer closes (True) or 30 s of silence (False)."""
    try:
        while True:
            if not sock.recv(1 << 16):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


# ---- the secret ---------------------------------------------------------------------------------
def test_secret_from_flag_env_or_api_key(monkeypatch):
    monkeypatch.delenv("PDSERVE_KV_SECRET", raising=False)
    assert auth.resolve_secret(None, None) is None
    from_key = auth.resolve_secret(None, "sk-one")
    assert from_key == auth.resolve_secret(None, "sk-one") != auth.resolve_secret(None, "sk-two")
    assert b"sk-one" not in from_key                      # a key of its own, not the API key
    monkeypatch.setenv("PDSERVE_KV_SECRET", "from-env")
    assert auth.resolve_secret(None, "sk-one") == auth.resolve_secret("from-env", None) != from_key
    assert auth.resolve_secret("flag", "sk-one") == auth.resolve_secret("flag", None)   # the flag wins


# ---- the server authenticates before it spends ------------------------------------------------
def test_pull_with_the_shared_secret_works_and_without_it_is_refused(serve):
    src = random_pool()
    prod = FakeProducer(src)
    srv = serve(prod, secret=SECRET)
    dst = torch.zeros(SHAPE)
    KVClient(spec(), BlockPool(dst), secret=SECRET).pull(remote(srv.port), [7, 8], [0, 1])
    assert torch.equal(dst[:, :, [0, 1]], src[:, :, [7, 8]])
    with pytest.raises(KVPullError, match="requires a KV secret"):
        KVClient(spec(), BlockPool(dst)).pull(remote(srv.port), [2], [3])
    wrong = auth.resolve_secret("another deployment", None)
    with pytest.raises(KVPullError, match="did not prove"):
        KVClient(spec(), BlockPool(dst), secret=wrong).pull(remote(srv.port), [2], [3])
    assert prod.grants == {}   # only the proven pull touched a grant (it spent r1)


def test_an_unproven_peer_learns_nothing_and_a_proven_one_hears_the_field(serve):
    srv = serve(FakeProducer(random_pool()), secret=SECRET)
    with raw(srv.port) as s:   # an attacker: whatever it sends, it has no proof
        challenge = recv_msg(s)
        assert set(challenge) == {"op", "nonce", "auth"}
        send_msg(s, {"op": "hello", "nonce": auth.nonce(), "mac": "0" * 64, "spec": spec(block_size=8).to_dict()})
        reply = recv_msg(s)
        assert reply == {"ok": False, "error": "KV authentication failed"}
        assert closed_by_peer(s)
    with raw(srv.port) as s:   # a pull without a hello gets nothing either
        recv_msg(s)
        send_msg(s, {"op": "pull", "request_id": "r1", "token": "tok", "block_ids": [7], "transport": "tcp"})
        assert recv_msg(s) == {"ok": False, "error": "KV authentication failed"}
    # a proven peer with another block size is told which field differs
    with pytest.raises(KVHandshakeError) as e:
        KVClient(spec(block_size=8), BlockPool(torch.zeros(SHAPE)), secret=SECRET).pull(remote(srv.port), [7], [0])
    assert e.value.field == "block_size"


def test_release_after_a_refused_spec_still_needs_the_proof(serve):
    prod = FakeProducer(random_pool())
    srv = serve(prod, secret=SECRET)
    KVClient(spec(block_size=8), BlockPool(torch.zeros(SHAPE))).release(remote(srv.port))   # no secret
    KVClient(spec(block_size=8), BlockPool(torch.zeros(SHAPE)), secret=auth.resolve_secret("x", None)).release(
        remote(srv.port))
    assert prod.released == []
    KVClient(spec(block_size=8), BlockPool(torch.zeros(SHAPE)), secret=SECRET).release(remote(srv.port))
    assert wait_released(prod) == ["r1"]


def test_handshake_has_a_deadline(serve, monkeypatch):
    monkeypatch.setattr(kv_server, "HANDSHAKE_S", 0.5)
    srv = serve(FakeProducer(random_pool()), secret=SECRET)
    with raw(srv.port) as s:
        recv_msg(s)
        s.sendall(struct.pack("!I", 200) + b"{")   # half a hello, then silence
        assert closed_by_peer(s)                    # the server hung up; today it waits forever


def test_an_unproven_peer_cannot_make_the_server_allocate(serve, caplog):
    srv = serve(FakeProducer(random_pool()), secret=SECRET)
    with caplog.at_level(logging.INFO, logger="pdserve.kv"), raw(srv.port) as s:
        recv_msg(s)
        s.sendall(struct.pack("!I", 64 << 20) + b"{")   # claims a 64 MiB frame
        assert closed_by_peer(s)
    assert any("too large" in r.getMessage() for r in caplog.records)


def test_connections_past_the_bound_are_closed_at_once(serve):
    src = random_pool()
    srv = serve(FakeProducer(src), max_connections=8)   # so at most 4 mid-handshake
    idle = [raw(srv.port) for _ in range(4)]
    try:
        for s in idle:
            assert recv_msg(s)["op"] == "challenge"   # each got a thread and a challenge
        extra = raw(srv.port)
        assert closed_by_peer(extra)                  # no challenge: closed on arrival
        assert srv.refused >= 1
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: srv.connections == 0, what="the idle connections to end")
    dst = torch.zeros(SHAPE)
    KVClient(spec(), BlockPool(dst)).pull(remote(srv.port), [7], [0])   # the server still serves
    assert torch.equal(dst[:, :, 0], src[:, :, 7])


def test_shm_pool_fd_needs_a_ticket_and_is_read_only():
    alloc = ShmPoolAllocator()
    pool = alloc(SHAPE, torch.float32, torch.device("cpu"))
    pool.copy_(random_pool())
    try:
        desc = alloc.describe()   # what a local process can learn from /proc/net/unix
        with pytest.raises(OSError):
            ShmAttachment(desc, torch.float32)
        with pytest.raises(OSError):
            ShmAttachment({**desc, "ticket": "guessed"}, torch.float32)
        ticketed = alloc.describe_for_peer()
        att = ShmAttachment(ticketed, torch.float32)
        assert torch.equal(att.tensor, pool)
        with pytest.raises(OSError):
            ShmAttachment(ticketed, torch.float32)   # one-time
        # what a peer gets cannot be written through, not even by reopening it
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.connect("\0" + desc["socket"])
            s.sendall(alloc.issue_ticket().encode())
            _, fds, _, _ = socket.recv_fds(s, 1, 1)
        try:
            with pytest.raises(OSError):
                mmap.mmap(fds[0], 4096)
            with pytest.raises(OSError):
                os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR) and mmap.mmap(
                    os.open(f"/proc/self/fd/{fds[0]}", os.O_RDWR), 4096)
        finally:
            os.close(fds[0])
        pool[0, 0, 0] += 1   # ... while the producer's own mapping stays writable
        assert torch.equal(att.tensor, pool)
    finally:
        alloc.close()


# ---- the consumer trusts only proven or listed peers ------------------------------------------
def test_untrusted_peers_are_never_dialled():
    dst = BlockPool(torch.zeros(SHAPE))
    far = RemotePrefill("E1", "192.0.2.1", 9, [7], "r1", "tok", 5, [1] * 4, ["tcp"])   # TEST-NET-1
    with pytest.raises(KVPullError, match="untrusted.*loopback"):
        KVClient(spec(), dst).pull(far, [7], [0])   # no secret: loopback only
    listed = KVClient(spec(), dst, allowed_peers=auth.parse_peers("127.0.0.1:1,prefill-a:7000"))
    with pytest.raises(KVPullError, match="not in --kv-allowed-peers"):
        listed.pull(remote(2), [7], [0])
    with pytest.raises(ValueError):
        auth.parse_peers("no-port")


def test_a_peer_without_the_secret_is_refused_before_any_block_is_written():
    pool = torch.zeros(SHAPE)
    fake = FakeKVPeer(spec().to_dict(), "E1", BlockPool(pool).stream_bytes, payload=lambda n: b"\x7f" * n)
    try:
        with pytest.raises(KVPullError, match="did not prove"):
            KVClient(spec(), BlockPool(pool), secret=SECRET).pull(remote(fake.port), [7, 8], [0, 1])
        assert fake.pulls == 0 and not pool.any()
    finally:
        fake.close()


# ---- one deadline per pull --------------------------------------------------------------------
def test_a_trickling_peer_fails_its_pull_at_the_deadline():
    pool = BlockPool(torch.zeros(SHAPE))
    fake = FakeKVPeer(spec().to_dict(), "E1", pool.stream_bytes, drip=0.05)
    outcome = []

    def pull():
        try:
            KVClient(spec(), pool, timeout=1.0).pull(remote(fake.port), [7, 8], [0, 1])
            outcome.append("finished")
        except KVPullError as e:
            outcome.append(str(e))
    t = threading.Thread(target=pull, daemon=True)
    t.start()
    t.join(120)   # a per-read timeout never fires: a byte comes every 50 ms, for minutes
    fake.close()
    assert outcome and "did not finish within 1s" in outcome[0]
    assert 0 < fake.bytes_sent < pool.stream_bytes(2)


# ---- the lease, on the scheduler's own clock ----------------------------------------------------
def test_held_blocks_lease_renewed_then_expired():
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, max_model_len=64, role="prefill"),
                      BlockManager(16, 4))
    seq = Sequence("h", list(range(10)), SamplingParams(max_tokens=1), remote_decode=True)
    sched.add(seq)
    out = sched.schedule()
    sched.update(out, [3], now=100.0)
    assert "h" in sched.held
    lease = 30.0
    assert sched.expire_held(125.0, lease) == []
    assert sched.renew_held("h", 125.0)                 # the decode worker still wants them
    assert sched.expire_held(150.0, lease) == []        # 50 s after the hold, 25 s after renewal
    assert sched.renew_held("h", 120.0) and sched.held["h"][1] == 125.0   # an older renewal never shortens it
    assert [s.request_id for s in sched.expire_held(155.0, lease)] == ["h"]
    assert not sched.held and sched.bm.num_used_blocks == 0
    assert not sched.renew_held("h", 156.0)
