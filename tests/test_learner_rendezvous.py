"""The learner ranks' rendezvous listens on the master address only (learner/rendezvous.py): a file store on
loopback, on a cluster a TCPStore bound to the address of rank 0's node (torch's own listens everywhere)."""

from __future__ import annotations

import ipaddress
import os
import socket
import threading

import psutil
import pytest

from selfdistill.learner.rendezvous import MasterEnd, interface_of, rendezvous
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



@pytest.mark.skipif(_external_address() is None, reason="this machine has no address outside loopback")
def test_rank_0_opens_the_rendezvous_on_its_own_node_and_holds_the_port():
    """A port free on the driver's machine (here: on loopback) may be taken on rank 0's node (here: the external
    address); the master end picks its port there and keeps it listening until the store serves on it."""
    address = _external_address()
    with socket.socket() as neighbour:  # another process on rank 0's node holds a port
        neighbour.bind((address, 0))
        neighbour.listen()
        taken = neighbour.getsockname()[1]
        with socket.socket() as driver_probe:
            driver_probe.bind(("127.0.0.1", taken))  # ... that a probe on the driver's side finds free
        with pytest.raises(OSError):  # the old way: rank 0 told to serve on the driver's pick
            rendezvous(address, taken, 0, 1, 30, "job")

        end = MasterEnd(address)
        assert end.port != taken and _listening(end.port) == {address}  # held before any other rank is told
        stores = {}
        master = threading.Thread(target=lambda: stores.setdefault(
            0, rendezvous(address, end.port, 0, 2, 30, "job", end.fd)["store"]))
        master.start()
        client = rendezvous(address, end.port, 1, 2, 30, "job")["store"]
        master.join(30)
        stores[0].set("from rank 0", "hello")
        assert client.get("from rank 0") == b"hello"
        assert _listening(end.port) == {address} and _refused("127.0.0.1", end.port)


def test_loopback_master_end_names_a_file_store_and_listens_nowhere():
    end = MasterEnd("127.0.0.1")
    assert end.fd is None and not _listening(end.port)
    assert rendezvous("127.0.0.1", end.port, 0, 1, 30, "job")["init_method"].endswith(f"-job-{end.port}")


def _rank_class():
    """A learner rank with LearnerActor's start-up protocol and no DeepSpeed: the real rendezvous, a real
    TCPStore (made here so that Ray ships the class by value: the workers cannot import this module)."""

    class Rank:
        def __init__(self, cfg, model_path, rank, world_size, port, resume_from, master):
            self.rank, self.world_size, self.master = rank, world_size, master
            self.end = MasterEnd(master) if rank == 0 and port is None else None
            if port is not None:  # started in one go
                self.start(port)

        def ready(self):
            return os.getpid()

        def master_port(self):
            return self.end.port

        def start(self, port):
            self.store = rendezvous(self.master, port, self.rank, self.world_size, 30, "job",
                                    self.end.fd if self.end else None)["store"]
            self.store.set(f"rank {self.rank}", str(os.getpid()))
            return [self.store.get(f"rank {r}").decode() for r in range(self.world_size)]  # waits for every rank

    return Rank


@pytest.mark.skipif(_external_address() is None, reason="this machine has no address outside loopback")
def test_learner_group_meets_on_a_port_rank_0_chose_even_if_the_drivers_pick_is_taken_there(monkeypatch):
    """Two Ray actor ranks, master on the external address. Any port the driver probes free on loopback is
    taken on the master address at once (a neighbour on rank 0's node): a group that picks its port on the
    driver cannot start; one whose rank 0 opens its own port meets, and rank 0 listens on it there only."""
    from selfdistill.config import load_config
    from selfdistill.launch.cluster import ray_cluster
    from selfdistill.launch.processes import alive, stop_actors
    from selfdistill.learner import group

    address, neighbours, probes = _external_address(), [], []
    bind = socket.socket.bind

    def bind_then_taken_on_rank_0s_node(sock, where):
        bind(sock, where)
        if sock.family == socket.AF_INET and where[0] == "127.0.0.1" and where[1] == 0:
            probes.append(sock.getsockname()[1])
            neighbour = socket.socket()
            bind(neighbour, (address, probes[-1]))
            neighbour.listen()
            neighbours.append(neighbour)

    monkeypatch.setattr(group, "LearnerActor", _rank_class())
    cfg = load_config(None, ["learner.num_ranks=2", "learner.num_cpus_per_rank=0.5", "faults.start_timeout_s=600",
                             f"cluster.node_ip_address={address}"])
    with ray_cluster(None, 2):
        monkeypatch.setattr(socket.socket, "bind", bind_then_taken_on_rank_0s_node)
        try:
            learners = group.LearnerGroup(cfg, "no model")
        finally:
            monkeypatch.setattr(socket.socket, "bind", bind)
            for neighbour in neighbours:
                neighbour.close()
        try:
            import ray

            port = ray.get(learners.actors[0].master_port.remote())
            listening = {(c.laddr.ip, c.laddr.port) for c in psutil.Process(learners.pids[0]).net_connections("inet")
                         if c.status == psutil.CONN_LISTEN}
            assert (address, port) in listening and not {a for a, p in listening if p == port} - {address}
            assert not probes  # the driver chose no port
        finally:
            assert not stop_actors(learners.actors, learners.pids, timeout_s=30)
        assert not any(alive(pid) for pid in learners.pids)
