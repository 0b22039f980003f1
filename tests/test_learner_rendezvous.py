"""The learner ranks' rendezvous listens on the master address only (learner/rendezvous.py): a file store on
loopback, on a cluster a TCPStore bound to the address of rank 0's node (torch's own listens everywhere)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

import psutil
import pytest

from selfdistill.learner.rendezvous import interface_of, rendezvous
from selfdistill.weights.collective import bound_store


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> set[str]:
    """Addresses this process listens on at `port`."""
    return {c.laddr.ip for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def _refused(address: str, port: int) -> bool:
    with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET) as s:
        s.settimeout(5)
        try:
            s.connect((address, port))
        except ConnectionRefusedError:
            return True
        return False


def _external_address() -> str | None:
    """A non-loopback IPv4 address of this machine (a stand-in for a cluster node's own address)."""
    return next((a.address for addrs in psutil.net_if_addrs().values() for a in addrs
                 if a.family == socket.AF_INET and not ipaddress.ip_address(a.address).is_loopback), None)


def test_store_master_listens_on_its_address_only_and_ranks_meet_there():
    port, stores = _free_port(), {}
    master = threading.Thread(target=lambda: stores.setdefault(0, bound_store("127.0.0.1", port, 0, 2, 30)))
    master.start()  # the master waits for the other rank
    client = bound_store("127.0.0.1", port, 1, 2, 30)
    master.join(30)
    assert 0 in stores
    stores[0].set("from rank 0", "hello")
    assert client.get("from rank 0") == b"hello"
    assert _listening(port) == {"127.0.0.1"}  # not 0.0.0.0 or ::
    assert _refused("127.0.0.2", port)  # another address of the same machine: nothing listens there


def _without_socket_interfaces(monkeypatch) -> None:
    """os.environ without the gloo/NCCL interface variables, restored after the test."""
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME")})


def test_loopback_master_meets_through_a_file_and_listens_nowhere(monkeypatch):
    _without_socket_interfaces(monkeypatch)
    port = _free_port()
    found = rendezvous("127.0.0.1", port, 0, 2, 30, "job")
    assert set(found) == {"init_method"} and found["init_method"].startswith("file://")
    assert not _listening(port)
    assert os.environ["GLOO_SOCKET_IFNAME"] == "lo" and "NCCL_SOCKET_IFNAME" not in os.environ
    assert interface_of("127.0.0.1") == "lo" and interface_of("203.0.113.7") is None  # TEST-NET-3: nobody's


@pytest.mark.skipif(_external_address() is None, reason="this machine has no address outside loopback")
def test_cluster_master_listens_on_the_node_address_only(monkeypatch):
    address = _external_address()
    _without_socket_interfaces(monkeypatch)
    port = _free_port()
    found = rendezvous(address, port, 0, 1, 30, "job")
    assert set(found) == {"store"}
    assert _listening(port) == {address}
    assert _refused("127.0.0.1", port)  # the rendezvous is not reachable on any other interface
    interface = interface_of(address)
    assert interface is not None and interface != "lo"
    assert os.environ["GLOO_SOCKET_IFNAME"] == interface == os.environ["NCCL_SOCKET_IFNAME"]

