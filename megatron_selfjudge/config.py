"""Run configuration: one dataclass per section, the single source of every default.

A run is configured by (in order of precedence, lowest first) these dataclass defaults,
an optional YAML file, and ``key=value`` overrides on the command line whose keys are
dotted paths of the dataclasses (``loss.beta_kl=0.02``). OmegaConf structured configs do
the merging, the unknown-key and the type checks; :func:`validate` adds range checks.

The method's defaults are the paper's (docs/method.md): 512 prompts x 8 rollouts per step, its
rewards, calibration, advantages, loss and optimiser; the model's size defaults to the tiny
preset. The embedded CPU default (``configs/tiny.yaml``) lists only what differs from these
dataclasses, and docs/method.md's defaults table is generated from them (``docs_table.py``).

Validation rules beyond the per-key ranges (every failure is a one-line ConfigError naming the
key or the file; ``selfjudge config check`` prints it, or the resolved YAML):

- every float must be finite (NaN/inf refused everywhere); every integer is a count or a size
  bounded by MAX_COUNT, except the seeds, which lie in [0, MAX_SEED];
- rollout.n <= MAX_GROUP_SIZE, judge.samples <= MAX_JUDGE_SAMPLES, prompts x rollouts per step
  <= MAX_TRAJECTORIES_PER_STEP, model.image_size <= MAX_IMAGE_SIZE, and the policy's and the
  Judge's context (prompt + response + image tokens) <= MAX_CONTEXT_TOKENS;
- with data.train=synthetic: data.synthetic_unlabeled >= trainer.prompts_per_step and
  model.image_size >= 24 (the drawings' size); trainer.run_dir, data.train and data.eval are
  non-blank; no string holds a NUL character; trainer.allow_config_change lists real keys;
- files: a regular, UTF-8 file of at most MAX_CONFIG_BYTES holding one YAML mapping; YAML
  tags that construct objects, alias bombs and interpolation errors are refused.

Resume: RESUME_SAFE_KEYS may differ between a run and its resume; config_drift lists the other
differences and load_saved_config reads a run directory's config.yaml.
"""
from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, List, Optional, Sequence, Tuple

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

# The choices of reward.mode, reward.equivalence, judge.kind, judge.unparsed, advantage.estimator,
# loss.agg, loss.impl, rollout.backend, judge.backend and data.instruction are the names of the registries that
# implement them; validate() reads them there (imported when validating: they import torch).
RESUME_MODES = ("never", "auto")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")


def torch_dtype(name: str) -> Any:
    """The torch dtype named by one of PARAMS_DTYPES (ValueError naming the choices otherwise)."""
    if name not in PARAMS_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(PARAMS_DTYPES)}, got {name!r}")
    import torch  # here, not at the top: config validation stays free of torch

    return getattr(torch, name)

# Bounds on counts and sizes. Values past them are typos or hostile input; refusing them here
# turns a late crash or an out-of-memory into a one-line error naming the key.
MAX_COUNT = 2**31 - 1  # any count or size: int32 indexing in torch/megatron, and far past any real run
# Seeds: the trainer seeds NumPy's legacy generator with seed % 2**32 (larger seeds would alias
# smaller ones) and derives per-step torch seeds as seed * 1_000_003 + step, which must stay
# inside torch's 64-bit seed range.
MAX_SEED = 2**32 - 1
SEED_KEYS = ("trainer.seed", "data.synthetic_seed")
MAX_DATA_WORKERS = 64  # data.workers: decode processes per rank
MAX_GROUP_SIZE = 1024  # rollout.n: G rollouts of one prompt are held, rewarded and normalised together (paper: 8)
MAX_JUDGE_SAMPLES = 64  # judge.samples: K full Judge generations per trajectory (paper: 1)
MAX_TRAJECTORIES_PER_STEP = 2**20  # prompts_per_step * n: every trajectory's tokens stay in host memory (paper: 4096)
# Context of the policy and of the Judge (prompt + response + image tokens): Qwen2.5-VL's longest
# supported context is 128K tokens; the paper uses 1024 + 2048.
MAX_CONTEXT_TOKENS = 131072
MAX_IMAGE_SIZE = 4096  # model.image_size in pixels per side: 16.7 M pixels, above Qwen2.5-VL's max_pixels
MIN_SYNTHETIC_IMAGE_SIZE = 24  # data/synthetic.py refuses to draw smaller images
MAX_CONFIG_BYTES = 1 << 20  # a config file is a few KB; this bounds what a wrong path can make us read


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range (one line)."""

    def __init__(self, message: str):
        # One line on the terminal even when a value or a library message holds line breaks.
        super().__init__(" ".join(part.strip() for part in str(message).splitlines() if part.strip()))


@dataclass
class ModelConfig:
    """Policy architecture; the Judge and the reference model are frozen copies of it."""

    preset: str = "tiny-llava"  # tiny-llava | tiny-gpt (text only) | qwen2.5-vl | qwen2.5 (HF folder in hf_path)
    hf_path: str = ""  # local HF model folder of the qwen2.5-vl / qwen2.5 presets (the sizes below are the tiny presets')
    transformer_impl: str = "auto"  # auto: transformer_engine when TE imports and CUDA is present, else local
    params_dtype: str = "bfloat16"  # weights and activations: float32 | bfloat16 | float16
    num_layers: int = 2  # decoder layers
    hidden_size: int = 64  # decoder width
    num_attention_heads: int = 4  # decoder attention heads (divide hidden_size)
    ffn_hidden_size: int = 256  # decoder MLP width
    vision_num_layers: int = 1  # ViT layers (tiny-llava)
    vision_hidden_size: int = 64  # ViT width (tiny-llava)
    image_size: int = 32  # pixels per side; images are resized to it
    patch_size: int = 8  # ViT patch side: (image_size / patch_size)^2 image tokens


@dataclass
class ParallelConfig:
    """Megatron layout; data parallel size is world_size / (tp * pp)."""

    tp: int = 1  # tensor-parallel size
    pp: int = 1  # pipeline-parallel size
    use_distributed_optimizer: bool = True  # shard Adam state over data-parallel ranks (megatron-core)


@dataclass
class VllmRolloutConfig:
    """The vLLM rollout engine (rollout.backend=vllm), colocated in each training process."""

    tp: int = 1  # vLLM tensor-parallel size (may differ from parallel.tp)
    dtype: str = ""  # engine dtype: float32 | bfloat16 | float16; "" = model.params_dtype
    max_model_len: int = 4096  # longest sequence the engine holds (prompt + image tokens + response)
    gpu_memory_utilization: float = 0.5  # GPU: fraction of memory vLLM may take (weights + KV cache)
    kv_cache_gb: float = 0.0  # KV-cache GiB; 0: GPU from gpu_memory_utilization, CPU 2 GiB
    sync_bucket_mb: int = 512  # weight push: MiB of HF tensors moved to the engine at once
    sleep_level: int = 1  # GPU sleep mode while the trainer updates (1: free KV, offload weights; 0: off)
    enable_prefix_caching: bool = True  # reuse a prompt's KV blocks across its G samples
    max_images_per_prompt: int = 1  # vLLM's limit_mm_per_prompt (it sizes its encoder cache for this many)


@dataclass
class RolloutConfig:
    """Sampling of G trajectories per prompt."""

    backend: str = "megatron"  # rollout engine, a name of rollout.base.available_engines()
    n: int = 8  # G: rollouts per prompt, one group
    temperature: float = 1.0  # sampling temperature; the policy's log-probs use it too
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    max_prompt_len: int = 1024  # prompt tokens (longer prompts are refused, not cut)
    max_response_len: int = 2048  # new tokens per rollout
    max_batch_size: int = 64  # sequences decoded together by the in-process megatron engine
    # TTRL (reward.mode=ttrl): samples per prompt that vote on the pseudo-label; the first rollout.n are trained on.
    vote_n: int = 64
    vllm: VllmRolloutConfig = field(default_factory=VllmRolloutConfig)  # rollout.backend=vllm settings


@dataclass
class CalibrationConfig:
    """Bounded smooth map g(s) from a Judge score to a reward multiplier."""

    tau_h: float = 0.95  # score where the bonus is half on
    tau_l: float = 0.40  # score where the malus is half on
    kappa_h: float = 0.02  # width of the bonus step
    kappa_l: float = 0.05  # width of the malus step
    alpha_h: float = 0.2  # height of the bonus
    alpha_l: float = 0.2  # depth of the malus
    g_min: float = 0.8  # lower clamp of g
    g_max: float = 1.2  # upper clamp of g


@dataclass
class RewardConfig:
    """How trajectories are rewarded without labels."""

    # majority | consistency | judge | judge_raw | ground_truth | random | agreement | self_certainty | neg_entropy | ttrl
    mode: str = "judge"
    equivalence: str = "symbolic"  # answer classes: exact | normalized | symbolic
    consistency_gate: float = 0.85  # binarise a group whose top answer share exceeds it; 1.0 = pure frequency
    format_penalty: float = 0.5  # lambda: f_i = -lambda when the format is broken
    symbolic_timeout: float = 5.0  # seconds per symbolic comparison (math-verify in a worker)
    # gamma of reward.mode=agreement (EvoLMM): r = (answer frequency) ** gamma; EvoLMM takes gamma in (0, 1]
    agreement_gamma: float = 0.5
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class JudgeConfig:
    """The frozen Judge (a copy of the initial actor)."""

    kind: str = "generative"  # generative (rubric) | likelihood (mean token log-prob)
    samples: int = 1  # K judge samples per trajectory, averaged
    temperature: float = 1.0  # Judge sampling temperature
    top_p: float = 0.9  # Judge nucleus sampling
    max_tokens: int = 1024  # new tokens per Judge verdict
    max_prompt_len: int = 4096  # rubric + question + candidate response, in tokens (generative)
    # full: the paper's written rubric | short: a compact cue for the tiny policy, which learns to
    # grade in its warm start (data.synthetic_sft_judge)
    rubric: str = "full"
    unparsed: str = "zero"  # zero: reference code (s = 0); neutral: g = 1
    backend: str = ""  # rollout engine of the generative Judge; "" = the policy's rollout.backend
    # true: the generative Judge samples from the policy's own engine (its current weights, not the
    # frozen initial ones; saves a second engine's memory); false: its own engine, loaded once, never synced.
    share_engine: bool = False


@dataclass
class AdvantageConfig:
    """Group-relative advantage estimator."""

    estimator: str = "energy"  # grpo | grpo_no_std | energy
    temperature: float = 1.0  # T of the energy estimator
    center: bool = True  # energy: subtract the group mean (released code) vs + log G
    eps: float = 1e-6  # grpo: added to the group std


@dataclass
class LossConfig:
    """Token-level clipped policy loss with k3 KL to the reference."""

    eps_low: float = 0.2  # ratio clip below: 1 - eps_low
    eps_high: float = 0.2  # ratio clip above: 1 + eps_high
    dual_clip: float = 3.0  # c: for A < 0 the loss is at most -c * A
    beta_kl: float = 0.01  # weight of the k3 KL to the reference model
    entropy_coef: float = 0.0  # entropy bonus weight (0: off)
    agg: str = "token-mean"  # token-mean | seq-mean-token-mean | seq-mean-token-sum
    # How the per-token loss and the old/ref log-probs are computed: a name of loss.LOSS_IMPLS
    # (reference | logits_kernel | fused_linear) or auto (the logits kernel on CUDA, else reference).
    impl: str = "auto"
    # Rollout/train mismatch (a rollout engine other than the policy, e.g. vLLM): truncated importance
    # weight min(exp(logp_train_old - logp_rollout), cap) per token (token), or of the sequence's
    # product (sequence), multiplying each token's policy-gradient term; none: off.
    rollout_correction: str = "none"
    rollout_correction_cap: float = 2.0  # the truncation C of the importance weight


@dataclass
class OptimConfig:
    """AdamW from megatron.core.optimizer."""

    lr: float = 1e-6  # constant learning rate of stage 2
    sft_lr: float = 1e-5  # stage-1 supervised warm start (only when trainer.sft_steps > 0)
    # Warm-start schedule over trainer.sft_steps (megatron-core's OptimizerParamScheduler styles).
    sft_schedule: str = "constant"  # constant | linear | cosine (decay from sft_lr to sft_min_lr)
    sft_warmup_steps: int = 0  # warm-start steps of linear warmup from 0 to sft_lr
    sft_min_lr: float = 0.0  # where the linear / cosine decay ends
    weight_decay: float = 0.01  # AdamW decoupled weight decay
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)
    adam_beta1: float = 0.9  # Adam beta1
    adam_beta2: float = 0.999  # Adam beta2
    adam_eps: float = 1e-8  # Adam epsilon


@dataclass
class DataConfig:
    """Training prompts: 'synthetic' (embedded task) or a local parquet/JSONL path."""

    # 'synthetic', a parquet/JSONL file, or a list of files (streamed; mixed by data.weights)
    train: Any = "synthetic"
    # One weight per data.train file: each step takes that share of its prompts from the file
    # (empty: the files are one pool, each row equally likely).
    weights: List[float] = field(default_factory=list)
    limit: int = 0  # keep the first N usable rows of each training file (0: all)
    shuffle: bool = True  # seeded order per epoch (trainer.seed); false: file order
    workers: int = 2  # processes decoding images in the load-time check of a file (0: this process)
    eval: Optional[str] = None  # held-out file (null: the synthetic test split, or none)
    on_error: str = "raise"  # raise | skip (skipped rows are counted)
    # Image paths in rows may only point inside the data file's folder or these folders.
    image_roots: List[str] = field(default_factory=list)
    # 16384 * 28 * 28: Qwen2.5-VL's processor max_pixels. Larger images are refused from their
    # header, before decoding, so a tiny file cannot expand into gigabytes.
    max_image_pixels: int = 12845056
    max_image_bytes: int = 64 * 1024 * 1024  # encoded size of one image
    max_images_per_row: int = 16  # images one row may hold
    instruction: str = "full"  # format instruction appended to questions: full | short | mmupt | none
    synthetic_seed: int = 0  # seed of the synthetic task
    # question families: count | add | compare | bar
    synthetic_families: List[str] = field(default_factory=lambda: ["count", "add", "compare", "bar"])
    synthetic_sft: int = 512  # labelled warm-start prompts
    # Of those, how many also teach question writing (for `selfjudge synth`): each adds three
    # warm-start pairs, "image + question + ask cue -> another question about the image",
    # "image + ask cue -> a question" and "the other question -> its solution" (0: off).
    synthetic_sft_ask: int = 0
    # Of those, how many also teach judging (the generative Judge in miniature): each adds two pairs,
    # "image + question + a right / a flawed solution, in judge.rubric's prompt -> the Judge's own
    # reading of the image, then the rubric's weighted score" (0: off).
    synthetic_sft_judge: int = 0
    synthetic_unlabeled: int = 2048  # label-free training prompts
    synthetic_test: int = 256  # held-out prompts


@dataclass
class TrainerConfig:
    """Outer loop: steps, batches, checkpoints."""

    max_steps: int = -1  # -1: run `epochs` epochs
    # Keep the frozen reference/Judge copy in host memory except while it is used (GPU runs only).
    offload_frozen: bool = True
    epochs: int = 15  # passes over the training prompts (when max_steps = -1)
    prompts_per_step: int = 512  # prompts per rollout batch (x rollout.n trajectories)
    mini_batch_prompts: int = 128  # prompts per optimizer update: prompts_per_step / mini_batch_prompts updates a step
    micro_batch_tokens: int = 16384  # token budget of one forward/backward micro-batch
    seed: int = 1234  # run seed (rollouts, Judge, random rewards, data order)
    run_dir: str = "runs/default"  # run directory: config, metrics, checkpoints, results
    save_every: int = 50  # checkpoint every this many steps (0: only at the end)
    keep_checkpoints: int = 3  # step checkpoints kept
    resume: str = "auto"  # auto: continue from the newest checkpoint | never
    # Keys that may differ from the run directory's saved config.yaml on resume (see runtime/run_state.py).
    allow_config_change: List[str] = field(default_factory=list)
    sft_steps: int = 0  # steps of the supervised warm start (stage 1) before label-free training
    sft_batch_size: int = 32  # prompts per warm-start step
    # Benchmarks on the live policy every eval_every UPT steps and at the last step (0: off); the
    # accuracies go into metrics.jsonl as eval/<benchmark>/accuracy, the files under eval/step_N/.
    eval_every: int = 0
    eval_benchmarks: List[str] = field(default_factory=list)  # names from eval.benchmarks.BENCHMARK_NAMES
    eval_data: str = ""  # folder holding the benchmarks' files (as `selfjudge eval --data`)
    eval_limit: int = 0  # first N problems of each benchmark (0: all)
    # Start stage 2 from this run directory's newest checkpoint (or this checkpoint folder) instead of
    # the SFT stage: one warm start shared by several runs ("" = off; trainer.sft_steps is then unused).
    init_from: str = ""


@dataclass
class Config:
    """The whole run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    judge: JudgeConfig = field(default_factory=JudgeConfig)
    advantage: AdvantageConfig = field(default_factory=AdvantageConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)


# --- range checks -----------------------------------------------------------------------

def _choice(path: str, value: Any, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{path}={value!r} is not one of {', '.join(allowed)}")


def _check(path: str, ok: bool, rule: str, value: Any) -> None:
    if not ok:
        raise ConfigError(f"{path}={value!r} is out of range: must be {rule}")


def _check_context(names: Sequence[str], lengths: Sequence[int]) -> None:
    """A model context (prompt + response + image tokens) must fit MAX_CONTEXT_TOKENS."""
    if sum(lengths) > MAX_CONTEXT_TOKENS:
        raise ConfigError(f"{' + '.join(names)} = {' + '.join(map(str, lengths))} = {sum(lengths)} tokens "
                          f"exceeds the context bound {MAX_CONTEXT_TOKENS}")


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def leaf_fields(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any, dataclasses.Field]]:
    """(dotted key, the dataclass instance holding it, its field) of every leaf, in declaration order."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", obj, f


def leaf_items(obj: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value) of every leaf field of a config dataclass, in declaration order."""
    for key, owner, f in leaf_fields(obj, prefix):
        yield key, getattr(owner, f.name)


def _check_leaves(cfg: Config) -> None:
    """Rules for every leaf by type: finite floats, bounded integers, strings free of NUL."""
    for key, value in leaf_items(cfg):
        if isinstance(value, bool):
            continue
        if isinstance(value, float):
            _check(key, _finite(value), "a finite number", value)
        elif isinstance(value, int):
            if key in SEED_KEYS:
                _check(key, 0 <= value <= MAX_SEED, f"in [0, {MAX_SEED}]", value)
            else:
                _check(key, abs(value) <= MAX_COUNT, f"at most {MAX_COUNT} in absolute value", value)
        else:  # str, Optional[str] or a list of str; a NUL byte breaks every path and name
            for item in value if isinstance(value, list) else [value]:
                _check(key, not isinstance(item, str) or "\0" not in item, "free of NUL characters", value)


def _check_train_files(d: DataConfig) -> None:
    """data.train: 'synthetic', a path or a list of distinct paths; data.weights: one positive weight each."""
    is_list = isinstance(d.train, (list, tuple, ListConfig))
    files = list(d.train) if is_list else [d.train]
    rule = "'synthetic', a path, or a non-empty list of paths"
    _check("data.train", bool(files) and all(isinstance(f, str) and f.strip() for f in files), rule, d.train)
    if is_list:
        _check("data.train", "synthetic" not in files, "a list of files ('synthetic' stands alone)", d.train)
        _check("data.train", len(set(files)) == len(files), "a list of distinct files", d.train)
    if d.weights:
        _check("data.weights", is_list and len(d.weights) == len(files),
               f"one weight per data.train file ({len(files) if is_list else 'data.train is not a list'})",
               list(d.weights))
        _check("data.weights", all(_finite(w) and w > 0 for w in d.weights), "finite positive numbers", list(d.weights))


def validate(cfg: Config) -> Config:
    """Check every value's range and the cross-field rules; raise ConfigError naming the key."""
    m, p, r, rw, j, a, lo, o, d, t = (cfg.model, cfg.parallel, cfg.rollout, cfg.reward, cfg.judge,
                                       cfg.advantage, cfg.loss, cfg.optim, cfg.data, cfg.trainer)
    _check_leaves(cfg)
    from megatron_selfjudge.megatron.models.family import family_names

    _choice("model.preset", m.preset, family_names())  # the model-family registry is the list
    from megatron_selfjudge.megatron.models import TRANSFORMER_IMPLS

    _choice("model.transformer_impl", m.transformer_impl, TRANSFORMER_IMPLS)
    _choice("model.params_dtype", m.params_dtype, PARAMS_DTYPES)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "vision_num_layers", "vision_hidden_size", "image_size", "patch_size"):
        _check(f"model.{name}", getattr(m, name) >= 1, ">= 1", getattr(m, name))
    _check("model.hidden_size", m.hidden_size % m.num_attention_heads == 0,
           "divisible by model.num_attention_heads", m.hidden_size)
    _check("model.image_size", m.image_size % m.patch_size == 0,
           "divisible by model.patch_size", m.image_size)
    _check("model.image_size", m.image_size <= MAX_IMAGE_SIZE, f"<= {MAX_IMAGE_SIZE}", m.image_size)
    image_tokens = (m.image_size // m.patch_size) ** 2  # as the model builder sizes the context
    _check("parallel.tp", p.tp >= 1, ">= 1", p.tp)
    _check("parallel.pp", p.pp >= 1, ">= 1", p.pp)
    from megatron_selfjudge.rollout.base import available_engines

    _choice("rollout.backend", r.backend, available_engines())
    _choice("judge.backend", cfg.judge.backend, ["", *available_engines()])
    _check("rollout.n", 2 <= r.n <= MAX_GROUP_SIZE,
           f"in [2, {MAX_GROUP_SIZE}] (a group needs at least two rollouts)", r.n)
    _check("rollout.temperature", _finite(r.temperature) and r.temperature > 0, "> 0", r.temperature)
    _check("rollout.top_p", 0 < r.top_p <= 1, "in (0, 1]", r.top_p)
    _check("rollout.max_prompt_len", r.max_prompt_len >= 1, ">= 1", r.max_prompt_len)
    _check("rollout.max_response_len", r.max_response_len >= 1, ">= 1", r.max_response_len)
    _check("rollout.max_batch_size", r.max_batch_size >= 1, ">= 1", r.max_batch_size)
    v = r.vllm
    _check("rollout.vllm.tp", v.tp >= 1, ">= 1", v.tp)
    _choice("rollout.vllm.dtype", v.dtype, ["", *PARAMS_DTYPES])
    _check("rollout.vllm.max_model_len", v.max_model_len >= 1, ">= 1", v.max_model_len)
    _check("rollout.vllm.gpu_memory_utilization", 0 < v.gpu_memory_utilization <= 1, "in (0, 1]",
           v.gpu_memory_utilization)
    _check("rollout.vllm.kv_cache_gb", v.kv_cache_gb >= 0, ">= 0", v.kv_cache_gb)
    _check("rollout.vllm.sync_bucket_mb", v.sync_bucket_mb >= 1, ">= 1", v.sync_bucket_mb)
    _check("rollout.vllm.max_images_per_prompt", v.max_images_per_prompt >= 1, ">= 1", v.max_images_per_prompt)
    _check("rollout.vllm.sleep_level", v.sleep_level in (0, 1, 2), "0, 1 or 2", v.sleep_level)
    image_names = "image tokens (model.image_size / model.patch_size)^2"
    _check_context(("rollout.max_prompt_len", "rollout.max_response_len", image_names),
                   (r.max_prompt_len, r.max_response_len, image_tokens))
    from megatron_selfjudge.rewards.answers import EQUIVALENCE_MODES
    from megatron_selfjudge.rewards.combine import REWARD_MODES

    _choice("reward.mode", rw.mode, list(REWARD_MODES))
    _choice("reward.equivalence", rw.equivalence, EQUIVALENCE_MODES)
    _check("reward.consistency_gate", 0 <= rw.consistency_gate <= 1, "in [0, 1]", rw.consistency_gate)
    _check("reward.format_penalty", rw.format_penalty >= 0, ">= 0", rw.format_penalty)
    _check("reward.symbolic_timeout", rw.symbolic_timeout > 0, "> 0", rw.symbolic_timeout)
    _check("reward.agreement_gamma", rw.agreement_gamma > 0, "> 0", rw.agreement_gamma)
    if REWARD_MODES[rw.mode].needs_votes:
        _check("rollout.vote_n", r.n < r.vote_n <= MAX_GROUP_SIZE,
               f"in (rollout.n={r.n}, {MAX_GROUP_SIZE}] with reward.mode={rw.mode} (more votes than trained samples)",
               r.vote_n)
        _check("rollout.vote_n", t.prompts_per_step * r.vote_n <= MAX_TRAJECTORIES_PER_STEP,
               f"such that trainer.prompts_per_step * rollout.vote_n <= {MAX_TRAJECTORIES_PER_STEP}", r.vote_n)
    c = rw.calibration
    for name in ("kappa_h", "kappa_l"):
        _check(f"reward.calibration.{name}", getattr(c, name) > 0, "> 0", getattr(c, name))
    for name in ("tau_h", "tau_l"):
        _check(f"reward.calibration.{name}", 0 <= getattr(c, name) <= 1, "in [0, 1]", getattr(c, name))
    _check("reward.calibration.g_min", 0 <= c.g_min <= c.g_max, "in [0, reward.calibration.g_max]", c.g_min)
    from megatron_selfjudge.judges import JUDGE_KINDS
    from megatron_selfjudge.rewards.judge import RUBRICS, UNPARSED_POLICIES

    _choice("judge.kind", j.kind, list(JUDGE_KINDS))
    _choice("judge.unparsed", j.unparsed, list(UNPARSED_POLICIES))
    _choice("judge.rubric", j.rubric, list(RUBRICS))
    _check("judge.samples", 1 <= j.samples <= MAX_JUDGE_SAMPLES, f"in [1, {MAX_JUDGE_SAMPLES}]", j.samples)
    _check("judge.temperature", j.temperature > 0, "> 0", j.temperature)
    _check("judge.top_p", 0 < j.top_p <= 1, "in (0, 1]", j.top_p)
    _check("judge.max_tokens", j.max_tokens >= 1, ">= 1", j.max_tokens)
    _check("judge.max_prompt_len", j.max_prompt_len >= 1, ">= 1", j.max_prompt_len)
    # Checked whatever the Judge kind: the generative Judge, a copy of the policy, needs this context.
    _check_context(("judge.max_prompt_len", "judge.max_tokens", image_names),
                   (j.max_prompt_len, j.max_tokens, image_tokens))
    from megatron_selfjudge.advantages import ESTIMATORS

    _choice("advantage.estimator", a.estimator, list(ESTIMATORS))
    _check("advantage.temperature", _finite(a.temperature) and a.temperature > 0, "> 0", a.temperature)
    _check("advantage.eps", a.eps > 0, "> 0", a.eps)
    _check("loss.eps_low", 0 <= lo.eps_low < 1, "in [0, 1)", lo.eps_low)
    _check("loss.eps_high", lo.eps_high >= 0, ">= 0", lo.eps_high)
    _check("loss.dual_clip", lo.dual_clip > 1, "> 1", lo.dual_clip)
    _check("loss.beta_kl", lo.beta_kl >= 0, ">= 0", lo.beta_kl)
    _check("loss.entropy_coef", lo.entropy_coef >= 0, ">= 0", lo.entropy_coef)
    from megatron_selfjudge.loss import AGG_MODES, IMPL_CHOICES

    _choice("loss.agg", lo.agg, AGG_MODES)
    _choice("loss.impl", lo.impl, IMPL_CHOICES)
    from megatron_selfjudge.loss import ROLLOUT_CORRECTIONS

    _choice("loss.rollout_correction", lo.rollout_correction, ROLLOUT_CORRECTIONS)
    _check("loss.rollout_correction_cap", _finite(lo.rollout_correction_cap) and lo.rollout_correction_cap > 0,
           "> 0", lo.rollout_correction_cap)
    _check("optim.lr", _finite(o.lr) and o.lr >= 0, ">= 0", o.lr)
    _check("optim.sft_lr", _finite(o.sft_lr) and o.sft_lr >= 0, ">= 0", o.sft_lr)
    from megatron_selfjudge.sft import SFT_SCHEDULES

    _choice("optim.sft_schedule", o.sft_schedule, SFT_SCHEDULES)
    _check("optim.sft_min_lr", _finite(o.sft_min_lr) and 0 <= o.sft_min_lr <= o.sft_lr,
           f"in [0, optim.sft_lr={o.sft_lr}]", o.sft_min_lr)
    _check("optim.sft_warmup_steps", 0 <= o.sft_warmup_steps and (t.sft_steps == 0 or o.sft_warmup_steps < t.sft_steps),
           f"in [0, trainer.sft_steps={t.sft_steps})", o.sft_warmup_steps)
    _check("optim.weight_decay", o.weight_decay >= 0, ">= 0", o.weight_decay)
    _check("optim.grad_clip", o.grad_clip >= 0, ">= 0 (0 disables clipping)", o.grad_clip)
    _check("optim.adam_beta1", 0 <= o.adam_beta1 < 1, "in [0, 1)", o.adam_beta1)
    _check("optim.adam_beta2", 0 <= o.adam_beta2 < 1, "in [0, 1)", o.adam_beta2)
    _check("optim.adam_eps", o.adam_eps > 0, "> 0 (it keeps Adam's denominator away from zero)", o.adam_eps)
    _choice("data.on_error", d.on_error, ("raise", "skip"))
    for name in ("max_image_pixels", "max_image_bytes", "max_images_per_row"):
        _check(f"data.{name}", getattr(d, name) >= 1, ">= 1", getattr(d, name))
    from megatron_selfjudge.data.prompts import INSTRUCTIONS

    _choice("data.instruction", d.instruction, list(INSTRUCTIONS))
    from megatron_selfjudge.data.synthetic import FAMILIES

    for fam in d.synthetic_families:
        _choice("data.synthetic_families", fam, FAMILIES)
    _check("data.synthetic_families", len(d.synthetic_families) >= 1, "non-empty", d.synthetic_families)
    for name in ("synthetic_sft", "synthetic_test"):
        _check(f"data.{name}", getattr(d, name) >= 0, ">= 0", getattr(d, name))
    _check("data.synthetic_unlabeled", d.synthetic_unlabeled >= 1, ">= 1", d.synthetic_unlabeled)
    for name in ("synthetic_sft_ask", "synthetic_sft_judge"):
        _check(f"data.{name}", 0 <= getattr(d, name) <= d.synthetic_sft,
               f"in [0, data.synthetic_sft={d.synthetic_sft}]", getattr(d, name))
    _check_train_files(d)
    _check("data.limit", d.limit >= 0, ">= 0 (0 = every usable row)", d.limit)
    _check("data.workers", 0 <= d.workers <= MAX_DATA_WORKERS, f"in [0, {MAX_DATA_WORKERS}]", d.workers)
    _check("data.eval", d.eval is None or d.eval.strip() != "", "null or a path", d.eval)
    _check("trainer.max_steps", t.max_steps >= -1, ">= -1 (-1 = run trainer.epochs)", t.max_steps)
    _check("trainer.epochs", t.epochs >= 1, ">= 1", t.epochs)
    _check("trainer.prompts_per_step", t.prompts_per_step >= 1, ">= 1", t.prompts_per_step)
    _check("trainer.mini_batch_prompts", 1 <= t.mini_batch_prompts <= t.prompts_per_step,
           "in [1, trainer.prompts_per_step]", t.mini_batch_prompts)
    _check("trainer.prompts_per_step", t.prompts_per_step % t.mini_batch_prompts == 0,
           "a multiple of trainer.mini_batch_prompts", t.prompts_per_step)
    _check("trainer.micro_batch_tokens", t.micro_batch_tokens >= 1, ">= 1", t.micro_batch_tokens)
    _check("trainer.save_every", t.save_every >= 0, ">= 0 (0 = only at the end)", t.save_every)
    _check("trainer.sft_steps", t.sft_steps >= 0, ">= 0", t.sft_steps)
    _check("trainer.sft_batch_size", t.sft_batch_size >= 1, ">= 1", t.sft_batch_size)
    _check("trainer.eval_every", t.eval_every >= 0, ">= 0 (0 = off)", t.eval_every)
    _check("trainer.eval_limit", t.eval_limit >= 0, ">= 0 (0 = every problem)", t.eval_limit)
    if t.eval_every:
        from megatron_selfjudge.eval.benchmarks import BENCHMARK_NAMES

        _check("trainer.eval_benchmarks", bool(t.eval_benchmarks) and set(t.eval_benchmarks) <= set(BENCHMARK_NAMES)
               and len(set(t.eval_benchmarks)) == len(t.eval_benchmarks),
               f"a non-empty list of distinct names from {', '.join(BENCHMARK_NAMES)} with trainer.eval_every > 0",
               t.eval_benchmarks)
        _check("trainer.eval_data", t.eval_data.strip() != "", "the folder of the benchmarks' files with "
               "trainer.eval_every > 0", t.eval_data)
    _check("trainer.keep_checkpoints", t.keep_checkpoints >= 1, ">= 1", t.keep_checkpoints)
    _choice("trainer.resume", t.resume, RESUME_MODES)
    _check("trainer.run_dir", t.run_dir.strip() != "", "a non-blank path", t.run_dir)
    leaf_keys = {key for key, _ in leaf_items(cfg)}  # a misspelt key would silently allow nothing
    _check("trainer.allow_config_change", set(t.allow_config_change) <= leaf_keys,
           f"a list of dotted config keys; unknown: {sorted(set(t.allow_config_change) - leaf_keys)}",
           t.allow_config_change)
    _check("trainer.prompts_per_step", t.prompts_per_step * r.n <= MAX_TRAJECTORIES_PER_STEP,
           f"such that trainer.prompts_per_step * rollout.n <= {MAX_TRAJECTORIES_PER_STEP} trajectories "
           f"per step (rollout.n={r.n})", t.prompts_per_step)
    if d.train == "synthetic":  # files are sized when read; the synthetic split is sized here
        _check("data.synthetic_unlabeled", d.synthetic_unlabeled >= t.prompts_per_step,
               f">= trainer.prompts_per_step={t.prompts_per_step} (a step draws that many distinct prompts)",
               d.synthetic_unlabeled)
        _check("model.image_size", m.image_size >= MIN_SYNTHETIC_IMAGE_SIZE,
               f">= {MIN_SYNTHETIC_IMAGE_SIZE} with data.train=synthetic (the size of the drawings)", m.image_size)
    # Judging pairs teach the generative Judge; without it the model's context is not sized for them.
    _check("data.synthetic_sft_judge", d.synthetic_sft_judge == 0 or (d.train == "synthetic"
                                                                       and uses_generative_judge(cfg)),
           "0 unless data.train=synthetic, judge.kind=generative and a reward.mode that uses the Judge",
           d.synthetic_sft_judge)
    _check("data.synthetic_sft_ask", d.synthetic_sft_ask == 0 or d.train == "synthetic",
           "0 unless data.train=synthetic", d.synthetic_sft_ask)
    return cfg


# --- loading ----------------------------------------------------------------------------

def embedded_default_path() -> Path:
    """Path of the embedded tiny CPU default shipped inside the package."""
    return Path(str(resources.files("megatron_selfjudge") / "configs" / "tiny.yaml"))


def _omegaconf_message(exc: OmegaConfBaseException) -> str:
    """OmegaConf's first message line (the rest is its object dump) and the full key it names."""
    msg = str(exc).split("\n")[0]
    key = getattr(exc, "full_key", None)
    return msg + (f" (key: {key})" if key else "")


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """A PyYAML error as its problem and position (its own text spans several lines)."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        return ", ".join(part for part in (exc.context, exc.problem) if part) + where
    return str(exc)


def _parse_override(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.beta_kl=0.02)")
    key, value = item.split("=", 1)
    if "" in key.split("."):
        raise ConfigError(f"override {item!r} has an empty or malformed key")
    try:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override {item!r}: {_omegaconf_message(exc)}") from None
    except yaml.YAMLError as exc:  # the value is parsed as YAML
        raise ConfigError(f"override {item!r}: the value is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"override {item!r}: the value is nested too deeply") from None
    except IndexError:  # OmegaConf's key-path parser on keys such as "[" (found by hypothesis)
        raise ConfigError(f"override {item!r} has an empty or malformed key") from None


def _parse_yaml_mapping(text: str, origin: str) -> DictConfig:
    """The YAML mapping in text; OmegaConf's loader refuses object tags and alias bombs."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)  # nodes only: nothing is constructed
        if root is not None and not isinstance(root, yaml.MappingNode):
            kind = "list" if isinstance(root, yaml.SequenceNode) else "scalar"
            raise ConfigError(f"{origin} must hold a mapping of sections, not a {kind}")
        loaded = OmegaConf.load(io.StringIO(text))
    except yaml.YAMLError as exc:
        raise ConfigError(f"{origin} is not valid YAML: {_yaml_problem(exc)}") from None
    except RecursionError:
        raise ConfigError(f"{origin} is nested too deeply") from None
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{origin}: {_omegaconf_message(exc)}") from None
    assert isinstance(loaded, DictConfig)
    return loaded


def _read_config_file(path: Path) -> DictConfig:
    """A config file's mapping; every problem is a one-line ConfigError naming the file."""
    name = f"config file {str(path)!r}"
    if path.is_dir():
        raise ConfigError(f"{name} is a directory, not a YAML file")
    if not path.exists():
        raise ConfigError(f"{name} does not exist")
    if not path.is_file():
        raise ConfigError(f"{name} is not a regular file")
    from megatron_selfjudge.runtime.files import read_bounded

    data = read_bounded(path, MAX_CONFIG_BYTES, name, ConfigError, "a config file is a few KB")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise ConfigError(f"{name} is not UTF-8 text (byte {exc.start}, line {line})") from None
    return _parse_yaml_mapping(text, name)


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        # OmegaConf names the full key; keep its message and say where the value came from.
        raise ConfigError(f"{origin}: {_omegaconf_message(exc)}") from None
    except TypeError as exc:  # e.g. a mapping merged into a list field ("Cannot merge incompatible ...")
        raise ConfigError(f"{origin}: {exc}") from None


def _resolve(sources: Sequence[Tuple[str, DictConfig]]) -> Config:
    """Defaults merged with each source, as dataclasses; interpolations resolve (and fail) here."""
    merged = OmegaConf.structured(Config)
    for origin, src in sources:
        merged = _merge(merged, src, origin)
    try:
        cfg = OmegaConf.to_object(merged)
    except (OmegaConfBaseException, RecursionError) as exc:
        msg = (_omegaconf_message(exc) if isinstance(exc, OmegaConfBaseException)
               else "an interpolation (${...}) refers to itself")
        # Name the source: the first one whose addition makes the config fail to resolve.
        for n in range(1, len(sources)):
            try:
                _resolve(sources[:n])
            except ConfigError:
                raise ConfigError(f"{sources[n - 1][0]}: {msg}") from None
        raise ConfigError((f"{sources[-1][0]}: " if sources else "") + msg) from None
    assert isinstance(cfg, Config)
    return cfg


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                embedded_default: bool = True) -> Config:
    """Build a validated Config from defaults, a YAML file (or the embedded default) and overrides."""
    if path is None and embedded_default:
        path = embedded_default_path()
    sources: list[Tuple[str, DictConfig]] = []
    if path is not None:
        path = Path(path)
        sources.append((f"config file {str(path)!r}", _read_config_file(path)))
    sources += [(f"override {item!r}", _parse_override(item)) for item in overrides]
    return validate(_resolve(sources))


def to_yaml(cfg: Config) -> str:
    """Resolved config as YAML text (written to the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


# --- resume -----------------------------------------------------------------------------

# Keys that may differ between a run and its resume without changing what the run learns.
# Everything else (the task, the model, the reward, the loss, the optimiser, the seeds, the batch
# layout in prompts) changes the run's meaning and is drift.
RESUME_SAFE_KEYS = frozenset({
    "trainer.max_steps",  # extending or shortening a run: the steps taken so far are unchanged
    "trainer.epochs",  # the same, for runs sized in epochs (max_steps = -1)
    "trainer.save_every",  # checkpoint cadence only
    "trainer.keep_checkpoints",  # checkpoint retention only
    "trainer.run_dir",  # a moved run directory is the same run
    "trainer.resume",  # how this start treats existing checkpoints, not what they hold
    # Token budget per micro-batch: the loss is normalised over all micro-batches of an update,
    # so the update is the same up to floating-point rounding.
    "trainer.micro_batch_tokens",
    # Sequences decoded together: the sampling distribution is the same, only the order in which
    # random numbers are drawn (hence the exact samples) may change.
    "rollout.max_batch_size",
    "loss.impl",  # implementations of one loss, tested against the reference
    # A run that started with `raise` had no bad row, so `skip` reads the same rows; a run that
    # skipped rows fails loudly under `raise` instead of training on other rows.
    "data.on_error",
    "data.workers",  # how many processes check the rows at load, not which rows are kept
    # A compute limit: only comparisons that hit it (scored as not equivalent) are affected.
    "reward.symbolic_timeout",
    "trainer.allow_config_change",  # the permission itself (runtime/run_state.py)
    # Benchmark evaluation during training only reads the policy: it never changes what is learnt.
    "trainer.eval_every", "trainer.eval_benchmarks", "trainer.eval_data", "trainer.eval_limit",
})


def config_drift(saved: Config, current: Config) -> List[Tuple[str, Any, Any]]:
    """(dotted key, saved value, current value) of every changed leaf outside RESUME_SAFE_KEYS."""
    now = dict(leaf_items(current))
    return [(key, old, now[key]) for key, old in leaf_items(saved)
            if key not in RESUME_SAFE_KEYS and now.get(key) != old]


def load_saved_config(path: str | Path) -> Config:
    """The validated config of a run directory (its config.yaml) or of a saved config file."""
    path = Path(path)
    file = path / "config.yaml" if path.is_dir() else path
    if not file.is_file():
        raise ConfigError(f"saved config {str(file)!r} does not exist")
    try:
        cfg = load_config(file, embedded_default=False)
    except ConfigError as exc:
        msg = str(exc)
        raise ConfigError(msg if str(file) in msg else f"saved config {str(file)!r}: {msg}") from None
    if not file.read_bytes().strip():  # to_yaml never writes an empty file
        raise ConfigError(f"saved config {str(file)!r} is empty (damaged)")
    return cfg


def uses_judge(cfg: Config) -> bool:
    """Whether the reward mode reads Judge scores (the reward-mode registry says)."""
    from megatron_selfjudge.rewards.combine import REWARD_MODES

    return REWARD_MODES[cfg.reward.mode].needs_judge


def uses_generative_judge(cfg: Config) -> bool:
    """Whether the rewards need the frozen model to write rubric judgements (its context must fit too)."""
    return uses_judge(cfg) and cfg.judge.kind == "generative"
