"""Token ids and image tensors for the policy: prompts, responses and training sequences.

Prompt layout: ``[bos] [image]*n_images question+instruction``, one placeholder id per image
(or ``image_tokens_per_image`` of them for processors that pre-expand images). Which id a model
uses is its family's business (``megatron/models/``): it passes ``image_token_id``, or the
tokenizer carries one.

Training sequences (prompt + response) are right-padded, so token t sits at column t, and follow
megatron's shift convention: ``tokens = full[:-1]``, ``labels = full[1:]``, and
``loss_mask[b, t] = 1`` exactly when ``labels[b, t]`` is a response token (never a prompt, image
placeholder or pad token).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import torch
from PIL import Image

from .prompts import FORMAT_INSTRUCTION, build_prompt_text


class TokenizerLike(Protocol):
    """What collate needs of a tokenizer (the project's character tokenizer or a Hugging Face one)."""

    pad_token_id: int
    eos_token_id: int

    def encode(self, text: str, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class SequenceBatch:
    """Prompt + response sequences for the policy update, in megatron's shifted layout."""

    tokens: torch.Tensor  # [B, T] long: full[:, :-1]
    labels: torch.Tensor  # [B, T] long: full[:, 1:] (pad id where there is nothing to predict)
    loss_mask: torch.Tensor  # [B, T] fp32: 1 where labels is a response token


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


def pad_sequences(seqs: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """Right-pad id lists with pad_id to long [B, L_max]."""
    if not seqs:
        raise ValueError("seqs: need at least one sequence")
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), pad_id, dtype=torch.long)
    for b, s in enumerate(seqs):
        ids[b, :len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return ids


def build_sequences(prompt_ids: Sequence[Sequence[int]], response_ids: Sequence[Sequence[int]],
                    pad_id: int) -> SequenceBatch:
    """Concatenate prompts and responses, right-padded; loss_mask is 1 only where the label is a response token."""
    if len(prompt_ids) != len(response_ids):
        raise ValueError(f"prompt_ids ({len(prompt_ids)}) and response_ids ({len(response_ids)}) "
                         "must have the same length")
    if any(len(p) == 0 for p in prompt_ids):
        raise ValueError("prompt_ids: every prompt needs at least one token (the first label)")
    ids = pad_sequences([list(p) + list(r) for p, r in zip(prompt_ids, response_ids)], pad_id)
    is_response = torch.zeros(ids.shape, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompt_ids, response_ids)):
        is_response[b, len(p):len(p) + len(r)] = True
    return SequenceBatch(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=is_response[:, 1:].float())
