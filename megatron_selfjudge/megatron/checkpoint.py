"""Resumable training checkpoints: megatron dist-checkpoint of model + optimizer, RNG, trainer state.

Layout under a checkpoint root (the run directory's ``checkpoints/``)::

    latest                    text file: name of the newest complete checkpoint ("step_00000040")
    step_00000040/
        dist/                 megatron-core dist_checkpointing folder: every rank writes its own
                              shards of the model and optimizer (any TP/PP/DP layout)
        rng/rank_00000.pt     per global rank: python, numpy, torch CPU/CUDA and megatron RNG-tracker
                              states (tensors and plain numbers only: loaded with weights_only=True)
        trainer_state.json    what the trainer passed (step, phase, data cursor, eval results...)
        checkpoint.json       step, world size, TP/PP/DP sizes, whether optimizer state is inside

Use (every rank calls both, at the same point)::

    ckpt = latest_checkpoint(run_dir / "checkpoints")          # trainer.resume=auto
    state = load_checkpoint(ckpt, ddp_model, optimizer) if ckpt else {"step": 0}
    ...after optimizer.step() and after the step's metrics are written:
    save_checkpoint(run_dir / "checkpoints", step, ddp_model, optimizer,
                    {"step": step, "data": {...cursor...}}, keep_last=3)

Crash safety: everything is written into ``.tmp.step_XXXXXXXX`` and renamed into place only after
all ranks finished; the ``latest`` marker is replaced (write-then-rename) last. A crash mid-save
leaves at worst a hidden temporary folder, which `latest_checkpoint` ignores and the next save
deletes. Multi-node runs need the root on a filesystem all nodes share.

Unsafe deserialisation: our own files load with ``torch.load(weights_only=True)``. Inside the
library, megatron reads ``common.pt`` with torch.load's default and torch.distributed.checkpoint
reads byte objects (megatron's ShardedObjects) with an explicit ``weights_only=False``;
`load_checkpoint` sets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 for the duration of the load, which torch
applies over both. torch.distributed.checkpoint also reads its ``.metadata`` index with plain
pickle, so that file is first replayed through an unpickler that admits only
torch.distributed.checkpoint's metadata classes, torch.Size and torch dtypes.

Optimizer state: megatron's plain optimizers save per-parameter ShardedTensors (reshardable to any
TP/PP layout); the DistributedOptimizer (DP > 1) saves megatron's default "dp_reshardable" format,
which resumes on another DP size but the same TP/PP. On the torch-AdamW path (no Transformer
Engine / Apex, e.g. this CPU runtime) megatron-core 0.16.1 cannot describe a fresh distributed
optimizer's state and loses the Adam step on load; `_init_empty_distributed_state` and
`_restore_step_counters` fix both, checked by an exact-resume test at DP=2.

Scripts that save checkpoints need an ``if __name__ == "__main__":`` guard: megatron's checkpoint
writer starts a multiprocessing Manager with the "spawn" start method, which re-imports ``__main__``.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron_selfjudge.megatron import cpu

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
DIST_DIR = "dist"
RNG_DIR = "rng"
TRAINER_STATE_FILE = "trainer_state.json"
META_FILE = "checkpoint.json"
FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step_(\d{8,})$")
_TMP_PREFIX = ".tmp."
_OLD_PREFIX = ".old."
# Distributed-optimizer state format: megatron's default, fully parallel (no gather); it reshards
# over DP only. ("fully_reshardable" would allow other TP/PP layouts, but megatron-core 0.16.1
# cannot load it with torch's AdamW, i.e. without Transformer Engine / Apex: KeyError 'step'.)
OPTIM_SHARDING = "dp_reshardable"

Models = Union[torch.nn.Module, Sequence[torch.nn.Module]]


def step_dir_name(step: int) -> str:
    """Folder name of the checkpoint of `step` (zero-padded so names sort by step)."""
    return f"step_{step:08d}"


# ----------------------------------------------------------------------------- distributed helpers

def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _rank() -> int:
    return dist.get_rank() if _distributed() else 0


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _barrier() -> None:
    if _distributed():
        dist.barrier()


def _flag_device() -> torch.device:
    """Device for small collective tensors: NCCL needs CUDA tensors, gloo CPU ones."""
    if _distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _raise_if_any_rank_failed(error: Optional[BaseException]) -> None:
    """Re-raise `error` on its rank and a pointer to it on the others, so no rank hangs in a collective."""
    failed = torch.tensor([_rank() if error is not None else -1], dtype=torch.int64, device=_flag_device())
    if _world_size() > 1:
        dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if int(failed.item()) >= 0:
        raise RuntimeError(f"checkpoint loading failed on rank {int(failed.item())}; see that rank's error")


def _layout() -> dict[str, int]:
    """World size and megatron's TP/PP/DP sizes (1 when model parallelism is not initialised)."""
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return {"world_size": _world_size(), "tp": 1, "pp": 1, "dp": _world_size()}
    return {"world_size": _world_size(), "tp": ps.get_tensor_model_parallel_world_size(),
            "pp": ps.get_pipeline_model_parallel_world_size(), "dp": ps.get_data_parallel_world_size()}


# ----------------------------------------------------------------------------- sharded state dicts

def _chunks(model: Models) -> list[torch.nn.Module]:
    """Bare megatron modules (DDP / Float16Module unwrapped) of a model or list of chunks."""
    from megatron.core.utils import unwrap_model

    chunks = list(model) if isinstance(model, (list, tuple)) else [model]
    if not chunks or not all(isinstance(c, torch.nn.Module) for c in chunks):
        raise TypeError("model must be a torch.nn.Module or a non-empty list of them")
    bare = unwrap_model(chunks)
    for chunk in bare:
        if not hasattr(chunk, "sharded_state_dict"):
            raise TypeError(f"{type(chunk).__name__} has no sharded_state_dict(); pass a megatron-core model")
    return bare


def _model_keys(n_chunks: int) -> list[str]:
    """megatron's naming: "model" for one chunk, "model0", "model1"... for virtual-pipeline chunks."""
    return ["model"] if n_chunks == 1 else [f"model{i}" for i in range(n_chunks)]


def _content_metadata() -> dict[str, Any]:
    """The sharded_state_dict metadata stored in the checkpoint, so loading rebuilds the same layout."""
    return {"distrib_optim_sharding_type": OPTIM_SHARDING, "singleton_local_shards": False,
            "chained_optim_avoid_prefix": True}


def _sharded_state_dict(chunks: list, optimizer: Any, metadata: dict, is_loading: bool) -> dict:
    state: dict[str, Any] = {}
    for key, chunk in zip(_model_keys(len(chunks)), chunks):
        # Each call gets its own copy: megatron adds a process group (dp_cp_group) to the dict.
        state[key] = chunk.sharded_state_dict(metadata=dict(metadata))
    if optimizer is not None:
        # The optimizer maps its parameters to the model's sharded keys through `state`.
        state["optimizer"] = optimizer.sharded_state_dict(state, is_loading=is_loading, metadata=dict(metadata))
    return state


def _inner_optimizers(optimizer: Any) -> list:
    return list(getattr(optimizer, "chained_optimizers", [optimizer]))


def _init_empty_distributed_state(optimizer: Any) -> None:
    """Give a never-stepped DistributedOptimizer the Adam state its sharded_state_dict() needs.

    Without Transformer Engine / Apex (torch AdamW), DistributedOptimizer.state_dict() reads the
    step from every parameter's state and asserts there is exactly one value, so a fresh optimizer
    (empty state) cannot describe what it wants to load. Zero moments at step 0 are what Adam would
    start from; the checkpoint overwrites all of it.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(inner, distrib_optimizer.DistributedOptimizer) or torch_opt is None or torch_opt.state:
            continue
        inner.init_state_fn(torch_opt, inner.config)
        for group in torch_opt.param_groups:
            for param in group["params"]:
                torch_opt.state[param]["step"] = torch.tensor(0.0)


def _restore_step_counters(optimizer: Any) -> None:
    """Give every parameter of a DistributedOptimizer its own, correct Adam `step` after a load.

    megatron-core 0.16.1's DistributedOptimizer on the torch-AdamW path (no TE / Apex) stores the
    step in its param groups and, on load, (1) puts ONE shared step tensor into every parameter's
    state, which torch's AdamW then increments in place once per parameter per update, and (2) then
    overwrites it with the unsaved placeholder of the parameter-state load (dp_reshardable). The
    param groups still hold the saved step: rebuild one tensor per parameter from them.
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    for inner in _inner_optimizers(optimizer):
        torch_opt = getattr(inner, "optimizer", None)
        if not isinstance(inner, DistributedOptimizer) or torch_opt is None:
            continue
        for group in torch_opt.param_groups:
            if "step" not in group:  # TE / Apex FusedAdam keep the step in the group only
                continue
            for param in group["params"]:
                state = torch_opt.state.get(param)
                if state and isinstance(state.get("step"), torch.Tensor):
                    state["step"] = torch.tensor(float(group["step"]), dtype=state["step"].dtype,
                                                 device=state["step"].device)


# ----------------------------------------------------------------------------- RNG states

def _rng_state() -> dict[str, Any]:
    """This rank's RNG states as tensors and plain numbers (safe for weights_only loading)."""
    from megatron.core.tensor_parallel import random as mrandom

    version, mt_state, gauss_next = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state(legacy=True)
    tracker = {}
    for name, value in mrandom.get_cuda_rng_tracker().get_states().items():
        tracker[name] = (value.get_state() if isinstance(value, torch.Generator) else value).clone()
    state = {
        "python": {"version": version, "state": torch.tensor(mt_state, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": np_kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(np_pos),
                  "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
        "torch_cpu": torch.get_rng_state(),
        "megatron_tracker": tracker,
    }
    if torch.cuda.is_available():
        state["torch_cuda"] = [s.cpu() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of `_rng_state`."""
    from megatron.core.tensor_parallel import random as mrandom

    py = state["python"]
    random.setstate((py["version"], tuple(int(x) for x in py["state"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"], npy["has_gauss"],
                         npy["cached_gaussian"]))
    tracker = mrandom.get_cuda_rng_tracker()
    current = tracker.get_states()
    restored = {}
    for name, value in state["megatron_tracker"].items():
        if isinstance(current.get(name), torch.Generator):  # CUDA-graph-safe trackers hold generators
            current[name].set_state(value)
            restored[name] = current[name]
        else:
            restored[name] = value
    tracker.set_states(restored)
    if "torch_cuda" in state:
        torch.cuda.set_rng_state_all(state["torch_cuda"])
    # Last: on the CPU runtime the tracker's states are CPU generator states too.
    torch.set_rng_state(state["torch_cpu"])


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / RNG_DIR / f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------- safe loading

# Everything torch.distributed.checkpoint's `.metadata` pickle may reference.
_DCP_METADATA_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                         "torch.distributed.checkpoint.filesystem")
_SAFE_GLOBALS = {("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict")}


class _MetadataUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except DCP's metadata classes, torch.Size and dtypes."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _SAFE_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if module in _DCP_METADATA_MODULES:
            found = super().find_class(module, name)
            if isinstance(found, type):  # dataclasses and enums only, never functions
                return found
        raise pickle.UnpicklingError(f"checkpoint metadata references a disallowed object {module}.{name}")


def _check_dcp_metadata(dist_dir: Path) -> None:
    """Refuse a `.metadata` index that would make torch's plain-pickle reader run arbitrary code."""
    path = dist_dir / ".metadata"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint index {path} is missing: incomplete or not a megatron dist checkpoint")
    _MetadataUnpickler(io.BytesIO(path.read_bytes())).load()


@contextlib.contextmanager
def _weights_only_loads() -> Iterator[None]:
    """Force torch.load's weights_only mode for calls inside megatron that do not pass it."""
    saved = {k: os.environ.get(k) for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    os.environ.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _check_model_shapes(ckpt: Path, state: dict, model_keys: list[str]) -> None:
    """Name the first model tensor whose global shape differs from the checkpoint's, or that it lacks."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = dist_checkpointing.load_tensors_metadata(str(ckpt / DIST_DIR))
    for key in model_keys:
        for item in nested_values(state[key]):
            if not isinstance(item, ShardedTensor):
                continue
            if item.key not in saved:
                raise ValueError(f"checkpoint {ckpt} has no tensor {item.key!r} that the model expects "
                                 "(a checkpoint of a different model?)")
            if tuple(saved[item.key].global_shape) != tuple(item.global_shape):
                raise ValueError(f"checkpoint {ckpt} does not match the model at {item.key!r}: checkpoint shape "
                                 f"{tuple(saved[item.key].global_shape)}, model shape {tuple(item.global_shape)}")


# ----------------------------------------------------------------------------- files and markers

def _write_text_atomic(path: Path, text: str) -> None:
    """Write then rename, so readers see the old content or the new one, never half of it."""
    part = path.with_name(path.name + ".part")
    with open(part, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(part, path)


def _is_complete(path: Path) -> bool:
    # metadata.json is the last file megatron writes, after every rank's shards.
    required = (path / META_FILE, path / TRAINER_STATE_FILE, path / DIST_DIR / "metadata.json")
    return all(p.is_file() for p in required)


def _complete_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint under root, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = _STEP_RE.match(child.name)
        if match and child.is_dir() and _is_complete(child):
            found.append((int(match.group(1)), child))
    return sorted(found)


def latest_checkpoint(root: Union[str, Path]) -> Optional[Path]:
    """The checkpoint the `latest` marker names, else the newest complete one; None when there is none."""
    root = Path(root)
    marker = root / LATEST_FILE
    if marker.is_file():
        name = marker.read_text(encoding="utf-8").strip()
        # The marker is data: accept only a plain step folder name (no paths, no "..").
        if _STEP_RE.match(name) and _is_complete(root / name):
            return root / name
        logger.warning("checkpoint marker %s names %r, which is not a complete checkpoint; "
                       "falling back to the newest complete one", marker, name)
    complete = _complete_checkpoints(root)
    return complete[-1][1] if complete else None


def _prune(root: Path, keep_last: Optional[int], keep: Path) -> None:
    """Delete complete checkpoints beyond the newest `keep_last` (never `keep`), and stale temporaries."""
    for child in root.iterdir():
        if child.is_dir() and child.name.startswith((_TMP_PREFIX, _OLD_PREFIX)):
            shutil.rmtree(child, ignore_errors=True)
    if keep_last is None:
        return
    complete = _complete_checkpoints(root)
    for _, path in complete[:max(len(complete) - keep_last, 0)]:
        if path != keep:
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------- save / load

def _check_save_args(step: int, trainer_state: dict, keep_last: Optional[int]) -> str:
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise ValueError(f"step must be a non-negative int, got {step!r}")
    if not isinstance(trainer_state, dict):
        raise TypeError(f"trainer_state must be a dict, got {type(trainer_state).__name__}")
    if keep_last is not None and (not isinstance(keep_last, int) or isinstance(keep_last, bool) or keep_last < 1):
        raise ValueError(f"keep_last must be a positive int or None (keep all), got {keep_last!r}")
    try:
        return json.dumps(trainer_state, indent=2, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"trainer_state must be JSON-serialisable: {exc}") from exc


def save_checkpoint(root: Union[str, Path], step: int, model: Models, optimizer: Any = None,
                    trainer_state: Optional[dict] = None, keep_last: Optional[int] = 3) -> Path:
    """Save model, optimizer, per-rank RNG and trainer state as `root/step_XXXXXXXX`; a collective call.

    Every rank must call it at the same point (after the optimizer step). Returns the folder.
    """
    from megatron.core import dist_checkpointing

    trainer_state = {} if trainer_state is None else trainer_state
    state_json = _check_save_args(step, trainer_state, keep_last)
    cpu.activate()
    root = Path(root)
    final = root / step_dir_name(step)
    tmp = root / f"{_TMP_PREFIX}{final.name}"
    rank = _rank()
    if rank == 0:
        if tmp.exists():  # left by a crashed save of this step
            shutil.rmtree(tmp)
        (tmp / DIST_DIR).mkdir(parents=True)
        (tmp / RNG_DIR).mkdir()
    _barrier()  # the folders exist before any rank writes into them

    metadata = _content_metadata()
    state = _sharded_state_dict(_chunks(model), optimizer, metadata, is_loading=False)
    dist_checkpointing.save(state, str(tmp / DIST_DIR), content_metadata=metadata)
    torch.save(_rng_state(), _rng_file(tmp, rank))
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "has_optimizer": optimizer is not None,
                **_layout()}
        _write_text_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
        _write_text_atomic(tmp / TRAINER_STATE_FILE, state_json)
    _barrier()  # every rank's shards and RNG file are on disk

    if rank == 0:
        _publish(root, tmp, final, keep_last)
    _barrier()  # nobody returns (and possibly loads) before the marker moved
    return final


def _publish(root: Path, tmp: Path, final: Path, keep_last: Optional[int]) -> None:
    """Rename the finished temporary folder into place, then move the marker, then prune."""
    old = root / f"{_OLD_PREFIX}{final.name}"
    if final.exists():  # re-saving a step (e.g. a preemption save right after a periodic one)
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(tmp, final)
    _write_text_atomic(root / LATEST_FILE, final.name + "\n")
    _prune(root, keep_last, keep=final)


def _load_rng_file(ckpt: Path, saved_world: int) -> dict:
    """This rank's RNG file, checked against the layout it was saved with."""
    if saved_world != _world_size():
        raise ValueError(f"checkpoint {ckpt} was saved by {saved_world} ranks, this run has {_world_size()}: "
                         "RNG states are per rank; pass load_rng=False to resume on another layout "
                         "(training then does not continue bit-exactly)")
    path = _rng_file(ckpt, _rank())
    if not path.is_file():
        raise FileNotFoundError(f"RNG state file {path} for rank {_rank()} is missing")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if "torch_cuda" in state and not torch.cuda.is_available():
        raise RuntimeError(f"{path} holds CUDA RNG states but CUDA is not available; pass load_rng=False")
    return state


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a complete checkpoint")
    return json.loads(path.read_text(encoding="utf-8"))


def _prepare_load(ckpt: Path, chunks: list, optimizer: Any, load_rng: bool) -> tuple[dict, dict, Optional[dict]]:
    """Validate the checkpoint on this rank; returns (trainer state, sharded state dict, RNG state)."""
    from megatron.core import dist_checkpointing

    meta = _read_json(ckpt / META_FILE)
    trainer_state = _read_json(ckpt / TRAINER_STATE_FILE)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise ValueError(f"checkpoint {ckpt} holds no optimizer state; pass optimizer=None to load weights only")
    _check_dcp_metadata(ckpt / DIST_DIR)
    with _weights_only_loads():
        metadata = dist_checkpointing.load_content_metadata(str(ckpt / DIST_DIR)) or _content_metadata()
    if optimizer is not None:
        _init_empty_distributed_state(optimizer)
    state = _sharded_state_dict(chunks, optimizer, metadata, is_loading=True)
    _check_model_shapes(ckpt, state, _model_keys(len(chunks)))
    rng = _load_rng_file(ckpt, int(meta["world_size"])) if load_rng else None
    return trainer_state, state, rng


def load_checkpoint(path: Union[str, Path], model: Models, optimizer: Any = None, *,
                    load_rng: bool = True) -> dict:
    """Restore weights, optimizer state and this rank's RNG from `path`; returns the trainer state.

    A collective call. Build the model and optimizer exactly as for training (same TP/PP/DP layout
    when load_rng is True), initialise megatron's parallel state first, then call this.
    """
    from megatron.core import dist_checkpointing

    ckpt = Path(path)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"checkpoint folder {ckpt} does not exist")
    cpu.activate()
    chunks = _chunks(model)
    error, prepared = None, None
    try:
        prepared = _prepare_load(ckpt, chunks, optimizer, load_rng)
    except Exception as exc:  # re-raised below, after every rank learnt that one failed
        error = exc
    _raise_if_any_rank_failed(error)
    trainer_state, state, rng = prepared
    # no_grad: with fp32 params the distributed optimizer's main params are views of the model's
    # leaf parameters, which autograd refuses to let copy_ write into.
    with _weights_only_loads(), torch.no_grad():
        loaded = dist_checkpointing.load(state, str(ckpt / DIST_DIR))
        for key, chunk in zip(_model_keys(len(chunks)), chunks):
            chunk.load_state_dict(loaded[key], strict=True)
        if optimizer is not None:
            optimizer.load_state_dict(loaded["optimizer"])
            _restore_step_counters(optimizer)
    if rng is not None:
        _set_rng_state(rng)
    _barrier()
    return trainer_state
