"""Where each role runs: its resources from the config, a plan against a cluster, Ray placement groups.

Each role (rollout engines, teacher, learner ranks) asks for GPUs, CPUs and optionally custom
resources or node labels per actor. `plan_placement` lays the actors onto a `ClusterSpec` the way
Ray's PACK placement groups do (first node with room, ranks of one role kept together) and refuses
an impossible placement with a `ConfigError` naming the field, before any actor starts; a dry-run
prints that plan. `RolePlacements` then makes the placement groups of `bundle_layout` (one per role;
one shared group in colocated mode; one per tensor-parallel engine in separate mode), orders each
group's bundles by node, and gives every actor the scheduling strategy of its bundle.

Colocated mode (as verl's hybrid engine and OpenRLHF's colocate_all_models): bundle r holds learner
rank r and, every tensor-parallel-size ranks, an engine (or its vLLM workers), each asking for a
share of the bundle's GPU; the engines sleep while the learner trains (launch/roles.py).

The CPU default asks for no GPU, so it plans (and runs) exactly as a local cluster always did.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from selfdistill.launch import sizing


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RolePlacement(_Strict):
    gpus: int = Field(0, ge=0, description="GPUs per actor (per learner rank, for the teacher; 0: CPU only).")
    resources: dict[str, float] = Field(
        default_factory=dict,
        description="Custom Ray resources each actor's bundle asks for (e.g. {node_b: 0.01} to pin the role to the "
        "nodes started with `--resources '{\"node_b\": 1}'`).",
    )
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Node labels the role's nodes must carry (Ray node labels, `ray start --labels`), e.g. "
        "{accelerator: H100}.",
    )


class EnginePlacement(RolePlacement):
    tensor_parallel_size: int = Field(
        1, ge=1,
        description="vLLM workers per rollout engine, each holding a 1/N shard of the model and taking its own rank "
        "in a collective weight transport. On GPUs one GPU per worker (vLLM's Ray executor, all on one node); on CPU "
        "vLLM's multiprocess executor, each worker bound to its share of the engine's cores "
        "(rollout.num_cpus_per_engine must be at least N).",
    )
    gpus: int = Field(
        0, ge=0, description="GPUs per rollout engine: 0 (CPU engine) or tensor_parallel_size (one per worker)."
    )


class PlacementConfig(_Strict):
    mode: Literal["separate", "colocated"] = Field(
        "separate",
        description="separate: every role gets its own GPUs; colocated: rollout engines and learner ranks share "
        "the same GPUs (engines sleep while the learner trains, so rollout.max_staleness must be 0), so num_engines "
        "x rollout.tensor_parallel_size must equal num_ranks x learner GPUs (a CPU rank counting as 1).",
    )
    rollout: EnginePlacement = Field(default_factory=EnginePlacement, description="Each rollout engine's resources.")
    teacher: RolePlacement = Field(default_factory=RolePlacement, description="The teacher actor's resources.")
    learner: RolePlacement = Field(default_factory=RolePlacement, description="Each learner rank's resources.")
    timeout_s: float = Field(
        300.0, gt=0, description="How long to wait for the cluster to grant the placement groups before giving up."
    )


# --------------------------------------------------------------------------- the cluster


@dataclass
class NodeSpec:
    name: str
    cpus: float
    gpus: float = 0.0
    gpu_memory_gib: float | None = None
    resources: dict[str, float] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)


@dataclass
class ClusterSpec:
    nodes: list[NodeSpec]
    source: str  # where it came from: "--cluster-spec ...", "live cluster ADDR", "this machine"

    @classmethod
    def parse(cls, text: str) -> ClusterSpec:
        """`nodes=2,gpus_per_node=8[,cpus_per_node=64][,gpu_memory_gib=80]` (CPUs default to 16 per GPU)."""
        keys = {"nodes": int, "gpus_per_node": int, "cpus_per_node": float, "gpu_memory_gib": float}
        values = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            key, sep, value = item.partition("=")
            if not sep or key not in keys:
                raise ValueError(f"--cluster-spec: {item!r} is not one of {', '.join(f'{k}=N' for k in keys)}")
            try:
                values[key] = keys[key](value)
            except ValueError:
                raise ValueError(f"--cluster-spec: {key} must be a number (got {value!r})") from None
        nodes, gpus = values.get("nodes", 1), values.get("gpus_per_node", 0)
        if nodes < 1 or gpus < 0:
            raise ValueError(f"--cluster-spec: nodes must be >= 1 and gpus_per_node >= 0 (got {text!r})")
        cpus = values.get("cpus_per_node", float(max(16 * gpus, 16)))
        memory = values.get("gpu_memory_gib", 80.0 if gpus else None)
        return cls([NodeSpec(f"node{i}", cpus, gpus, memory) for i in range(nodes)], f"--cluster-spec {text}")

    @classmethod
    def live(cls) -> ClusterSpec:
        """The nodes of the Ray cluster this process is connected to."""
        import ray

        nodes = []
        for n in ray.nodes():
            if not n.get("Alive"):
                continue
            res = dict(n["Resources"])
            custom = {k: v for k, v in res.items() if k not in ("CPU", "GPU", "memory", "object_store_memory")
                      and not k.startswith("node:") and not k.startswith("accelerator_type")}
            nodes.append(NodeSpec(n["NodeID"], res.get("CPU", 0.0), res.get("GPU", 0.0), None, custom,
                                  dict(n.get("Labels") or {})))
        return cls(nodes, "live cluster")


# --------------------------------------------------------------------------- the plan


@dataclass
class ActorPlan:
    actor: str  # "rollout/0", "teacher", "learner/3"
    role: str
    cpus: float
    gpus: float
    resources: dict[str, float]
    node: int  # index into the cluster spec's nodes
    memory: sizing.RoleMemory | None


@dataclass
class Plan:
    mode: str
    cluster: ClusterSpec
    actors: list[ActorPlan]
    tensor_parallel_size: int = 1  # vLLM workers per engine (placement.rollout.tensor_parallel_size)

    def role(self, name: str) -> list[ActorPlan]:
        return [a for a in self.actors if a.role == name]

    def table(self) -> str:
        """The plan as text: one line per actor, then GPUs and CPUs used per node."""
        engines = self.role("rollout")
        workers = ("one GPU each, vLLM's Ray executor" if engines and engines[0].gpus
                   else "on the engine's CPUs, vLLM's multiprocess executor")
        lines = [f"placement ({self.mode} mode) against {self.cluster.source}:",
                 f"  rollout engines: tensor_parallel_size {self.tensor_parallel_size} "
                 f"(placement.rollout.tensor_parallel_size)" + (f", {self.tensor_parallel_size} workers per engine "
                 f"({workers}), one collective rank each" if self.tensor_parallel_size > 1 else ""),
                 f"  {'actor':<12} {'node':<10} {'GPUs':>4} {'CPUs':>5}  {'memory GiB (weights + state + act.)':<40}"]
        for a in self.actors:
            mem = (f"{a.memory.total_gib:8.2f} ({a.memory.weights_gib:.2f} + {a.memory.other_gib:.2f} + "
                   f"{a.memory.activations_gib:.2f}; {a.memory.what})" if a.memory else "unknown (model shape unknown)")
            lines.append(f"  {a.actor:<12} {self.cluster.nodes[a.node].name[:10]:<10} {a.gpus:>4g} {a.cpus:>5g}  {mem}")
        for i, node in enumerate(self.cluster.nodes):
            on = [a for a in self.actors if a.node == i]
            gpus = _gpus_used(on, self.mode)
            lines.append(f"  node {node.name[:16]}: {gpus:g}/{node.gpus:g} GPUs, {sum(a.cpus for a in on):g}/"
                         f"{node.cpus:g} CPUs used" + (f", {node.gpu_memory_gib:g} GiB per GPU" if node.gpu_memory_gib else ""))
        return "\n".join(lines)


def plan_placement(cfg, spec: ClusterSpec, contexts: tuple[str, ...] | None = None) -> Plan:
    """Lay every actor of `cfg` onto `spec` (raises ConfigError naming the field when it cannot fit)."""
    from selfdistill.config import ConfigError
    from selfdistill.learner.objectives import build_objective

    pc = cfg.placement
    if contexts is None:
        contexts = build_objective(cfg.objective).contexts
    shape = sizing.model_shape(cfg)
    check_modes(cfg, contexts)
    tp = pc.rollout.tensor_parallel_size
    max_node_gpus = max(n.gpus for n in spec.nodes)
    if pc.rollout.gpus > max_node_gpus:
        raise ConfigError(f"placement.rollout.tensor_parallel_size: an engine's {tp} tensor-parallel GPUs "
                          f"(placement.rollout.gpus={pc.rollout.gpus}) must sit on one node, and the largest node "
                          f"has {max_node_gpus:g} ({spec.source})")
    if cfg.sync.transport == "ipc" and shape:
        largest = shape.vocab_size * shape.hidden_size * 4  # the embedding, sent in float32 (learner/actor.py)
        if largest > cfg.sync.bucket_bytes:
            raise ConfigError(f"sync.bucket_mb: vLLM's IPC producer packs into one shared buffer per learner GPU that "
                              f"every tensor must fit, and the embedding ({shape.vocab_size} x {shape.hidden_size} "
                              f"float32) holds {largest / 2**20:.0f} MiB; set sync.bucket_mb to at least "
                              f"{-(-largest // 2**20)} (got {cfg.sync.bucket_mb:g})")
    free = [{"CPU": n.cpus, "GPU": n.gpus, **n.resources} for n in spec.nodes]
    actors: list[ActorPlan] = []

    def place(role: str, name: str, cpus: float, gpus: float, rp: RolePlacement, memory, share: int | None = None):
        need = {"CPU": cpus, "GPU": gpus, **rp.resources}
        for key in rp.resources:
            if not any(key in f for f in free):
                raise ConfigError(f"placement.{role}.resources.{key}: no node of the cluster has resource {key!r} "
                                  f"({spec.source})")
        for i, node in enumerate(spec.nodes):
            if share is not None and i != share:
                continue
            if any(node.labels.get(k) != v for k, v in rp.labels.items()):
                continue
            if all(free[i].get(k, 0.0) + 1e-9 >= v for k, v in need.items()):
                for k, v in need.items():
                    free[i][k] -= v
                actors.append(ActorPlan(name, role, cpus, gpus, rp.resources, i, memory))
                return i
        placed = ", ".join(f"{a.actor}@{spec.nodes[a.node].name}" for a in actors) or "nothing"
        field = (f"placement.{role}.gpus" if gpus else f"placement.{role}.resources" if rp.resources
                 else f"placement.{role}.labels" if rp.labels else CPU_FIELDS[role])
        raise ConfigError(f"{field}: {name} needs {gpus:g} GPUs, {cpus:g} CPUs"
                          + (f", {rp.resources}" if rp.resources else "") + (f", labels {rp.labels}" if rp.labels else "")
                          + f" and no node has that left ({spec.source}; already placed: {placed})")

    mem = (lambda f, *a: f(cfg, shape, *a) if shape else None)
    learner_mem, engine_mem = mem(sizing.learner_memory), mem(sizing.engine_memory, tp)
    if pc.mode == "colocated":
        # Engine i shares the node of learner ranks i*TP .. (i+1)*TP-1; the GPUs are the learner's.
        for r in range(cfg.learner.num_ranks):
            place("learner", f"learner/{r}", cfg.learner.num_cpus_per_rank, pc.learner.gpus, pc.learner, learner_mem)
        for e in range(cfg.rollout.num_engines):
            node = actors[e * tp].node
            place("rollout", f"rollout/{e}", cfg.rollout.num_cpus_per_engine, 0, pc.rollout, engine_mem, share=node)
            actors[-1].gpus = pc.rollout.gpus
    else:
        for e in range(cfg.rollout.num_engines):
            place("rollout", f"rollout/{e}", cfg.rollout.num_cpus_per_engine, pc.rollout.gpus, pc.rollout, engine_mem)
        if contexts:
            place("teacher", "teacher", cfg.teacher.num_cpus, pc.teacher.gpus, pc.teacher, mem(sizing.teacher_memory))
        for r in range(cfg.learner.num_ranks):
            place("learner", f"learner/{r}", cfg.learner.num_cpus_per_rank, pc.learner.gpus, pc.learner, learner_mem)
    if pc.mode == "colocated" and contexts:
        place("teacher", "teacher", cfg.teacher.num_cpus, pc.teacher.gpus, pc.teacher, mem(sizing.teacher_memory))
    _check_memory(pc, spec, actors)
    return Plan(pc.mode, spec, actors, tp)


def check_modes(cfg, contexts: tuple[str, ...] = ()) -> None:
    """Refuse, naming the field, a colocated or tensor-parallel setup that cannot run (whatever the cluster);
    `contexts`: the objective's teacher contexts (none: no teacher)."""
    from selfdistill.config import ConfigError

    pc = cfg.placement
    tp, gpus = pc.rollout.tensor_parallel_size, pc.rollout.gpus
    if gpus not in (0, tp):
        raise ConfigError(f"placement.rollout.gpus: a GPU engine holds one GPU per tensor-parallel worker, so "
                          f"placement.rollout.gpus must be 0 (CPU) or placement.rollout.tensor_parallel_size ({tp}); "
                          f"got {gpus}")
    if tp > 1 and cfg.rollout.engine.name != "vllm":
        raise ConfigError(f"placement.rollout.tensor_parallel_size: {tp} needs rollout.engine.name vllm (got "
                          f"{cfg.rollout.engine.name!r})")
    if tp > 1 and not gpus and cfg.rollout.num_cpus_per_engine < tp:
        raise ConfigError(f"rollout.num_cpus_per_engine: a CPU engine's {tp} tensor-parallel workers "
                          f"(placement.rollout.tensor_parallel_size) each bind at least one core, so the engine needs "
                          f"at least {tp} CPUs (got {cfg.rollout.num_cpus_per_engine:g})")
    if tp > 1 and cfg.sync.transport == "object_store":
        raise ConfigError(f"sync.transport: tensor-parallel engines (placement.rollout.tensor_parallel_size={tp}) run "
                          f"their workers in other processes (vLLM's Ray executor on GPUs, its multiprocess executor "
                          f"on CPU), where the object store's in-process reload cannot reach; use collective (backend "
                          f"nccl on GPUs, gloo on CPU)" + (" or ipc" if gpus else ""))
    if cfg.sync.transport == "ipc" and (not gpus or pc.mode != "colocated"):
        raise ConfigError(f"sync.transport: ipc shares the learner ranks' CUDA buffers with engines on the same GPUs, "
                          f"so it needs placement.mode colocated and GPU engines (got placement.mode={pc.mode}, "
                          f"placement.rollout.gpus={gpus}); otherwise use collective or object_store")
    if cfg.sync.transport == "ipc" and contexts and cfg.teacher.weights != "frozen":
        raise ConfigError(f"teacher.weights: a {cfg.teacher.weights} teacher receives every sync, and with "
                          f"sync.transport ipc it could only map buffers of a learner rank's GPU, while its placement "
                          f"gives it its own (placement.teacher.gpus={pc.teacher.gpus}); use teacher.weights frozen, "
                          f"or sync.transport collective or object_store")
    if pc.mode != "colocated":
        return
    if cfg.rollout.max_staleness > 0:
        raise ConfigError(f"rollout.max_staleness: colocated mode (placement.mode) needs 0 (got "
                          f"{cfg.rollout.max_staleness}): an engine cannot generate while the learner holds its GPU")
    if cfg.rollout.engine.name != "vllm":
        raise ConfigError(f"rollout.engine.name: colocated mode (placement.mode) needs vllm (got "
                          f"{cfg.rollout.engine.name!r}): the engines sleep while the learner trains")
    if (gpus == 0) != (pc.learner.gpus == 0):
        raise ConfigError(f"placement.rollout.gpus: colocated engines and learner ranks both use GPUs or both CPUs "
                          f"(placement.rollout.gpus={gpus}, placement.learner.gpus={pc.learner.gpus})")
    if gpus and cfg.sync.transport == "collective" and cfg.sync.backend == "nccl":
        raise ConfigError("sync.transport: NCCL cannot join two processes on one GPU (an engine and its learner "
                          "rank); colocated engines on GPUs receive through ipc (or object_store)")
    engine_slots, learner_slots = cfg.rollout.num_engines * tp, cfg.learner.num_ranks * max(pc.learner.gpus, 1)
    if pc.learner.gpus > 1 or engine_slots != learner_slots:
        raise ConfigError(
            f"rollout.num_engines: colocated mode needs num_engines x placement.rollout.tensor_parallel_size "
            f"({cfg.rollout.num_engines} x {tp} = {engine_slots}) equal to learner.num_ranks with "
            f"placement.learner.gpus at most 1 ({cfg.learner.num_ranks} x {max(pc.learner.gpus, 1)} = "
            f"{learner_slots}); a CPU rank counts as 1")


CPU_FIELDS = {"rollout": "rollout.num_cpus_per_engine", "teacher": "teacher.num_cpus", "learner": "learner.num_cpus_per_rank"}


def _check_memory(pc: PlacementConfig, spec: ClusterSpec, actors: list[ActorPlan]) -> None:
    from selfdistill.config import ConfigError

    def per_gpu_of(a: ActorPlan) -> float:  # an engine's estimate is per tensor-parallel worker: one GPU already
        return a.memory.total_gib if a.role == "rollout" else a.memory.total_gib / max(a.gpus, 1)

    for role in ("rollout", "teacher", "learner"):
        on_role = [a for a in actors if a.role == role and a.memory and a.gpus]
        for a in on_role[:1]:
            per_gpu = per_gpu_of(a)
            if pc.mode == "colocated" and role in ("rollout", "learner"):
                partner = next((b for b in actors if b.role != role and b.role != "teacher" and b.memory), None)
                per_gpu += per_gpu_of(partner) if partner else 0.0
            limit = spec.nodes[a.node].gpu_memory_gib
            if limit and per_gpu > limit:
                raise ConfigError(f"placement.{role}.gpus: {a.actor} needs about {per_gpu:.1f} GiB per GPU "
                                  f"({a.memory.what}) and the GPUs have {limit:g} GiB ({spec.source}): give the role "
                                  f"more GPUs or ranks, a higher ZeRO stage, or smaller micro-batches")


def _gpus_used(actors: list[ActorPlan], mode: str) -> float:
    return sum(a.gpus for a in actors if not (mode == "colocated" and a.role == "rollout"))


def cpus_needed(cfg, contexts) -> int:
    """Logical CPUs for a local cluster: what the actors reserve (they may exceed physical cores)."""
    need = cfg.rollout.num_engines * cfg.rollout.num_cpus_per_engine + cfg.learner.num_ranks * cfg.learner.num_cpus_per_rank
    need += cfg.teacher.num_cpus if contexts else 0
    return max(1, int(need + 0.999))


def local_spec(num_cpus: int) -> ClusterSpec:
    """The local cluster a run would start on this machine: `num_cpus` logical CPUs, its GPUs if any."""
    gpus = 0
    try:
        import torch

        gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # no usable CUDA: a CPU machine
        gpus = 0
    return ClusterSpec([NodeSpec("local", float(num_cpus), float(gpus))], "this machine (local cluster)")


# --------------------------------------------------------------------------- Ray placement groups


def actor_nodes(actors: dict) -> dict[str, str]:
    """Node id each named actor actually runs on (asked of the actor itself)."""
    import ray

    refs = {name: actor.__ray_call__.remote(_node_id) for name, actor in actors.items()}
    return dict(zip(refs, ray.get(list(refs.values()))))


def _node_id(_actor) -> str:
    import ray

    return ray.get_runtime_context().get_node_id()


COLOCATED_SHARE = 0.5  # of a shared GPU bundle: the learner rank and the engine (or its tensor-parallel worker)


@dataclass
class Slot:
    """Where one actor goes: a bundle of a placement group, and what it asks for inside it."""

    group: str  # key of its placement group in the layout
    bundle: int  # position in that group's bundles once ordered by node
    gpus: float  # the actor's own GPU request (a fraction of a shared bundle's GPU when colocated)
    workers: list[int] = field(default_factory=list)  # tensor-parallel engine: its vLLM workers' bundle positions
    worker_gpus: float = 1.0  # GPU request of each such worker


@dataclass
class Layout:
    """The placement groups a run asks Ray for (bundles, strategy, node labels) and each actor's slot in them."""

    groups: dict[str, tuple[list[dict], str, dict]]
    slots: dict[tuple[str, int], Slot]


def bundle_layout(cfg, plan: Plan) -> Layout:
    """The placement groups of `plan`, one per role, except:

    - colocated mode: one shared group, bundle r holding learner rank r and (for r a multiple of the tensor-parallel
      size) an engine, each actor asking for `COLOCATED_SHARE` of the bundle's GPU;
    - tensor-parallel GPU engines (placement.rollout.tensor_parallel_size > 1, placement.rollout.gpus > 0): one
      bundle per GPU, vLLM's Ray executor putting one worker into each; in separate mode every engine gets its own
      STRICT_PACK group, so its GPUs share a node. A CPU engine's workers are processes of its own (vLLM's
      multiprocess executor) inside its one bundle.
    """
    pc = cfg.placement
    tp = pc.rollout.tensor_parallel_size
    gpu_workers = tp > 1 and pc.rollout.gpus > 0
    groups, slots = {}, {}
    if plan.mode == "colocated":
        per_engine = tp  # learner ranks per engine
        learners = plan.role("learner")
        bundles = []
        for r, rank in enumerate(learners):
            bundle = {"CPU": rank.cpus, **({"GPU": float(rank.gpus)} if rank.gpus else {}), **rank.resources}
            slots[("learner", r)] = Slot("colocated", r, COLOCATED_SHARE if rank.gpus else 0.0)
            if r % per_engine == 0 and r // per_engine < cfg.rollout.num_engines:
                e = r // per_engine
                engine = plan.role("rollout")[e]
                bundle["CPU"] += engine.cpus
                for key, value in engine.resources.items():
                    bundle[key] = max(bundle.get(key, 0.0), value)
                if gpu_workers:
                    slots[("rollout", e)] = Slot("colocated", r, 0.0, list(range(r, r + tp)), COLOCATED_SHARE)
                else:
                    slots[("rollout", e)] = Slot("colocated", r, COLOCATED_SHARE if pc.rollout.gpus else 0.0)
            bundles.append(bundle)
        groups["colocated"] = (bundles, "PACK", {**pc.learner.labels, **pc.rollout.labels})
    roles = ("teacher",) if plan.mode == "colocated" else ("rollout", "teacher", "learner")
    for role in roles:
        members = plan.role(role)
        labels = getattr(pc, role).labels
        if role == "rollout" and gpu_workers:
            for e, a in enumerate(members):
                bundles = [{"GPU": 1.0, **({"CPU": a.cpus, **a.resources} if k == 0 else {})} for k in range(tp)]
                groups[a.actor] = (bundles, "STRICT_PACK", labels)
                slots[(role, e)] = Slot(a.actor, 0, 0.0, list(range(tp)), 1.0)
        elif members:
            groups[role] = ([{"CPU": a.cpus, **({"GPU": float(a.gpus)} if a.gpus else {}), **a.resources}
                             for a in members], "PACK", labels)
            for i, a in enumerate(members):
                slots[(role, i)] = Slot(role, i, float(a.gpus))
    return Layout(groups, slots)


def engine_executor(slot: Slot, order: list[int], tensor_parallel_size: int):
    """How an engine in `slot` runs vLLM (`rollout.base.EngineExecutor`): `placement.rollout.tensor_parallel_size`
    workers; GPU workers in their bundles (positions mapped to the group's bundle indices by `order`, the granted
    order by node), CPU workers inside the engine's own bundle (no bundle indices: vLLM's multiprocess executor)."""
    from selfdistill.rollout.base import EngineExecutor

    if not slot.workers:
        return EngineExecutor(tensor_parallel_size)
    return EngineExecutor(len(slot.workers), [order[p] for p in slot.workers], slot.worker_gpus)


def ipc_routes(layout: Layout) -> dict[int, list[int]]:
    """Colocated engines over CUDA IPC: engine -> the learner ranks whose GPU buffers its workers map, one per
    worker, in tensor-parallel rank order (the ranks sharing its bundles). Every learner rank exports its own
    packed buffer, vLLM's IPC trainer engine gathers them into one {GPU UUID: handle} map, and each worker
    picks its own GPU's entry; these are the pairs that must share a GPU."""
    by_bundle = {slot.bundle: rank for (role, rank), slot in layout.slots.items()
                 if role == "learner" and slot.group == "colocated"}
    routes = {}
    for (role, e), slot in sorted(layout.slots.items()):
        if role == "rollout" and slot.group == "colocated":
            routes[e] = [by_bundle[b] for b in (slot.workers or [slot.bundle])]
    return routes


class RolePlacements:
    """The placement groups of `bundle_layout`, granted or refused within `placement.timeout_s`; `options(role, i)`
    gives actor i of a role the scheduling strategy of its bundle (bundles ordered by node)."""

    def __init__(self, cfg, plan: Plan):
        import ray
        from ray.util.placement_group import placement_group, placement_group_table

        from selfdistill.config import ConfigError

        self.plan, self.groups, self.order, self.nodes = plan, {}, {}, {}
        self.tensor_parallel_size = cfg.placement.rollout.tensor_parallel_size
        self.layout = bundle_layout(cfg, plan)
        for name, (bundles, strategy, labels) in self.layout.groups.items():
            self.groups[name] = placement_group(
                bundles, strategy=strategy, name=f"selfdistill-{name.replace('/', '-')}",
                bundle_label_selector=[dict(labels) for _ in bundles] if labels else None)
        try:
            ray.get([pg.ready() for pg in self.groups.values()], timeout=cfg.placement.timeout_s)
        except ray.exceptions.GetTimeoutError:
            self.remove()
            raise ConfigError(f"placement.timeout_s: the cluster did not grant placement groups for "
                              f"{list(self.groups)} within {cfg.placement.timeout_s:g} s (not enough free resources)"
                              ) from None
        for name, pg in self.groups.items():
            nodes = placement_group_table(pg)["bundles_to_node_id"]
            self.order[name] = sorted(nodes, key=lambda b: (nodes[b], b))  # ranks of one node stay together
            self.nodes[name] = nodes
        for (role, index), slot in self.layout.slots.items():
            on = {self.nodes[slot.group][self.order[slot.group][p]] for p in slot.workers}
            if len(on) > 1:
                self.remove()
                raise ConfigError(f"placement.rollout.tensor_parallel_size: the {len(slot.workers)} GPUs of "
                                  f"rollout/{index} landed on {len(on)} nodes; each node's learner GPUs must be a "
                                  f"multiple of placement.rollout.tensor_parallel_size")

    def options(self, role: str, index: int) -> dict:
        """Ray actor options that put actor `index` of `role` into its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        member, slot = self.plan.role(role)[index], self.layout.slots[(role, index)]
        strategy = PlacementGroupSchedulingStrategy(self.groups[slot.group],
                                                    placement_group_bundle_index=self.order[slot.group][slot.bundle])
        return dict(num_cpus=member.cpus, num_gpus=slot.gpus, scheduling_strategy=strategy)

    def executor(self, index: int):
        """How engine `index` runs vLLM (`engine_executor` over the granted bundle order)."""
        slot = self.layout.slots[("rollout", index)]
        return engine_executor(slot, self.order.get(slot.group, []), self.tensor_parallel_size)

    def node_address(self, role: str, index: int) -> str:
        """IP address of the node that holds actor `index` of `role` (the learner's rendezvous host)."""
        import ray

        slot = self.layout.slots[(role, index)]
        node_id = self.nodes[slot.group][self.order[slot.group][slot.bundle]]
        return next(n["NodeManagerAddress"] for n in ray.nodes() if n["NodeID"] == node_id)

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group

        for pg in self.groups.values():
            try:
                remove_placement_group(pg)
            except Exception:  # the cluster is gone already
                pass
        self.groups = {}


# --------------------------------------------------------------------------- dry run


def dry_run(cfg, cluster_spec: str | None = None) -> str:
    """The resolved config and its placement plan against `cluster_spec`, the cluster `cfg.cluster.address`
    names (joined, nothing started), or this machine; raises ConfigError if the placement is impossible."""
    import yaml

    from selfdistill.config import ConfigError
    from selfdistill.learner.objectives import build_objective

    contexts = build_objective(cfg.objective).contexts
    if cluster_spec:
        spec = ClusterSpec.parse(cluster_spec)
    elif cfg.cluster.address:
        import ray

        try:
            ray.init(address=cfg.cluster.address, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise ConfigError(f"cluster.address {cfg.cluster.address!r}: no cluster to plan against ({e}); "
                              f"pass --cluster-spec nodes=N,gpus_per_node=G instead") from None
        try:
            spec = ClusterSpec.live()
            spec.source = f"live cluster {cfg.cluster.address}"
        finally:
            ray.shutdown()
    else:
        spec = local_spec(cfg.cluster.num_cpus or cpus_needed(cfg, contexts))
    plan = plan_placement(cfg, spec, contexts)
    resolved = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    table = plan.table()
    if cfg.sync.transport == "ipc":
        routes = ipc_routes(bundle_layout(cfg, plan))
        table += "\n  ipc (each worker maps the buffer of the learner rank on its GPU): " + "; ".join(
            f"rollout/{e} <- " + ", ".join(f"learner/{r}" for r in ranks) for e, ranks in routes.items())
    return f"# resolved config\n{resolved}\n{table}\n(dry run: nothing was started)"
