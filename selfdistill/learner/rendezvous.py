"""Where the learner ranks meet: torch.distributed's store, listening on one address only.

The master address is the address Ray gives rank 0's node (`LearnerGroup`: the placement's node,
else `cluster.node_ip_address`). On one machine (a loopback master) the ranks meet through a file
store, which listens on nothing. On a cluster, rank 0's TCPStore serves on a socket bound to the
master address alone: torch's own TCPStore server listens on every interface whatever MASTER_ADDR
says. gloo's and NCCL's own sockets then use the interface that holds the rank's node address
(`GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME`, unless set already).

The port is chosen on rank 0's node, by rank 0 (`MasterEnd`), before the other ranks start: a port
probed free on the driver's machine says nothing about rank 0's node. Its socket stays bound and
listening until the TCPStore serves on it, so nothing can take the port in between (a probe that
closes its socket again, as Ray Train and OpenRLHF do on rank 0, leaves that window open).
"""

from __future__ import annotations

import os
import socket
import tempfile

from selfdistill.launch.cluster import is_loopback
from selfdistill.weights.collective import bound_store, held_port  # the weights' group serves the same way


class MasterEnd:
    """Rank 0's end of the rendezvous, opened in rank 0's process on its own node; `port` is what the
    other ranks are told. On a cluster: a socket bound to (master address, a port the OS picks there) and
    listening, its descriptor `fd` held for the TCPStore (`rendezvous(..., listen_fd=fd)`). On loopback:
    no socket (`fd` None), a port number free on this machine, which only names the file store."""

    def __init__(self, master_addr: str):
        if is_loopback(master_addr):
            self.fd = None
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                self.port = probe.getsockname()[1]
        else:
            self.fd, self.port = held_port(master_addr)  # the descriptor stays open for the store


def rendezvous(master_addr: str, port: int, rank: int, world_size: int, timeout_s: float, job: str,
               listen_fd: int | None = None) -> dict:
    """`init_process_group`'s rendezvous arguments: {"init_method": a file store} on loopback, else
    {"store": a TCPStore whose master listens on `master_addr` only: on `listen_fd` (rank 0's `MasterEnd`)
    where given, else on a socket rank 0 binds to `port` now}."""
    if is_loopback(master_addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own sockets stay on loopback too
        return {"init_method": f"file://{tempfile.gettempdir()}/selfdistill-rendezvous-{job}-{port}"}
    import ray

    interface = interface_of(ray.util.get_node_ip_address() if ray.is_initialized() else master_addr)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    return {"store": bound_store(master_addr, port, rank, world_size, timeout_s, listen_fd)}


def interface_of(address: str) -> str | None:
    """The name of the network interface holding `address` (None: no local interface does)."""
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items() for a in addrs
                 if a.address.split("%")[0] == address), None)
