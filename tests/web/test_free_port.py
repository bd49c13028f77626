"""``free_port``: the port a test or the demo hands to a server it starts a moment later."""

from __future__ import annotations

import socket

from training.demo import processes
from training.demo.processes import free_port, port_free


def test_the_port_is_free_and_outside_the_range_the_kernel_gives_outgoing_connections():
    low, high = processes._ephemeral_port_range()
    ports = {free_port() for _ in range(50)}
    assert all(port_free(port) for port in ports)
    assert all(not low <= port <= high for port in ports), sorted(ports)
    assert min(ports) >= processes._LOWEST_LISTENING_PORT


def test_a_port_already_listened_on_is_never_handed_out(monkeypatch):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        # Squeeze the range to exactly the taken port and one other.
        monkeypatch.setattr(processes, "_LOWEST_LISTENING_PORT", port)
        monkeypatch.setattr(processes, "_ephemeral_port_range", lambda: (port + 1000, port + 2000))
        handed = {free_port() for _ in range(30)}
    assert port not in handed


def test_without_room_below_the_ephemeral_range_it_asks_the_kernel(monkeypatch):
    monkeypatch.setattr(processes, "_ephemeral_port_range", lambda: (10100, 60999))
    port = free_port()
    assert port_free(port)
    assert port > 10100
