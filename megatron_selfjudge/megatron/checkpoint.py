"""Resumable training checkpoints: megatron dist-checkpoint of model + optimizer, RNG, trainer state.

Layout under a checkpoint root (the run directory's ``checkpoints/``)::

    latest                    text file: name of the newest complete checkpoint ("step_00000040")
    step_00000040/
        dist/                 megatron-core dist_checkpointing folder: every rank writes its own
                              shards of the model and optimizer (any TP/PP/DP layout)
        rng/rank_00000.pt     per global rank: python, numpy, torch CPU/CUDA and megatron RNG-tracker
                              states (tensors and plain numbers only: loaded with weights_only=True)
        trainer_state.json    what the trainer passed (step, phase, data cursor, eval results...)
        checkpoint.json       format version, step, world size, TP/PP/DP sizes, whether optimizer
                              state is inside
        manifest.json         size and SHA-256 of every other file, written last before publishing

Use (every rank calls both, at the same point)::

    ckpt = latest_checkpoint(run_dir / "checkpoints")          # or checkpoint_candidates(), best first
    state = load_checkpoint(ckpt, ddp_model, optimizer) if ckpt else {"step": 0}
    ...after optimizer.step() and after the step's metrics are written:
    save_checkpoint(run_dir / "checkpoints", step, ddp_model, optimizer,
                    {"step": step, "data": {...cursor...}}, keep_last=3)

Crash safety: everything is written into ``.tmp.step_XXXXXXXX`` and renamed into place only after
all ranks finished; the ``latest`` marker is replaced (write-then-rename) last. A crash mid-save
leaves at worst a hidden temporary folder, which `latest_checkpoint` ignores and the next save
deletes. Multi-node runs need the root on a filesystem all nodes share.

Damage: before any state is touched, every rank checks its share of the files against
``manifest.json`` (each rank hashed its share at save time too), so a flipped byte, a truncated or
deleted shard, or garbage in the RNG or trainer-state files raises `CheckpointDamaged` naming the
file on every rank, instead of NaNs later. The caller may then try the next of
`checkpoint_candidates` (the trainer does, and says so).

Unsafe deserialisation: our own files load with ``torch.load(weights_only=True)``. Inside the
library, megatron reads ``common.pt`` with torch.load's default and torch.distributed.checkpoint
reads byte objects (megatron's ShardedObjects) with an explicit ``weights_only=False``;
`load_checkpoint` sets TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 for the duration of the load, which torch
applies over both. torch.distributed.checkpoint also reads its ``.metadata`` index with plain
pickle: `dcp_metadata` reads it once with an unpickler that admits exact class names only,
checks the result, and hands that object to every reader during the load (the file is never
unpickled by torch's own reader).

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
import hashlib
import io
import json
import logging
import os
import random
import re
import shutil
import stat
import struct
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist

from megatron_selfjudge.megatron import cpu, dcp_metadata
from megatron_selfjudge.megatron.optimizer import is_fresh, reset_optimizer_state
from megatron_selfjudge.runtime.files import write_atomic
from megatron_selfjudge.runtime.ranks import any_rank, raise_if_any_rank_failed
from megatron_selfjudge.runtime.run_state import CheckpointDamaged

logger = logging.getLogger(__name__)

LATEST_FILE = "latest"
DIST_DIR = "dist"
RNG_DIR = "rng"
TRAINER_STATE_FILE = "trainer_state.json"
META_FILE = "checkpoint.json"
MANIFEST_FILE = "manifest.json"
# 2: manifest.json with a SHA-256 of every file. Version-1 checkpoints (no manifest) still load, unverified.
FORMAT_VERSION = 2
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


_MT_N = 624  # words of a Mersenne-Twister state (Python, numpy and torch's CPU generator)
_TORCH_CPU_STATE_BYTES = 5056


def _torch_cpu_state_problem(state: Any, what: str) -> Optional[str]:
    """Why a torch CPU generator state is not one torch could have written (its reader checks little)."""
    if not isinstance(state, torch.Tensor) or state.dtype != torch.uint8 or state.numel() != _TORCH_CPU_STATE_BYTES:
        return f"{what} is not a torch CPU generator state"
    _, left, seeded, nxt = struct.unpack_from("<QiiQ", state.numpy().tobytes(), 0)
    # Just seeded: left 1, next 0; after draws: left + next = N + 1 with 1 <= left <= N.
    if seeded != 1 or not ((left == 1 and nxt == 0) or (1 <= left <= _MT_N and left + nxt == _MT_N + 1)):
        return f"{what} has an impossible position (left {left}, next {nxt})"
    return None


def _rng_state_problem(state: dict) -> Optional[str]:
    """Why a loaded RNG state must not be restored (its readers trust their input), or None.

    numpy and torch index their state arrays with the saved positions: an out-of-range one reads
    memory beyond them (numpy crashes), so positions and sizes are checked here.
    """
    try:
        py, npy = state["python"], state["numpy"]
        if py["state"].shape != (_MT_N + 1,) or not 0 <= int(py["state"][-1]) <= _MT_N:
            return "the Python RNG state has the wrong size or position"
        if npy["kind"] != "MT19937" or npy["keys"].shape != (_MT_N,) or not 0 <= int(npy["pos"]) <= _MT_N \
                or int(npy["has_gauss"]) not in (0, 1):
            return "the numpy RNG state has the wrong kind, size or position"
    except (KeyError, TypeError, AttributeError, ValueError):
        return "the Python or numpy RNG state is malformed"
    states = [("the torch CPU state", state["torch_cpu"])]
    if not isinstance(state["megatron_tracker"], dict):
        return "the megatron RNG tracker states are malformed"
    # On the CPU runtime the tracker's streams are CPU generator states too (CUDA ones are seed + offset).
    states += [(f"tracker stream {name!r}", value) for name, value in state["megatron_tracker"].items()
               if not torch.cuda.is_available()]
    return next((p for p in (_torch_cpu_state_problem(v, w) for w, v in states) if p), None)


def _rng_file(ckpt: Path, rank: int) -> Path:
    return ckpt / RNG_DIR / f"rank_{rank:05d}.pt"


# ----------------------------------------------------------------------------- safe loading

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


# ----------------------------------------------------------------------------- file digests

def _checkpoint_files(ckpt: Path) -> list[str]:
    """Every file under a checkpoint folder but the manifest, as sorted relative POSIX paths."""
    return sorted(p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*")
                  if p.is_file() and p.name != MANIFEST_FILE)


def _sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _gather_share(mine: dict) -> dict:
    """Union of every rank's dict (all ranks get it)."""
    if _world_size() == 1:
        return mine
    parts: list = [None] * _world_size()
    dist.all_gather_object(parts, mine)
    return {k: v for part in parts for k, v in part.items()}


def _write_manifest(tmp: Path) -> None:
    """Digest the finished checkpoint (each rank hashes its share of the files); rank 0 writes it."""
    names = _checkpoint_files(tmp) if _rank() == 0 else None
    if _world_size() > 1:
        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    mine = {n: {"size": (tmp / n).stat().st_size, "sha256": _sha256(tmp / n)}
            for n in names[_rank()::_world_size()]}
    files = _gather_share(mine)
    if _rank() == 0:
        write_atomic(tmp / MANIFEST_FILE, json.dumps({"algorithm": "sha256", "files": files},
                                                           indent=1, sort_keys=True))


def _refuse_links(ckpt: Path) -> None:
    """Refuse a checkpoint folder that is, or holds, a symlink or anything but folders and regular files.

    Every reader below follows links, so one would make a load read a file outside the checkpoint.
    """
    if ckpt.is_symlink():
        raise CheckpointDamaged(f"checkpoint folder {ckpt} is a symbolic link")
    for folder, dirs, files in os.walk(ckpt, followlinks=False):
        for name in dirs + files:
            path = Path(folder) / name
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode) or not (stat.S_ISDIR(mode) or stat.S_ISREG(mode)):
                raise CheckpointDamaged(f"checkpoint entry {path} is not a plain file or folder (a link?)")


def _verify_manifest(ckpt: Path, format_version: int, skip: tuple[str, ...] = ()) -> None:
    """Check this rank's share of the files against the manifest; raise CheckpointDamaged naming the file.

    Entries starting with a prefix in `skip` are not read by this load and are not checked.
    """
    path = ckpt / MANIFEST_FILE
    if not path.is_file():
        if format_version >= 2:
            raise CheckpointDamaged(f"{path} is missing: the checkpoint's files cannot be verified")
        logger.warning("checkpoint %s (format %d) has no manifest: its files are not verified", ckpt, format_version)
        return
    manifest = _read_json(path)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or manifest.get("algorithm") != "sha256":
        raise CheckpointDamaged(f"{path} is not a checkpoint manifest")
    names = sorted(n for n in files if not n.startswith(skip))
    for name in names[_rank()::_world_size()]:
        entry, target = files[name], ckpt / name
        # Names are data: plain relative paths inside the folder only.
        if name.startswith("/") or ".." in name.split("/") or not isinstance(entry, dict):
            raise CheckpointDamaged(f"{path} lists an invalid entry {name!r}")
        if not target.is_file():
            raise CheckpointDamaged(f"checkpoint file {target} is missing")
        size = target.stat().st_size
        if size != entry.get("size"):
            raise CheckpointDamaged(f"checkpoint file {target} has {size} bytes, {entry.get('size')} were saved "
                                    "(truncated or replaced)")
        if _sha256(target) != entry.get("sha256"):
            raise CheckpointDamaged(f"checkpoint file {target} does not match its saved SHA-256 (altered or corrupt)")


# ----------------------------------------------------------------------------- files and markers

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


def checkpoint_candidates(root: Union[str, Path]) -> list[Path]:
    """Checkpoints to resume from, best first: the one `latest` names, then the complete ones, newest first."""
    root = Path(root)
    complete = [path for _, path in reversed(_complete_checkpoints(root))]
    marker = root / LATEST_FILE
    if marker.is_file():
        # The marker is data: accept only a plain step folder name (no paths, no ".."), whatever its bytes.
        name = marker.read_bytes()[:64].decode("utf-8", errors="replace").strip()
        if _STEP_RE.match(name) and _is_complete(root / name):
            return [root / name] + [p for p in complete if p.name != name]
        logger.warning("checkpoint marker %s names %r, which is not a complete checkpoint; "
                       "falling back to the newest complete one", marker, name)
    return complete


def latest_checkpoint(root: Union[str, Path]) -> Optional[Path]:
    """The checkpoint the `latest` marker names, else the newest complete one; None when there is none."""
    candidates = checkpoint_candidates(root)
    return candidates[0] if candidates else None


def has_step_checkpoints(root: Union[str, Path]) -> bool:
    """Whether root holds any step folder or marker, usable or not (a run has saved there before)."""
    root = Path(root)
    return root.is_dir() and any(_STEP_RE.match(c.name) or c.name == LATEST_FILE for c in root.iterdir())


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
    # A never-stepped optimizer holds nothing to save, and megatron-core 0.16.1 writes a checkpoint
    # of one that it cannot load (no Adam moments, the zero step dropped): record it as fresh.
    fresh = optimizer is not None and is_fresh(optimizer)
    state = _sharded_state_dict(_chunks(model), None if fresh else optimizer, metadata, is_loading=False)
    dist_checkpointing.save(state, str(tmp / DIST_DIR), content_metadata=metadata)
    torch.save(_rng_state(), _rng_file(tmp, rank))
    if rank == 0:
        meta = {"format_version": FORMAT_VERSION, "step": step, "has_optimizer": optimizer is not None,
                "optimizer_fresh": fresh,
                **_layout()}
        write_atomic(tmp / META_FILE, json.dumps(meta, indent=2))
        write_atomic(tmp / TRAINER_STATE_FILE, state_json)
    _barrier()  # every rank's shards and RNG file are on disk
    _write_manifest(tmp)

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
    write_atomic(root / LATEST_FILE, final.name + "\n")
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
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch reports garbage through several exception types
        raise CheckpointDamaged(f"RNG state file {path} is unreadable ({type(exc).__name__})") from None
    if not isinstance(state, dict) or not {"python", "numpy", "torch_cpu", "megatron_tracker"} <= set(state):
        raise CheckpointDamaged(f"RNG state file {path} does not hold this project's RNG states")
    problem = _rng_state_problem(state)
    if problem:
        raise CheckpointDamaged(f"RNG state file {path}: {problem}")
    if "torch_cuda" in state and not torch.cuda.is_available():
        raise RuntimeError(f"{path} holds CUDA RNG states but CUDA is not available; pass load_rng=False")
    return state


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: not a complete checkpoint")
    try:
        value = json.loads(path.read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointDamaged(f"checkpoint file {path} is not valid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise CheckpointDamaged(f"checkpoint file {path} holds a {type(value).__name__}, not a JSON object")
    return value


def _read_index(ckpt: Path) -> Any:
    """The checked dist-checkpoint index (see dcp_metadata), or CheckpointDamaged naming the file."""
    try:
        return dcp_metadata.read_metadata_file(ckpt / DIST_DIR)
    except dcp_metadata.UnsafeMetadataError as exc:
        raise CheckpointDamaged(str(exc)) from None


def _check_pickled_entries(ckpt: Path, index: Any) -> None:
    """Unpickle common.pt and every byte object of the shards weights-only, before the collective load.

    The load would refuse a non-tensor payload too (TORCH_FORCE_WEIGHTS_ONLY_LOAD), but mid-load,
    as a traceback; here the refusal is a CheckpointDamaged naming the file, on every rank, so a
    resume can fall back. Byte objects are small (extra states, scalars).
    """
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    def weights_only(data: bytes, where: str) -> None:
        try:
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch reports refusals and garbage through several types
            raise CheckpointDamaged(f"{where} holds something other than tensors and plain values "
                                    f"({type(exc).__name__})") from None

    common = ckpt / DIST_DIR / "common.pt"
    if common.is_file():
        weights_only(common.read_bytes(), f"checkpoint file {common}")
    byte_entries = {k for k, v in index.state_dict_metadata.items() if isinstance(v, BytesStorageMetadata)}
    for entry, info in index.storage_data.items():
        if entry.fqn in byte_entries and not info.transform_descriptors:
            shard = ckpt / DIST_DIR / info.relative_path
            with open(shard, "rb") as f:
                f.seek(info.offset)
                weights_only(f.read(info.length), f"checkpoint file {shard} (entry {entry.fqn!r})")


def _read_meta(ckpt: Path) -> dict:
    """checkpoint.json, with the fields loading relies on checked."""
    meta = _read_json(ckpt / META_FILE)
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= FORMAT_VERSION:
        raise CheckpointDamaged(f"{ckpt / META_FILE}: format_version {version!r} is not one this build reads "
                                f"(1..{FORMAT_VERSION})")
    if not isinstance(meta.get("world_size"), int):
        raise CheckpointDamaged(f"{ckpt / META_FILE}: world_size {meta.get('world_size')!r} is not an integer")
    return meta


def _prepare_load(ckpt: Path, meta: dict, chunks: list, optimizer: Any, load_rng: bool,
                  index: Any) -> tuple[dict, dict, Optional[dict]]:
    """Validate the checkpoint on this rank; returns (trainer state, sharded state dict, RNG state).

    Runs inside `dcp_metadata.reading_metadata`, so megatron's reads of the index get the checked one.
    """
    from megatron.core import dist_checkpointing

    trainer_state = _read_json(ckpt / TRAINER_STATE_FILE)
    _check_pickled_entries(ckpt, index)
    if optimizer is not None and not meta.get("has_optimizer"):
        raise ValueError(f"checkpoint {ckpt} holds no optimizer state; pass optimizer=None to load weights only")
    with _weights_only_loads():
        metadata = dist_checkpointing.load_content_metadata(str(ckpt / DIST_DIR)) or _content_metadata()
    if optimizer is not None and meta.get("optimizer_fresh"):
        reset_optimizer_state(optimizer)  # the saved optimizer had never stepped: so must this one
        optimizer = None
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
    error, prepared, index = None, None, None
    try:
        # Every file against its saved digest first, so damage is found before any state changes.
        _refuse_links(ckpt)
        meta = _read_meta(ckpt)
        _verify_manifest(ckpt, meta["format_version"], skip=() if load_rng else (RNG_DIR + "/",))
        index = _read_index(ckpt)
        with dcp_metadata.reading_metadata(ckpt / DIST_DIR, index):
            prepared = _prepare_load(ckpt, meta, chunks, optimizer, load_rng, index)
    except Exception as exc:  # re-raised below, after every rank learnt that one failed
        error = exc
    # Damage anywhere is damage everywhere, so every rank takes the same fallback decision.
    if any_rank(isinstance(error, CheckpointDamaged)) and not isinstance(error, CheckpointDamaged):
        error = CheckpointDamaged(f"checkpoint {ckpt} is damaged (reported by another rank)")
    raise_if_any_rank_failed(error, "checkpoint loading")
    trainer_state, state, rng = prepared
    # no_grad: with fp32 params the distributed optimizer's main params are views of the model's
    # leaf parameters, which autograd refuses to let copy_ write into.
    with dcp_metadata.reading_metadata(ckpt / DIST_DIR, index), _weights_only_loads(), torch.no_grad():
        loaded = dist_checkpointing.load(state, str(ckpt / DIST_DIR))
        for key, chunk in zip(_model_keys(len(chunks)), chunks):
            chunk.load_state_dict(loaded[key], strict=True)
        if optimizer is not None and "optimizer" in loaded:  # absent: saved fresh (see save_checkpoint)
            optimizer.load_state_dict(loaded["optimizer"])
            _restore_step_counters(optimizer)
    if rng is not None:
        _set_rng_state(rng)
    _barrier()
    return trainer_state
