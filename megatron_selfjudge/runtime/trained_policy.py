"""A trained policy for inference outside the trainer (`selfjudge eval`, `selfjudge synth`).

A run's config, model family and weights, found from one `--checkpoint` argument.

`--checkpoint` may name a run directory (``config.yaml`` + ``checkpoints/``: its newest intact
step checkpoint, falling back past damaged ones as a resume does), its ``checkpoints/`` root, or
one step folder inside it (exactly that one). The model is built from the run's saved config by
its model family and loaded weights-only (megatron/checkpoint.py: manifest verified, no
optimizer, no RNG) in the caller's parallel layout (`single_process`: TP=PP=1); dist-checkpoint
shards reshard from any layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager

from megatron_selfjudge.config import Config, load_saved_config


class PolicyLoadError(ValueError):
    """The checkpoint argument names nothing loadable; one line."""


@dataclass
class RunCheckpoint:
    """Where a policy comes from: the run's config file and its checkpoints, best first."""

    config_file: Path
    candidates: list[Path]
    root: Path  # the checkpoints/ folder


def locate(path: str | Path) -> RunCheckpoint:
    """Resolve a run directory, its checkpoints/ root, its warm start (checkpoints/initial), or a step folder."""
    from megatron_selfjudge.megatron.checkpoint import META_FILE, checkpoint_candidates

    path = Path(path)
    if not path.is_dir():
        raise PolicyLoadError(f"checkpoint {path} does not exist (expected a run directory)")
    if (path / META_FILE).is_file():  # one step folder: run_dir/checkpoints/[initial/]step_XXXXXXXX
        run_dir = path.parent.parent.parent if path.parent.name == "initial" else path.parent.parent
        return RunCheckpoint(run_dir / "config.yaml", [path], path.parent)
    if (path / "checkpoints").is_dir():
        root, run_dir = path / "checkpoints", path
    elif (path / "config.yaml").is_file():
        raise PolicyLoadError(f"run directory {path} has no checkpoints/ folder")
    elif path.name == "initial" and path.parent.name == "checkpoints":  # the warm start's own root
        root, run_dir = path, path.parent.parent
    else:  # the checkpoints/ root itself
        root, run_dir = path, path.parent
    config_file = run_dir / "config.yaml"
    if not config_file.is_file():
        raise PolicyLoadError(f"{path} is not a run directory: no {config_file} (pass the trainer.run_dir of a run)")
    candidates = checkpoint_candidates(root)
    if not candidates:
        raise PolicyLoadError(f"{root} holds no complete step checkpoint")
    return RunCheckpoint(config_file, candidates, root)


@dataclass
class LoadedPolicy:
    """The run's config, its model family, the bare module with the checkpoint's weights, and where from."""

    cfg: Config
    family: Any  # ModelFamily
    module: Any  # torch.nn.Module
    checkpoint: Path
    step: int


def load_run_config(where: RunCheckpoint) -> Config:
    """The run's validated config.yaml (ConfigError, one line, when missing or invalid)."""
    return load_saved_config(where.config_file)


def load_policy(where: RunCheckpoint, cfg: Config, warn: Callable[[str], None]) -> LoadedPolicy:
    """Build the run's model (config `cfg`) and load the first intact checkpoint of `where`.

    Megatron's parallel state must exist (`single_process()`, or the caller's own set-up).
    """
    from megatron_selfjudge.megatron.checkpoint import load_checkpoint
    from megatron_selfjudge.megatron.models.family import build_family
    from megatron_selfjudge.runtime.run_state import RunStateError, load_newest_intact

    family = build_family(cfg)
    module = family.builder()()
    problems: list[str] = []

    def note(message: str) -> None:
        problems.append(message)
        warn(message)
    try:
        path, state = load_newest_intact(where.candidates,
                                         lambda p: load_checkpoint(p, module, None, load_rng=False),
                                         note, True, where.root)
    except RunStateError:  # its advice is about resuming a run; here there is simply no policy to load
        raise PolicyLoadError(f"no intact checkpoint to load under {where.root}: {' '.join(problems)}") from None
    module.eval()
    return LoadedPolicy(cfg=cfg, family=family, module=module, checkpoint=path, step=int(state.get("step", 0)))


def single_process(seed: int) -> ContextManager[None]:
    """A one-rank process group and megatron's groups at TP=PP=1 (runtime.setup.one_process), torn down after."""
    from megatron_selfjudge.runtime.setup import one_process

    return one_process("this command", seed, PolicyLoadError)
