"""The HF Qwen families: Qwen2.5-VL ("qwen2.5-vl") and Qwen2 / Qwen2.5 text ("qwen2.5") from a local folder.

`model.hf_path=DIR` names an HF folder (config.json, *.safetensors, tokenizer files with a chat
template; for the VL model also preprocessor_config.json). Two presets rather than one that
guesses from config.json: a config names the model it means, and a folder of the other kind is
refused in one line. The other `model.*` size keys (num_layers, hidden_size, image_size...) are
the tiny presets'; these families read every size from the folder.

Text side (public: the vLLM engine uses the same folder, tokenizer, processor and prompts):
  - `tokenizer`, `processor` (image-only Qwen2.5-VL processor, no torchvision), `hf_config`;
  - `prompt_ids(question, num_images, instruction)`: the chat template's ids of one user turn
    (the template adds its default system turn) holding `num_images` image blocks
    `<|vision_start|><|image_pad|><|vision_end|>` before the question and the format
    instruction, and the generation prompt; ONE `<|image_pad|>` per image, as vLLM takes them;
  - `expand_images(ids, images)`: each image's `<|image_pad|>` repeated to the processor's count
    (image_grid_thw.prod() / merge_size**2), as transformers' processor and the megatron module
    take them; the trainer always sends expanded ids to the rollout engine;
  - `images(pil_images)`: a batching.PackedImages of the processor's pixel_values [patches, D]
    and image_grid_thw [N, 3] (each image keeps its own size: variable token counts).
The question text is tokenized with special-token strings split, so a question holding
`<|im_end|>` or `<|image_pad|>` stays text.

Module side: `builder` -> qwen.build_model (mbridge; local spec on CPU, Transformer Engine's with
TE + CUDA; safetensors sharded over TP/PP); the frozen reference/Judge copy is built the same way
from the same folder before it receives the policy's weights. `describe` marks an image by its
`<|vision_start|>` id (one per image) with image_seq_len 0: the processor already wrote one
token per image embedding, so logits are where the tokens are. `run` computes transformers'
M-RoPE positions and places the vision embeddings on the prompt's image tokens only (an image
id the policy generated is text, as in transformers' generate). Generation: `inference_wrapper`
runs megatron's static KV cache with M-RoPE positions of the whole buffer (computed once from
the prompts: text after the prompt continues 1-D) and the vision tower once per batch, its
embeddings placed in whichever window holds their tokens (prompts differ in length).
"""
from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterator, Optional, Sequence

import torch

from megatron_selfjudge.megatron.batching import PackedImages
from megatron_selfjudge.megatron.models import qwen
from megatron_selfjudge.megatron.models.family import ModelFamily, ModelInfo

IMAGE_BLOCK = "<|vision_start|><|image_pad|><|vision_end|>"
_SENTINEL = "\ue000question\ue000"  # private-use characters: never in a chat template


def _pipeline_parallel() -> bool:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size() > 1


def prompt_image_mask(tokens: torch.Tensor, loss_mask: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """[B, T] bool: image tokens of the prompt (before the first response token), not generated ones."""
    before_response = (torch.cumsum(loss_mask.long(), dim=1) - loss_mask.long()) == 0
    return (tokens == image_token_id) & before_response


class QwenFamily(ModelFamily):
    """Shared by the Qwen2.5-VL and Qwen2 text families (see the module docstring)."""

    model_types: ClassVar[tuple[str, ...]]

    def __init__(self, cfg: Any):
        from megatron_selfjudge.config import ConfigError

        super().__init__(cfg)
        path = str(getattr(cfg.model, "hf_path", "") or "")
        if not path.strip():
            raise ConfigError(f"model.hf_path: model.preset={self.name} needs a local HF model folder "
                              "(e.g. `selfjudge convert tiny-qwen DIR` makes a tiny one)")
        try:
            self.hf_config = qwen.load_hf_config(path)
            if self.hf_config.model_type not in self.model_types:
                other = "qwen2.5-vl" if qwen.is_vision_language(self.hf_config) else "qwen2.5"
                raise qwen.HFFolderError(f"{path} holds a {self.hf_config.model_type} model, not "
                                         f"{' / '.join(self.model_types)}; use model.preset={other}")
            self._tokenizer = qwen.load_tokenizer(path)
            if not getattr(self._tokenizer, "chat_template", None):
                raise qwen.HFFolderError(f"{path}: the tokenizer has no chat template")
            self._processor = qwen.load_processor(path) if self.multimodal else None
        except qwen.HFFolderError as exc:
            raise ConfigError(f"model.hf_path: {exc}") from None
        self.hf_path = Path(path)

    # ---- text side ----
    @property
    def tokenizer(self) -> Any:
        """The folder's HF tokenizer (chat template, eos = the folder's, e.g. <|im_end|>)."""
        return self._tokenizer

    @property
    def processor(self) -> Any:
        """The image-only HF processor of the folder (None for a text model)."""
        return self._processor

    def chat_text(self, question: str, num_images: int, instruction: str) -> str:
        """The chat-template text of the prompt (one `<|image_pad|>` per image), with the generation prompt."""
        from megatron_selfjudge.data.prompts import build_prompt_text

        if num_images and not self.multimodal:
            raise ValueError(f"{self.name} is a text model: a prompt with {num_images} images cannot be encoded")
        content = [{"type": "image"}] * num_images + [{"type": "text", "text": build_prompt_text(question, instruction)}]
        return self._tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                   add_generation_prompt=True)

    def prompt_ids(self, question: str, num_images: int, instruction: str) -> list[int]:
        """Chat-template ids with one `<|image_pad|>` per image (see `expand_images`)."""
        from megatron_selfjudge.data.prompts import build_prompt_text

        text = build_prompt_text(question, instruction)
        template = self.chat_text(_SENTINEL, num_images, "")
        if template.count(_SENTINEL) != 1:
            raise ValueError(f"{self.hf_path}: the chat template does not place the user text exactly once")
        head, tail = template.split(_SENTINEL)
        enc = self._tokenizer
        # The template's own markup is parsed for special tokens; the question's text is not.
        return (enc.encode(head, add_special_tokens=False)
                + enc.encode(text, add_special_tokens=False, split_special_tokens=True)
                + enc.encode(tail, add_special_tokens=False))

    def image_token_counts(self, images: Optional[PackedImages]) -> list[int]:
        """Decoder tokens of each image: its patches / merge_size**2."""
        if images is None:
            return []
        merge = self.hf_config.vision_config.spatial_merge_size
        return (images.grid.prod(-1) // (merge * merge)).tolist()

    def expand_images(self, ids: list[int], images: Any) -> list[int]:
        """`ids` with the i-th `<|image_pad|>` repeated image_token_counts(images)[i] times."""
        if not self.multimodal:
            return ids
        pad = self.hf_config.image_token_id
        counts = self.image_token_counts(images)
        slots = sum(t == pad for t in ids)
        if slots != len(counts):
            raise ValueError(f"the prompt has {slots} image placeholders but {len(counts)} images were given")
        out: list[int] = []
        pending = iter(counts)
        for t in ids:
            out.extend([t] * next(pending) if t == pad else [t])
        return out

    def images(self, images: Sequence[Any]) -> Optional[PackedImages]:
        """pixel_values and image_grid_thw of the processor, as PackedImages (None for the text model)."""
        if not self.multimodal:
            return None
        if not images:  # an image-free row of a VL batch: no patches (rows keep one layout)
            v = self.hf_config.vision_config
            width = v.in_channels * v.temporal_patch_size * v.patch_size ** 2
            return PackedImages(torch.zeros(0, width), torch.zeros(0, 3, dtype=torch.long))
        out = self._processor.image_processor(images=[img.convert("RGB") for img in images], return_tensors="pt")
        return PackedImages(out["pixel_values"].float(), out["image_grid_thw"].long())

    def num_images(self, images: Sequence[Any]) -> int:
        return len(images) if self.multimodal else 0

    # ---- sizes ----
    def tensor_parallel_splits(self) -> list[tuple[str, int]]:
        """Attention heads and KV heads of the decoder (and the vision tower's heads)."""
        text = qwen.text_config(self.hf_config)
        splits = [(f"the decoder's {text.num_attention_heads} attention heads", text.num_attention_heads),
                  (f"the decoder's {text.num_key_value_heads} key/value heads", text.num_key_value_heads)]
        if self.multimodal:
            heads = self.hf_config.vision_config.num_heads
            splits.append((f"the vision tower's {heads} heads", heads))
        return splits

    def parameter_count(self) -> int:
        """All parameters of the folder's model, from its config.json (megatron/models/qwen_sizes.py)."""
        from megatron_selfjudge.megatron.models.qwen_sizes import parameter_counts

        return int(sum(parameter_counts(json.loads((self.hf_path / "config.json").read_text())).values()))

    # ---- module side ----
    def module_builder(self) -> Callable[[], torch.nn.Module]:
        m = self.cfg.model
        return functools.partial(_build_module, str(self.hf_path), m.params_dtype, m.transformer_impl)

    @classmethod
    def _qwen_of(cls, bare: torch.nn.Module) -> Optional[qwen.QwenModel]:
        found = getattr(bare, "selfjudge_qwen", None)
        if isinstance(found, qwen.QwenModel) and found.vision_language == cls.multimodal:
            return found
        return None

    @classmethod
    def describe(cls, bare: torch.nn.Module) -> Optional[ModelInfo]:
        found = cls._qwen_of(bare)
        if found is None:
            return None
        param = next(bare.parameters())
        marker = found.hf_config.vision_start_token_id if cls.multimodal else -1
        return ModelInfo(family=cls, multimodal=cls.multimodal, image_token_index=marker, image_seq_len=0,
                         max_seq_len=None, pipeline_parallel=_pipeline_parallel(), device=param.device,
                         dtype=param.dtype)

    @classmethod
    def language_model(cls, bare: torch.nn.Module) -> torch.nn.Module:
        return bare.language_model if cls.multimodal else bare

    # ---- HF conversion ----
    def export_hf(self, model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
        """This rank's weights under HF names (a collective over TP/PP: every rank runs it to the end)."""
        yield from qwen.export_hf_weights(qwen.of_module(model))

    def load_hf(self, model: torch.nn.Module, path: str) -> None:
        """Load an HF folder's safetensors into this rank's shard (a collective over TP)."""
        qwen.load_hf_weights(qwen.of_module(model), path)


def _build_module(hf_path: str, dtype: str, transformer_impl: str) -> torch.nn.Module:
    return qwen.build_model(hf_path, dtype=dtype, transformer_impl=transformer_impl).module


class QwenTextFamily(QwenFamily):
    """HF Qwen2 / Qwen2.5 text models (model_type qwen2)."""

    name = "qwen2.5"
    multimodal = False
    model_types = qwen.TEXT_MODEL_TYPES

    @classmethod
    def run(cls, model: torch.nn.Module, micro: Any, info: ModelInfo) -> torch.Tensor:
        found = qwen.of_module(model)
        return qwen.decoder_forward(found, micro.tokens, qwen.text_position_ids(micro.tokens), module=model)


class QwenVLFamily(QwenFamily):
    """HF Qwen2.5-VL (model_type qwen2_5_vl), images through the PIL image processor."""

    name = "qwen2.5-vl"
    multimodal = True
    model_types = qwen.VL_MODEL_TYPES

    @classmethod
    def run(cls, model: torch.nn.Module, micro: Any, info: ModelInfo) -> torch.Tensor:
        found = qwen.of_module(model)
        mask = prompt_image_mask(micro.tokens, micro.loss_mask, found.hf_config.image_token_id)
        images = micro.row_images()
        pixels, grid = (None, None) if images is None else (images.rows.to(info.device, info.dtype), images.grid)
        positions = qwen.mrope_position_ids(found.hf_config, micro.tokens, grid, image_mask=mask)
        return qwen.decoder_forward(found, micro.tokens, positions, pixels, grid, image_mask=mask, module=model)

    @classmethod
    def inference_wrapper(cls, model: torch.nn.Module, wrapper_config: Any, context: Any,
                          images: Optional[Any], extra_per_row: int) -> Any:
        wrapper = _vl_wrapper_class()(model, wrapper_config, context)
        wrapper.set_images(qwen.of_module(model), images)
        return wrapper


@functools.lru_cache(maxsize=None)
def _vl_wrapper_class() -> type:
    """megatron's GPT inference wrapper for Qwen2.5-VL, defined on first use (imports megatron)."""
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper

    class QwenVLInferenceWrapper(GPTInferenceWrapper):
        """Static KV-cache decoding with M-RoPE positions; the vision tower runs once per batch.

        mbridge's Qwen2_5VLModel.forward refuses an inference context, so this wrapper places the
        vision embeddings itself (qwen.decoder_forward) and drives the language model, whose
        attention keeps megatron's static KV cache. Megatron slices the rotary embedding of the
        whole context at the cache offset, so each step passes the positions [3, b, :end].
        """

        def set_images(self, found: qwen.QwenModel, images: Optional[PackedImages]) -> None:
            """The images of the batch's rows in row order (PackedImages), or None."""
            self._qwen = found
            self._images = images
            device = next(found.module.parameters()).device
            dtype = next(found.module.parameters()).dtype
            self._pixels = None if images is None else images.rows.to(device, dtype)
            self._grid = None if images is None else images.grid.to(device)

        def prep_inference_input(self, prompts_tokens: torch.Tensor) -> dict:
            # The buffer holds prompts then padding: every later token is text, so the positions
            # of the whole buffer are known now (text continues 1-D after the prompt).
            mask = prompts_tokens == self._qwen.hf_config.image_token_id
            positions = qwen.mrope_position_ids(self._qwen.hf_config, prompts_tokens, self._grid, image_mask=mask)
            # Embedding row of each image token (row-major, as the tower emits them): prompts of
            # different lengths put some image tokens after the prefill window.
            slot = (torch.cumsum(mask.flatten().long(), 0) - 1).view_as(mask)
            self._vision = None
            return {"tokens": prompts_tokens, "position_ids": positions, "image_mask": mask, "slot": slot,
                    "attention_mask": None}

        def get_batch_for_context_window(self, inference_input: dict, context_start_position: int,
                                         context_end_position: int) -> dict:
            start, end = context_start_position, context_end_position
            return {"tokens": inference_input["tokens"][:, start:end],
                    "position_ids": inference_input["position_ids"][:, :, :end],
                    "image_mask": inference_input["image_mask"][:, start:end],
                    "slot": inference_input["slot"][:, start:end], "attention_mask": None}

        def _forward(self, inference_input: dict) -> torch.Tensor:
            from megatron.core.utils import unwrap_model

            mask = inference_input["image_mask"]
            vision = None
            if bool(mask.any()) and unwrap_model(self.model).pre_process:
                if self._vision is None:  # once per batch, on the first window that shows an image
                    self._vision = qwen.vision_embeddings(self._qwen, self._pixels, self._grid, module=self.model)
                vision = self._vision[inference_input["slot"][mask]]
            return qwen.decoder_forward(self._qwen, inference_input["tokens"], inference_input["position_ids"],
                                        image_mask=mask, module=self.model, inference_context=self.inference_context,
                                        runtime_gather_output=True, vision=vision)

    return QwenVLInferenceWrapper
