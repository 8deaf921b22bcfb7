"""tri_megatron/local_dist.py's free_port: a port outside the kernel's ephemeral range, free and bindable."""

import socket

from tri_megatron import local_dist


def test_free_port_is_drawn_below_the_ephemeral_range():
    low, _ = local_dist._ephemeral_ports()
    ports = [local_dist.free_port() for _ in range(50)]
    assert all(10000 <= p < low for p in ports), ports
    assert len(set(ports)) > 40  # at random: two runs starting together rarely draw the same one
    with socket.socket() as s:
        s.bind(("127.0.0.1", ports[-1]))  # free now


def test_free_port_skips_a_port_in_use(monkeypatch):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        monkeypatch.setattr(local_dist, "_ephemeral_ports", lambda: (taken + 1, 60999))
        draws = iter([taken, taken, taken - 1])

        class Draw:
            def randrange(self, a, b):
                return next(draws)

        monkeypatch.setattr("random.SystemRandom", Draw)
        assert local_dist.free_port() == taken - 1


def test_free_port_with_an_unusual_range_asks_the_kernel(monkeypatch):
    low, high = local_dist._ephemeral_ports()
    monkeypatch.setattr(local_dist, "_ephemeral_ports", lambda: (2000, 60999))
    port = local_dist.free_port()
    assert low <= port <= high  # bind(0): the kernel's choice
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))
