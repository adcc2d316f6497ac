"""Model families and the megatron-core builders they use.

- `family`: the model-family interface and its registry (light: no torch at import, so config
  validation can read the family names).
- `tiny`: the in-process tiny families (text GPT, LLaVA-style) of the embedded default.
- `builders`: layout-invariant builders of megatron-core GPTModel and a tiny LLaVAModel, and the
  Transformer Engine / local layer-spec choice.
- `qwen_family`, `qwen`, `mbridge_compat`, `qwen_sizes`, `tiny_hf`: HF Qwen2.5-VL / Qwen2.5 folders
  through mbridge; `convert`: `selfjudge convert` between those folders and megatron checkpoints.

`from megatron_selfjudge.megatron import models; models.build_gpt(...)` keeps working: the
builders' names resolve lazily here, so importing the package stays cheap.
"""
from __future__ import annotations

import importlib
from typing import Any


def __getattr__(name: str) -> Any:
    if name.startswith("__"):  # dunder look-ups (pickling, import machinery) are not builders
        raise AttributeError(name)
    # import_module, not "from . import builders": that would ask this __getattr__ for "builders".
    builders = importlib.import_module(f"{__name__}.builders")
    try:
        return getattr(builders, name)
    except AttributeError:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
