"""Builders for megatron-core policies: a text GPTModel and a tiny LLaVA (CLIP ViT + MLP + GPT).

Initialisation is layout-invariant: with `use_cpu_initialization` megatron draws every weight
full-size from the CPU generator and keeps this rank's shard, so TP shards equal the TP=1 weights.
Pipeline stages build different subsets of layers, so each transformer layer re-seeds the generator
from (seed, stream, global layer number) before drawing its weights; embeddings and the output
layer then see the same generator state on every layout. The vision stem (patch conv, position
embeddings, class token) is re-drawn from its own seeded stream after construction because
LLaVAModel builds it after the language model, whose size depends on the stage.
"""
from __future__ import annotations

import hashlib
from typing import Any, Optional

import torch

from megatron_selfjudge.megatron import cpu

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")  # what model.transformer_impl accepts
_LANGUAGE_STREAM = "language"
_VISION_STREAM = "vision"


def _stream_seed(seed: int, stream: str, index: int) -> int:
    """A 63-bit seed for one named init stream; hashing keeps streams of nearby seeds apart."""
    digest = hashlib.sha256(f"{seed}:{stream}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


class _SeededLayerMixin:
    """Re-seeds the CPU generator from the global layer number before a layer draws its weights."""

    _init_seed: int = 0
    _init_stream: str = ""

    def __init__(self, config: Any, submodules: Any, layer_number: int = 1, *args: Any, **kwargs: Any):
        from megatron.core import parallel_state
        from megatron.core.transformer.transformer_layer import get_transformer_layer_offset
        from megatron.core.utils import get_pg_rank

        pg_collection = kwargs.get("pg_collection")
        if pg_collection is not None:
            pp_rank = get_pg_rank(pg_collection.pp)
        else:
            pp_rank = parallel_state.get_pipeline_model_parallel_rank()
        offset = get_transformer_layer_offset(config, kwargs.get("vp_stage"), pp_rank)
        torch.manual_seed(_stream_seed(self._init_seed, self._init_stream, layer_number + offset))
        super().__init__(config, submodules, layer_number, *args, **kwargs)


def _seeded_spec(spec: Any, seed: int, stream: str) -> Any:
    """Copy of a layer ModuleSpec whose module re-seeds per global layer number."""
    from megatron.core.transformer.spec_utils import ModuleSpec

    base = spec.module
    seeded = type(f"Seeded{base.__name__}", (_SeededLayerMixin, base),
                  {"_init_seed": seed, "_init_stream": stream})
    return ModuleSpec(module=seeded, params=dict(spec.params), submodules=spec.submodules)


def _to_compute_device(model: torch.nn.Module) -> torch.nn.Module:
    """CPU-initialised weights move to the current GPU when there is one (megatron's get_model does the same)."""
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def transformer_engine_available() -> bool:
    """Whether Transformer Engine's PyTorch modules import here."""
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception:  # an installed TE whose CUDA libraries fail to load raises OSError/RuntimeError too
        return False
    return True


def resolve_transformer_impl(requested: str, te_available: bool, cuda_available: bool) -> str:
    """The layer implementation to build: 'auto' is transformer_engine when TE imports and CUDA is present, else local.

    Raises ValueError for an unknown name and RuntimeError (one line) when transformer_engine is
    requested where it cannot run.
    """
    if requested not in TRANSFORMER_IMPLS:
        raise ValueError(f"transformer_impl must be one of {TRANSFORMER_IMPLS}, got {requested!r}")
    if requested == "auto":
        return "transformer_engine" if te_available and cuda_available else "local"
    if requested == "transformer_engine" and not te_available:
        raise RuntimeError("model.transformer_impl=transformer_engine needs Transformer Engine, which does not "
                           "import here; use model.transformer_impl=auto or local")
    if requested == "transformer_engine" and not cuda_available:
        raise RuntimeError("model.transformer_impl=transformer_engine needs CUDA, which is not available here; "
                           "use model.transformer_impl=auto or local")
    return requested


def _resolve_impl(transformer_impl: str) -> str:
    return resolve_transformer_impl(transformer_impl, transformer_engine_available(), torch.cuda.is_available())


def transformer_config(
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int,
    params_dtype: torch.dtype = torch.float32,
    **overrides: Any,
):
    """A TransformerConfig for the current TP/PP layout with CPU init and no dropout."""
    from megatron.core import parallel_state
    from megatron.core.transformer.transformer_config import TransformerConfig

    _check_positive(num_layers=num_layers, hidden_size=hidden_size,
                    num_attention_heads=num_attention_heads, ffn_hidden_size=ffn_hidden_size)
    if params_dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(f"params_dtype must be float32, bfloat16 or float16, got {params_dtype}")
    kwargs = dict(
        num_layers=num_layers,
        hidden_size=hidden_size,
        num_attention_heads=num_attention_heads,
        ffn_hidden_size=ffn_hidden_size,
        tensor_model_parallel_size=parallel_state.get_tensor_model_parallel_world_size(),
        pipeline_model_parallel_size=parallel_state.get_pipeline_model_parallel_world_size(),
        pipeline_dtype=params_dtype,
        params_dtype=params_dtype,
        bf16=params_dtype == torch.bfloat16,
        fp16=params_dtype == torch.float16,
        # Full-size CPU draws make TP shards identical to the TP=1 weights.
        use_cpu_initialization=True,
        # RL needs deterministic log-probs: old/new log-prob ratios must be 1 at step 0.
        hidden_dropout=0.0,
        attention_dropout=0.0,
    )
    kwargs.update(overrides)
    return TransformerConfig(**kwargs)


def _gpt_layer_spec(transformer_impl: str):
    from megatron.core.models.gpt import gpt_layer_specs

    if transformer_impl == "transformer_engine":
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec()
    return gpt_layer_specs.get_gpt_layer_local_spec()


def build_gpt(
    vocab_size: int,
    num_layers: int,
    hidden_size: int,
    num_attention_heads: int,
    ffn_hidden_size: int,
    max_seq_len: int,
    pre_process: bool = True,
    post_process: bool = True,
    transformer_impl: str = "auto",
    params_dtype: torch.dtype = torch.float32,
    seed: int = 0,
    position_embedding_type: str = "rope",
):
    """A megatron-core GPTModel for this rank's TP/PP stage, identically initialised on any layout."""
    from megatron.core.models.gpt import GPTModel

    cpu.activate()
    _check_positive(vocab_size=vocab_size, max_seq_len=max_seq_len)
    transformer_impl = _resolve_impl(transformer_impl)
    config = transformer_config(num_layers, hidden_size, num_attention_heads, ffn_hidden_size, params_dtype)
    torch.manual_seed(_stream_seed(seed, _LANGUAGE_STREAM, 0))
    model = GPTModel(
        config=config,
        transformer_layer_spec=_seeded_spec(_gpt_layer_spec(transformer_impl), seed, _LANGUAGE_STREAM),
        vocab_size=vocab_size,
        max_sequence_length=max_seq_len,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        # Untied: a tied output layer on the last stage would need a cross-stage weight copy.
        share_embeddings_and_output_weights=False,
        position_embedding_type=position_embedding_type,
    )
    return _to_compute_device(model)


def _vision_layer_spec(transformer_impl: str):
    from megatron.core.models.vision import vit_layer_specs
    from megatron.core.transformer.enums import AttnMaskType

    if transformer_impl == "transformer_engine":
        spec = vit_layer_specs.get_vit_layer_with_transformer_engine_spec()
    else:
        spec = vit_layer_specs.get_vit_layer_with_local_spec()
    # Image patches attend to each other both ways (megatron's ViT spec defaults to causal).
    spec.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    return spec


def _projection_submodules(transformer_impl: str):
    from megatron.core.models.gpt.gpt_layer_specs import get_mlp_module_spec

    return get_mlp_module_spec(use_te=transformer_impl == "transformer_engine").submodules


def tiny_vit_dims(vision_hidden_size: int) -> dict:
    """Heads (16 channels each) and FFN width (4x) of the tiny presets' ViT, from its width."""
    return {"vision_num_attention_heads": max(1, vision_hidden_size // 16),
            "vision_ffn_hidden_size": 4 * vision_hidden_size}


def _reseed_vision_stem(vision_model: Any, seed: int) -> None:
    """Re-draw the patch conv, position embeddings and class token from their own seeded stream."""
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(_stream_seed(seed, _VISION_STREAM, 0))
        vision_model.conv1.reset_parameters()
        vision_model.position_embeddings.reset_parameters()
        if getattr(vision_model, "class_token", None) is not None:
            # Same distribution as CLIPViTModel's torch.randn class token.
            vision_model.class_token.normal_()


def build_tiny_llava(
    vocab_size: int = 128,
    num_layers: int = 2,
    hidden_size: int = 32,
    num_attention_heads: int = 4,
    ffn_hidden_size: int = 64,
    max_seq_len: int = 64,
    vision_num_layers: int = 1,
    vision_hidden_size: int = 16,
    vision_num_attention_heads: int = 2,
    vision_ffn_hidden_size: int = 32,
    img_size: int = 16,
    patch_dim: int = 4,
    image_token_index: int = -200,
    pre_process: bool = True,
    post_process: bool = True,
    add_encoder: Optional[bool] = None,
    transformer_impl: str = "auto",
    params_dtype: torch.dtype = torch.float32,
    seed: int = 0,
):
    """A megatron-core LLaVAModel (CLIP ViT + MLP projector + GPT) for this rank's TP/PP stage.

    The vision tower lives on the first pipeline stage (add_encoder defaults to pre_process).
    Each image becomes (img_size / patch_dim) ** 2 embeddings (the class token is dropped) that
    replace its `image_token_index` token in input_ids.
    """
    from megatron.core.models.multimodal.llava_model import LLaVAModel
    from megatron.core.transformer.enums import ModelType

    cpu.activate()
    _check_positive(vocab_size=vocab_size, max_seq_len=max_seq_len, img_size=img_size, patch_dim=patch_dim,
                    vision_num_layers=vision_num_layers, vision_hidden_size=vision_hidden_size,
                    vision_num_attention_heads=vision_num_attention_heads,
                    vision_ffn_hidden_size=vision_ffn_hidden_size)
    if img_size % patch_dim:
        raise ValueError(f"img_size ({img_size}) must be a multiple of patch_dim ({patch_dim})")
    if 0 <= image_token_index < vocab_size:
        raise ValueError(f"image_token_index ({image_token_index}) must lie outside the vocab [0, {vocab_size})")
    transformer_impl = _resolve_impl(transformer_impl)
    if add_encoder is None:
        add_encoder = pre_process
    language = transformer_config(num_layers, hidden_size, num_attention_heads, ffn_hidden_size, params_dtype)
    # The whole ViT sits on the first stage, so it is never pipeline-split itself.
    vision = transformer_config(vision_num_layers, vision_hidden_size, vision_num_attention_heads,
                                vision_ffn_hidden_size, params_dtype, pipeline_model_parallel_size=1,
                                gated_linear_unit=False, add_bias_linear=True)
    vision.vision_model_type = "clip"
    projection = transformer_config(1, hidden_size, num_attention_heads, hidden_size, params_dtype,
                                    pipeline_model_parallel_size=1, add_bias_linear=True)
    torch.manual_seed(_stream_seed(seed, _LANGUAGE_STREAM, 0))
    model = LLaVAModel(
        language_transformer_config=language,
        language_transformer_layer_spec=_seeded_spec(_gpt_layer_spec(transformer_impl), seed, _LANGUAGE_STREAM),
        language_vocab_size=vocab_size,
        language_max_sequence_length=max_seq_len,
        vision_transformer_config=vision,
        vision_transformer_layer_spec=_seeded_spec(_vision_layer_spec(transformer_impl), seed, _VISION_STREAM),
        drop_vision_class_token=True,
        vision_projection_config=projection,
        vision_projection_layer_spec=_projection_submodules(transformer_impl),
        vision_projection_type="mlp",
        parallel_output=True,
        share_embeddings_and_output_weights=False,
        language_position_embedding_type="rope",
        pre_process=pre_process,
        post_process=post_process,
        add_encoder=add_encoder,
        add_decoder=True,
        img_h=img_size,
        img_w=img_size,
        patch_dim=patch_dim,
        image_token_index=image_token_index,
    )
    if model.vision_model is not None:
        _reseed_vision_stem(model.vision_model, seed)
    # The pipeline schedules read model_type; megatron's training loop sets it, LLaVAModel does not.
    model.model_type = ModelType.encoder_or_decoder
    return _to_compute_device(model)
