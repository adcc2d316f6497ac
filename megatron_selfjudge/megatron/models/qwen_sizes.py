"""Sizes of HF Qwen2.5-VL and Qwen2 / Qwen2.5 text models from their config.json alone.

The pre-flight checks, the memory estimate and `selfjudge train --dry-run` need the layer sizes
and the parameter count of a 7B model without building it, loading weights or importing
transformers or megatron: this module reads the config as plain JSON.

Counts follow the HF modules (transformers 5.19, identical in the megatron build: mbridge fuses
q/k/v into one linear of the same size):
- vision tower (Qwen2.5-VL): Conv3d patch embedding without bias (in_channels x temporal_patch x
  patch x patch -> hidden); per block two RMSNorms, qkv and proj linears with bias, a SwiGLU MLP
  with bias. Window-attention and full-attention blocks (`fullatt_block_indexes`) differ only in
  their attention mask, not in parameters. The merger: an RMSNorm over the ViT width, then
  Linear(hidden*merge^2 -> same) and Linear(-> out_hidden), both with bias.
- decoder: per layer two RMSNorms, q/k/v with bias (grouped-query: k and v have
  num_key_value_heads x head_dim outputs), o_proj without bias, a SwiGLU MLP without bias;
  the token embedding, the final RMSNorm, and the output layer unless tie_word_embeddings.

Both the transformers-5 layout (text sizes under `text_config`) and the earlier flat layout of
the published checkpoints (text sizes at the top level, `in_chans`) are read.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional, Union

from megatron_selfjudge.config import ConfigError

# The model types whose layout this module (and the Qwen families) know.
VL_MODEL_TYPES = ("qwen2_5_vl",)
TEXT_MODEL_TYPES = ("qwen2",)
MAX_CONFIG_JSON_BYTES = 1 << 20  # a config.json is a few KB; a wrong path must not make us read gigabytes


class HFConfigError(ConfigError):
    """A config.json that cannot be read or lacks a size this module needs (one line, names the file)."""


@dataclass(frozen=True)
class VisionSizes:
    """The Qwen2.5-VL vision tower's sizes."""

    depth: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    out_hidden_size: int
    patch_size: int
    temporal_patch_size: int
    spatial_merge_size: int
    in_channels: int
    window_size: int
    fullatt_block_indexes: tuple[int, ...]


@dataclass(frozen=True)
class QwenSizes:
    """The decoder's sizes (and the vision tower's, for a VL model) of one config.json."""

    model_type: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool
    vision: Optional[VisionSizes]

    @property
    def vision_language(self) -> bool:
        """Whether the model has a vision tower (Qwen2.5-VL)."""
        return self.vision is not None


def _int(section: Mapping[str, Any], key: str, where: str, default: Optional[int] = None) -> int:
    value = section.get(key, default)
    if value is None:
        raise HFConfigError(f"{where}: {key} is missing")
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise HFConfigError(f"{where}: {key}={value!r} must be a positive integer")
    return value


def sizes(hf_config: Mapping[str, Any], where: str = "config.json") -> QwenSizes:
    """The sizes of a parsed config.json (`where` names it in errors)."""
    if not isinstance(hf_config, Mapping):
        raise HFConfigError(f"{where} must hold a JSON object")
    model_type = hf_config.get("model_type")
    if model_type not in VL_MODEL_TYPES + TEXT_MODEL_TYPES:
        raise HFConfigError(f"{where}: model_type {model_type!r} is not supported "
                            f"(supported: {', '.join(VL_MODEL_TYPES + TEXT_MODEL_TYPES)})")
    vl = model_type in VL_MODEL_TYPES
    # transformers 5 writes a VL model's text sizes under text_config; older saves keep them on top.
    text = hf_config.get("text_config") or hf_config
    if not isinstance(text, Mapping):
        raise HFConfigError(f"{where}: text_config must be a JSON object")
    hidden = _int(text, "hidden_size", where)
    heads = _int(text, "num_attention_heads", where)
    kv_heads = _int(text, "num_key_value_heads", where, default=heads)
    if heads % kv_heads:
        raise HFConfigError(f"{where}: num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
    if text.get("head_dim") is None and hidden % heads:
        raise HFConfigError(f"{where}: hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    # Pre-v5 VL saves placed tie_word_embeddings inside text_config; transformers forwards it to the top.
    tied = bool(hf_config.get("tie_word_embeddings", False) or (vl and text.get("tie_word_embeddings", False)))
    vision = None
    if vl:
        v = hf_config.get("vision_config")
        if not isinstance(v, Mapping):
            raise HFConfigError(f"{where}: a {model_type} config needs a vision_config object")
        vw = f"{where} vision_config"
        full = v.get("fullatt_block_indexes", [])
        vision = VisionSizes(
            depth=_int(v, "depth", vw), hidden_size=_int(v, "hidden_size", vw),
            intermediate_size=_int(v, "intermediate_size", vw), num_heads=_int(v, "num_heads", vw),
            out_hidden_size=_int(v, "out_hidden_size", vw, default=hidden), patch_size=_int(v, "patch_size", vw),
            temporal_patch_size=_int(v, "temporal_patch_size", vw, default=2),
            spatial_merge_size=_int(v, "spatial_merge_size", vw, default=2),
            in_channels=_int(v, "in_channels", vw, default=v.get("in_chans", 3)),
            window_size=_int(v, "window_size", vw, default=112),
            fullatt_block_indexes=tuple(int(i) for i in full) if isinstance(full, list) else ())
        if vision.hidden_size % vision.num_heads:
            raise HFConfigError(f"{vw}: hidden_size={vision.hidden_size} is not divisible by "
                                f"num_heads={vision.num_heads}")
    return QwenSizes(model_type=model_type, num_layers=_int(text, "num_hidden_layers", where), hidden_size=hidden,
                     num_attention_heads=heads, num_key_value_heads=kv_heads,
                     head_dim=_int(text, "head_dim", where, default=hidden // heads),
                     intermediate_size=_int(text, "intermediate_size", where),
                     vocab_size=_int(text, "vocab_size", where, default=hf_config.get("vocab_size")),
                     tie_word_embeddings=tied, vision=vision)


def read_config(hf_path: Union[str, Path]) -> dict:
    """The parsed config.json of a local HF folder (nothing else in it is read)."""
    file = Path(hf_path) / "config.json"
    if not Path(hf_path).is_dir():
        raise HFConfigError(f"model.hf_path={str(hf_path)!r} is not a folder")
    if not file.is_file():
        raise HFConfigError(f"model folder {str(hf_path)!r} has no config.json")
    from megatron_selfjudge.runtime.files import read_bounded

    data = read_bounded(file, MAX_CONFIG_JSON_BYTES, str(file), HFConfigError, "a config.json is a few KB")
    try:
        parsed = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise HFConfigError(f"{file} is not valid JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise HFConfigError(f"{file} must hold a JSON object")
    return parsed


def folder_sizes(hf_path: Union[str, Path]) -> QwenSizes:
    """`sizes` of a local HF folder's config.json."""
    return sizes(read_config(hf_path), where=str(Path(hf_path) / "config.json"))


def decoder_layer_parameters(s: QwenSizes) -> int:
    """Parameters of one decoder layer (two norms, q/k/v with bias, o_proj, SwiGLU MLP)."""
    h, q, kv = s.hidden_size, s.num_attention_heads * s.head_dim, s.num_key_value_heads * s.head_dim
    attention = (h * q + q) + 2 * (h * kv + kv) + q * h
    return 2 * h + attention + 3 * h * s.intermediate_size


def _vision_counts(v: VisionSizes) -> dict[str, int]:
    hv, fv = v.hidden_size, v.intermediate_size
    block = 2 * hv + (hv * 3 * hv + 3 * hv) + (hv * hv + hv) + 2 * (hv * fv + fv) + (fv * hv + hv)
    merged = hv * v.spatial_merge_size ** 2
    return {
        "vision_patch_embed": v.in_channels * v.temporal_patch_size * v.patch_size ** 2 * hv,
        "vision_blocks": v.depth * block,
        "vision_merger": hv + (merged * merged + merged) + (merged * v.out_hidden_size + v.out_hidden_size),
    }


def parameter_counts(hf_config: Union[Mapping[str, Any], QwenSizes]) -> dict[str, int]:
    """Parameters per part of a Qwen2.5-VL or Qwen2 / Qwen2.5 model, from its parsed config.json (or its sizes).

    Parts (each present for every model; the vision ones are 0 for a text model, lm_head 0 when
    tied): vision_patch_embed, vision_blocks, vision_merger, embedding, decoder_layers,
    final_norm, lm_head. Their sum is the whole model (`sum(counts.values())`).
    """
    s = hf_config if isinstance(hf_config, QwenSizes) else sizes(hf_config)
    counts = _vision_counts(s.vision) if s.vision else dict.fromkeys(
        ("vision_patch_embed", "vision_blocks", "vision_merger"), 0)
    counts.update({
        "embedding": s.vocab_size * s.hidden_size,
        "decoder_layers": s.num_layers * decoder_layer_parameters(s),
        "final_norm": s.hidden_size,
        "lm_head": 0 if s.tie_word_embeddings else s.vocab_size * s.hidden_size,
    })
    return counts
