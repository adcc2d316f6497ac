"""HF Qwen2.5-VL and Qwen2 / Qwen2.5 text checkpoints in megatron-core, through mbridge.

Everything is read from a LOCAL folder (`model.hf_path=DIR`: config.json, *.safetensors,
tokenizer files, preprocessor_config.json); the hub is never contacted (`local_files_only`,
and HF_HUB_OFFLINE is set for the process). Pieces, each usable on its own:

- `load_hf_config`, `load_tokenizer`, `load_image_processor`, `load_processor`: the HF side.
  The image processor is transformers' PIL/numpy one (no torchvision); `load_processor` builds
  an image-only Qwen2.5-VL processor (videos need torchvision, which has no CPU build here).
- `build_model`: this rank's megatron module for the current TP/PP layout (megatron's parallel
  state must be initialised first), local spec on CPU and Transformer Engine's spec when TE and
  CUDA are present, weights loaded from the folder's safetensors and sharded over TP/PP.
- `mrope_position_ids` / `text_position_ids`, `forward`: inputs and the forward of one
  micro-batch (logits [b, s, V/tp] on the last stage).
- `export_hf_weights` / `save_hf_folder`: the weights back under HF names (a collective over
  TP and PP), and a complete HF folder (config, tokenizer and processor files, safetensors).

The mbridge adjustments this needs live in `mbridge_compat` (documented there, one by one).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import torch

from megatron_selfjudge.config import torch_dtype
from megatron_selfjudge.megatron import cpu
from megatron_selfjudge.megatron.models.builders import resolve_transformer_impl, transformer_engine_available
from megatron_selfjudge.megatron.models import mbridge_compat

VL_MODEL_TYPES = ("qwen2_5_vl",)
TEXT_MODEL_TYPES = ("qwen2",)
SUPPORTED_MODEL_TYPES = VL_MODEL_TYPES + TEXT_MODEL_TYPES
# Files of an HF folder that are not weights: copied as they are into exported folders.
HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "vocab.json", "merges.txt", "added_tokens.json",
                 "chat_template.jinja", "chat_template.json", "preprocessor_config.json",
                 "processor_config.json")
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"


class HFFolderError(ValueError):
    """A model folder that cannot be used (missing, no config, unsupported model type...); one line."""


def _offline() -> None:
    # transformers / huggingface_hub read these at call time: never reach for the hub.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def _folder(hf_path: Union[str, Path]) -> Path:
    path = Path(hf_path)
    if not path.is_dir():
        raise HFFolderError(f"model folder {path} does not exist (model.hf_path must be a local folder)")
    if not (path / "config.json").is_file():
        raise HFFolderError(f"model folder {path} has no config.json")
    return path


def load_hf_config(hf_path: Union[str, Path]) -> Any:
    """The HF config of a local folder; HFFolderError for a missing folder or an unsupported model type."""
    from transformers import AutoConfig

    _offline()
    path = _folder(hf_path)
    try:
        config = AutoConfig.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError, json.JSONDecodeError) as exc:
        raise HFFolderError(f"{path / 'config.json'}: {str(exc).splitlines()[0]}") from None
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise HFFolderError(f"{path / 'config.json'}: model_type {config.model_type!r} is not supported "
                            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    return config


def is_vision_language(hf_config: Any) -> bool:
    """Whether the config is a Qwen2.5-VL (image + text) model rather than a text-only Qwen2."""
    return hf_config.model_type in VL_MODEL_TYPES


def text_config(hf_config: Any) -> Any:
    """The language model's config (the `text_config` of a VL model, the config itself otherwise)."""
    return getattr(hf_config, "text_config", None) or hf_config


def load_tokenizer(hf_path: Union[str, Path]) -> Any:
    """The folder's HF tokenizer (with its chat template)."""
    from transformers import AutoTokenizer

    _offline()
    path = _folder(hf_path)
    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (ValueError, OSError) as exc:
        raise HFFolderError(f"{path}: cannot load the tokenizer: {str(exc).splitlines()[0]}") from None


def load_image_processor(hf_path: Union[str, Path]) -> Any:
    """The folder's image processor, the PIL/numpy implementation (works without torchvision)."""
    from transformers import AutoImageProcessor

    _offline()
    path = _folder(hf_path)
    if not (path / "preprocessor_config.json").is_file():
        raise HFFolderError(f"model folder {path} has no preprocessor_config.json (needed for images)")
    return AutoImageProcessor.from_pretrained(str(path), local_files_only=True)


class NoVideoProcessor:
    """Stands in for Qwen2.5-VL's video processor, which needs torchvision: video input is refused."""

    valid_kwargs = None  # read by processors (and vLLM) to list accepted video kwargs: none
    merge_size = 2

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("video input needs torchvision, which is not installed (images only)")


def _image_only_processor_class() -> type:
    from transformers import Qwen2_5_VLProcessor

    class ImageOnlyQwen2_5_VLProcessor(Qwen2_5_VLProcessor):
        """Qwen2.5-VL processor for images and text; its video slot holds a NoVideoProcessor."""

        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and isinstance(argument, NoVideoProcessor):
                return NoVideoProcessor
            return super().check_argument_for_proper_class(argument_name, argument)

    return ImageOnlyQwen2_5_VLProcessor


def load_processor(hf_path: Union[str, Path]) -> Any:
    """An image-only Qwen2.5-VL processor (tokenizer + PIL image processor + chat template)."""
    tokenizer = load_tokenizer(hf_path)
    cls = _image_only_processor_class()
    return cls(image_processor=load_image_processor(hf_path), tokenizer=tokenizer,
               video_processor=NoVideoProcessor(), chat_template=tokenizer.chat_template)


def parse_dtype(dtype: Union[str, torch.dtype, None], hf_config: Any = None) -> torch.dtype:
    """A torch dtype from 'float32'/'bfloat16'/'float16', a torch.dtype, or None (the config's dtype)."""
    if isinstance(dtype, torch.dtype):
        return torch_dtype(str(dtype).replace("torch.", ""))  # refuses any other dtype, by name
    if dtype is None:
        saved = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None) or "float32"
        dtype = str(saved).replace("torch.", "")
    return torch_dtype(dtype)


def make_bridge(hf_config: Any, dtype: torch.dtype = torch.float32, transformer_impl: str = "auto") -> Any:
    """An mbridge bridge for the current megatron layout, adjusted for this device (see mbridge_compat)."""
    from mbridge import AutoBridge

    cpu.activate()
    mbridge_compat.activate()
    impl = resolve_transformer_impl(transformer_impl, transformer_engine_available(), torch.cuda.is_available())
    bridge = AutoBridge.from_config(mbridge_compat.bridge_config(hf_config), dtype=dtype)
    mbridge_compat.prepare_bridge(bridge, impl)
    # Micro-batches are padded to any length (batching.py); sequence parallelism would need
    # lengths divisible by TP, and the torch norms of the local spec reject it.
    overrides: dict[str, Any] = {"sequence_parallel": False}
    if not torch.cuda.is_available():
        overrides["use_cpu_initialization"] = True
    bridge.set_extra_args(**overrides)
    return bridge


@dataclass
class QwenModel:
    """This rank's megatron module and what converting it needs."""

    module: torch.nn.Module  # Qwen2_5VLModel (VL) or GPTModel (text), this TP/PP stage
    bridge: Any  # the mbridge bridge that built it (weight maps, TP split/merge)
    hf_config: Any
    transformer_impl: str  # 'local' or 'transformer_engine'
    vision_language: bool


def build_model(hf_path: Union[str, Path], dtype: Union[str, torch.dtype, None] = "float32",
                transformer_impl: str = "auto", load_weights: bool = True) -> QwenModel:
    """Build this rank's megatron module from an HF folder and (by default) load its safetensors.

    Call after megatron's parallel state is initialised (parallel.initialize_parallel); every rank
    of the TP/PP group must call it. The module is unwrapped (no DDP / Float16Module), in `dtype`.
    """
    from megatron.core.transformer.enums import ModelType

    path = _folder(hf_path)
    hf_config = load_hf_config(path)
    dtype = parse_dtype(dtype, hf_config)
    bridge = make_bridge(hf_config, dtype, transformer_impl)
    modules = bridge.get_model(weight_path=None, wrap_with_ddp=False, bf16=False, fp16=False,
                               use_cpu_initialization=not torch.cuda.is_available(),
                               data_parallel_random_init=False)
    if len(modules) != 1:
        raise RuntimeError(f"expected one model chunk (no virtual pipeline), got {len(modules)}")
    module = modules[0].to(dtype)  # mbridge's get_model already placed it on this rank's device
    # The pipeline schedules read model_type.
    module.model_type = ModelType.encoder_or_decoder
    model = QwenModel(module=module, bridge=bridge, hf_config=hf_config,
                      transformer_impl=bridge._selfjudge_impl, vision_language=is_vision_language(hf_config))
    module.selfjudge_qwen = model  # so code that holds only the (wrapped) module finds the rest: of_module()
    if load_weights:
        load_hf_weights(model, path)
    return model


def of_module(module: torch.nn.Module) -> QwenModel:
    """The QwenModel a module was built as (through DDP / Float16Module wrappers); ValueError if none."""
    from mbridge.core.util import unwrap_model

    found = getattr(unwrap_model(module), "selfjudge_qwen", None)
    if not isinstance(found, QwenModel):
        raise ValueError(f"{type(module).__name__} was not built by qwen.build_model")
    return found


def load_hf_weights(model: QwenModel, hf_path: Union[str, Path]) -> None:
    """Load the folder's safetensors into this rank's shard (a collective over the TP group)."""
    path = _folder(hf_path)
    if not any(path.glob("*.safetensors")):
        raise HFFolderError(f"model folder {path} has no *.safetensors weights")
    with torch.no_grad():
        model.bridge.load_weights([model.module], str(path))


def export_hf_weights(model: QwenModel) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (HF name, full tensor) for every weight; every TP/PP rank must run the iterator to its end.

    With tied embeddings the first and last pipeline stages both hold the embedding: it is
    yielded once. Tensors come back in the model's dtype on the model's device.
    """
    seen: set[str] = set()
    for name, tensor in model.bridge.export_weights([model.module]):
        if name in seen:
            continue
        seen.add(name)
        yield name, tensor


def save_hf_folder(model: QwenModel, source_dir: Union[str, Path], out_dir: Union[str, Path],
                   dtype: Optional[torch.dtype] = None) -> Optional[Path]:
    """Write an HF folder (the source's config/tokenizer/processor files + model.safetensors).

    A collective call (every TP/PP rank); rank 0 writes. Returns out_dir on rank 0, None elsewhere.
    """
    import torch.distributed as dist
    from safetensors.torch import save_file

    source = _folder(source_dir)
    out = Path(out_dir)
    rank = dist.get_rank() if dist.is_initialized() else 0
    weights = {}
    for name, tensor in export_hf_weights(model):
        if rank == 0:
            weights[name] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous()
    if rank != 0:
        return None
    out.mkdir(parents=True, exist_ok=True)
    for name in HF_SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    (out / WEIGHTS_INDEX_FILE).unlink(missing_ok=True)  # one file, no index (sharded sources included)
    save_file(weights, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    if dtype is not None:
        _set_config_dtype(out / "config.json", dtype)
    return out


def _set_config_dtype(config_file: Path, dtype: torch.dtype) -> None:
    """Make config.json name the dtype the weights were written in (top level and text_config)."""
    config = json.loads(config_file.read_text())
    name = str(dtype).replace("torch.", "")
    for section in (config, config.get("text_config")):
        if isinstance(section, dict):
            for key in ("dtype", "torch_dtype"):
                if key in section or (key == "dtype" and section is config):
                    section[key] = name
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _rope_index_helper(hf_config: Any) -> Any:
    """An object on which transformers' own Qwen2.5-VL get_rope_index runs (it needs only `.config`)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel

    helper = type("_RopeIndex", (), {"get_rope_index": Qwen2_5_VLModel.get_rope_index,
                                     "get_vision_position_ids": Qwen2_5_VLModel.get_vision_position_ids})()
    helper.config = hf_config
    return helper


def mm_token_type_ids(hf_config: Any, input_ids: torch.Tensor) -> torch.Tensor:
    """transformers' modality ids per token: 1 for image placeholders, 0 for text (no video)."""
    if (input_ids == hf_config.video_token_id).any():
        raise ValueError("video tokens in input_ids: video input needs torchvision and is not supported")
    return (input_ids == hf_config.image_token_id).to(torch.int32)


def mrope_position_ids(hf_config: Any, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                       attention_mask: Optional[torch.Tensor] = None,
                       image_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """M-RoPE positions [3, b, s] exactly as transformers computes them (always with mm_token_type_ids).

    input_ids [b, s]; image_grid_thw [n_images, 3] for the images of all rows in order;
    attention_mask [b, s] (1 = real token) for padded rows, or None. image_mask [b, s] bool says
    which tokens are image slots (default: every image token); an image or video id elsewhere
    (one a policy generated) is text, as in transformers' generate.
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must be [batch, seq], got shape {tuple(input_ids.shape)}")
    types = mm_token_type_ids(hf_config, input_ids) if image_mask is None else image_mask.to(torch.int32)
    n_placeholders = int(types.sum())
    if image_grid_thw is None:
        if n_placeholders:
            raise ValueError(f"input_ids hold {n_placeholders} image tokens but no image_grid_thw was given")
    else:
        merge = hf_config.vision_config.spatial_merge_size
        expected = int((image_grid_thw.prod(-1) // (merge * merge)).sum())
        if expected != n_placeholders:
            raise ValueError(f"image_grid_thw gives {expected} image tokens, input_ids hold {n_placeholders}")
    positions, _ = _rope_index_helper(hf_config).get_rope_index(
        input_ids, mm_token_type_ids=types, image_grid_thw=image_grid_thw, attention_mask=attention_mask)
    return positions


def text_position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    """Positions [b, s] of right-padded rows for a text model: 0..s-1."""
    b, s = input_ids.shape
    return torch.arange(s, device=input_ids.device).unsqueeze(0).expand(b, s)


def position_ids(model: QwenModel, input_ids: torch.Tensor, image_grid_thw: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The position ids `forward` expects: [3, b, s] M-RoPE for a VL model, [b, s] for a text model."""
    if model.vision_language:
        return mrope_position_ids(model.hf_config, input_ids, image_grid_thw, attention_mask)
    if image_grid_thw is not None:
        raise ValueError(f"{model.hf_config.model_type} is a text model: it takes no images")
    return text_position_ids(input_ids)


def vision_embeddings(model: QwenModel, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor,
                      module: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """The vision tower's (merged) embeddings [image tokens of all images, hidden] (first stage only)."""
    from mbridge.core.util import unwrap_model

    bare = unwrap_model(module if module is not None else model.module)
    return bare.vision_model(vision_data=pixel_values, grid_thw=image_grid_thw)


def decoder_forward(model: QwenModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
                    image_mask: Optional[torch.Tensor] = None, module: Optional[torch.nn.Module] = None,
                    inference_context: Any = None, runtime_gather_output: Optional[bool] = None,
                    vision: Optional[torch.Tensor] = None) -> torch.Tensor:
    """`forward` with the image embeddings placed by this code, so it also serves generation.

    Qwen2.5-VL: the vision tower's embeddings (`vision`, else computed from pixel_values and
    image_grid_thw) replace, in order, the embeddings of the tokens `image_mask` marks (default:
    every image token; on the first pipeline stage), and the language model
    runs with `position_ids` ([3, b, s] M-RoPE, or [3, b, end] covering the KV cache with an
    `inference_context`, whose static cache slices them) and megatron's inference context. The
    text model runs as a GPTModel. Logits [b, s, V/tp] on the last stage (gathered with
    `runtime_gather_output`), hidden states elsewhere.
    """
    from mbridge.core.util import unwrap_model

    net = module if module is not None else model.module
    if not model.vision_language:
        return net(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
                   inference_context=inference_context, runtime_gather_output=runtime_gather_output)
    bare = unwrap_model(net)
    embeddings = None
    if bare.pre_process:
        embeddings = bare.language_model.embedding(input_ids=input_ids, position_ids=None)  # [s, b, h]
        if image_mask is None:
            image_mask = input_ids == model.hf_config.image_token_id
        slots = int(image_mask.sum())
        if slots:
            if vision is None:
                if pixel_values is None or image_grid_thw is None:
                    raise ValueError(f"{slots} image tokens but no pixel_values / image_grid_thw")
                vision = vision_embeddings(model, pixel_values, image_grid_thw, module=net)
            if vision.shape[0] != slots:
                raise ValueError(f"the images give {vision.shape[0]} embeddings for {slots} image tokens")
            embeddings = embeddings.transpose(0, 1).clone()
            embeddings[image_mask] = vision.to(embeddings.dtype)
            embeddings = embeddings.transpose(0, 1).contiguous()
    return bare.language_model(input_ids=None, position_ids=position_ids, attention_mask=None,
                               decoder_input=embeddings, inference_context=inference_context,
                               runtime_gather_output=runtime_gather_output)


def forward(model: QwenModel, input_ids: torch.Tensor, position_ids: torch.Tensor,
            pixel_values: Optional[torch.Tensor] = None, image_grid_thw: Optional[torch.Tensor] = None,
            module: Optional[torch.nn.Module] = None) -> torch.Tensor:
    """One micro-batch through this stage: logits [b, s, V/tp] on the last stage, hidden states elsewhere.

    input_ids [b, s] (right-padded; causal attention keeps real tokens off the padding);
    position_ids from `position_ids()`; pixel_values / image_grid_thw from the image processor
    for the images of all rows, in row order (first pipeline stage only; ignored elsewhere).
    `module` overrides model.module (e.g. a DDP-wrapped copy of it).
    """
    from mbridge.core.util import unwrap_model

    net = module if module is not None else model.module
    if not model.vision_language:
        return net(input_ids=input_ids, position_ids=position_ids, attention_mask=None)
    if position_ids.dim() != 3:
        raise ValueError(f"a Qwen2.5-VL forward needs [3, b, s] M-RoPE position ids, got {tuple(position_ids.shape)}")
    if not unwrap_model(net).pre_process:  # later stages take the hidden states from the previous one
        pixel_values, image_grid_thw = None, None
    elif (input_ids == model.hf_config.image_token_id).any() and (pixel_values is None or image_grid_thw is None):
        raise ValueError("input_ids hold image tokens but pixel_values / image_grid_thw were not given")
    return net(input_ids=input_ids, position_ids=position_ids, attention_mask=None,
               pixel_values=pixel_values, image_grid_thw=image_grid_thw)
