"""Pre-flight checks: refuse in seconds, with one line, a run that would otherwise crash or hang later.

`trainer.main` runs them in two phases, before any model is built:

- `check_launch` (before the process group exists) reads only the config and this machine's
  software and GPUs, which every rank of a job sees alike, so every rank fails the same way at once
  and none is left waiting for another: the layout (world size vs tp*pp; attention heads, FFN width
  and vocabulary divisible by tp, layers by pp), what this platform cannot run (bf16/fp16 weights
  or a Triton loss without CUDA, Transformer Engine where it does not import), NCCL for CUDA runs,
  and GPUs visible vs the processes started on this node (LOCAL_WORLD_SIZE).
- `check_ranks` (once the process group exists) covers what can differ between ranks and nodes:
  the data files present here, the run directory writable here and the same folder on every rank
  (each rank writes a probe file named by its rank, rank 0 looks for all of them), and this GPU's
  free memory against `estimate_memory`. One rank's failure is raised on every rank
  (`runtime.ranks`), so no rank hangs in the next collective.

`selfjudge env` runs the same checks and prints each one's verdict instead of raising.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

from megatron_selfjudge.config import Config, uses_generative_judge

GIB = 1024 ** 3
PROBE_PREFIX = ".preflight-rank"
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class PreflightError(RuntimeError):
    """A pre-flight check failed; the message is one line naming the key or resource to change."""


# --- what the checks read about the process and the machine ----------------------------------

def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise PreflightError(f"environment variable {name}={value!r} is not an integer") from None


@dataclass(frozen=True)
class Platform:
    """This process's place in the job and the machine's GPUs and libraries (`detect`; tests build it)."""

    world_size: int = 1
    rank: int = 0
    local_world_size: int = 1
    local_rank: int = 0
    cuda: bool = False
    gpu_count: int = 0
    nccl: bool = False
    transformer_engine: bool = False
    host: str = field(default_factory=socket.gethostname)

    @classmethod
    def detect(cls) -> "Platform":
        """Read torchrun's variables (one process when unset), CUDA, NCCL and Transformer Engine."""
        import torch
        import torch.distributed as dist

        from megatron_selfjudge.megatron.models import transformer_engine_available

        if dist.is_available() and dist.is_initialized():
            world, rank = dist.get_world_size(), dist.get_rank()
        else:
            world, rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0)
        cuda = torch.cuda.is_available()
        return cls(world_size=world, rank=rank, local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
                   local_rank=_env_int("LOCAL_RANK", 0), cuda=cuda,
                   gpu_count=torch.cuda.device_count() if cuda else 0,
                   nccl=dist.is_available() and dist.is_nccl_available(),
                   transformer_engine=transformer_engine_available())


@dataclass(frozen=True)
class Check:
    """One check's verdict: what was found (ok) or the one-line refusal."""

    name: str
    ok: bool
    message: str


def _run(checks: Sequence[tuple[str, Callable[[], str]]]) -> list[Check]:
    out = []
    for name, fn in checks:
        try:
            out.append(Check(name, True, fn()))
        except PreflightError as exc:
            out.append(Check(name, False, str(exc)))
    return out


def require(checks: Sequence[Check]) -> None:
    """Raise the first failed check's message as a PreflightError."""
    for check in checks:
        if not check.ok:
            raise PreflightError(check.message)


# --- phase 1: config and platform ----------------------------------------------------------

def check_layout(tp: int, pp: int, world_size: int) -> str:
    """World size must hold a whole number of tp*pp model replicas."""
    mp = tp * pp
    if mp > world_size:
        raise PreflightError(
            f"parallel.tp={tp} x parallel.pp={pp} needs {mp} processes but the run has {world_size} "
            f"(WORLD_SIZE={world_size}); start it with torchrun --nproc-per-node {mp} (or a multiple) "
            "or lower parallel.tp / parallel.pp")
    if world_size % mp:
        raise PreflightError(
            f"world size {world_size} is not a multiple of parallel.tp={tp} x parallel.pp={pp} = {mp}: "
            "the data-parallel size world / (tp*pp) must be whole")
    return f"world size {world_size} = tp {tp} x pp {pp} x dp {world_size // mp}"


def check_prompt_split(mini_batch_prompts: int, tp: int, pp: int, world_size: int) -> str:
    """Each data-parallel rank rolls out an equal part of every mini-batch (batching.prompt_shard)."""
    dp = max(world_size // (tp * pp), 1)
    if mini_batch_prompts % dp:
        raise PreflightError(
            f"trainer.mini_batch_prompts={mini_batch_prompts} does not split over the {dp} data-parallel "
            f"ranks: each rank rolls out an equal share of every mini-batch; use a multiple of {dp}")
    return f"{mini_batch_prompts // dp} prompts of each mini-batch per data-parallel rank"


def check_split(cfg: Config, shape: "ModelShape") -> str:
    """Megatron splits heads, FFN width and vocabulary evenly over tp ranks and layers over pp stages."""
    tp, pp = cfg.parallel.tp, cfg.parallel.pp
    for what, count in shape.tp_splits:
        if count % tp:
            raise PreflightError(f"{what} is not divisible by parallel.tp={tp}")
    if shape.num_layers % pp:
        raise PreflightError(f"{shape.layers_name} is not divisible by parallel.pp={pp}")
    if shape.vocab_size % tp:
        raise PreflightError(
            f"the vocabulary of {shape.vocab_size} tokens is not divisible by parallel.tp={tp}: the embedding and "
            "output layer are split evenly over tensor-parallel ranks (pad the vocabulary to a multiple of tp)")
    return (f"{shape.num_attention_heads} heads, FFN {shape.ffn_hidden_size} and vocabulary {shape.vocab_size} "
            f"over tp {tp}; {shape.num_layers} layers over pp {pp}")


def check_params_dtype(params_dtype: str, cuda: bool) -> str:
    """Half-precision weights need CUDA here: megatron-core's CPU path runs float32 only."""
    if params_dtype != "float32" and not cuda:
        raise PreflightError(
            f"model.params_dtype={params_dtype} needs CUDA: on CPU megatron-core's layers mix it with float32 "
            "and fail; set model.params_dtype=float32 for CPU runs")
    return params_dtype


def check_loss_impl(impl: str, cuda: bool) -> str:
    """A loss implementation with a Triton kernel runs only on CUDA logits in a training run."""
    from megatron_selfjudge.loss import LOSS_IMPLS

    kernel = LOSS_IMPLS[impl].module if impl in LOSS_IMPLS else None
    if kernel is not None and not cuda:
        raise PreflightError(
            f"loss.impl={impl} runs a Triton kernel, which needs CUDA (on CPU it runs only in the kernel tests, "
            "under the Triton interpreter); use loss.impl=auto or reference")
    return impl


def check_transformer_impl(requested: str, te_available: bool, cuda: bool) -> str:
    """Resolve model.transformer_impl (auto -> transformer_engine with TE and CUDA, else local)."""
    from megatron_selfjudge.megatron.models import resolve_transformer_impl

    try:
        resolved = resolve_transformer_impl(requested, te_available, cuda)
    except (ValueError, RuntimeError) as exc:
        raise PreflightError(str(exc)) from None
    return resolved if resolved == requested else f"{requested} -> {resolved}"


def check_nccl(cuda: bool, nccl: bool) -> str:
    """CUDA runs communicate over NCCL."""
    if not cuda:
        return "not needed (CPU run over gloo)"
    if not nccl:
        raise PreflightError("this CUDA run needs NCCL, but this torch build has none "
                             "(torch.distributed.is_nccl_available() is False); use a CUDA build of torch with NCCL")
    return "available"


def check_gpus(cuda: bool, gpu_count: int, local_world_size: int, local_rank: int) -> str:
    """Each process on a node drives its own GPU (LOCAL_RANK), so the node needs LOCAL_WORLD_SIZE of them."""
    if not cuda:
        return "none (CPU run)"
    needed = max(local_world_size, local_rank + 1)
    if gpu_count < needed:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        shown = f" (CUDA_VISIBLE_DEVICES={visible})" if visible is not None else ""
        raise PreflightError(
            f"{local_world_size} processes on this node (LOCAL_WORLD_SIZE, LOCAL_RANK={local_rank}) but {gpu_count} "
            f"GPU(s) visible{shown}; start torchrun with --nproc-per-node {gpu_count} or request more GPUs")
    return f"{gpu_count} visible for {local_world_size} process(es) on this node"


def launch_checks(cfg: Config, platform: Platform, shape: "ModelShape") -> list[Check]:
    """Phase 1 verdicts: config and model shape (`model_shape`) against the platform, alike on every rank."""
    p = platform
    return _run([
        ("layout", lambda: check_layout(cfg.parallel.tp, cfg.parallel.pp, p.world_size)),
        ("tp/pp split", lambda: check_split(cfg, shape)),
        ("prompt split", lambda: check_prompt_split(cfg.trainer.mini_batch_prompts, cfg.parallel.tp,
                                                    cfg.parallel.pp, p.world_size)),
        ("params dtype", lambda: check_params_dtype(cfg.model.params_dtype, p.cuda)),
        ("loss impl", lambda: check_loss_impl(cfg.loss.impl, p.cuda)),
        ("transformer impl", lambda: check_transformer_impl(cfg.model.transformer_impl, p.transformer_engine, p.cuda)),
        ("NCCL", lambda: check_nccl(p.cuda, p.nccl)),
        ("GPUs", lambda: check_gpus(p.cuda, p.gpu_count, p.local_world_size, p.local_rank)),
    ])


# --- model shape and memory estimate --------------------------------------------------------

@dataclass(frozen=True)
class ModelShape:
    """What the layout checks and the memory estimate read about the policy, without building it.

    `tp_splits` are the (what, count) pairs tensor parallelism splits evenly (named as the user
    would change them). With `layer_parameters` known, the parameters on the busiest pipeline stage
    are its layers plus what only the first stage (embedding, vision tower) or only the last stage
    (final norm, output layer) holds; otherwise they are split evenly over the stages.
    """

    num_layers: int
    layers_name: str  # how a message names the layer count, e.g. "model.num_layers=2"
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    ffn_hidden_size: int
    vocab_size: int
    parameters: Optional[int]  # the whole policy; None when its family cannot count before building
    image_positions: int = 0  # decoder positions one image adds beyond the prompt's tokens
    tp_splits: tuple = ()
    layer_parameters: int = 0
    first_stage_parameters: int = 0
    last_stage_parameters: int = 0
    description: str = ""

    def stage_parameters(self, pp: int) -> int:
        """Parameters of the pipeline stage holding the most of them (all TP shards together)."""
        assert self.parameters is not None
        if pp == 1 or not self.layer_parameters:
            return -(-self.parameters // pp)
        layers = -(-self.num_layers // pp) * self.layer_parameters
        return layers + max(self.first_stage_parameters, self.last_stage_parameters)


def _hf_shape(hf_path: str) -> ModelShape:
    """The shape of an HF folder's model from its config.json alone (megatron/models/qwen_sizes.py)."""
    from megatron_selfjudge.megatron.models import qwen_sizes

    where = str(Path(hf_path) / "config.json")
    s = qwen_sizes.folder_sizes(hf_path)
    counts = qwen_sizes.parameter_counts(s)
    splits = [(f"num_attention_heads={s.num_attention_heads} of {where}", s.num_attention_heads),
              (f"num_key_value_heads={s.num_key_value_heads} of {where}", s.num_key_value_heads),
              (f"intermediate_size={s.intermediate_size} of {where}", s.intermediate_size)]
    if s.vision:
        splits += [(f"vision_config.num_heads={s.vision.num_heads} of {where}", s.vision.num_heads),
                   (f"vision_config.intermediate_size={s.vision.intermediate_size} of {where}",
                    s.vision.intermediate_size)]
    vision = counts["vision_patch_embed"] + counts["vision_blocks"] + counts["vision_merger"]
    # A tied output layer still needs the embedding's rows on the last stage when pp > 1.
    head = counts["final_norm"] + (counts["lm_head"] or counts["embedding"])
    total = sum(counts.values())
    text = f"{s.model_type} from {where}: {total / 1e9:.2f} B parameters"
    if s.vision:
        text += f" ({vision / 1e9:.2f} B vision tower)"
    return ModelShape(
        num_layers=s.num_layers, layers_name=f"num_hidden_layers={s.num_layers} of {where}",
        hidden_size=s.hidden_size, num_attention_heads=s.num_attention_heads,
        num_key_value_heads=s.num_key_value_heads, head_dim=s.head_dim, ffn_hidden_size=s.intermediate_size,
        vocab_size=s.vocab_size, parameters=total,
        # The processor writes one <|image_pad|> per image embedding into the prompt, so image
        # tokens count in rollout.max_prompt_len and add no positions of their own.
        image_positions=0, tp_splits=tuple(splits), layer_parameters=qwen_sizes.decoder_layer_parameters(s),
        first_stage_parameters=counts["embedding"] + vision, last_stage_parameters=head, description=text)


def model_shape(cfg: Config) -> ModelShape:
    """The policy's shape: from `model.hf_path`'s config.json when set, else from `model.*` and its family.

    Nothing is built and, for an HF folder, nothing but config.json is read (no tokenizer,
    weights, transformers or megatron): `selfjudge train --dry-run` relies on it.
    """
    if cfg.model.hf_path:
        return _hf_shape(cfg.model.hf_path)
    from megatron_selfjudge.megatron.models.family import NotSupported, build_family

    m = cfg.model
    family = build_family(cfg)
    try:
        parameters: Optional[int] = family.parameter_count()
    except NotSupported:
        parameters = None
    splits = [(f"model.num_attention_heads={m.num_attention_heads}", m.num_attention_heads),
              (f"model.ffn_hidden_size={m.ffn_hidden_size}", m.ffn_hidden_size), *family.tensor_parallel_splits()]
    return ModelShape(num_layers=m.num_layers, layers_name=f"model.num_layers={m.num_layers}",
                      hidden_size=m.hidden_size, num_attention_heads=m.num_attention_heads,
                      num_key_value_heads=m.num_attention_heads, head_dim=m.hidden_size // m.num_attention_heads,
                      ffn_hidden_size=m.ffn_hidden_size, vocab_size=family.tokenizer.vocab_size,
                      parameters=parameters, image_positions=family.image_positions(), tp_splits=tuple(splits),
                      description=f"{m.preset} from model.*" + (
                          f": {parameters / 1e6:.2f} M parameters" if parameters is not None else ""))


# Parts resident on the GPU in each phase of a step; the peak is the largest phase.
_PERSISTENT = ("weights", "grads", "optimizer")
PHASES = {
    "rollout": _PERSISTENT,
    "reference/Judge": (*_PERSISTENT, "frozen copy", "logits"),
    "training": (*_PERSISTENT, "activations", "logits"),
}  # the engines' weights and KV caches join the phases they are resident in (estimate_memory)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes one GPU needs at least: named parts, and which of them are resident in each phase.

    Without phases every part counts at once (the total is their sum); with phases the total
    is the largest phase's sum.
    """

    parts: dict
    phases: dict = field(default_factory=dict)

    def phase_totals(self) -> dict:
        """Bytes resident in each phase."""
        return {name: sum(self.parts.get(p, 0) for p in names) for name, names in self.phases.items()}

    @property
    def peak_phase(self) -> Optional[str]:
        """The phase with the most bytes resident (None without phases)."""
        totals = self.phase_totals()
        return max(totals, key=totals.get) if totals else None

    @property
    def total(self) -> int:
        """The peak: the largest phase, or the sum of the parts without phases."""
        return max(self.phase_totals().values()) if self.phases else sum(self.parts.values())

    def describe(self) -> str:
        """One line: each part and the total."""
        items = ", ".join(f"{k} {format_bytes(v)}" for k, v in self.parts.items())
        peak = f" ({self.peak_phase} peak)" if self.phases else ""
        return f"{items}: at least {format_bytes(self.total)} per rank{peak}"

    def table(self, gpu_bytes: Optional[int] = None) -> list[str]:
        """Lines of a table: each part, each phase's total, the peak against `gpu_bytes`."""
        rows = [f"  {name:22s} {format_bytes(value):>11s}" for name, value in self.parts.items()]
        for name, value in self.phase_totals().items():
            rows.append(f"  {'phase ' + name:22s} {format_bytes(value):>11s}  ({' + '.join(self.phases[name])})")
        peak = f"  {'peak (' + str(self.peak_phase) + ')' if self.phases else 'total':22s} {format_bytes(self.total):>11s}"
        if gpu_bytes:
            peak += f"  of {format_bytes(gpu_bytes)} per GPU: {self.total / gpu_bytes:.0%}"
        return rows + [peak]


def format_bytes(n: float) -> str:
    """GiB with two decimals, or MiB below one GiB."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 1024 ** 2:.1f} MiB"


def activation_bytes_per_token(shape: ModelShape, tp: int, width: int) -> int:
    """Bytes one token's decoder activations keep for the backward pass in one layer (no recomputation).

    Kept per layer and token (elements): the inputs and outputs of the two norms, 4 h, whole on
    every tensor-parallel rank (sequence parallelism is off); split over tp: the q/k/v
    projection's output (q + 2 kv), q and k after the rotary embedding (q + kv), the attention
    output (q), the MLP's gate and up outputs (2 f) and the activation fed to its down
    projection (f); q = heads x head_dim, kv = kv heads x head_dim. Fused / flash attention
    keeps no seq x seq scores; dropout is off (no masks).
    """
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    split = 3 * q + 3 * kv + 3 * shape.ffn_hidden_size
    return (4 * shape.hidden_size + -(-split // tp)) * width


def _engine_kv_row(shape: ModelShape, layers: int, tp: int, width: int) -> int:
    """Bytes of K and V per token for `layers` layers with the kv heads split over `tp`."""
    return 2 * layers * -(-shape.num_key_value_heads // tp) * shape.head_dim * width


def _vllm_engine(cfg: Config, shape: ModelShape, rows: int, tokens: int, gpu_bytes: Optional[int],
                 on_gpu: bool) -> tuple[int, int]:
    """(weights, KV cache) bytes one rank's vLLM engine (rollout.vllm.*) holds.

    Weights: the whole model (vLLM has no pipeline stages here) over rollout.vllm.tp in its dtype.
    KV cache: rollout.vllm.kv_cache_gb when set; else on CPU vLLM's 2 GiB (vllm_compat's default);
    else on GPU what gpu_memory_utilization x the GPU leaves after the engine's weights (vLLM takes
    it whole), or, when the GPU's size is unknown, max_num_seqs (= rollout.max_batch_size) rows of
    min(max_model_len, the longest sequence) tokens.
    """
    v = cfg.rollout.vllm
    width = _BYTES[v.dtype or cfg.model.params_dtype]
    weights = -(-shape.parameters // v.tp) * width
    if v.kv_cache_gb > 0:
        kv = int(v.kv_cache_gb * GIB)
    elif not on_gpu:
        kv = 2 * GIB
    elif gpu_bytes:
        kv = max(0, int(v.gpu_memory_utilization * gpu_bytes) - weights)
    else:
        kv = rows * min(v.max_model_len, tokens) * _engine_kv_row(shape, shape.num_layers, v.tp, width)
    return weights, kv


def estimate_memory(cfg: Config, shape: ModelShape, world_size: int, offload_frozen: bool = True,
                    on_gpu: bool = True, gpu_bytes: Optional[int] = None) -> MemoryEstimate:
    """Memory one rank needs for the config: a pure function of the config, the model's shape and the GPU.

    - weights, params_dtype: the busiest pipeline stage's parameters over tp;
    - grads: megatron DDP's fp32 gradient buffer (grad_reduce_in_fp32), as large as the weights' count;
    - optimizer: Adam's two fp32 moments, plus fp32 master weights for bf16/fp16, split over the
      data-parallel ranks by the distributed optimizer;
    - frozen copy: the reference/Judge model in params_dtype, sharded like the weights; on the GPU
      only in the reference/Judge phase with `offload_frozen` (trainer.offload_frozen on GPU),
      else in every phase;
    - activations (no activation recomputation: the project does not turn it on): one micro-batch
      of trainer.micro_batch_tokens tokens x `activation_bytes_per_token` x the stage's layers x pp
      (1F1B keeps up to pp micro-batches in flight on the first stage). The vision tower's
      activations are not counted;
    - logits: one micro-batch's [tokens, vocab / tp] in fp32 with their gradient (8 B each);
    - rollout KV cache, rollout.backend=megatron: K and V of this rank's stage layers, kv heads / tp
      x head_dim each, in params_dtype, for one engine batch (rollout.max_batch_size rows, at most
      this data-parallel rank's prompts x rollout.n) of full-length sequences (prompt + response +
      image positions), in the rollout phase. rollout.backend=vllm: the engine's own weights and
      KV cache (`_vllm_engine`), resident until the update, which it sleeps through on GPU
      (rollout.vllm.sleep_level > 0);
    - Judge KV cache: the same for the generative Judge's batch (judge.samples per trajectory), in
      the reference/Judge phase; a Judge on its own vLLM engine (judge.backend or rollout.backend
      vllm, judge.share_engine off) holds its weights and KV cache in every phase (it never sleeps);
      a Judge sharing the policy's vLLM engine adds nothing.
    The total is the peak over the phases of a step (PHASES): rollout, reference/Judge, training;
    the reference/Judge phase counts the Judge's cache and a forward's logits together.
    """
    m, p, r, t, j = cfg.model, cfg.parallel, cfg.rollout, cfg.trainer, cfg.judge
    if shape.parameters is None:
        raise ValueError("the model's parameter count is unknown (see memory_estimate)")
    dp = max(1, world_size // (p.tp * p.pp))
    width = _BYTES[m.params_dtype]
    local = -(-shape.stage_parameters(p.pp) // p.tp)
    adam = 8 + (4 if m.params_dtype != "float32" else 0)
    shard = dp if (p.use_distributed_optimizer and dp > 1) else 1
    stage_layers = -(-shape.num_layers // p.pp)
    kv_row = _engine_kv_row(shape, stage_layers, p.tp, width)
    extra = shape.image_positions
    rank_trajectories = -(-t.prompts_per_step // dp) * r.n
    rollout_rows, rollout_len = min(r.max_batch_size, rank_trajectories), r.max_prompt_len + r.max_response_len + extra
    parts = {
        "weights": local * width,
        "grads": local * 4,
        "optimizer": -(-local * adam // shard),
        "frozen copy": local * width,
        "activations": t.micro_batch_tokens * activation_bytes_per_token(shape, p.tp, width) * stage_layers * p.pp,
        "logits": t.micro_batch_tokens * -(-shape.vocab_size // p.tp) * 8,
    }
    phases = {name: [x for x in names if x in parts] for name, names in PHASES.items()}
    if r.backend == "vllm":
        parts["rollout engine weights"], parts["rollout KV cache"] = _vllm_engine(
            cfg, shape, rollout_rows, rollout_len, gpu_bytes, on_gpu)
        awake = ("rollout", "reference/Judge") if on_gpu and r.vllm.sleep_level > 0 else tuple(phases)
        for name in awake:
            phases[name] += ["rollout engine weights", "rollout KV cache"]
    else:
        parts["rollout KV cache"] = rollout_rows * rollout_len * kv_row
        phases["rollout"].append("rollout KV cache")
    if uses_generative_judge(cfg) and not (j.share_engine and r.backend == "vllm"):
        judge_rows = min(r.max_batch_size, rank_trajectories * j.samples)
        judge_len = j.max_prompt_len + j.max_tokens + extra
        if (j.backend or r.backend) == "vllm" and not j.share_engine:
            parts["Judge engine weights"], parts["Judge KV cache"] = _vllm_engine(
                cfg, shape, judge_rows, judge_len, gpu_bytes, on_gpu)
            for names in phases.values():
                names += ["Judge engine weights", "Judge KV cache"]
        else:
            parts["Judge KV cache"] = judge_rows * judge_len * kv_row
            phases["reference/Judge"].append("Judge KV cache")
    if not offload_frozen:
        for names in phases.values():
            if "frozen copy" not in names:
                names.append("frozen copy")
    return MemoryEstimate(parts=parts, phases={name: tuple(names) for name, names in phases.items()})


def memory_estimate(cfg: Config, shape: ModelShape, world_size: int, cuda: bool,
                    gpu_bytes: Optional[int] = None) -> Optional[MemoryEstimate]:
    """`estimate_memory` for the config's model, or None when its family cannot count its parameters.

    The frozen copy leaves the GPU between uses only on CUDA with trainer.offload_frozen (the trainer's rule).
    """
    if shape.parameters is None:
        return None
    return estimate_memory(cfg, shape, world_size, offload_frozen=cfg.trainer.offload_frozen and cuda,
                           on_gpu=cuda, gpu_bytes=gpu_bytes)


def check_memory(estimate: Optional[MemoryEstimate], free_bytes: Optional[int], where: str) -> str:
    """The estimate must fit in the free memory of this rank's device."""
    if estimate is None:
        return f"not estimated (model.preset cannot count its parameters before it is built); {where}"
    if free_bytes is None:
        return f"{estimate.describe()} (free memory unknown)"
    if free_bytes < estimate.total:
        raise PreflightError(
            f"{where} has {format_bytes(free_bytes)} free but the config needs {estimate.describe()}; lower "
            "rollout.max_batch_size or trainer.micro_batch_tokens, or raise parallel.tp / parallel.pp")
    return f"{estimate.describe()}; {format_bytes(free_bytes)} free on {where}"


def free_memory(platform: Platform) -> tuple[Optional[int], str]:
    """Free bytes of this rank's GPU, or of the host shared by this node's processes on CPU; and its name."""
    if platform.cuda:
        import torch

        free, _ = torch.cuda.mem_get_info(platform.local_rank)
        return free, f"GPU {platform.local_rank} ({torch.cuda.get_device_name(platform.local_rank)})"
    import psutil

    # On CPU the node's processes share the host memory: give each its share.
    return psutil.virtual_memory().available // max(1, platform.local_world_size), "host memory (this process's share)"


# --- phase 2: per rank, once the process group exists -----------------------------------------

def check_data(cfg: Config) -> str:
    """data.train / data.eval, unless synthetic, must be readable files on this node."""
    from megatron_selfjudge.data.task import train_files

    found = []
    train = [] if cfg.data.train == "synthetic" else train_files(cfg.data.train)
    named = [(f"data.train[{i}]" if len(train) > 1 else "data.train", v) for i, v in enumerate(train)]
    for key, value in (*named, ("data.eval", cfg.data.eval)):
        if value is None:
            continue
        path = Path(value)
        state = ("does not exist" if not path.exists() else "is not a file" if not path.is_file()
                 else "is not readable" if not os.access(path, os.R_OK) else None)
        if state:
            raise PreflightError(f"{key}={value!r} {state} on this node")
        found.append(f"{key} {value}")
    return ", ".join(found) or "synthetic"


def probe_path(run_dir: str | Path, rank: int) -> Path:
    """This rank's probe file in the run directory."""
    return Path(run_dir) / f"{PROBE_PREFIX}{rank:05d}"


def write_probe(run_dir: str | Path, rank: int, token: str) -> str:
    """Create the run directory and this rank's probe file holding `token` (the writability check)."""
    from megatron_selfjudge.runtime.lock import describe_os_error

    path = probe_path(run_dir, rank)
    try:
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        path.write_text(token)
    except OSError as exc:
        mapped = describe_os_error(exc, run_dir)
        raise PreflightError(str(mapped) if mapped else f"trainer.run_dir={str(run_dir)!r} is not writable: "
                             f"{exc.strerror or exc}") from None
    return f"{run_dir} writable"


def missing_probes(run_dir: str | Path, tokens: Sequence[Optional[str]]) -> list[int]:
    """Ranks whose probe file this process does not see with the token that rank wrote."""
    missing = []
    for rank, token in enumerate(tokens):
        try:
            ok = token is not None and probe_path(run_dir, rank).read_text() == token
        except (OSError, UnicodeDecodeError):
            ok = False
        if not ok:
            missing.append(rank)
    return missing


def check_shared(run_dir: str | Path, tokens: Sequence[Optional[str]], hosts: Sequence[str]) -> str:
    """Rank 0 must see every rank's probe file: the run directory is one folder for all of them."""
    missing = missing_probes(run_dir, tokens)
    if missing:
        where = sorted({hosts[r] for r in missing})
        raise PreflightError(
            f"trainer.run_dir={str(run_dir)!r} is not one folder for every rank: rank 0 ({hosts[0]}) does not see "
            f"the probe files of rank(s) {_ranges(missing)} on {', '.join(where)}; put the run directory on a "
            "filesystem every node shares")
    return f"shared by all {len(tokens)} ranks"


def _ranges(ranks: Sequence[int]) -> str:
    parts, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            parts.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ",".join(parts)


@dataclass
class RankProbe:
    """This rank's phase-2 verdicts and the probe file it wrote (removed by `remove`)."""

    checks: list
    run_dir: Path
    rank: int
    token: Optional[str]

    def remove(self) -> None:
        """Delete this rank's probe file."""
        if self.token is not None:
            with contextlib.suppress(OSError):  # the run directory may have gone read-only meanwhile
                probe_path(self.run_dir, self.rank).unlink(missing_ok=True)


def rank_checks(cfg: Config, platform: Platform, estimate: Optional[MemoryEstimate]) -> RankProbe:
    """Phase 2 verdicts of this rank alone (data, run directory, memory); writes this rank's probe file."""
    token = f"{platform.host}:{os.getpid()}:{secrets.token_hex(8)}"

    def memory() -> str:
        free, where = free_memory(platform)
        return check_memory(estimate, free, where)

    checks = _run([("data files", lambda: check_data(cfg)),
                   ("run directory", lambda: write_probe(cfg.trainer.run_dir, platform.rank, token)),
                   ("memory", memory)])
    written = next(c.ok for c in checks if c.name == "run directory")
    return RankProbe(checks, Path(cfg.trainer.run_dir), platform.rank, token if written else None)


def shared_check(probe: RankProbe, platform: Platform) -> Check:
    """The shared-run-directory verdict on every rank (a collective; trivially true for one rank)."""
    import torch.distributed as dist

    if platform.world_size == 1:
        return Check("shared run directory", True, "one rank")
    gathered: list = [None] * platform.world_size
    dist.all_gather_object(gathered, (probe.token, platform.host))
    verdict = None
    if platform.rank == 0:
        verdict = _run([("shared run directory", lambda: check_shared(
            probe.run_dir, [g[0] for g in gathered], [g[1] for g in gathered]))])[0]
    box = [verdict]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --- what trainer.main calls --------------------------------------------------------------------

@dataclass
class Preflight:
    """Phase-1 results carried into phase 2."""

    platform: Platform
    checks: list
    estimate: Optional[MemoryEstimate]

    def summary(self) -> list[str]:
        """Lines for the run's log: the verdicts, then the memory estimate."""
        verdicts = "; ".join(f"{c.name}: {c.message}" for c in self.checks if c.name != "memory")
        memory = [f"pre-flight memory: {c.message}" for c in self.checks if c.name == "memory"]
        return [f"pre-flight ok: {verdicts}", *memory]


def check_launch(cfg: Config, platform: Optional[Platform] = None) -> Preflight:
    """Phase 1 (before the process group): raise the first failure as a PreflightError on every rank."""
    platform = platform or Platform.detect()
    shape = model_shape(cfg)
    checks = launch_checks(cfg, platform, shape)
    require(checks)
    return Preflight(platform, checks, memory_estimate(cfg, shape, platform.world_size, platform.cuda))


def check_ranks(cfg: Config, pre: Preflight) -> list[Check]:
    """Phase 2 (a collective, process group up): one rank's failure stops every rank, in seconds."""
    from megatron_selfjudge.runtime.ranks import raise_if_any_rank_failed

    platform = pre.platform
    probe = rank_checks(cfg, platform, pre.estimate)
    try:
        failed = next((c for c in probe.checks if not c.ok), None)
        prefix = f"rank {platform.rank} ({platform.host}): " if platform.world_size > 1 else ""
        raise_if_any_rank_failed(PreflightError(prefix + failed.message) if failed else None, "pre-flight checks")
        shared = shared_check(probe, platform)
        require([shared])
    finally:
        probe.remove()
    pre.checks.extend(probe.checks + [shared])
    return pre.checks
