"""Ray bring-up: join a cluster (`ray job submit`) or start a local one bound to loopback."""

from __future__ import annotations

import os
from contextlib import contextmanager

# Ray rewrites 127.0.0.1 to the machine's external address unless told not to; gloo likewise.
LOOPBACK_ENV = {
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "GLOO_SOCKET_IFNAME": "lo",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "TOKENIZERS_PARALLELISM": "false",
    "RAY_DEDUP_LOGS": "0",
}


@contextmanager
def ray_cluster(address: str | None, num_cpus: int, quiet: bool = True):
    """Connect to `address`, or start a local single-node cluster on 127.0.0.1; shut down after."""
    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    kwargs = dict(runtime_env={"env_vars": dict(LOOPBACK_ENV)}, log_to_driver=not quiet)
    if address:
        ray.init(address=address, **kwargs)
    else:
        # address="local": a new cluster of our own, even while other runs on this machine have theirs
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address="127.0.0.1", **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()
