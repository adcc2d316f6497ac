"""Records + tokenizer -> tensors for the multimodal policy.

Prompt layout: ``[bos] [image]*n_images question+instruction``. Each image is ONE
placeholder id; megatron-core's ``LLaVAModel`` swaps every placeholder for the ViT's
patch embeddings (its default ``image_token_index`` is -200), so the id is configurable:
the tokenizer's own ``image_token_id`` for a model that embeds it, -200 for LLaVAModel,
and ``image_tokens_per_image`` > 1 for processors that pre-expand (Qwen2.5-VL).

Padding: prompts are LEFT-padded by default, so every prompt ends at the same column and
generation appends at one position for the whole batch; training sequences
(prompt + response) are RIGHT-padded by default, so token t sits at column t. Both accept
either side, and ``position_ids`` always count real tokens from 0, whatever the padding.

Training sequences follow megatron's shift convention: ``tokens = full[:-1]``,
``labels = full[1:]``, and ``loss_mask[b, t] = 1`` exactly when ``labels[b, t]`` is a
response token (never a prompt, image placeholder or pad token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from .datasets import PromptRecord
from .prompts import FORMAT_INSTRUCTION, build_prompt_text

PADDING_SIDES = ("left", "right")


class TokenizerLike(Protocol):
    """What collate needs of a tokenizer (CharTokenizer or a Hugging Face tokenizer)."""

    pad_token_id: int
    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class PromptBatch:
    """A batch of prompts ready for generation."""

    input_ids: torch.Tensor  # [B, P] long
    attention_mask: torch.Tensor  # [B, P] bool, True on real tokens
    position_ids: torch.Tensor  # [B, P] long, 0 at each prompt's first real token
    images: torch.Tensor  # [N_images, C, H, W] fp32, normalised; N_images = B for one image each
    num_images: torch.Tensor  # [B] long: images of each prompt, in order
    num_image_tiles: torch.Tensor  # [N_images] long: 1 tile per image (LLaVAModel's argument)
    prompt_lengths: torch.Tensor  # [B] long, real tokens per prompt
    prompt_ids: list[list[int]]  # unpadded token ids, for building training sequences later
    uids: list[str]
    answers: list[str | None]
    padding_side: str


@dataclass
class SequenceBatch:
    """Prompt + response sequences for the policy update, in megatron's shifted layout."""

    tokens: torch.Tensor  # [B, T] long: full[:, :-1]
    labels: torch.Tensor  # [B, T] long: full[:, 1:] (pad id where there is nothing to predict)
    loss_mask: torch.Tensor  # [B, T] fp32: 1 where labels is a response token
    attention_mask: torch.Tensor  # [B, T] bool: True where tokens is a real token
    position_ids: torch.Tensor  # [B, T] long
    prompt_lengths: torch.Tensor  # [B] long
    response_lengths: torch.Tensor  # [B] long


def _check_side(padding_side: str) -> None:
    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side: must be 'left' or 'right', got {padding_side!r}")


def image_to_tensor(image: Image.Image, image_size: int, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.5, 0.5, 0.5)) -> torch.Tensor:
    """RGB image -> fp32 [3, S, S], resized (bicubic) only when its size differs, then normalised."""
    if not isinstance(image, Image.Image):
        raise TypeError(f"image: expected a PIL image, got {type(image).__name__}")
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError("mean/std: need three values each, std > 0")
    image = image.convert("RGB")
    if image.size != (image_size, image_size):
        image = image.resize((image_size, image_size), Image.BICUBIC)
    arr = torch.from_numpy(np.asarray(image, dtype=np.float32).transpose(2, 0, 1).copy()) / 255.0
    return (arr - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def encode_prompt(question: str, n_images: int, tokenizer: TokenizerLike, *,
                  image_token_id: int | None = None, image_tokens_per_image: int = 1,
                  instruction: str = FORMAT_INSTRUCTION, add_bos: bool = True) -> list[int]:
    """Prompt ids: [bos] + image placeholders + encode(question + instruction)."""
    if image_token_id is None:
        image_token_id = getattr(tokenizer, "image_token_id", None)
        if image_token_id is None:
            raise ValueError("image_token_id: the tokenizer has no image_token_id; pass one")
    if n_images < 0 or image_tokens_per_image < 1:
        raise ValueError("n_images must be >= 0 and image_tokens_per_image >= 1")
    bos = getattr(tokenizer, "bos_token_id", None)
    head = [bos] if add_bos and bos is not None else []
    text = tokenizer.encode(build_prompt_text(question, instruction), add_special_tokens=False)
    return head + [image_token_id] * (n_images * image_tokens_per_image) + list(text)


def encode_response(text: str, tokenizer: TokenizerLike, add_eos: bool = True) -> list[int]:
    """Response ids (e.g. an SFT target), ending with EOS so the model learns to stop."""
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    return ids + [tokenizer.eos_token_id] if add_eos else ids


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int,
                  padding_side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """Pad id lists to [B, L_max]; returns (ids long, mask bool True on real tokens)."""
    _check_side(padding_side)
    if not seqs:
        raise ValueError("seqs: need at least one sequence")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for b, s in enumerate(seqs):
        start = width - len(s) if padding_side == "left" else 0
        ids[b, start:start + len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        mask[b, start:start + len(s)] = True
    return ids, mask


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Positions counting real tokens from 0 (pads get 0), whichever side is padded."""
    return (mask.long().cumsum(dim=-1) - 1).clamp(min=0) * mask.long()


def collate_prompts(records: Sequence[PromptRecord], tokenizer: TokenizerLike, image_size: int, *,
                    image_token_id: int | None = None, image_tokens_per_image: int = 1,
                    instruction: str = FORMAT_INSTRUCTION, padding_side: str = "left",
                    max_prompt_len: int | None = None, mean: Sequence[float] = (0.5, 0.5, 0.5),
                    std: Sequence[float] = (0.5, 0.5, 0.5)) -> PromptBatch:
    """Tokenise, pad and stack a batch of records for generation."""
    _check_side(padding_side)
    if not records:
        raise ValueError("records: need at least one record")
    prompt_ids, pixels = [], []
    for rec in records:
        if not rec.images:
            raise ValueError(f"record {rec.uid}: has no image")
        ids = encode_prompt(rec.question, len(rec.images), tokenizer, image_token_id=image_token_id,
                            image_tokens_per_image=image_tokens_per_image, instruction=instruction)
        if max_prompt_len is not None and len(ids) > max_prompt_len:
            # Cutting the question would change the problem: refuse instead.
            raise ValueError(f"record {rec.uid} ({rec.source_file} row {rec.row}): prompt has "
                             f"{len(ids)} tokens > max_prompt_len {max_prompt_len}")
        prompt_ids.append(ids)
        pixels.extend(image_to_tensor(img, image_size, mean, std) for img in rec.images)
    input_ids, mask = pad_sequences(prompt_ids, tokenizer.pad_token_id, padding_side)
    n_img = torch.tensor([len(r.images) for r in records], dtype=torch.long)
    return PromptBatch(input_ids=input_ids, attention_mask=mask,
                       position_ids=position_ids_from_mask(mask), images=torch.stack(pixels),
                       num_images=n_img, num_image_tiles=torch.ones(len(pixels), dtype=torch.long),
                       prompt_lengths=torch.tensor([len(p) for p in prompt_ids], dtype=torch.long),
                       prompt_ids=prompt_ids, uids=[r.uid for r in records],
                       answers=[r.answer for r in records], padding_side=padding_side)


def build_sequences(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    pad_id: int, padding_side: str = "right") -> SequenceBatch:
    """Concatenate prompts and responses; loss_mask is 1 only where the label is a response token."""
    _check_side(padding_side)
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids ({len(prompt_ids)}) and response_ids ({len(response_ids)}) "
                         "must have the same length")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token (the first label)")
    full = [list(p) + list(r) for p, r in zip(prompt_ids, response_ids)]
    ids, mask = pad_sequences(full, pad_id, padding_side)
    is_response = torch.zeros_like(mask)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        start = (ids.shape[1] - len(full[b])) if padding_side == "left" else 0
        is_response[b, start + len(p):start + len(p) + len(r)] = True
    tokens_mask = mask[:, :-1]
    return SequenceBatch(tokens=ids[:, :-1], labels=ids[:, 1:],
                         loss_mask=is_response[:, 1:].float(), attention_mask=tokens_mask,
                         position_ids=position_ids_from_mask(tokens_mask),
                         prompt_lengths=torch.tensor([len(p) for p in prompt_ids], dtype=torch.long),
                         response_lengths=torch.tensor([len(r) for r in response_ids], dtype=torch.long))
