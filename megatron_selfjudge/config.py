"""Run configuration: one dataclass per section, the single source of every default.

A run is configured by (in order of precedence, lowest first) these dataclass defaults,
an optional YAML file, and ``key=value`` overrides on the command line whose keys are
dotted paths of the dataclasses (``loss.beta_kl=0.02``). OmegaConf structured configs do
the merging, the unknown-key and the type checks; :func:`validate` adds range checks.

The defaults are the paper's (ALGORITHM.md): Qwen2.5-VL-7B scale, 512 prompts x 8 rollouts.
The embedded CPU default (``configs/tiny.yaml``) overrides only what it must.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REWARD_MODES = ("majority", "consistency", "judge", "judge_raw", "ground_truth", "random")
EQUIVALENCE_MODES = ("exact", "normalized", "symbolic")
JUDGE_KINDS = ("generative", "likelihood")
UNPARSED_POLICIES = ("zero", "neutral")
ESTIMATORS = ("grpo", "grpo_no_std", "energy")
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
LOSS_BACKENDS = ("auto", "torch", "triton")
ROLLOUT_BACKENDS = ("megatron",)  # vLLM comes with its engine
MODEL_PRESETS = ("tiny-llava", "tiny-gpt")  # HF presets (Qwen2.5-VL via mbridge) come with mbridge
TRANSFORMER_IMPLS = ("local", "transformer_engine")
RESUME_MODES = ("never", "auto")
PARAMS_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A configuration value is unknown, of the wrong type or out of range."""


@dataclass
class ModelConfig:
    """Policy architecture; the Judge and the reference model are frozen copies of it."""

    preset: str = "tiny-llava"  # tiny-llava | tiny-gpt (text only)
    transformer_impl: str = "local"
    params_dtype: str = "bfloat16"
    num_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    ffn_hidden_size: int = 256
    vision_num_layers: int = 1
    vision_hidden_size: int = 64
    image_size: int = 32
    patch_size: int = 8


@dataclass
class ParallelConfig:
    """Megatron layout; data parallel size is world_size / (tp * pp)."""

    tp: int = 1
    pp: int = 1
    use_distributed_optimizer: bool = True


@dataclass
class RolloutConfig:
    """Sampling of G trajectories per prompt."""

    backend: str = "megatron"
    n: int = 8
    temperature: float = 1.0
    top_p: float = 1.0
    max_prompt_len: int = 1024
    max_response_len: int = 2048
    max_batch_size: int = 64  # sequences decoded together by the in-process megatron engine


@dataclass
class CalibrationConfig:
    """Bounded smooth map g(s) from a Judge score to a reward multiplier."""

    tau_h: float = 0.95
    tau_l: float = 0.40
    kappa_h: float = 0.02
    kappa_l: float = 0.05
    alpha_h: float = 0.2
    alpha_l: float = 0.2
    g_min: float = 0.8
    g_max: float = 1.2


@dataclass
class RewardConfig:
    """How trajectories are rewarded without labels."""

    mode: str = "judge"
    equivalence: str = "symbolic"
    consistency_gate: float = 0.85  # 1.0 = pure answer frequency
    format_penalty: float = 0.5  # lambda: f_i = -lambda when the format is broken
    symbolic_timeout: float = 5.0  # seconds per symbolic comparison (math-verify in a worker)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)


@dataclass
class JudgeConfig:
    """The frozen Judge (a copy of the initial actor)."""

    kind: str = "generative"
    samples: int = 1  # K judge samples per trajectory, averaged
    temperature: float = 1.0
    top_p: float = 0.9
    max_tokens: int = 1024
    max_prompt_len: int = 4096  # rubric + question + candidate response, in tokens (generative)
    unparsed: str = "zero"  # zero: reference code (s = 0); neutral: g = 1


@dataclass
class AdvantageConfig:
    """Group-relative advantage estimator."""

    estimator: str = "energy"
    temperature: float = 1.0  # T of the energy estimator
    center: bool = True  # energy: subtract the group mean (released code) vs + log G
    eps: float = 1e-6


@dataclass
class LossConfig:
    """Token-level clipped policy loss with k3 KL to the reference."""

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip: float = 3.0
    beta_kl: float = 0.01
    entropy_coef: float = 0.0
    agg: str = "token-mean"
    backend: str = "auto"


@dataclass
class OptimConfig:
    """AdamW from megatron.core.optimizer."""

    lr: float = 1e-6
    sft_lr: float = 1e-5  # stage-1 supervised warm start (only when trainer.sft_steps > 0)
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8


@dataclass
class DataConfig:
    """Training prompts: 'synthetic' (embedded task) or a local parquet/JSONL path."""

    train: str = "synthetic"
    eval: Optional[str] = None
    on_error: str = "raise"  # raise | skip (skipped rows are counted)
    instruction: str = "full"  # format instruction appended to questions: full | short | mmupt | none
    synthetic_seed: int = 0
    synthetic_families: List[str] = field(default_factory=lambda: ["count", "add", "compare", "bar"])
    synthetic_sft: int = 512
    synthetic_unlabeled: int = 2048
    synthetic_test: int = 256


@dataclass
class TrainerConfig:
    """Outer loop: steps, batches, checkpoints."""

    max_steps: int = -1  # -1: run `epochs` epochs
    epochs: int = 15
    prompts_per_step: int = 512
    mini_batch_prompts: int = 128  # 512 / 128 = 4 updates per rollout batch
    micro_batch_tokens: int = 16384
    seed: int = 1234
    run_dir: str = "runs/default"
    save_every: int = 50
    keep_checkpoints: int = 3
    resume: str = "auto"
    sft_steps: int = 0  # supervised warm start before unsupervised training
    sft_batch_size: int = 32


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


def _finite(x: float) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def validate(cfg: Config) -> Config:
    """Check every value's range and the cross-field rules; raise ConfigError naming the key."""
    m, p, r, rw, j, a, lo, o, d, t = (cfg.model, cfg.parallel, cfg.rollout, cfg.reward, cfg.judge,
                                       cfg.advantage, cfg.loss, cfg.optim, cfg.data, cfg.trainer)
    _choice("model.preset", m.preset, MODEL_PRESETS)
    _choice("model.transformer_impl", m.transformer_impl, TRANSFORMER_IMPLS)
    _choice("model.params_dtype", m.params_dtype, PARAMS_DTYPES)
    for name in ("num_layers", "hidden_size", "num_attention_heads", "ffn_hidden_size",
                 "vision_num_layers", "vision_hidden_size", "image_size", "patch_size"):
        _check(f"model.{name}", getattr(m, name) >= 1, ">= 1", getattr(m, name))
    _check("model.hidden_size", m.hidden_size % m.num_attention_heads == 0,
           "divisible by model.num_attention_heads", m.hidden_size)
    _check("model.image_size", m.image_size % m.patch_size == 0,
           "divisible by model.patch_size", m.image_size)
    _check("parallel.tp", p.tp >= 1, ">= 1", p.tp)
    _check("parallel.pp", p.pp >= 1, ">= 1", p.pp)
    _choice("rollout.backend", r.backend, ROLLOUT_BACKENDS)
    _check("rollout.n", r.n >= 2, ">= 2 (a group needs at least two rollouts)", r.n)
    _check("rollout.temperature", _finite(r.temperature) and r.temperature > 0, "> 0", r.temperature)
    _check("rollout.top_p", 0 < r.top_p <= 1, "in (0, 1]", r.top_p)
    _check("rollout.max_prompt_len", r.max_prompt_len >= 1, ">= 1", r.max_prompt_len)
    _check("rollout.max_response_len", r.max_response_len >= 1, ">= 1", r.max_response_len)
    _check("rollout.max_batch_size", r.max_batch_size >= 1, ">= 1", r.max_batch_size)
    _choice("reward.mode", rw.mode, REWARD_MODES)
    _choice("reward.equivalence", rw.equivalence, EQUIVALENCE_MODES)
    _check("reward.consistency_gate", 0 <= rw.consistency_gate <= 1, "in [0, 1]", rw.consistency_gate)
    _check("reward.format_penalty", rw.format_penalty >= 0, ">= 0", rw.format_penalty)
    _check("reward.symbolic_timeout", rw.symbolic_timeout > 0, "> 0", rw.symbolic_timeout)
    c = rw.calibration
    for name in ("kappa_h", "kappa_l"):
        _check(f"reward.calibration.{name}", getattr(c, name) > 0, "> 0", getattr(c, name))
    for name in ("tau_h", "tau_l"):
        _check(f"reward.calibration.{name}", 0 <= getattr(c, name) <= 1, "in [0, 1]", getattr(c, name))
    _check("reward.calibration.g_min", 0 <= c.g_min <= c.g_max, "in [0, g_max]", c.g_min)
    _choice("judge.kind", j.kind, JUDGE_KINDS)
    _choice("judge.unparsed", j.unparsed, UNPARSED_POLICIES)
    _check("judge.samples", j.samples >= 1, ">= 1", j.samples)
    _check("judge.temperature", j.temperature > 0, "> 0", j.temperature)
    _check("judge.top_p", 0 < j.top_p <= 1, "in (0, 1]", j.top_p)
    _check("judge.max_tokens", j.max_tokens >= 1, ">= 1", j.max_tokens)
    _check("judge.max_prompt_len", j.max_prompt_len >= 1, ">= 1", j.max_prompt_len)
    _choice("advantage.estimator", a.estimator, ESTIMATORS)
    _check("advantage.temperature", _finite(a.temperature) and a.temperature > 0, "> 0", a.temperature)
    _check("advantage.eps", a.eps > 0, "> 0", a.eps)
    _check("loss.eps_low", 0 <= lo.eps_low < 1, "in [0, 1)", lo.eps_low)
    _check("loss.eps_high", lo.eps_high >= 0, ">= 0", lo.eps_high)
    _check("loss.dual_clip", lo.dual_clip > 1, "> 1", lo.dual_clip)
    _check("loss.beta_kl", lo.beta_kl >= 0, ">= 0", lo.beta_kl)
    _check("loss.entropy_coef", lo.entropy_coef >= 0, ">= 0", lo.entropy_coef)
    _choice("loss.agg", lo.agg, LOSS_AGGS)
    _choice("loss.backend", lo.backend, LOSS_BACKENDS)
    _check("optim.lr", _finite(o.lr) and o.lr >= 0, ">= 0", o.lr)
    _check("optim.sft_lr", _finite(o.sft_lr) and o.sft_lr >= 0, ">= 0", o.sft_lr)
    _check("optim.weight_decay", o.weight_decay >= 0, ">= 0", o.weight_decay)
    _check("optim.grad_clip", o.grad_clip >= 0, ">= 0 (0 disables clipping)", o.grad_clip)
    _check("optim.adam_beta1", 0 <= o.adam_beta1 < 1, "in [0, 1)", o.adam_beta1)
    _check("optim.adam_beta2", 0 <= o.adam_beta2 < 1, "in [0, 1)", o.adam_beta2)
    _choice("data.on_error", d.on_error, ("raise", "skip"))
    _choice("data.instruction", d.instruction, ("full", "short", "mmupt", "none"))
    from megatron_selfjudge.data.synthetic import FAMILIES

    for fam in d.synthetic_families:
        _choice("data.synthetic_families", fam, FAMILIES)
    _check("data.synthetic_families", len(d.synthetic_families) >= 1, "non-empty", d.synthetic_families)
    for name in ("synthetic_sft", "synthetic_test"):
        _check(f"data.{name}", getattr(d, name) >= 0, ">= 0", getattr(d, name))
    _check("data.synthetic_unlabeled", d.synthetic_unlabeled >= 1, ">= 1", d.synthetic_unlabeled)
    _check("trainer.seed", t.seed >= 0, ">= 0", t.seed)
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
    _check("trainer.keep_checkpoints", t.keep_checkpoints >= 1, ">= 1", t.keep_checkpoints)
    _choice("trainer.resume", t.resume, RESUME_MODES)
    return cfg


# --- loading ----------------------------------------------------------------------------

def embedded_default_path() -> Path:
    """Path of the embedded tiny CPU default shipped inside the package."""
    return Path(str(resources.files("megatron_selfjudge") / "configs" / "tiny.yaml"))


def _parse_override(item: str) -> DictConfig:
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. loss.beta_kl=0.02)")
    key, value = item.split("=", 1)
    if not key or key.startswith(".") or key.endswith("."):
        raise ConfigError(f"override {item!r} has an empty or malformed key")
    try:
        return OmegaConf.from_dotlist([f"{key}={value}"])
    except OmegaConfBaseException as exc:
        raise ConfigError(f"override {item!r}: {exc}") from None


def _merge(base: DictConfig, other: DictConfig, origin: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        # OmegaConf names the full key; keep its message and say where the value came from.
        msg = str(exc).split("\n")[0]
        key = getattr(exc, "full_key", None)
        raise ConfigError(f"{origin}: {msg}" + (f" (key: {key})" if key else "")) from None


def load_config(path: Optional[str | Path] = None, overrides: Sequence[str] = (),
                embedded_default: bool = True) -> Config:
    """Build a validated Config from defaults, a YAML file (or the embedded default) and overrides."""
    merged = OmegaConf.structured(Config)
    if path is None and embedded_default:
        path = embedded_default_path()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            loaded = OmegaConf.load(path)
        except Exception as exc:  # YAML syntax errors come from several libraries
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {exc}") from None
        if not isinstance(loaded, DictConfig):
            raise ConfigError(f"config file {str(path)!r} must hold a mapping of sections")
        merged = _merge(merged, loaded, f"config file {str(path)!r}")
    for item in overrides:
        merged = _merge(merged, _parse_override(item), f"override {item!r}")
    cfg = OmegaConf.to_object(merged)
    assert isinstance(cfg, Config)
    return validate(cfg)


def to_yaml(cfg: Config) -> str:
    """Resolved config as YAML text (written to the run directory)."""
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict:
    """Resolved config as a plain nested dict."""
    return dataclasses.asdict(cfg)
