"""Every use of vLLM internals and version-sensitive vLLM API, in one module (vLLM 0.32).

A vLLM upgrade should touch this file only. What is used, and why:

- `VLLM_ENABLE_V1_MULTIPROCESSING=0` (read when the engine is built): the engine core runs
  in the caller's process, so `reload_weights` can take a Python iterator of tensors by
  reference, and a CPU engine starts in seconds instead of a minute. `make_llm` sets it
  before it imports vllm; nothing else here imports vllm at module level.
- `vllm.LLM(...)` keyword arguments (`llm_args`): `distributed_executor_backend="uni"` (one worker in
  this process) or, tensor parallel, `"ray"` with `tensor_parallel_size` and the environment
  variables `VLLM_RAY_BUNDLE_INDICES` / `VLLM_RAY_PER_WORKER_GPUS` (workers in the bundles of the
  engine's placement group), `enable_sleep_mode` (GPU only), `kv_cache_memory_bytes` (the CPU KV cache size; it replaces the legacy
  `VLLM_CPU_KVCACHE_SPACE`, which, if set, still wins), `logprobs_mode`, and
  `weight_transfer_config` (vLLM's weight-transfer API, backend named by the weight transport).
- `SamplingParams`: `logprobs=0` returns the sampled token's log-prob only;
  `flat_logprobs=True` returns them as `FlatLogprobs` (flat lists, no dict per token),
  whose `logprobs[start_indices[i]]` is the sampled (or, for prompts, the actual) token
  of position i; `prompt_logprobs=0` scores a prompt and skips the prefix cache for that
  request; `include_stop_str_in_output=True` keeps text and token ids in agreement.
- `TokensPrompt(prompt_token_ids=...)`: token ids in, no tokenisation.
- `LLM.collective_rpc("reload_weights", kwargs={"weights_iterator": ...})`: in-place reload
  from checkpoint-format (Hugging Face named) tensors. It unpacks the CPU kernels' packed
  linear layers, loads, and repacks them; calling the model's own `load_weights` fails on
  CPU (packed layers hold empty parameters). Two gaps it leaves, closed here: a tied
  `lm_head` is not repacked (its CPU kernel keeps the old embedding; fixed with
  `LLM.apply_model` re-running the layer's `process_weights_after_loading`), and weights
  it did not receive only get a warning (`reload_weights` returns the names it passed on).
- `LLM.reset_prefix_cache()`: cached KV blocks were computed with the old weights.
- LoRA: `LLM(enable_lora=True, max_lora_rank=...)` (ranks vLLM allows: `MaxLoRARanks` in
  vllm/config/lora.py), a `LoRARequest(name, int id, folder)` per adapter version passed to
  `generate` (vLLM loads the PEFT folder at first use and caches it by id; prefix-cache blocks
  are keyed by the adapter's name, so versions never share KV), `llm_engine.remove_lora(id)`
  to drop a replaced version, and the model registry's class with `supports_lora` to refuse
  a model whose vLLM implementation has no LoRA path.
- Sleep mode: `LLM.sleep(level=1)` (weights offloaded to CPU memory, KV cache dropped),
  `LLM.wake_up(tags=["weights"])` and `wake_up(tags=["kv_cache"])`, `llm_engine.is_sleeping()`.
  The executor keeps the sleeping tags, and the scheduler stays paused until every tag is awake.
  On CPU the worker's sleep and wake_up do nothing, but that state is kept all the same.
- RL weight-transfer API (`init_weight_transfer_engine`, `start_weight_update`,
  `update_weights`, `finish_weight_update(weight_version=...)`): the collective and IPC weight
  transports (selfdistill/weights/). With multiprocessing off the worker runs in this
  process, so a backend registered here with vLLM's factory (gloo, on CPU) is found. The
  update goes through the same layerwise reload as `reload_weights`, so the tied lm_head is
  repacked after it too; on CPU the base engine's `torch.accelerator.synchronize()` raises,
  which the gloo backend skips.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.outputs import CompletionOutput

    from selfdistill.rollout.base import EngineConfig, EngineExecutor, SamplingConfig

FINISH_REASONS = ("stop", "length")


def configure_env() -> None:
    """Set the environment vLLM must see before it builds an engine (in-process engine core)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"


def make_llm(model_path: str, cfg: EngineConfig, max_lora_rank: int | None = None,
             weight_transfer_backend: str | None = None, executor: EngineExecutor | None = None,
             sleep_mode: bool = False) -> LLM:
    """Build an in-process `vllm.LLM` for a Hugging Face model folder (serving one LoRA adapter at a time if
    `max_lora_rank` is set; tensor parallel over Ray workers if `executor` says so; able to sleep if `sleep_mode`)."""
    configure_env()
    from vllm import LLM
    from vllm.platforms import current_platform

    kwargs, env = llm_args(model_path, cfg, max_lora_rank, weight_transfer_backend, executor,
                           sleep_mode and current_platform.is_sleep_mode_available(),
                           ray_executor=bool(current_platform.ray_device_key))
    for key, value in env.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return LLM(**kwargs)


def llm_args(model_path: str, cfg: EngineConfig, max_lora_rank: int | None = None,
             weight_transfer_backend: str | None = None, executor: EngineExecutor | None = None,
             enable_sleep_mode: bool = False, ray_executor: bool = True) -> tuple[dict, dict[str, str | None]]:
    """`vllm.LLM` keyword arguments, and the environment (None: unset) the engine process needs for them.

    Tensor parallel (`executor.tensor_parallel_size` > 1) on GPUs (`ray_executor`): vLLM's Ray executor,
    which finds the engine actor's placement group (`ray.util.get_current_placement_group`), starts one
    worker per bundle in `VLLM_RAY_BUNDLE_INDICES`, each asking for `VLLM_RAY_PER_WORKER_GPUS`; the
    engine actor itself holds no GPU, so `CUDA_VISIBLE_DEVICES` (which Ray sets empty for it) is unset.
    On CPU (no Ray device: vLLM's Ray executor refuses the platform) the workers are vLLM's
    multiprocess executor's, each bound to its share of this process's cores (`VLLM_CPU_OMP_THREADS_BIND`,
    "0|1": vLLM's own binding wants one NUMA node per worker).
    `enable_sleep_mode` (GPU only: the CPU platform refuses it, and its sleep and wake_up calls do
    nothing but keep the executor's sleep state) lets `sleep(level=1)` offload weights and drop the KV cache.
    """
    kwargs = {}
    if max_lora_rank is not None:
        kwargs.update(enable_lora=True, max_lora_rank=lora_rank_slot(max_lora_rank), max_loras=1)
    if cfg.kv_cache_gib is not None:
        kwargs["kv_cache_memory_bytes"] = int(cfg.kv_cache_gib * 2**30)
    if weight_transfer_backend is not None:
        kwargs["weight_transfer_config"] = {"backend": weight_transfer_backend}
    if enable_sleep_mode:
        kwargs["enable_sleep_mode"] = True
    env: dict[str, str | None] = {}
    tp = executor.tensor_parallel_size if executor else 1
    if tp > 1:
        if ray_executor:
            if len(executor.bundle_indices) != tp:
                raise ValueError(f"tensor parallel size {tp} needs one bundle per worker, got "
                                 f"{executor.bundle_indices}")
            env = {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, executor.bundle_indices)),
                   "VLLM_RAY_PER_WORKER_GPUS": f"{executor.worker_gpus:g}", "CUDA_VISIBLE_DEVICES": None}
        elif "VLLM_CPU_OMP_THREADS_BIND" not in os.environ:
            cores = sorted(os.sched_getaffinity(0))
            share = max(1, len(cores) // tp)
            env = {"VLLM_CPU_OMP_THREADS_BIND": "|".join(
                ",".join(map(str, cores[i * share:(i + 1) * share] or cores[-1:])) for i in range(tp))}
    kwargs.update(
        model=model_path,
        dtype=cfg.dtype,
        seed=cfg.seed,
        max_model_len=cfg.max_model_len,
        enforce_eager=cfg.enforce_eager,
        enable_prefix_caching=cfg.enable_prefix_caching,
        gpu_memory_utilization=cfg.gpu_memory_utilization,
        logprobs_mode=cfg.logprobs_mode,
        tensor_parallel_size=tp,
        distributed_executor_backend=("ray" if ray_executor else "mp") if tp > 1 else "uni",
    )
    return kwargs, env


def sleep(llm: LLM) -> None:
    """Offload the weights and drop the KV cache (level 1), freeing the GPU for a colocated learner."""
    llm.sleep(level=1)


def wake_up(llm: LLM, tag: str) -> None:
    """Bring back one kind of memory: "weights" (before a weight update), then "kv_cache" (before generating)."""
    llm.wake_up(tags=[tag])


def is_sleeping(llm: LLM) -> bool:
    """Whether any of the engine's memory is still asleep (vLLM's own state, kept on CPU too)."""
    return llm.llm_engine.is_sleeping()


def sampling_params(sampling: SamplingConfig, seed: int | None) -> SamplingParams:
    """vLLM sampling params for one prompt: `sampling.n` samples with their token log-probs.

    vLLM gives the n samples of one request seeds seed, seed+1, ..., seed+n-1.
    """
    from vllm import SamplingParams

    return SamplingParams(
        n=sampling.n,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k,
        max_tokens=sampling.max_new_tokens,
        seed=seed,
        stop=list(sampling.stop),
        include_stop_str_in_output=True,
        logprobs=0,
        flat_logprobs=True,
    )


def scoring_params() -> SamplingParams:
    """vLLM params that score the prompt (log-prob of each actual token) and generate one token."""
    from vllm import SamplingParams

    return SamplingParams(max_tokens=1, prompt_logprobs=0, flat_logprobs=True, detokenize=False)


def generate(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
             adapter: LoRARequest | None = None) -> list[RequestOutput]:
    """Run token-id prompts through the engine (with a LoRA adapter if given); outputs come back in prompt order."""
    from vllm.inputs import TokensPrompt

    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                        lora_request=adapter)


def generate_stream(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams],
                    adapter: LoRARequest | None = None) -> Iterator[tuple[int, RequestOutput]]:
    """Like `generate`, but yield (prompt index, output) as each request finishes (all its n samples)."""
    from vllm.inputs import TokensPrompt

    request_ids = llm.enqueue([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False,
                              lora_request=adapter)
    # enqueue returns internal ids "<external>-<8 random chars>"; outputs carry the external id.
    index_of = {request_id.rsplit("-", 1)[0]: i for i, request_id in enumerate(request_ids)}
    engine = llm.llm_engine
    while engine.has_unfinished_requests():
        for output in engine.step():
            if output.finished:
                yield index_of[output.request_id], output


def sampled_logprobs(completion: CompletionOutput) -> list[float]:
    """Log-prob of each sampled token of one completion (requested with `sampling_params`)."""
    flat = completion.logprobs
    return [flat.logprobs[start] for start in flat.start_indices]


def prompt_logprobs(output: RequestOutput) -> list[float]:
    """log p(x_t | x_<t) of each prompt token t >= 1 (requested with `scoring_params`)."""
    flat = output.prompt_logprobs
    # position 0 has no log-prob: its range is empty
    return [flat.logprobs[start] for start in flat.start_indices[1:]]


def finish_reason(completion: CompletionOutput) -> str:
    """'stop' or 'length'; anything else (abort, error, repetition) is an engine failure."""
    reason = completion.finish_reason
    if reason not in FINISH_REASONS:
        raise RuntimeError(f"vLLM ended a sample with finish_reason={reason!r}; expected one of {FINISH_REASONS}")
    return reason


def reload_weights(llm: LLM, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
    """Load Hugging Face named tensors into the engine in one in-place reload; return the names passed on.

    The iterator is consumed inside the engine, one tensor at a time. The prefix cache is
    reset afterwards, since its KV blocks came from the old weights.
    """
    names: set[str] = set()

    def recorded() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in named_tensors:
            names.add(name)
            yield name, tensor

    llm.collective_rpc("reload_weights", kwargs={"weights_iterator": recorded()})
    llm.apply_model(_repack_tied_lm_head)
    llm.reset_prefix_cache()
    return names


def _repack_tied_lm_head(model: torch.nn.Module) -> None:
    """Rebuild a tied lm_head's kernel from the reloaded embedding.

    On CPU the lm_head keeps a packed copy of its weight. A tied lm_head receives no
    tensor of its own during `reload_weights`, so vLLM 0.32 restores it without repacking
    and the logits keep using the old embedding (stale log-probs after every sync).
    """
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding

    embeddings = {id(m.weight) for m in model.modules() if type(m) is VocabParallelEmbedding}
    for module in model.modules():
        if isinstance(module, ParallelLMHead) and id(module.weight) in embeddings:
            module.quant_method.process_weights_after_loading(module)


def lora_rank_slot(rank: int) -> int:
    """The smallest `max_lora_rank` vLLM accepts that holds `rank`."""
    from typing import get_args

    from vllm.config.lora import MaxLoRARanks

    allowed = sorted(get_args(MaxLoRARanks))
    fitting = [r for r in allowed if r >= rank]
    if not fitting:
        raise ValueError(f"learner.lora.rank: vLLM serves LoRA ranks up to {allowed[-1]} (got {rank}); "
                         f"use a smaller rank or learner.lora.sync=merged")
    return fitting[0]


def lora_request(folder: str, adapter_id: int) -> LoRARequest:
    """A request for the PEFT adapter folder `folder`; each distinct adapter needs its own id (>= 1)."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=f"adapter-{adapter_id}", lora_int_id=adapter_id, lora_path=folder)


def remove_lora(llm: LLM, adapter_id: int) -> None:
    """Drop an adapter version from the engine's cache (a no-op if it was never loaded)."""
    llm.llm_engine.remove_lora(adapter_id)


def lora_unsupported_reason(model_path: str) -> str | None:
    """Why vLLM cannot serve a LoRA adapter on the model at `model_path`, or None when it can."""
    configure_env()
    from transformers import AutoConfig
    from vllm.model_executor.models import ModelRegistry
    from vllm.model_executor.models.interfaces import supports_lora

    architectures = AutoConfig.from_pretrained(model_path).architectures or []
    classes = [ModelRegistry._try_load_model_cls(arch) for arch in architectures]
    if not any(cls is not None and supports_lora(cls) for cls in classes):
        return f"vLLM 0.32 has no LoRA support for the architecture {architectures}"
    return None


def init_weight_transfer(llm: LLM, init_info: dict) -> None:
    """Join the learner's weight-transfer group (backend-specific `init_info`, e.g. the rendezvous)."""
    llm.init_weight_transfer_engine({"init_info": init_info})


def start_weight_update(llm: LLM) -> None:
    """Open a weight update (layerwise reload of checkpoint-format tensors)."""
    llm.start_weight_update()


def update_weights(llm: LLM, update_info: dict) -> None:
    """Receive one chunk of the update while the learner sends it."""
    llm.update_weights({"update_info": update_info})


def finish_weight_update(llm: LLM, version: int) -> None:
    """Commit the update as `version`; repack a tied lm_head and drop KV blocks of the old weights."""
    llm.finish_weight_update(weight_version=str(version))
    llm.apply_model(_repack_tied_lm_head)
    llm.reset_prefix_cache()
