"""Checkpoints: a resumed run continues bit-exactly (weights, Adam state, RNG, data), saves are atomic,
old ones are pruned, loading is weights-only, and bad checkpoints fail with clear errors."""
from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_utils import run_distributed  # noqa: E402

from megatron_selfjudge.megatron import checkpoint as ck  # noqa: E402

VOCAB, SEQ, BATCH = 32, 8, 2
TRAINER_STATE = {"step": 2, "phase": "upt", "data": {"epoch": 0, "cursor": 4, "order_seed": 5},
                 "eval": {"greedy": 0.5}}


# ----------------------------------------------------------------------------- worker helpers

def _tiny_gpt(seed: int, ffn: int = 32):
    from megatron_selfjudge.megatron.models import build_gpt

    return build_gpt(vocab_size=VOCAB, num_layers=2, hidden_size=16, num_attention_heads=2,
                     ffn_hidden_size=ffn, max_seq_len=16, seed=seed)


def _fresh_run(tp: int, seed: int, model_seed: int):
    """Parallel state, host RNGs and a DDP model + megatron AdamW, all seeded by the arguments."""
    from megatron_selfjudge.megatron.optimizer import build_optimizer
    from megatron_selfjudge.megatron.parallel import initialize_parallel

    initialize_parallel(tp=tp, pp=1, seed=seed)
    random.seed(seed)
    np.random.seed(seed)
    return build_optimizer(_tiny_gpt(model_seed), lr=1e-2, grad_clip=1.0)


def _train(ddp, optimizer, steps: int) -> list[torch.Tensor]:
    """Plain LM steps on random tokens drawn from torch's RNG, so the data depends on restored RNG too."""
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, VOCAB, (BATCH, SEQ))
        ddp.zero_grad_buffer()
        optimizer.zero_grad()
        loss = ddp(ids, torch.arange(SEQ).expand(BATCH, SEQ), None, labels=ids).mean()
        loss.backward()
        ddp.finish_grad_sync()
        ok, _, _ = optimizer.step()
        assert ok
        losses.append(loss.detach().clone())
    return losses


def _weights(ddp) -> dict:
    return {k: v.detach().clone() for k, v in ddp.module.state_dict().items() if isinstance(v, torch.Tensor)}


def _adam_state(optimizer) -> list:
    """Every Adam state entry (moments and step counts) in parameter order, for exact comparison."""
    out = []
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        torch_opt = inner.optimizer
        for group in torch_opt.param_groups:
            for param in group["params"]:
                state = torch_opt.state[param]
                out.append({k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()})
    return out


def _rng_draws() -> tuple:
    """Draw once from each RNG a checkpoint restores, then put the generators back untouched."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    tracker = get_cuda_rng_tracker()
    saved = (random.getstate(), np.random.get_state(), torch.get_rng_state(),
             {k: v.clone() for k, v in tracker.get_states().items()})
    with tracker.fork():
        tracked = torch.rand(3)
    draws = (random.random(), float(np.random.rand()), torch.rand(3), tracked)
    random.setstate(saved[0])
    np.random.set_state(saved[1])
    torch.set_rng_state(saved[2])
    tracker.set_states(saved[3])
    return draws


def _same(a, b) -> bool:
    """Exact equality of nested tensors / numbers."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _round_trip(root: Path, tp: int, record_loads: bool = False) -> dict:
    """Train 2, save, train 2; then a differently seeded fresh run loads and trains 2."""
    ddp, optimizer = _fresh_run(tp, seed=11, model_seed=0)
    _train(ddp, optimizer, 2)
    saved_path = ck.save_checkpoint(root, 2, ddp, optimizer, TRAINER_STATE, keep_last=2)
    out = {"saved_path": str(saved_path), "draws_at_save": _rng_draws(), "weights_at_save": _weights(ddp),
           "adam_at_save": _adam_state(optimizer), "optimizer_kinds": sorted(
               type(o).__name__ for o in getattr(optimizer, "chained_optimizers", [optimizer]))}
    out["continued"] = _train(ddp, optimizer, 2)
    out["weights_end"] = _weights(ddp)

    ddp2, optimizer2 = _fresh_run(tp, seed=77, model_seed=3)
    out["fresh_differs"] = not _same(_weights(ddp2), out["weights_at_save"])
    out["draws_before_load"] = _rng_draws()
    loads = []
    original_load = torch.load

    def recording_load(*args, **kwargs):
        loads.append((kwargs.get("weights_only"), os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")))
        return original_load(*args, **kwargs)

    if record_loads:
        torch.load = recording_load
    try:
        out["trainer_state"] = ck.load_checkpoint(ck.latest_checkpoint(root), ddp2, optimizer2)
    finally:
        torch.load = original_load
    out["torch_loads"] = loads
    out["draws_after_load"] = _rng_draws()
    out["weights_after_load"] = _weights(ddp2)
    out["adam_after_load"] = _adam_state(optimizer2)
    out["resumed"] = _train(ddp2, optimizer2, 2)
    out["weights_end_resumed"] = _weights(ddp2)
    return out


def _error(fn, *args, **kwargs):
    """(exception type name, message) of what fn raises, or None."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # the tests assert on type and message
        return type(exc).__name__, str(exc)
    return None


class _RemoveFile:
    """A pickle payload that deletes a file when unpickled: proof that nothing was executed."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return os.remove, (self.path,)


def _error_cases(root: Path) -> dict:
    """Bad checkpoints and bad calls, all after a good save of step 2 under root (TP=1, one rank)."""
    good = ck.latest_checkpoint(root)
    out = {"missing_folder": _error(ck.load_checkpoint, root / "step_99999999", _tiny_gpt(0))}
    out["shape_mismatch"] = _error(ck.load_checkpoint, good, _tiny_gpt(0, ffn=48))

    no_rng = root.parent / "no_rng" / good.name
    shutil.copytree(good, no_rng)
    (no_rng / "rng" / "rank_00000.pt").unlink()
    out["missing_rank_file"] = _error(ck.load_checkpoint, no_rng, _tiny_gpt(0))

    tampered = root.parent / "tampered" / good.name
    shutil.copytree(good, tampered)
    victim = root.parent / "victim.txt"
    victim.write_text("still here")
    (tampered / "dist" / ".metadata").write_bytes(pickle.dumps(_RemoveFile(str(victim))))
    out["tampered"] = _error(ck.load_checkpoint, tampered, _tiny_gpt(0))
    ck._write_manifest(tampered)  # an attacker who rewrites the manifest too meets the restricted reader
    out["tampered_with_manifest"] = _error(ck.load_checkpoint, tampered, _tiny_gpt(0))
    out["victim_exists"] = victim.exists()
    out["damage"] = _damage_cases(root, good)

    ddp, optimizer = _fresh_run(1, seed=11, model_seed=0)
    weights_only_root = root.parent / "weights_only"
    ck.save_checkpoint(weights_only_root, 0, ddp, None, {})
    out["no_optimizer_state"] = _error(ck.load_checkpoint, ck.latest_checkpoint(weights_only_root), ddp, optimizer)
    out["weights_only_load"] = ck.load_checkpoint(ck.latest_checkpoint(weights_only_root), _tiny_gpt(5))
    out["bad_state"] = _error(ck.save_checkpoint, root, 3, ddp, optimizer, {"x": object()})
    out["bad_keep"] = _error(ck.save_checkpoint, root, 3, ddp, optimizer, {}, keep_last=0)
    return out


def _damaged_copy(root: Path, good: Path, name: str, damage, rewrite_manifest: bool = False) -> Path:
    """A copy of `good` with `damage(folder)` applied (and its manifest recomputed, if asked)."""
    folder = root.parent / f"damaged_{name}" / good.name
    shutil.copytree(good, folder)
    damage(folder)
    if rewrite_manifest:
        ck._write_manifest(folder)
    return folder


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def _payload(victim: Path, size: Optional[int] = None) -> bytes:
    """A torch.save (legacy format) of an object that deletes `victim` when unpickled, padded to `size`."""
    import io

    buf = io.BytesIO()
    torch.save(_RemoveFile(str(victim)), buf, _use_new_zipfile_serialization=False)
    data = buf.getvalue()
    assert size is None or len(data) <= size, (len(data), size)
    return data if size is None else data + b"\0" * (size - len(data))


def _replace_byte_entry(folder: Path, victim: Path) -> None:
    """Overwrite the first byte object of the shards (an extra state) with a same-sized payload."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    from megatron_selfjudge.megatron.dcp_metadata import read_metadata_file

    index = read_metadata_file(folder / "dist")
    entry, info = next((e, i) for e, i in index.storage_data.items()
                       if isinstance(index.state_dict_metadata[e.fqn], BytesStorageMetadata))
    shard = folder / "dist" / info.relative_path
    data = bytearray(shard.read_bytes())
    data[info.offset:info.offset + info.length] = _payload(victim, info.length)
    shard.write_bytes(bytes(data))


def _edit_rng(folder: Path, change) -> None:
    path = folder / "rng" / "rank_00000.pt"
    state = torch.load(path, weights_only=True)
    change(state)
    torch.save(state, path)


def _torch_positions(state: dict, left: int, nxt: int) -> None:
    import struct

    raw = bytearray(state["torch_cpu"].numpy().tobytes())
    struct.pack_into("<ii", raw, 8, left, 1)
    struct.pack_into("<Q", raw, 16, nxt)
    state["torch_cpu"] = torch.frombuffer(raw, dtype=torch.uint8).clone()


def _link_outside(folder: Path, outside: Path) -> None:
    (folder / "trainer_state.json").unlink()
    (folder / "trainer_state.json").symlink_to(outside)


def _damage_cases(root: Path, good: Path) -> dict:
    """Each kind of damage, loaded into a fresh model: (error type, message)."""
    shard = sorted((good / "dist").glob("*.distcp"))[0].name
    victim = root.parent / "damage_victim.txt"
    victim.write_text("still here")
    outside = root.parent / "outside.json"
    outside.write_text('{"secret": "outside the checkpoint"}')
    cases = {
        "shard_deleted": (lambda f: (f / "dist" / shard).unlink(), False),
        "shard_truncated": (lambda f: (f / "dist" / shard).write_bytes((f / "dist" / shard).read_bytes()[:100]), False),
        "shard_flipped_byte": (lambda f: _flip_byte(f / "dist" / shard), False),
        "common_garbage": (lambda f: (f / "dist" / "common.pt").write_bytes(os.urandom(64)), False),
        "manifest_deleted": (lambda f: (f / "manifest.json").unlink(), False),
        # With the manifest recomputed, the files' own readers must still refuse cleanly.
        "rng_garbage": (lambda f: (f / "rng" / "rank_00000.pt").write_bytes(b"\x00garbage" * 50), True),
        "trainer_state_garbage": (lambda f: (f / "trainer_state.json").write_bytes(b"\xff\xfe{not json"), True),
        "meta_garbage": (lambda f: (f / "checkpoint.json").write_text("[1, 2]"), True),
        "index_garbage": (lambda f: (f / "dist" / ".metadata").write_bytes(b"\x80\x04garbage"), True),
        # Crafted pickles where megatron and torch unpickle: refused weights-only, before the load.
        "common_payload": (lambda f: (f / "dist" / "common.pt").write_bytes(_payload(victim)), True),
        "byte_entry_payload": (lambda f: _replace_byte_entry(f, victim), True),
        # Found in review: links out of the folder, and RNG positions their readers do not check.
        "symlink_out": (lambda f: _link_outside(f, outside), True),
        "numpy_position": (lambda f: _edit_rng(f, lambda s: s["numpy"].update(pos=10**8)), True),
        "torch_position": (lambda f: _edit_rng(f, lambda s: _torch_positions(s, 624, 624)), True),
    }
    out = {}
    for name, (damage, rewrite) in cases.items():
        folder = _damaged_copy(root, good, name, damage, rewrite)
        out[name] = _error(ck.load_checkpoint, folder, _tiny_gpt(0))
    out["victim_exists"] = victim.exists()
    return out


def _atomic_and_pruning(root: Path) -> dict:
    """A save that crashes mid-way keeps `latest`; later saves clean up and keep the newest two."""
    ddp, optimizer = _fresh_run(1, seed=11, model_seed=0)
    ck.save_checkpoint(root, 2, ddp, optimizer, {"step": 2}, keep_last=2)
    original = ck._rng_state

    def crash():
        raise RuntimeError("simulated crash mid-save")

    ck._rng_state = crash
    try:
        crashed = _error(ck.save_checkpoint, root, 3, ddp, optimizer, {"step": 3}, keep_last=2)
    finally:
        ck._rng_state = original
    out = {"crashed": crashed, "after_crash_latest": ck.latest_checkpoint(root).name,
           "after_crash_entries": sorted(p.name for p in root.iterdir())}
    for step in (4, 5):
        ck.save_checkpoint(root, step, ddp, optimizer, {"step": step}, keep_last=2)
        out[f"entries_after_{step}"] = sorted(p.name for p in root.iterdir())
    out["latest"] = (root / "latest").read_text().strip()
    out["resaved"] = str(ck.save_checkpoint(root, 5, ddp, optimizer, {"step": 5, "again": True}, keep_last=2))
    out["resaved_state"] = json.loads((root / "step_00000005" / "trainer_state.json").read_text())
    out["entries_after_resave"] = sorted(p.name for p in root.iterdir())
    return out


def _single_worker(rank: int, world: int, base: str) -> dict:
    base = Path(base)
    out = {"round_trip": _round_trip(base / "run" / "checkpoints", tp=1, record_loads=True)}
    out["errors"] = _error_cases(base / "run" / "checkpoints")
    out["atomic"] = _atomic_and_pruning(base / "atomic")
    return out


def _missing_rank_file(root: Path) -> dict:
    """Rank 1's RNG file is gone: every rank must raise (none may hang); load_rng=False still loads."""
    import torch.distributed as dist

    good = ck.latest_checkpoint(root)
    broken = root.parent / f"{root.name}_broken" / good.name
    if dist.get_rank() == 0:
        shutil.copytree(good, broken)
        (broken / "rng" / "rank_00001.pt").unlink()
    dist.barrier()
    return {"error": _error(ck.load_checkpoint, broken, _tiny_gpt(0)),
            "without_rng": ck.load_checkpoint(broken, _tiny_gpt(0), load_rng=False)}


def _multi_worker(rank: int, world: int, base: str) -> dict:
    from megatron_selfjudge.megatron.parallel import destroy_parallel

    results = {}
    for name, tp in (("tp2", 2), ("dp2", 1)):  # DP=2 builds the distributed optimizer
        results[name] = _round_trip(Path(base) / name, tp=tp)
        if name == "tp2":
            results["missing_rank_file"] = _missing_rank_file(Path(base) / name)
        destroy_parallel()
    return results


# ----------------------------------------------------------------------------- assertions

def _assert_exact_resume(run: dict) -> None:
    assert run["fresh_differs"], "the fresh model must start from other weights for the test to mean anything"
    assert not _same(run["draws_before_load"], run["draws_at_save"])
    assert _same(run["weights_after_load"], run["weights_at_save"])
    assert _same(run["adam_after_load"], run["adam_at_save"])
    assert all(len(state) > 0 for state in run["adam_at_save"]), "Adam state must exist after 2 steps"
    assert _same(run["draws_after_load"], run["draws_at_save"])
    assert len(run["resumed"]) == 2
    assert all(torch.equal(a, b) for a, b in zip(run["resumed"], run["continued"]))
    assert _same(run["weights_end_resumed"], run["weights_end"])
    assert run["trainer_state"] == TRAINER_STATE


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("ckpt")
    return run_distributed(_single_worker, 1, str(base), timeout=300)[0]


def test_resume_continues_exactly(single_run):
    run = single_run["round_trip"]
    _assert_exact_resume(run)
    files = sorted(p.name for p in Path(run["saved_path"]).iterdir())
    assert files == ["checkpoint.json", "dist", "manifest.json", "rng", "trainer_state.json"]
    assert json.loads((Path(run["saved_path"]) / "checkpoint.json").read_text())["world_size"] == 1


def test_every_torch_load_is_weights_only(single_run):
    loads = single_run["round_trip"]["torch_loads"]
    assert loads, "loading must go through torch.load"
    # torch.load's rule: TORCH_FORCE_WEIGHTS_ONLY_LOAD=1 overrides the argument, even an explicit
    # weights_only=False (torch.distributed.checkpoint passes that for byte objects); else it must be True.
    bad = [(flag, env) for flag, env in loads if not (env == "1" or flag is True)]
    assert not bad, bad
    assert any(flag is False for flag, _ in loads), "expected DCP's weights_only=False calls, now overridden"


def test_rng_files_hold_only_tensors_and_plain_values(single_run):
    path = Path(single_run["round_trip"]["saved_path"]) / "rng" / "rank_00000.pt"
    state = torch.load(path, weights_only=True)
    assert set(state) >= {"python", "numpy", "torch_cpu", "megatron_tracker"}
    assert state["python"]["state"].shape == (625,) and state["numpy"]["keys"].shape == (624,)


def test_clear_errors(single_run):
    errors = single_run["errors"]
    assert errors["missing_folder"][0] == "FileNotFoundError" and "step_99999999" in errors["missing_folder"][1]
    kind, message = errors["shape_mismatch"]
    # The layers are stacked in the checkpoint: (num_layers, ffn_hidden, hidden).
    assert kind == "ValueError" and "'decoder.layers.mlp.linear_fc1.weight'" in message, message
    assert "checkpoint shape (2, 32, 16), model shape (2, 48, 16)" in message, message
    kind, message = errors["missing_rank_file"]  # the manifest lists it
    assert kind == "CheckpointDamaged" and "rank_00000.pt is missing" in message, message
    kind, message = errors["tampered"]  # caught by its digest before it is ever unpickled
    assert kind == "CheckpointDamaged" and ".metadata has " in message and "were saved" in message, message
    kind, message = errors["tampered_with_manifest"]
    assert kind == "CheckpointDamaged" and "disallowed object posix.remove" in message, message
    assert errors["victim_exists"], "the tampered metadata must not be executed"
    assert errors["no_optimizer_state"][0] == "ValueError" and "optimizer" in errors["no_optimizer_state"][1]
    assert errors["weights_only_load"] == {}
    assert errors["bad_state"][0] == "TypeError" and "trainer_state" in errors["bad_state"][1]
    assert errors["bad_keep"][0] == "ValueError" and "keep_last" in errors["bad_keep"][1]


@pytest.mark.parametrize("case,file,words", [
    ("shard_deleted", ".distcp", "is missing"),
    ("shard_truncated", ".distcp", "bytes"),
    ("shard_flipped_byte", ".distcp", "SHA-256"),
    ("common_garbage", "common.pt", "bytes"),
    ("manifest_deleted", "manifest.json", "is missing"),
    ("rng_garbage", "rank_00000.pt", "unreadable"),
    ("trainer_state_garbage", "trainer_state.json", "not valid JSON"),
    ("meta_garbage", "checkpoint.json", "not a JSON object"),
    ("index_garbage", ".metadata", "not a readable checkpoint index"),
    ("common_payload", "common.pt", "something other than tensors"),
    ("byte_entry_payload", ".distcp (entry", "something other than tensors"),
    ("symlink_out", "trainer_state.json", "not a plain file or folder"),
    ("numpy_position", "rank_00000.pt", "numpy RNG state"),
    ("torch_position", "rank_00000.pt", "impossible position (left 624, next 624)"),
])
def test_damage_is_one_error_naming_the_file(single_run, case, file, words):
    kind, message = single_run["errors"]["damage"][case]
    assert kind == "CheckpointDamaged", (kind, message)
    assert file in message and words in message and "\n" not in message, message


def test_crafted_pickles_never_run(single_run):
    assert single_run["errors"]["damage"]["victim_exists"]


def test_manifest_lists_every_file_with_its_digest(single_run):
    import hashlib

    folder = Path(single_run["round_trip"]["saved_path"])
    manifest = json.loads((folder / "manifest.json").read_text())
    on_disk = sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                     if p.is_file() and p.name != "manifest.json")
    assert sorted(manifest["files"]) == on_disk and "dist/.metadata" in on_disk
    for name, entry in manifest["files"].items():
        data = (folder / name).read_bytes()
        assert entry == {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def test_crash_mid_save_keeps_latest_and_pruning_keeps_newest(single_run):
    atomic = single_run["atomic"]
    assert atomic["crashed"] == ("RuntimeError", "simulated crash mid-save")
    assert atomic["after_crash_latest"] == "step_00000002"
    assert ".tmp.step_00000003" in atomic["after_crash_entries"]  # the half-written folder is left...
    assert "step_00000003" not in atomic["after_crash_entries"]
    # ...ignored, then removed by the next save; keep_last=2 keeps the two newest.
    assert atomic["entries_after_4"] == ["latest", "step_00000002", "step_00000004"]
    assert atomic["entries_after_5"] == ["latest", "step_00000004", "step_00000005"]
    assert atomic["latest"] == "step_00000005"
    assert atomic["resaved_state"] == {"step": 5, "again": True}
    assert atomic["entries_after_resave"] == ["latest", "step_00000004", "step_00000005"]


def _fake_checkpoint(path: Path) -> None:
    """The files latest_checkpoint looks for (contents are irrelevant to it)."""
    (path / "dist").mkdir(parents=True)
    for name in ("checkpoint.json", "trainer_state.json", "dist/metadata.json"):
        (path / name).write_text("{}")


def test_latest_marker_ignores_temporaries_and_bad_markers(tmp_path):
    assert ck.latest_checkpoint(tmp_path / "absent") is None
    assert ck.latest_checkpoint(tmp_path) is None
    _fake_checkpoint(tmp_path / "step_00000004")
    _fake_checkpoint(tmp_path / "step_00000008")
    _fake_checkpoint(tmp_path / ".tmp.step_00000012")  # complete-looking but never published
    (tmp_path / "step_00000010").mkdir()  # incomplete
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_00000008"  # no marker: newest complete
    (tmp_path / "latest").write_text("step_00000004\n")
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_00000004"  # the marker wins
    for bad in ("step_00000010", "step_00000099", "../step_00000004", "/etc"):
        (tmp_path / "latest").write_text(bad)
        assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_00000008", bad
    (tmp_path / "latest").write_bytes(b"\xff\xfe\x00\x80" * 100)  # binary garbage: no traceback
    assert ck.latest_checkpoint(tmp_path) == tmp_path / "step_00000008"


def test_candidates_put_the_marker_first_then_newest_complete(tmp_path):
    assert ck.checkpoint_candidates(tmp_path) == [] and not ck.has_step_checkpoints(tmp_path)
    for step in (4, 8, 12):
        _fake_checkpoint(tmp_path / ck.step_dir_name(step))
    (tmp_path / "step_00000016").mkdir()  # incomplete: never a candidate, but a sign of an earlier run
    (tmp_path / "latest").write_text("step_00000008\n")
    assert [p.name for p in ck.checkpoint_candidates(tmp_path)] == ["step_00000008", "step_00000012",
                                                                    "step_00000004"]
    assert ck.has_step_checkpoints(tmp_path)


def test_step_dir_names_sort_by_step():
    names = [ck.step_dir_name(s) for s in (3, 20, 100, 12345678)]
    assert names == sorted(names) and names[0] == "step_00000003"


@pytest.mark.slow
def test_tp2_and_dp2_resume_continue_exactly(tmp_path):
    ranks = run_distributed(_multi_worker, 2, str(tmp_path), timeout=420)
    for rank, results in enumerate(ranks):
        for name in ("tp2", "dp2"):
            run = results[name]
            try:
                _assert_exact_resume(run)
            except AssertionError as exc:
                raise AssertionError(f"rank {rank}, {name}: {exc}") from exc
    assert ranks[0]["tp2"]["optimizer_kinds"] == ["FP32Optimizer"]
    assert ranks[0]["dp2"]["optimizer_kinds"] == ["DistributedOptimizer"]
    # TP ranks hold different shards and different tracker streams: the per-rank files matter.
    assert not _same(ranks[0]["tp2"]["weights_at_save"], ranks[1]["tp2"]["weights_at_save"])
    assert not _same(ranks[0]["tp2"]["draws_at_save"][3], ranks[1]["tp2"]["draws_at_save"][3])
    # DP ranks hold different shards of the distributed optimizer state.
    assert not _same(ranks[0]["dp2"]["adam_at_save"], ranks[1]["dp2"]["adam_at_save"])
    missing = [r["missing_rank_file"] for r in ranks]
    # The ranks share the digest checks, so one finds the loss and every rank raises the same kind
    # of error (the trainer's fallback decision must agree across ranks).
    errors = [m["error"] for m in missing]
    assert all(kind == "CheckpointDamaged" for kind, _ in errors), errors
    assert any("rank_00001.pt is missing" in message for _, message in errors), errors
    assert missing[0]["without_rng"] == missing[1]["without_rng"] == TRAINER_STATE
