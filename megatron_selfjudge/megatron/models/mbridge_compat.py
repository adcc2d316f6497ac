"""Adjustments that make mbridge 0.15.1 bridge HF Qwen2/Qwen2.5 and Qwen2.5-VL into megatron-core 0.16.1.

mbridge turns an HF config into megatron-core modules and maps weights both ways. With the
versions pinned here (mbridge 0.15.1, megatron-core 0.16.1, transformers 5.19.0) it needs the
adjustments below; `activate()` installs the class-level ones (it never edits installed files),
`prepare_bridge()` applies the per-bridge ones, and both refuse any other version of the three.
Numbers follow ../shared/QWEN2_5_VL.md where it lists them.

Every device (bugs or version mismatches whatever the hardware):
1. text_config_view: transformers 5 keeps `num_hidden_layers`, `hidden_size`, `vocab_size`,
   `rope_scaling`... of a VL model under `text_config` and `rope_theta` inside `rope_parameters`;
   mbridge reads them at the top level (AttributeError). The bridge gets a read-only view
   (`BridgeConfigView`) that looks there too; the HF config itself is never modified.
3. vision_config_from_hf: `get_vision_model_config` hard-codes the 7B/72B vision tower (depth 32,
   hidden 1280, 16 heads, window 112, full-attention blocks 7/15/23/31...). The sizes are read
   from the HF `vision_config` instead (needed for any other tower, e.g. a small test model).
7. rotary_pos_cos_sin: megatron-core 0.16.1's TransformerLayer passes `rotary_pos_cos_sin=` to
   the attention, which mbridge's `Qwen2_5VLSelfAttention.forward` does not accept (TypeError);
   it is always None outside flash-infer inference and is dropped.
8. merger_fc1_split (silent, TP > 1 only): `_get_mcore_config_by_name` returns the gated
   language config for every weight, so the non-gated vision merger's first linear
   (`vision_model.projection.encoder.linear_fc1`) is split across TP ranks as if it held
   [gate; up] halves. Logits are then wrong (0.79 off at TP=2) while export still round-trips
   bit-identically; the merger weights get a non-gated config.
9. per_instance_weight_maps: for tied embeddings `_adjust_mapping_for_shared_weights` writes
   into the CLASS's `_DIRECT_MAPPING`, so every later bridge of that class in the process maps
   its (untied) output layer onto the embedding. Each bridge gets its own copies of the maps.
10. caller_position_ids: `Qwen2_5VLModel.forward` ignores the `position_ids` it is given and
   recomputes M-RoPE positions with mbridge's `get_rope_index`, which hard-codes spatial merge
   size 2, tokens_per_second 2 and the image/video/vision-start ids. When the caller passes
   [3, b, s] positions (computed by transformers' own `get_rope_index` from the HF config, see
   qwen.mrope_position_ids), those are used; it also lets later pipeline stages run without
   the image inputs.

Only without Transformer Engine (the local spec: always on CPU, and on a GPU without TE):
2. local_specs: the providers import Transformer Engine linears and the TE ViT spec; local
   specs are used for decoder and ViT, the ViT's attention unmasked (the local ViT spec says
   causal), the merger built from Column/RowParallelLinear.
4. packed_vision_attention: the ViT's window attention runs packed (THD) sequences, which the
   local DotProductAttention refuses; `PackedSDPAttention` serves them with a block-diagonal
   mask through torch SDPA (the padded language decoder still uses DotProductAttention).
5. unfused_norm_names: without TE the norms are separate modules (`input_layernorm`,
   `pre_mlp_layernorm`) instead of being fused into the linears (`linear_qkv.layer_norm_weight`,
   `linear_fc1.layer_norm_weight`), so their names are translated before mbridge's maps.
6. local_fusions_off: masked-softmax, bias-activation, bias-dropout, rope and gradient-accumulation
   fusions and persist_layer_norm need CUDA kernels from TE / Apex / megatron's compiled ops
   (none of which the local spec has) and are turned off.

`disabled(name)` turns one adjustment off within a block; tests use it to show an adjustment is
needed (e.g. TP=2 logits are wrong without merger_fc1_split).
"""
from __future__ import annotations

import contextlib
import copy
import functools
from importlib import metadata
from typing import Any, Callable, Iterator, Optional

import torch

EXPECTED_VERSIONS = {"mbridge": "0.15.1", "megatron-core": "0.16.1", "transformers": "5.19.0"}
EVERY_DEVICE = ("text_config_view", "vision_config_from_hf", "rotary_pos_cos_sin", "merger_fc1_split",
                "per_instance_weight_maps", "caller_position_ids")
WITHOUT_TE = ("local_specs", "packed_vision_attention", "unfused_norm_names", "local_fusions_off")
ADJUSTMENTS = EVERY_DEVICE + WITHOUT_TE

_ACTIVE = False
_DISABLED: set[str] = set()
# Norm names of the local spec -> the TE-fused names mbridge's weight maps know.
_UNFUSED_NORMS = ((".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
                  (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"))
_LOCAL_FUSIONS_OFF = dict(masked_softmax_fusion=False, bias_activation_fusion=False, bias_dropout_fusion=False,
                        apply_rope_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False)
_MERGER_PREFIX = "vision_model.projection."


def check_versions() -> None:
    """Raise RuntimeError (one line) unless mbridge, megatron-core and transformers are the pinned versions."""
    wrong = []
    for package, want in EXPECTED_VERSIONS.items():
        try:
            have = metadata.version(package)
        except metadata.PackageNotFoundError:
            have = "not installed"
        if have != want:
            wrong.append(f"{package} {have} (needs {want})")
    if wrong:
        raise RuntimeError("megatron_selfjudge.megatron.models.mbridge_compat supports exactly "
                           + ", ".join(f"{k}=={v}" for k, v in EXPECTED_VERSIONS.items())
                           + "; found " + ", ".join(wrong))


def enabled(name: str) -> bool:
    """Whether adjustment `name` is in force (not switched off by `disabled`)."""
    if name not in ADJUSTMENTS:
        raise ValueError(f"unknown mbridge adjustment {name!r}; known: {ADJUSTMENTS}")
    return name not in _DISABLED


@contextlib.contextmanager
def disabled(*names: str) -> Iterator[None]:
    """Within the block, the named adjustments are off (for tests that prove they are needed)."""
    for name in names:
        enabled(name)  # validates the name
    added = [n for n in names if n not in _DISABLED]
    _DISABLED.update(added)
    try:
        yield
    finally:
        _DISABLED.difference_update(added)


def is_active() -> bool:
    """Whether the class-level adjustments are installed in this process."""
    return _ACTIVE


# ---------------------------------------------------------------------------------------------
# 1. text_config_view
class BridgeConfigView:
    """Read-only view of an HF config that also finds text-model keys under `text_config` and
    `rope_theta` inside `rope_parameters` (transformers 5 layout), as mbridge expects them."""

    def __init__(self, hf_config: Any):
        object.__setattr__(self, "_hf", hf_config)

    def __getattr__(self, name: str) -> Any:
        hf = object.__getattribute__(self, "_hf")
        text = getattr(hf, "text_config", None)
        for source in (hf, text):
            if source is None:
                continue
            try:
                return getattr(source, name)
            except AttributeError:  # transformers 5: absent at the top level of a VL config
                pass
        if name == "rope_theta":
            for source in (hf, text):
                try:
                    params = getattr(source, "rope_parameters", None) if source is not None else None
                except AttributeError:
                    continue
                if isinstance(params, dict) and "rope_theta" in params:
                    return params["rope_theta"]
        raise AttributeError(f"{type(hf).__name__} (nor its text_config) has no attribute {name!r}")

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("BridgeConfigView is read-only; change the HF config itself")

    @property
    def hf_config(self) -> Any:
        """The wrapped HF config."""
        return object.__getattribute__(self, "_hf")


def bridge_config(hf_config: Any) -> Any:
    """What to hand to mbridge's AutoBridge.from_config for this HF config."""
    return BridgeConfigView(hf_config) if enabled("text_config_view") else hf_config


# ---------------------------------------------------------------------------------------------
# 3. vision_config_from_hf (+ the projection config), used by the provider below
def vision_transformer_config(language_config: Any, vision_hf: Any) -> Any:
    """megatron config of the Qwen2.5-VL vision tower, sized from the HF vision config."""
    from mbridge.models.qwen2_5_vl.transformer_config import get_vision_model_config

    if not enabled("vision_config_from_hf"):
        config = get_vision_model_config(copy.deepcopy(language_config))
    else:
        if vision_hf.hidden_act != "silu":
            raise ValueError(f"Qwen2.5-VL vision hidden_act {vision_hf.hidden_act!r} is not supported (silu only)")
        if vision_hf.hidden_size % vision_hf.num_heads:
            raise ValueError(f"vision hidden_size {vision_hf.hidden_size} is not divisible by num_heads "
                             f"{vision_hf.num_heads}")
        config = copy.deepcopy(language_config)
        head_dim = vision_hf.hidden_size // vision_hf.num_heads
        for key, value in dict(
            num_layers=vision_hf.depth, hidden_size=vision_hf.hidden_size,
            num_attention_heads=vision_hf.num_heads, num_query_groups=vision_hf.num_heads,
            kv_channels=head_dim, ffn_hidden_size=vision_hf.intermediate_size,
            add_bias_linear=True, add_qkv_bias=True, hidden_dropout=0.0, attention_dropout=0.0,
            # HF's vision RMSNorms use a fixed eps of 1e-6, not the text model's rms_norm_eps.
            layernorm_epsilon=1e-6, layernorm_zero_centered_gamma=False,
            apply_query_key_layer_scaling=False, bias_activation_fusion=False, bias_dropout_fusion=False,
            attention_softmax_in_fp32=True, seq_length=1, tp_comm_overlap=False, sequence_parallel=False,
            context_parallel_size=1, temporal_patch_size=vision_hf.temporal_patch_size,
            patch_size=vision_hf.patch_size, in_channels=vision_hf.in_channels,
            spatial_merge_size=vision_hf.spatial_merge_size,
            fullatt_block_indexes=list(vision_hf.fullatt_block_indexes),
            _qwen2_5_vl_window_size=vision_hf.window_size,
        ).items():
            setattr(config, key, value)
    # The whole ViT lives on the first pipeline stage.
    config.pipeline_model_parallel_size = 1
    config.first_pipeline_num_layers = None
    return config


def vision_projection_config(language_config: Any, vision_hidden_size: int, spatial_merge_size: int) -> Any:
    """megatron config of the patch merger (LN -> Linear -> GELU -> Linear), mbridge's recipe."""
    from mbridge.models.qwen2_5_vl.transformer_config import get_vision_projection_config

    return get_vision_projection_config(copy.deepcopy(language_config), vision_hidden_size,
                                        spatial_merge_size=spatial_merge_size)


# ---------------------------------------------------------------------------------------------
# 4. packed_vision_attention
def _packed_sdpa_class():
    from megatron.core.transformer.dot_product_attention import DotProductAttention

    class PackedSDPAttention(DotProductAttention):
        """Local core attention that also serves packed (THD) sequences: block-diagonal SDPA."""

        def forward(self, query, key, value, attention_mask, attn_mask_type=None, attention_bias=None,
                    packed_seq_params=None):
            if packed_seq_params is None or not enabled("packed_vision_attention"):
                return super().forward(query, key, value, attention_mask, attn_mask_type=attn_mask_type,
                                       attention_bias=attention_bias, packed_seq_params=packed_seq_params)
            if packed_seq_params.qkv_format != "thd":
                raise ValueError(f"packed attention expects qkv_format 'thd', got {packed_seq_params.qkv_format!r}")
            # query/key/value: [t, heads, head_dim] (the attention squeezed the batch dim of 1).
            cu = packed_seq_params.cu_seqlens_q.to(device=query.device, dtype=torch.long)
            total = query.shape[0]
            if int(cu[-1]) != total:
                raise ValueError(f"cu_seqlens end at {int(cu[-1])} but the packed sequence has {total} tokens")
            segment = torch.bucketize(torch.arange(total, device=query.device), cu[1:], right=True)
            allowed = segment[:, None] == segment[None, :]
            groups = self.num_attention_heads_per_partition // self.num_query_groups_per_partition
            if groups > 1:
                key = key.repeat_interleave(groups, dim=1)
                value = value.repeat_interleave(groups, dim=1)
            out = torch.nn.functional.scaled_dot_product_attention(
                query.transpose(0, 1)[None], key.transpose(0, 1)[None], value.transpose(0, 1)[None],
                attn_mask=allowed, dropout_p=self.attention_dropout.p if self.training else 0.0,
                scale=self.softmax_scale)
            return out[0].transpose(0, 1).reshape(total, -1)

    return PackedSDPAttention


PACKED_SDPA_ATTENTION: Optional[type] = None


# ---------------------------------------------------------------------------------------------
# 2. local_specs (+ 3, 4): the Qwen2.5-VL provider and the text layer spec
def _use_te(bridge: Any) -> bool:
    return getattr(bridge, "_selfjudge_impl", "local") == "transformer_engine"


def _vl_layer_specs(bridge: Any, vp_stage: Optional[int]):
    """(language block spec, ViT layer spec, merger submodules) for this bridge's implementation."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec
    from megatron.core.models.gpt.moe_module_specs import MLPSubmodules
    from megatron.core.transformer.enums import AttnMaskType

    if _use_te(bridge) or not enabled("local_specs"):
        from megatron.core.extensions.transformer_engine import TEColumnParallelLinear, TERowParallelLinear
        from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_transformer_engine_spec

        language = bridge._get_transformer_layer_spec(vp_stage)
        return (language, get_vit_layer_with_transformer_engine_spec(),
                MLPSubmodules(linear_fc1=TEColumnParallelLinear, linear_fc2=TERowParallelLinear))
    from megatron.core.models.vision.vit_layer_specs import get_vit_layer_with_local_spec
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear

    language = get_gpt_decoder_block_spec(bridge.config, use_transformer_engine=False, vp_stage=vp_stage)
    vit = get_vit_layer_with_local_spec()
    # Image patches attend both ways; the local ViT spec defaults to causal.
    vit.submodules.self_attention.params["attn_mask_type"] = AttnMaskType.no_mask
    vit.submodules.self_attention.submodules.core_attention = PACKED_SDPA_ATTENTION
    return language, vit, MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear)


def _qwen2_5_vl_provider(self: Any, post_model_creation_callbacks: list, **_: Any) -> Callable:
    """Qwen2_5VLBridge._model_provider: local or TE specs, vision tower sized from the HF config."""
    from mbridge.models.qwen2_5_vl.model import Qwen2_5VLModel

    hf = self.hf_config
    vision_hf = hf.vision_config
    if vision_hf.out_hidden_size != hf.hidden_size:
        raise ValueError(f"vision out_hidden_size {vision_hf.out_hidden_size} != text hidden_size {hf.hidden_size}")
    tie = bool(getattr(hf, "tie_word_embeddings", False))

    def provider(pre_process: bool, post_process: bool, vp_stage: Optional[int] = None):
        language_spec, vit_spec, merger_spec = _vl_layer_specs(self, vp_stage)
        vision_config = vision_transformer_config(self.config, vision_hf)
        projection_config = vision_projection_config(self.config, vision_config.hidden_size,
                                                     vision_hf.spatial_merge_size)
        self._selfjudge_projection_config = projection_config
        model = Qwen2_5VLModel(
            language_transformer_config=self.config, language_transformer_layer_spec=language_spec,
            language_vocab_size=hf.vocab_size, language_max_sequence_length=hf.max_position_embeddings,
            vision_transformer_config=vision_config, vision_transformer_layer_spec=vit_spec,
            vision_projection_config=projection_config, vision_projection_layer_spec=merger_spec,
            vision_projection_type="mlp", language_rotary_base=hf.rope_theta,
            pre_process=pre_process, post_process=post_process, add_decoder=True, add_encoder=True,
            parallel_output=True, language_share_embeddings_and_output_weights=tie,
            image_token_id=hf.image_token_id, video_token_id=hf.video_token_id)
        for callback in post_model_creation_callbacks:
            callback(model, pre_process=pre_process, post_process=post_process, config=self.config,
                     hf_config=self.hf_config)
        return model

    return provider


def _text_layer_spec(original: Callable) -> Callable:
    @functools.wraps(original)
    def spec(self: Any, vp_stage: Optional[int] = None):
        if _use_te(self) or not enabled("local_specs"):
            return original(self, vp_stage)
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

        self.has_vp_stage = True
        return get_gpt_decoder_block_spec(self.config, use_transformer_engine=False, vp_stage=vp_stage)

    return spec


# ---------------------------------------------------------------------------------------------
# 7. rotary_pos_cos_sin
def _drop_rotary_pos_cos_sin(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self: Any, *args: Any, rotary_pos_cos_sin: Any = None, **kwargs: Any):
        if rotary_pos_cos_sin is not None:
            raise NotImplementedError("Qwen2.5-VL attention got rotary_pos_cos_sin (flash-infer fused rope), "
                                      "which mbridge 0.15.1 does not implement")
        return original(self, *args, **kwargs)

    return forward


# ---------------------------------------------------------------------------------------------
# 8. merger_fc1_split
def _config_by_name(original: Callable) -> Callable:
    @functools.wraps(original)
    def config_for(self: Any, mcore_weights_name: str):
        projection = getattr(self, "_selfjudge_projection_config", None)
        if enabled("merger_fc1_split") and projection is not None and mcore_weights_name.startswith(_MERGER_PREFIX):
            return projection
        return original(self, mcore_weights_name)

    return config_for


# ---------------------------------------------------------------------------------------------
# 9. per_instance_weight_maps
_MAP_NAMES = ("_DIRECT_MAPPING", "_ATTENTION_MAPPING", "_MLP_MAPPING", "_OTHER_MAPPING")


def _own_maps_first(original: Callable) -> Callable:
    @functools.wraps(original)
    def adjust(self: Any) -> None:
        if enabled("per_instance_weight_maps"):
            for name in _MAP_NAMES:
                if hasattr(type(self), name):
                    setattr(self, name, dict(getattr(type(self), name)))
        original(self)

    return adjust


# ---------------------------------------------------------------------------------------------
# 10. caller_position_ids
def _caller_positions(original: Callable) -> Callable:
    @functools.wraps(original)
    def forward(self: Any, input_ids: Any, position_ids: Any, *args: Any, **kwargs: Any):
        given = position_ids is not None and position_ids.dim() == 3
        if not given or not enabled("caller_position_ids"):
            return original(self, input_ids, position_ids, *args, **kwargs)
        from mbridge.models.qwen2_5_vl import rope_utils

        computed = rope_utils.get_rope_index
        rope_utils.get_rope_index = lambda *a, **k: (position_ids, None)
        try:
            return original(self, input_ids, position_ids, *args, **kwargs)
        finally:
            rope_utils.get_rope_index = computed

    return forward


# ---------------------------------------------------------------------------------------------
# 5. unfused_norm_names
def _translate_norm_names(original: Callable) -> Callable:
    @functools.wraps(original)
    def mapping(mcore_weights_name: str) -> list[str]:
        name = mcore_weights_name
        if enabled("unfused_norm_names"):
            for local, fused in _UNFUSED_NORMS:
                if name.endswith(local):
                    name = name[: -len(local)] + fused
        return original(name)

    return mapping


def activate() -> bool:
    """Install the class-level adjustments (idempotent); returns True once they are in place."""
    global _ACTIVE, PACKED_SDPA_ATTENTION
    if _ACTIVE:
        return True
    check_versions()
    from mbridge.core.bridge import Bridge
    from mbridge.core.llm_bridge import LLMBridge
    from mbridge.models.qwen2_5_vl import Qwen2_5VLBridge
    from mbridge.models.qwen2_5_vl.attention import Qwen2_5VLSelfAttention
    from mbridge.models.qwen2_5_vl.model import Qwen2_5VLModel

    PACKED_SDPA_ATTENTION = _packed_sdpa_class()
    original_provider = Qwen2_5VLBridge._model_provider

    def provider(self: Any, callbacks: list, **kwargs: Any) -> Callable:
        if enabled("vision_config_from_hf") or enabled("local_specs"):
            return _qwen2_5_vl_provider(self, callbacks, **kwargs)
        return original_provider(self, callbacks, **kwargs)

    Qwen2_5VLBridge._model_provider = provider
    LLMBridge._get_transformer_layer_spec = _text_layer_spec(LLMBridge._get_transformer_layer_spec)
    Qwen2_5VLSelfAttention.forward = _drop_rotary_pos_cos_sin(Qwen2_5VLSelfAttention.forward)
    Bridge._get_mcore_config_by_name = _config_by_name(Bridge._get_mcore_config_by_name)
    for cls in {Bridge, *_registered_bridges()}:
        if "_adjust_mapping_for_shared_weights" in vars(cls):
            cls._adjust_mapping_for_shared_weights = _own_maps_first(cls._adjust_mapping_for_shared_weights)
    Qwen2_5VLModel.forward = _caller_positions(Qwen2_5VLModel.forward)
    _ACTIVE = True
    return True


def _registered_bridges() -> list[type]:
    from mbridge.core.bridge import _MODEL_REGISTRY

    return list(_MODEL_REGISTRY.values())


def prepare_bridge(bridge: Any, transformer_impl: str) -> Any:
    """Apply the per-bridge adjustments for `transformer_impl` ('local' or 'transformer_engine')."""
    if transformer_impl not in ("local", "transformer_engine"):
        raise ValueError(f"transformer_impl must be 'local' or 'transformer_engine', got {transformer_impl!r}")
    activate()
    bridge._selfjudge_impl = transformer_impl
    if transformer_impl == "local":
        bridge._weight_name_mapping_mcore_to_hf = _translate_norm_names(bridge._weight_name_mapping_mcore_to_hf)
        if enabled("local_fusions_off"):
            bridge.set_extra_args(**_LOCAL_FUSIONS_OFF)
    return bridge
