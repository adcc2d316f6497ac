"""What a run directory must hold before a run may continue in it, and which checkpoint it resumes.

Three refusals (`RunStateError`, one line, exit 2 from the CLI), each of which used to continue
silently in a way that changed what the run means:
  - the saved ``config.yaml`` and this run's config differ in a key that changes the run
    (`config.config_drift`), unless the key is listed in ``trainer.allow_config_change``; the saved
    file is compared before anything overwrites it;
  - every step checkpoint is unusable: resuming from scratch would overwrite the run's metrics and
    checkpoints, so only ``trainer.resume=never`` (said explicitly) starts afresh there;
  - a run inside stage 2 lacks its frozen initial copy (``checkpoints/initial``): rebuilding the
    reference and the Judge from the trained policy would change both.
A damaged checkpoint with an intact older one behind it is not a refusal: `load_newest_intact`
says which one was damaged and why, and continues from the next.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional, Sequence


class RunStateError(Exception):
    """The run directory cannot be continued as configured; the message says what to do."""


class CheckpointDamaged(RuntimeError):
    """A checkpoint file is missing, truncated, altered or unreadable; the message names the file.

    Raised by megatron/checkpoint.py; defined here, without torch, so the CLI can catch it cheaply.
    """


def check_config_drift(saved_path: Path, current: Any, allowed: Sequence[str]) -> list[str]:
    """Refuse meaning-changing differences between the saved config and `current`.

    Returns the allowed changes (dotted keys) so the caller can report them.
    """
    from megatron_selfjudge.config import ConfigError, config_drift, load_saved_config

    if not saved_path.is_file():
        return []
    try:
        saved = load_saved_config(saved_path)
    except ConfigError as exc:
        raise RunStateError(f"cannot compare with the saved config: {exc}") from None
    changes = config_drift(saved, current)
    refused = [(k, old, new) for k, old, new in changes if k not in allowed]
    if refused:
        shown = "; ".join(f"{k}: {old!r} -> {new!r}" for k, old, new in refused[:5])
        more = f" (and {len(refused) - 5} more)" if len(refused) > 5 else ""
        keys = ",".join(k for k, _, _ in refused)
        raise RunStateError(f"resuming {saved_path.parent} with a different config: {shown}{more}. These keys "
                            f"change what the run means; to continue anyway pass "
                            f"trainer.allow_config_change=[{keys}], or use another trainer.run_dir")
    return [k for k, _, _ in changes]


def load_newest_intact(candidates: Sequence[Path], load: Callable[[Path], dict],
                       warn: Callable[[str], None], any_exist: bool, root: Path) -> Optional[tuple[Path, dict]]:
    """Load the first intact checkpoint of `candidates` (best first); None when the folder has none.

    A damaged one is reported through `warn` and skipped. When step checkpoints exist (`any_exist`)
    but none is intact, raises RunStateError rather than let the run start over them.
    """
    problems = []
    for path in candidates:
        try:
            return path, load(path)
        except CheckpointDamaged as exc:
            problems.append(f"{path.name} ({exc})")
            warn(f"checkpoint {path.name} is damaged: {exc}; "
                 + ("trying the next older one" if path != candidates[-1] else "no older one is left"))
    if not any_exist and not problems:
        return None
    found = "; ".join(problems) if problems else "no complete step checkpoint (only partial folders)"
    raise RunStateError(f"{root} holds step checkpoints but none can be resumed from: {found}. Starting over "
                        "would overwrite this run's metrics and checkpoints: pass trainer.resume=never to do "
                        "that, or restore a checkpoint")


def require_initial_copy(init_root: Path, step: int, found: Optional[Path]) -> Path:
    """The frozen initial copy a run resumed inside stage 2 needs, or RunStateError naming what is missing."""
    if found is None:
        missing = "is missing" if not init_root.exists() else "holds no complete checkpoint"
        raise RunStateError(f"resuming at UPT step {step}, but {init_root} {missing}: it is the frozen "
                            "initial policy (the reference model and the Judge), which cannot be rebuilt from "
                            "the trained policy. Restore it, or start the run afresh (trainer.resume=never)")
    return found


# --- the trainer's run state: what it saves, resumes and refuses ---------------------------------

def check_saved_config(run_dir: Path, cfg: Any, main: bool, warn: Callable[[str], None]) -> None:
    """When resuming (`trainer.resume=auto`), refuse meaning-changing drift from run_dir/config.yaml.

    A collective: rank 0 reads the file, every rank raises if it refused.
    """
    from megatron_selfjudge.runtime.ranks import raise_if_any_rank_failed

    error = None
    if main and cfg.trainer.resume == "auto":
        try:
            changed = check_config_drift(run_dir / "config.yaml", cfg, cfg.trainer.allow_config_change)
            if changed:
                warn(f"resuming with changed settings: {', '.join(changed)}")
        except RunStateError as exc:  # raised below, once every rank knows
            error = exc
    raise_if_any_rank_failed(error, "the run-directory config check")


def write_saved_config(run_dir: Path, cfg: Any, main: bool) -> None:
    """run_dir/config.yaml (resolved); written only once the run is known to start or resume."""
    from megatron_selfjudge.config import to_yaml

    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))


def resume_newest(ckpt_root: Path, model: Any, optimizer: Any,
                  warn: Callable[[str], None]) -> Optional[tuple[Path, dict]]:
    """(path, trainer state) of the newest intact step checkpoint loaded into model and optimizer, or None."""
    from megatron_selfjudge.megatron.checkpoint import checkpoint_candidates, has_step_checkpoints, load_checkpoint

    return load_newest_intact(checkpoint_candidates(ckpt_root), lambda path: load_checkpoint(path, model, optimizer),
                              warn, has_step_checkpoints(ckpt_root), ckpt_root)


def initial_copy(init_root: Path, policy: Any, build: Callable[[], Any], *, from_disk: bool, step: int,
                 offload: bool) -> Any:
    """The frozen initial policy (reference and Judge), a FrozenModel.

    `from_disk` (a run resumed inside stage 2): loaded from init_root, refused when missing or
    damaged. Otherwise the current policy is copied and saved there, replacing an older copy.
    """
    import torch

    from megatron_selfjudge.megatron.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
    from megatron_selfjudge.megatron.frozen import frozen_copy

    # The builders re-seed the global RNG; keep the run's stream where it was.
    with torch.random.fork_rng(devices=[]):
        if not from_disk:
            save_checkpoint(init_root, 0, policy, None, {"what": "initial policy: reference and Judge"}, keep_last=1)
            return frozen_copy(policy, build, offload)
        path = require_initial_copy(init_root, step, latest_checkpoint(init_root))
        module = build()
        try:
            load_checkpoint(path, module, None, load_rng=False)
        except CheckpointDamaged as exc:
            raise RunStateError(f"the frozen initial copy (reference and Judge) is damaged: {exc}") from None
        return frozen_copy(module, build, offload)
