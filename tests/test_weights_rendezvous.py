"""The weight-sync rendezvous port cannot be taken between choosing it and serving on it (weights/collective.py).

The sender (the learner's rank 0) opens a socket listening on the port it chooses and its store serves
on that same socket, so another process that goes for the port in between is refused, and the sync
works. Through real processes: another process tries to take the port right after
`trainer_init_info` returns (before the store exists), and a teacher actor (Ray) receives the
weights over gloo. The NCCL backend cannot run without GPUs; its rendezvous (vLLM's
`StatelessProcessGroup`, whose store serves on the held socket) runs here up to the store, with a
second process joining it as vLLM's workers do.
"""

from __future__ import annotations

import errno
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from selfdistill.config import TeacherConfig
from selfdistill.data.templates import PromptTemplates
from selfdistill.weights import CollectiveConfig, Receivers, TensorMeta, Weights
from selfdistill.weights.collective import CollectiveSender

pytestmark = pytest.mark.e2e

_TAKE_PORT = textwrap.dedent("""
    import socket, sys
    s = socket.socket()
    try:
        s.bind((sys.argv[1], int(sys.argv[2])))
        s.listen()
    except OSError as error:
        print("refused", error.errno, flush=True)
        sys.exit(0)
    print("took", 0, flush=True)
    sys.stdin.read()  # holds the port until the test closes its stdin
""")


class _PortTaker:
    """Another process that binds and listens on (address, port) if it can, and holds it until closed."""

    def __init__(self, address: str, port: int):
        self.proc = subprocess.Popen([sys.executable, "-c", _TAKE_PORT, address, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)
        self.outcome, code = self.proc.stdout.readline().split()
        self.errno = int(code)

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


class _RacedSender(CollectiveSender):
    """The learner's sender, with another process going for its port as soon as the port is chosen
    (after `trainer_init_info`, before the backend's store binds anything)."""

    def __init__(self, *args):
        super().__init__(*args)
        self.takers: list[_PortTaker] = []

    def trainer_init_info(self):
        info = super().trainer_init_info()
        if self.rank == 0:
            self.takers.append(_PortTaker(info.master_address, info.master_port))
        return info


def test_gloo_sync_works_when_another_process_goes_for_the_chosen_port(tiny_model, tmp_path):
    import ray

    from selfdistill.teacher.actor import TeacherActor

    timeout_s = 20.0
    cfg = CollectiveConfig(backend="gloo", timeout_s=timeout_s, bucket_mb=0.01)
    state = load_file(tiny_model / "model.safetensors")
    meta = [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    new = {n: t + 1.0 for n, t in state.items()}
    ray.init(address="local", num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        teacher = ray.remote(TeacherActor).options(num_cpus=1).remote(
            str(tiny_model), TeacherConfig(weights="live"), PromptTemplates(), 1.0, cfg)
        ray.get(teacher.ready.remote())
        sender = _RacedSender(cfg, 0, Receivers({"teacher": teacher}, timeout_s=timeout_s))
        try:
            sender.connect(Weights(meta, lambda: [new]))
            sender.send(Weights(meta, lambda: [{n: t} for n, t in new.items()]), version=1)
        finally:
            for taker in sender.takers:
                taker.close()
        [taker] = sender.takers
        assert (taker.outcome, taker.errno) == ("refused", errno.EADDRINUSE), \
            "another process took the port the sender had chosen: the sender did not hold it"
        ray.get(teacher.save.remote(str(tmp_path / "teacher")))
        received = load_file(tmp_path / "teacher" / "model.safetensors")
        assert set(received) == set(new)
        for name, tensor in new.items():
            assert torch.equal(received[name], tensor.to(received[name].dtype)), name
    finally:
        ray.shutdown()


_JOIN_AS_WORKER = textwrap.dedent("""
    import sys
    from vllm.distributed.utils import StatelessProcessGroup
    group = StatelessProcessGroup.create(host=sys.argv[1], port=int(sys.argv[2]), rank=1, world_size=2,
                                         store_timeout=60)
    print(group.broadcast_obj(None, src=0), flush=True)
""")


def test_nccl_rendezvous_store_serves_on_the_socket_held_since_the_port_was_chosen():
    """The NCCL backend up to its store (the communicator itself needs GPUs): rank 0's vLLM
    `StatelessProcessGroup` serves on the socket the sender opened in `trainer_init_info`; another process
    going for the port meanwhile is refused, and a worker that joins as vLLM's do meets rank 0 there."""
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from selfdistill.weights.nccl_engine import HeldNCCLTrainerWeightTransferEngine, trainer_group

    cfg = CollectiveConfig(backend="nccl", master_address="127.0.0.1")
    sender = _RacedSender(cfg, 0, Receivers({"engine": None}))
    info = sender.trainer_init_info()
    assert WeightTransferTrainerFactory._registry[info.backend]() is HeldNCCLTrainerWeightTransferEngine
    [taker] = sender.takers
    taker.close()
    assert (taker.outcome, taker.errno) == ("refused", errno.EADDRINUSE), \
        "another process took the port the sender had chosen: the sender did not hold it"
    worker = subprocess.Popen([sys.executable, "-c", _JOIN_AS_WORKER, info.master_address, str(info.master_port)],
                              stdout=subprocess.PIPE, text=True)
    try:
        group = trainer_group(info)
        group.broadcast_obj("from the sender's store", src=0)
        out, _ = worker.communicate(timeout=120)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    assert worker.returncode == 0 and out.strip() == "from the sender's store"
    assert group.rank == 0 and group.world_size == 2


def test_a_connect_that_fails_before_its_store_exists_frees_the_held_port(tiny_model, monkeypatch):
    """The sender holds its port from `trainer_init_info` on; if the connect fails before a store took the
    descriptor (here: opening the group with the receivers raises), the port is closed, not leaked: another
    process can take it afterwards. (Once handed to a store, the store owns and closes it.)"""
    import selfdistill.weights.gloo_engine as gloo_engine

    def unreachable(*args, **kwargs):
        raise RuntimeError("receivers unreachable")

    monkeypatch.setattr(gloo_engine, "open_with_workers", unreachable)
    infos = []

    class Recording(CollectiveSender):
        def trainer_init_info(self):
            infos.append(super().trainer_init_info())
            return infos[-1]

    state = load_file(tiny_model / "model.safetensors")
    meta = [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in state.items()]
    sender = Recording(CollectiveConfig(backend="gloo", master_address="127.0.0.1"), 0, Receivers({}))
    with pytest.raises(RuntimeError, match="receivers unreachable"):
        sender.connect(Weights(meta, lambda: [state]))
    [info] = infos
    taker = _PortTaker(info.master_address, info.master_port)
    taker.close()
    assert taker.outcome == "took", f"port {info.master_port} still held after the failed connect (errno {taker.errno})"
    assert info.listen_fd is None
