"""The in-process tiny families: a text GPTModel and a LLaVA-style model (CLIP ViT + MLP + GPT).

Both read the project's character tokenizer and the `model` section of the config; the builders
are in this package's __init__. LLaVA marks an image by one placeholder id (-200) in input_ids,
which the model replaces by (image_size / patch_size) ** 2 embeddings. Neither has HF weight
names (`export_hf` / `load_hf` raise NotSupported).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional, Sequence

import torch

from megatron_selfjudge.config import torch_dtype
from megatron_selfjudge.megatron.models import builders as models
from megatron_selfjudge.megatron.models.family import ModelFamily, ModelInfo

LLAVA_IMAGE_TOKEN_INDEX = -200


def _pipeline_parallel() -> bool:
    from megatron.core import parallel_state

    return parallel_state.get_pipeline_model_parallel_world_size() > 1


def _first_param(bare: torch.nn.Module) -> torch.nn.Parameter:
    return next(bare.parameters())


def _layer_params(hidden: int, ffn: int) -> int:
    # Local-spec layer: two LayerNorms (weight+bias), QKV and output projections, a two-layer MLP, all with bias.
    return 4 * hidden * hidden + 2 * hidden * ffn + 9 * hidden + ffn


class TinyGPTFamily(ModelFamily):
    """Text-only tiny GPT with the character tokenizer."""

    name = "tiny-gpt"
    multimodal = False

    def __init__(self, cfg: Any):
        from megatron_selfjudge.data.tokenizer import CharTokenizer

        super().__init__(cfg)
        self._tokenizer = CharTokenizer()

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    def prompt_ids(self, question: str, num_images: int, instruction: str) -> list[int]:
        from megatron_selfjudge.data import collate

        return collate.encode_prompt(question, num_images, self._tokenizer,
                                     image_token_id=LLAVA_IMAGE_TOKEN_INDEX, instruction=instruction)

    def _context_len(self) -> int:
        """Longest text sequence of the run: rollouts, and the generative Judge's prompts when it writes."""
        from megatron_selfjudge.config import uses_generative_judge

        cfg = self.cfg
        text = cfg.rollout.max_prompt_len + cfg.rollout.max_response_len
        if uses_generative_judge(cfg):
            text = max(text, cfg.judge.max_prompt_len + cfg.judge.max_tokens)
        return text

    def _common(self, max_seq_len: int) -> dict:
        from megatron.core import parallel_state

        m = self.cfg.model
        return dict(vocab_size=self._tokenizer.vocab_size, num_layers=m.num_layers, hidden_size=m.hidden_size,
                    num_attention_heads=m.num_attention_heads, ffn_hidden_size=m.ffn_hidden_size,
                    max_seq_len=max_seq_len, pre_process=parallel_state.is_pipeline_first_stage(),
                    post_process=parallel_state.is_pipeline_last_stage(), transformer_impl=m.transformer_impl,
                    params_dtype=torch_dtype(m.params_dtype), seed=self.cfg.trainer.seed)

    def module_builder(self) -> Callable[[], torch.nn.Module]:
        return functools.partial(models.build_gpt, **self._common(self._context_len()))

    def parameter_count(self) -> int:
        """Decoder layers, final norm, untied embedding and output layer (local spec)."""
        m = self.cfg.model
        h = m.hidden_size
        return m.num_layers * _layer_params(h, m.ffn_hidden_size) + 2 * h + 2 * self._tokenizer.vocab_size * h

    @classmethod
    def describe(cls, bare: torch.nn.Module) -> Optional[ModelInfo]:
        from megatron.core.models.gpt import GPTModel

        if not isinstance(bare, GPTModel):
            return None
        param = _first_param(bare)
        return ModelInfo(family=cls, multimodal=False, image_token_index=LLAVA_IMAGE_TOKEN_INDEX,
                         image_seq_len=0, max_seq_len=None, pipeline_parallel=_pipeline_parallel(),
                         device=param.device, dtype=param.dtype)

    @classmethod
    def run(cls, model: torch.nn.Module, micro: Any, info: ModelInfo) -> torch.Tensor:
        positions = torch.arange(micro.tokens.shape[1], device=info.device).expand_as(micro.tokens)
        return model(micro.tokens, positions, None)


class TinyLlavaFamily(TinyGPTFamily):
    """Tiny LLaVA: CLIP-style ViT, MLP projector, GPT decoder; one placeholder per image."""

    name = "tiny-llava"
    multimodal = True

    def images(self, images: Sequence[Any]) -> Optional[torch.Tensor]:
        from megatron_selfjudge.data.collate import image_to_tensor

        return torch.stack([image_to_tensor(img, self.cfg.model.image_size) for img in images])

    def image_positions(self) -> int:
        """Patch embeddings per image (the class token is dropped)."""
        m = self.cfg.model
        return (m.image_size // m.patch_size) ** 2

    def tensor_parallel_splits(self) -> list[tuple[str, int]]:
        """The ViT is tensor-parallel too; its head count follows its width."""
        m = self.cfg.model
        heads = models.tiny_vit_dims(m.vision_hidden_size)["vision_num_attention_heads"]
        return [(f"the ViT's {heads} heads (model.vision_hidden_size={m.vision_hidden_size} / 16)", heads)]

    def parameter_count(self) -> int:
        """The GPT's, plus the ViT (patch conv, position embeddings, class token, ln_pre, layers) and projector."""
        m = self.cfg.model
        h, hv = m.hidden_size, m.vision_hidden_size
        count = super().parameter_count()
        count += 3 * m.patch_size ** 2 * hv                      # patch conv, no bias
        count += (self.image_positions() + 1) * hv + hv + 2 * hv  # position embeddings (+ class token), class token, ln_pre
        count += m.vision_num_layers * _layer_params(hv, models.tiny_vit_dims(hv)["vision_ffn_hidden_size"])
        count += hv * h + h + h * h + h                          # MLP projector
        return count

    def module_builder(self) -> Callable[[], torch.nn.Module]:
        m = self.cfg.model
        return functools.partial(models.build_tiny_llava, vision_num_layers=m.vision_num_layers,
                                 vision_hidden_size=m.vision_hidden_size, **models.tiny_vit_dims(m.vision_hidden_size),
                                 img_size=m.image_size, patch_dim=m.patch_size,
                                 image_token_index=LLAVA_IMAGE_TOKEN_INDEX,
                                 **self._common(self._context_len() + self.image_positions()))

    @classmethod
    def describe(cls, bare: torch.nn.Module) -> Optional[ModelInfo]:
        from megatron.core.models.multimodal.llava_model import LLaVAModel

        if not isinstance(bare, LLaVAModel):
            return None
        param = _first_param(bare)
        return ModelInfo(family=cls, multimodal=True, image_token_index=bare.image_token_index,
                         image_seq_len=bare.img_seq_len, max_seq_len=bare._language_max_sequence_length,
                         pipeline_parallel=_pipeline_parallel(), device=param.device, dtype=param.dtype)

    @classmethod
    def run(cls, model: torch.nn.Module, micro: Any, info: ModelInfo) -> torch.Tensor:
        positions = torch.arange(micro.tokens.shape[1], device=info.device).expand_as(micro.tokens)
        placeholders = int((micro.tokens == info.image_token_index).sum())
        images = micro.row_images()
        if images is None:
            images = torch.zeros(0, 3, 1, 1)  # LLaVAModel needs a tensor even when there is no image
        if images.shape[0] != placeholders:
            raise ValueError(f"tokens hold {placeholders} image placeholders ({info.image_token_index}) but the "
                             f"batch has {images.shape[0]} images")
        images = images.to(device=info.device, dtype=info.dtype)
        num_tiles = torch.ones(images.shape[0], dtype=torch.int, device=info.device)
        output, _ = model(images, micro.tokens, positions, None, num_image_tiles=num_tiles)
        return output

    @classmethod
    def language_model(cls, bare: torch.nn.Module) -> torch.nn.Module:
        return bare.language_model

    @classmethod
    def inference_wrapper(cls, model: torch.nn.Module, wrapper_config: Any, context: Any,
                          images: Optional[torch.Tensor], extra_per_row: int) -> Any:
        from megatron.core.utils import get_model_config, unwrap_model

        wrapper = _llava_wrapper_class()(model, wrapper_config, context)
        dtype = get_model_config(model).params_dtype
        device = _first_param(unwrap_model(model)).device
        pixels = images.to(device=device, dtype=dtype) if images is not None else \
            torch.empty(0, dtype=dtype, device=device)
        wrapper.set_images(pixels, unwrap_model(model).image_token_index, extra_per_row)
        return wrapper


@functools.lru_cache(maxsize=None)
def _llava_wrapper_class() -> type:
    """megatron's GPT inference wrapper adapted to LLaVAModel, defined on first use (imports megatron).

    megatron-core's `VLMInferenceWrapper` sizes the KV-cache offset with the image count of the
    whole batch (right only for batch size 1); this one advances it by one row's image embeddings.
    """
    from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import GPTInferenceWrapper
    from megatron.core.utils import unwrap_model

    class LlavaInferenceWrapper(GPTInferenceWrapper):
        """GPT wrapper for LLaVAModel: images on the prefill step, per-row image KV offsets."""

        def set_images(self, images: torch.Tensor, image_token_index: int, extra_per_row: int) -> None:
            """Images [sum of images, C, H, W] in row order; extra_per_row = embeddings - tokens."""
            self._images = images
            self._num_tiles = torch.ones(images.shape[0], dtype=torch.int, device=images.device)
            self._image_token_index = image_token_index
            self._extra_per_row = extra_per_row

        def _forward(self, inference_input: dict) -> torch.Tensor:
            tokens = inference_input["tokens"]
            if not bool((tokens == self._image_token_index).any()):
                # No image in this window: run the decoder alone. LLaVAModel's KV-cache branch
                # hands the decoder [batch, seq, h] embeddings where it expects [seq, batch, h],
                # which is only right for batch size 1.
                return unwrap_model(self.model).language_model(
                    tokens, inference_input["position_ids"], None,
                    inference_context=self.inference_context, runtime_gather_output=True,
                )
            out = self.model(
                self._images,
                tokens,
                position_ids=inference_input["position_ids"],
                attention_mask=None,
                inference_context=self.inference_context,
                num_image_tiles=self._num_tiles,
                runtime_gather_output=True,
            )
            return out[0] if isinstance(out, tuple) else out

        def run_one_forward_step(self, inference_input: dict, recv_buffer_seq_len=None) -> torch.Tensor:
            tokens = inference_input["tokens"]
            has_images = bool((tokens == self._image_token_index).any())
            # Each image token expands to img_seq_len embeddings in the decoder's sequence.
            seq_len = tokens.size(1) + (self._extra_per_row if has_images else 0)
            offset = self.inference_context.sequence_len_offset
            logits = super().run_one_forward_step(inference_input, recv_buffer_seq_len=seq_len)
            self.inference_context.sequence_len_offset = offset + seq_len
            if has_images:
                # Later steps must skip the vision tower on every stage, not only the first one
                # (LLaVA sets this key only where the encoder lives).
                self.inference_context.key_value_memory_dict["image_tokens_count"] = self._extra_per_row
            return logits

    return LlavaInferenceWrapper
