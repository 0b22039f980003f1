"""Where the learner ranks meet: torch.distributed's store, listening on one address only.

The master address is the address Ray gives rank 0's node (`LearnerGroup`: the placement's node,
else `cluster.node_ip_address`). On one machine (a loopback master) the ranks meet through a file
store, which listens on nothing. On a cluster, rank 0's TCPStore serves on a socket bound to the
master address alone: torch's own TCPStore server listens on every interface whatever MASTER_ADDR
says. gloo's and NCCL's own sockets then use the interface that holds the rank's node address
(`GLOO_SOCKET_IFNAME` / `NCCL_SOCKET_IFNAME`, unless set already).
"""

from __future__ import annotations

import os
import tempfile

from selfdistill.launch.cluster import is_loopback
from selfdistill.weights.collective import bound_store  # the weights' group serves its store the same way


def rendezvous(master_addr: str, port: int, rank: int, world_size: int, timeout_s: float, job: str) -> dict:
    """`init_process_group`'s rendezvous arguments: {"init_method": a file store} on loopback, else
    {"store": a TCPStore whose master listens on `master_addr` only}."""
    if is_loopback(master_addr):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo's own sockets stay on loopback too
        return {"init_method": f"file://{tempfile.gettempdir()}/selfdistill-rendezvous-{job}-{port}"}
    import ray

    interface = interface_of(ray.util.get_node_ip_address() if ray.is_initialized() else master_addr)
    if interface is not None:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", interface)
        os.environ.setdefault("NCCL_SOCKET_IFNAME", interface)
    return {"store": bound_store(master_addr, port, rank, world_size, timeout_s)}


def interface_of(address: str) -> str | None:
    """The name of the network interface holding `address` (None: no local interface does)."""
    import psutil

    return next((name for name, addrs in psutil.net_if_addrs().items() for a in addrs
                 if a.address.split("%")[0] == address), None)
