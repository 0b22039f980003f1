"""Weight transports without processes: bucket plans, metadata checks, packing, IPC handle metadata, config."""

import pytest
import torch

from selfdistill.config import ConfigError, load_config
from selfdistill.weights import CollectiveConfig, IpcConfig, ObjectStoreConfig, TensorMeta, WeightSyncError, bucket_plan, \
    checked
from selfdistill.weights.base import meta_from_update_info, pack, unpack, update_info
from selfdistill.weights.ipc import check_update_info, handle_for


def test_bucket_plan_closes_a_bucket_once_it_exceeds_the_buffer():
    # 4+4=8 > 7 closes [0, 1]; 4+10 > 7 closes [2, 3]; the 1 left over is the last bucket
    assert bucket_plan([4, 4, 4, 10, 1], 7) == [range(0, 2), range(2, 4), range(4, 5)]
    assert bucket_plan([20], 7) == [range(0, 1)]  # larger than the buffer: alone
    assert bucket_plan([3, 4], 7) == [range(0, 2)]  # exactly full stays open until the end
    assert bucket_plan([], 7) == []


def test_bucket_plan_cuts_where_vllms_packed_producer_cuts():
    from vllm.distributed.weight_transfer.packed_tensor import pack_tensors

    generator = torch.Generator().manual_seed(0)
    tensors = [(f"t{i}", torch.zeros(int(torch.randint(1, 50, (1,), generator=generator)))) for i in range(40)]
    buffer = 256
    it = iter(tensors)
    vllm_chunks = []
    while (chunk := pack_tensors(it, lambda item: item[1], buffer)) is not None:
        vllm_chunks.append(chunk.names)
    ours = [[tensors[i][0] for i in part] for part in bucket_plan([t.numel() * 4 for _, t in tensors], buffer)]
    assert ours == vllm_chunks


def test_ipc_bucket_must_hold_the_largest_tensor():
    """Refused by field before a run: an ipc buffer smaller than the embedding would fail in vLLM's producer."""
    import re

    from selfdistill.launch import sizing
    from selfdistill.launch.placement import ClusterSpec, plan_placement

    path = "configs/gpu/qwen3-1.7b/grpo.yaml"
    overrides = ["placement.mode=colocated", "rollout.num_engines=4", "learner.num_ranks=4", "sync.transport=ipc"]
    shape = sizing.model_shape(load_config(path))
    embedding_mib = -(-shape.vocab_size * shape.hidden_size * 4 // 2**20)  # float32 on the wire
    spec = ClusterSpec.parse("nodes=1,gpus_per_node=4")
    with pytest.raises(ConfigError, match=re.escape("sync.bucket_mb:") + rf".*at least {embedding_mib} \(got 64\)"):
        plan_placement(load_config(path, [*overrides, "sync.bucket_mb=64"]), spec)
    plan_placement(load_config(path, [*overrides, f"sync.bucket_mb={embedding_mib}"]), spec)


def _meta(named):
    return [TensorMeta(n, t.dtype, tuple(t.shape)) for n, t in named]


def test_checked_passes_tensors_that_match_their_metadata():
    named = [("a", torch.zeros(2, 3)), ("b", torch.ones(4))]
    assert [n for n, _ in checked(iter(named), _meta(named))] == ["a", "b"]


@pytest.mark.parametrize("sent, message", [
    ([("a", torch.zeros(2, 3)), ("b", torch.ones(5))], "declared 'b' torch.float32 (4,), got 'b' torch.float32 (5,)"),
    ([("a", torch.zeros(2, 3)), ("b", torch.ones(4, dtype=torch.float64))], "got 'b' torch.float64"),
    ([("a", torch.zeros(2, 3)), ("c", torch.ones(4))], "declared 'b'"),
    ([("a", torch.zeros(2, 3))], "the first missing is 'b'"),
    ([("a", torch.zeros(2, 3)), ("b", torch.ones(4)), ("c", torch.ones(1))], "first extra 'c'"),
])
def test_checked_raises_naming_the_tensor_that_disagrees(sent, message):
    meta = _meta([("a", torch.zeros(2, 3)), ("b", torch.ones(4))])
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        list(checked(iter(sent), meta))


def test_pack_unpack_round_trip_and_update_info():
    named = [("w", torch.arange(6.0).view(2, 3)), ("i", torch.tensor([1, -2], dtype=torch.int64)),
             ("h", torch.tensor([0.5], dtype=torch.bfloat16))]
    meta = _meta(named)
    buffer = pack([t for _, t in named])
    assert buffer.dtype == torch.uint8 and buffer.numel() == 6 * 4 + 2 * 8 + 2
    for (name, want), (got_name, got) in zip(named, unpack(buffer, meta)):
        assert got_name == name and torch.equal(got, want)
    info = update_info(meta)
    assert info == {"names": ["w", "i", "h"], "dtype_names": ["float32", "int64", "bfloat16"],
                    "shapes": [[2, 3], [2], [1]]}
    assert meta_from_update_info(info) == meta


def test_ipc_update_info_checks_sizes_and_handles():
    info = {**update_info(_meta([("a", torch.zeros(2, 3)), ("b", torch.zeros(4))])), "tensor_sizes": [24, 16],
            "ipc_handles": {"GPU-0": ("args",)}}
    assert [m.name for m in check_update_info(info)] == ["a", "b"]
    with pytest.raises(ValueError, match="'b' torch.float32 \\(4,\\) holds 16 bytes, tensor_sizes says 12"):
        check_update_info({**info, "tensor_sizes": [24, 12]})
    with pytest.raises(ValueError, match="one byte size per tensor"):
        check_update_info({**info, "tensor_sizes": [24]})
    with pytest.raises(ValueError, match="ipc_handles must map GPU UUIDs"):
        check_update_info({**info, "ipc_handles": [("args",)]})


def test_sync_config_is_chosen_by_transport():
    assert isinstance(load_config(None, []).sync, ObjectStoreConfig)
    cfg = load_config(None, ["sync.transport=collective", "sync.timeout_s=20", "sync.bucket_mb=1"])
    assert isinstance(cfg.sync, CollectiveConfig) and cfg.sync.backend == "gloo" and cfg.sync.bucket_bytes == 2**20
    assert isinstance(load_config(None, ["sync.transport=ipc"]).sync, IpcConfig)
    with pytest.raises(ConfigError, match="sync"):
        load_config(None, ["sync.transport=carrier"])
    with pytest.raises(ConfigError, match="backend"):
        load_config(None, ["sync.transport=collective", "sync.backend=mpi"])
    with pytest.raises(ConfigError, match="backend"):
        load_config(None, ["sync.backend=gloo"])  # the object store has no backend


def _colocated(*overrides):
    from selfdistill.launch.placement import ClusterSpec, bundle_layout, plan_placement

    cfg = load_config(None, ["placement.mode=colocated", "placement.learner.gpus=1", "sync.transport=ipc",
                             "learner.num_ranks=4", *overrides])
    plan = plan_placement(cfg, ClusterSpec.parse("nodes=1,gpus_per_node=8"))
    return cfg, plan, bundle_layout(cfg, plan)


@pytest.mark.parametrize("tp, engines, routes", [
    (1, 4, {0: [0], 1: [1], 2: [2], 3: [3]}),  # one engine per learner rank's GPU
    (2, 2, {0: [0, 1], 1: [2, 3]}),  # worker k of engine e shares the GPU of rank e * TP + k
    (4, 1, {0: [0, 1, 2, 3]}),
])
def test_each_colocated_engine_worker_maps_the_buffer_of_the_learner_rank_on_its_gpu(tp, engines, routes):
    """Every rank exports its own GPU's buffer; the merged map rank 0 ships gives each worker its GPU's entry,
    i.e. the rank it shares a bundle (a GPU) with, never rank 0's for all of them."""
    from selfdistill.launch.placement import ipc_routes

    _, _, layout = _colocated(f"placement.rollout.tensor_parallel_size={tp}", f"placement.rollout.gpus={tp}",
                              f"rollout.num_engines={engines}")
    assert ipc_routes(layout) == routes
    for e, ranks in routes.items():  # the routes are the bundles: each worker's GPU share is its rank's bundle
        slot = layout.slots[("rollout", e)]
        assert [layout.slots[("learner", r)].bundle for r in ranks] == (slot.workers or [slot.bundle])
    gpu_of_rank = {r: f"GPU-{r:04d}" for r in range(4)}
    merged = {**update_info(_meta([("w", torch.zeros(3))])), "tensor_sizes": [12],
              "ipc_handles": {gpu_of_rank[r]: ("handle of rank", r) for r in range(4)}}
    check_update_info(merged)
    for ranks in routes.values():
        assert [handle_for(merged, gpu_of_rank[r]) for r in ranks] == [("handle of rank", r) for r in ranks]
    with pytest.raises(WeightSyncError, match=r"no learner rank shares this GPU \(GPU-9999\).*GPU-0000"):
        handle_for(merged, "GPU-9999")


def test_dry_run_prints_the_ipc_routes():
    from selfdistill.launch.placement import dry_run

    cfg, _, _ = _colocated("placement.rollout.tensor_parallel_size=2", "placement.rollout.gpus=2",
                           "rollout.num_engines=2")
    out = dry_run(cfg, "nodes=1,gpus_per_node=8")
    assert "ipc (each worker maps the buffer of the learner rank on its GPU): rollout/0 <- learner/0, learner/1; " \
           "rollout/1 <- learner/2, learner/3" in out


@pytest.mark.parametrize("overrides, field", [
    (["teacher.weights=live"], "teacher.weights"),  # the teacher has a GPU of its own: no learner buffer on it
    (["teacher.weights=ema"], "teacher.weights"),
    (["placement.mode=separate", "placement.rollout.gpus=1"], "sync.transport"),  # engines on GPUs of their own
])
def test_ipc_receivers_off_the_learner_gpus_are_refused_by_field(overrides, field):
    import re

    with pytest.raises(ConfigError, match=re.escape(field) + ":"):
        _colocated("placement.rollout.gpus=1", "rollout.num_engines=4", "placement.teacher.gpus=1", *overrides)


def test_receive_buckets_starts_the_next_receive_before_handing_out_a_bucket():
    """Bucket k+1 travels while the receiver loads bucket k: its receive is started before bucket k is yielded,
    and each bucket's tensors are what the sender packed."""
    from selfdistill.weights.collective import receive_buckets

    sent = [("a", torch.arange(4.0)), ("b", torch.arange(3.0) + 10), ("c", torch.tensor([7.0]))]
    meta = _meta(sent)
    plan = bucket_plan([m.nbytes for m in meta], 8)  # a: 16 bytes alone, then b (12 bytes) alone, then c
    packed, events = [pack([sent[i][1] for i in part]) for part in plan], []

    class Receive:
        def __init__(self, k, buffer):
            self.k, self.buffer = k, buffer

        def wait(self):
            events.append(f"wait {self.k}")
            self.buffer.copy_(packed[self.k])

    def start(buffer):
        events.append(f"start {len([e for e in events if e.startswith('start')])}")
        return Receive(len([e for e in events if e.startswith("start")]) - 1, buffer)

    got = []
    for bucket in receive_buckets(start, meta, 8):
        events.append(f"load {[name for name, _ in bucket]}")
        got += [(name, t.clone()) for name, t in bucket]
    assert events == ["start 0", "wait 0", "start 1", "load ['a']", "wait 1", "start 2", "load ['b']", "wait 2",
                      "load ['c']"]
    assert [name for name, _ in got] == ["a", "b", "c"] and all(torch.equal(t, s) for (_, t), (_, s) in zip(got, sent))
