"""Ray bring-up: join a cluster (`ray job submit`, `cluster.address`) or start a local one bound to loopback.

A local cluster listens only on `cluster.node_ip_address` (127.0.0.1 unless the config names another
address): Ray's gcs_server, raylet, dashboard agent, runtime-env agent, every worker and the driver, and
the learner's gloo rendezvous. Ray keeps 127.0.0.1 only while RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 is
set when `ray.init` resolves the node address (otherwise it replaces 127.0.0.1 with the machine's
external address and its processes listen on every interface); the variable is read once, when
`ray` is imported, so `_keep_on_loopback` also sets Ray's copy of it. A driver that joins a cluster
changes none of this: the cluster's own settings hold there.
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager

from selfdistill.config import ClusterConfig

# Every actor of every run: in-process vLLM engine, quiet tokenizers, one log line per actor line.
ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0"}
# A local cluster on loopback: Ray keeps 127.0.0.1, gloo and vLLM use the loopback interface.
LOOPBACK_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "GLOO_SOCKET_IFNAME": "lo", "VLLM_HOST_IP": "127.0.0.1"}


def is_loopback(address: str) -> bool:
    return address == "localhost" or address.startswith("127.") or address == "::1"


@contextmanager
def ray_cluster(address: str | None, num_cpus: int, node_ip_address: str = "127.0.0.1", quiet: bool = True,
                max_task_events: int = ClusterConfig.model_fields["max_task_events"].default):
    """Connect to `address` (`auto`: the cluster this job was submitted to; never starts another), or start
    a local single-node cluster listening only on `node_ip_address`, its GCS keeping at most
    `max_task_events` task events; shut down after.

    A driver that has Ray running already (a notebook, a test session, a script calling `train` several
    times) keeps its connection: the run uses it and leaves it up."""
    env = dict(ACTOR_ENV)
    if address is None and is_loopback(node_ip_address):
        env.update(LOOPBACK_ENV)
    for k, v in env.items():
        os.environ.setdefault(k, v)
    import ray

    if ray.is_initialized():
        yield ray
        return
    # A submitted job's runtime env already carries the variables `selfdistill submit` shipped (the user's own
    # among them) to every actor; Ray refuses a driver that names any of them again.
    job_env = _submitted_job_env_vars()
    kwargs = dict(runtime_env={"env_vars": {k: os.environ[k] for k in env if k not in job_env}},
                  log_to_driver=not quiet)
    if address:
        ray.init(address=address, **kwargs)
    else:
        if is_loopback(node_ip_address):
            _keep_on_loopback()
        # address="local": a new cluster of our own, even while other runs on this machine have theirs
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, _node_ip_address=node_ip_address,
                 _system_config={"task_events_max_num_task_in_gcs": max_task_events}, **kwargs)
    try:
        yield ray
    finally:
        ray.shutdown()


def _submitted_job_env_vars() -> dict[str, str]:
    """The env vars of the runtime env `ray job submit` gave this driver ({} outside a submitted job)."""
    from ray._private.runtime_env.constants import RAY_JOB_CONFIG_JSON_ENV_VAR

    config = os.environ.get(RAY_JOB_CONFIG_JSON_ENV_VAR)
    return (json.loads(config).get("runtime_env") or {}).get("env_vars") or {} if config else {}


def _keep_on_loopback() -> None:
    # Ray read RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER when it was imported, which may have been before the
    # variable was set here; its node-address resolution reads this module attribute at call time.
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
