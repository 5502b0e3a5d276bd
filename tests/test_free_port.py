"""procs.free_port: ports from below the kernel's ephemeral range, where outgoing connections
never take them between the choice and the bind."""
import socket

from pdserve import procs


def test_ports_come_from_below_the_ephemeral_range_and_are_free():
    low, _ = procs.ephemeral_ports()
    seen = set()
    for _ in range(20):
        port = procs.free_port()
        if low > procs.LOWEST_CHOSEN_PORT + 1000:
            assert procs.LOWEST_CHOSEN_PORT <= port < low
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))   # free: a server can take it
        seen.add(port)
    assert len(seen) > 1                  # drawn at random, not one port for every caller


def test_a_taken_port_is_skipped(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        draws = iter([busy, busy, busy + 1 if busy + 1 < 65536 else busy - 1])
        monkeypatch.setattr(procs, "ephemeral_ports", lambda: (65536, 65536))
        monkeypatch.setattr(procs.random.SystemRandom, "randrange", lambda self, a, b: next(draws))
        port = procs.free_port()
    assert port != busy


def test_no_room_below_the_range_falls_back_to_the_kernels_choice(monkeypatch, tmp_path):
    f = tmp_path / "range"
    f.write_text("1024\t65535\n")
    assert procs.ephemeral_ports(str(f)) == (1024, 65535)
    assert procs.ephemeral_ports(str(tmp_path / "missing")) == (32768, 60999)
    monkeypatch.setattr(procs, "ephemeral_ports", lambda: (1024, 65535))
    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
