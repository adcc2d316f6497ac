"""The policy-update batch, and how it is cut: mini-batches of prompts, DP shards, token-budget micro-batches.

Layout (megatron's shifted convention, as data/collate.py builds it): row b holds `tokens[b, t]`
whose next token is `labels[b, t]`; `loss_mask[b, t]` is 1 exactly where `labels[b, t]` is a
response token. Rows are RIGHT-padded: with causal attention a real token never sees the padding
after it, so no attention mask is needed. Each image is one `image_token_index` placeholder in
`tokens` that a model family may expand into `image_seq_len` embeddings; row b shows
`num_images[b]` images, in row order. A prompt's G samples show the same images, so a batch may
hold each image once: `image_index` then says which of `images` each row's image slot shows,
and `row_images()` materialises them in row order only for a micro-batch's forward.

Images are a [N, C, H, W] tensor, or a `PackedImages` when a family's processor makes images of
different sizes (each image a variable number of rows of patch features, e.g. Qwen2.5-VL's
pixel_values and image_grid_thw); the batch only counts, selects, concatenates and moves them.

Micro-batches are padded, not packed (packed THD attention needs Transformer Engine): a
micro-batch of n rows costs n * (longest row, images expanded) tokens, kept under the budget.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional, Sequence

import torch


@dataclass
class PackedImages:
    """N images of different sizes in one tensor: their rows stacked, and each image's grid.

    Image i owns `grid[i].prod()` consecutive rows of `rows` (e.g. patches of a ViT that takes
    variable-size images). Indexing with image indices gives the PackedImages of those images.
    """

    rows: "torch.Tensor"  # [sum of rows, D]
    grid: "torch.Tensor"  # [N, k] long; image i has prod(grid[i]) rows

    def __post_init__(self) -> None:
        if self.rows.dim() != 2 or self.grid.dim() != 2 or self.grid.dtype != torch.long:
            raise ValueError(f"PackedImages needs rows [R, D] and a long grid [N, k], got shapes "
                             f"{tuple(self.rows.shape)} and {tuple(self.grid.shape)} ({self.grid.dtype})")
        if int(self.grid.prod(-1).sum()) != self.rows.shape[0]:
            raise ValueError(f"the grid gives {int(self.grid.prod(-1).sum())} rows, the images hold "
                             f"{self.rows.shape[0]}")

    def __len__(self) -> int:
        return self.grid.shape[0]

    def __getitem__(self, index) -> "PackedImages":
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        counts = self.grid.prod(-1)
        starts = (torch.cumsum(counts, 0) - counts).tolist()
        pieces = [self.rows[starts[i]:starts[i] + int(counts[i])] for i in idx.tolist()]
        return PackedImages(torch.cat(pieces) if pieces else self.rows[:0], self.grid[idx.to(self.grid.device)])

    def to(self, device: "torch.device | str") -> "PackedImages":
        """A copy on `device`."""
        return PackedImages(self.rows.to(device), self.grid.to(device))


def concat_images(parts: Sequence) -> "torch.Tensor | PackedImages":
    """Images of several rows in order, as one [N, C, H, W] tensor or one PackedImages."""
    if all(isinstance(p, PackedImages) for p in parts):
        return PackedImages(torch.cat([p.rows for p in parts]), torch.cat([p.grid for p in parts]))
    return torch.cat(list(parts))


@dataclass
class PolicyBatch:
    """B sequences for the GRPO update (and for forward-only log-probs)."""

    tokens: torch.Tensor  # [B, T] long, image placeholders included
    labels: torch.Tensor  # [B, T] long, next token of each position
    loss_mask: torch.Tensor  # [B, T] 0/1: 1 where labels is a response token
    advantages: Optional[torch.Tensor] = None  # [B] fp32, one per sequence (needed for training)
    images: Optional[torch.Tensor] = None  # [N_images, C, H, W] or PackedImages (row order unless image_index); None: text-only
    num_images: Optional[torch.Tensor] = None  # [B] long; None = count placeholders in tokens
    image_index: Optional[torch.Tensor] = None  # [sum num_images] long: the image each slot shows; None: identity
    old_logp: Optional[torch.Tensor] = None  # [B, T] fp32 behaviour-policy log-probs, or None (on-policy)
    ref_logp: Optional[torch.Tensor] = None  # [B, T] fp32 reference log-probs, or None (no KL term)
    rollout_weight: Optional[torch.Tensor] = None  # [B, T] fp32 rollout-correction weights (loss.rollout_correction)

    def __post_init__(self) -> None:
        _check_2d("tokens", self.tokens, integer=True)
        shape = tuple(self.tokens.shape)
        if shape[0] == 0 or shape[1] == 0:
            raise ValueError(f"tokens must be a non-empty [B, T] tensor, got shape {shape}")
        _check_2d("labels", self.labels, integer=True, shape=shape)
        _check_2d("loss_mask", self.loss_mask, shape=shape)
        if not bool(((self.loss_mask == 0) | (self.loss_mask == 1)).all()):
            raise ValueError("loss_mask must hold only 0/1 values")
        for name in ("old_logp", "ref_logp", "rollout_weight"):
            value = getattr(self, name)
            if value is not None:
                _check_2d(name, value, shape=shape, floating=True)
        if self.advantages is not None and tuple(self.advantages.shape) != (shape[0],):
            raise ValueError(f"advantages must have shape ({shape[0]},), got {tuple(self.advantages.shape)}")
        if self.num_images is not None and tuple(self.num_images.shape) != (shape[0],):
            raise ValueError(f"num_images must have shape ({shape[0]},), got {tuple(self.num_images.shape)}")
        if self.images is not None:
            if not isinstance(self.images, PackedImages) and self.images.dim() != 4:
                raise ValueError(f"images must be [N, C, H, W], got shape {tuple(self.images.shape)}")
            slots = len(self.images) if self.image_index is None else self.image_index.numel()
            if self.num_images is not None and int(self.num_images.sum()) != slots:
                raise ValueError(f"num_images sums to {int(self.num_images.sum())} but the batch has {slots} "
                                 "image slots")
        if self.image_index is not None:
            if self.images is None or self.image_index.dim() != 1 or self.image_index.dtype != torch.long:
                raise ValueError("image_index must be a 1-D long tensor beside images")
            if self.image_index.numel() and not (0 <= int(self.image_index.min())
                                                 and int(self.image_index.max()) < len(self.images)):
                raise ValueError(f"image_index must lie in [0, {len(self.images)})")

    @classmethod
    def from_sequences(cls, sequences, advantages: torch.Tensor, images: Optional[torch.Tensor] = None,
                       num_images: Optional[torch.Tensor] = None,
                       image_index: Optional[torch.Tensor] = None) -> "PolicyBatch":
        """From data.collate.SequenceBatch (right-padded) plus per-sequence advantages and images."""
        if getattr(sequences, "tokens", None) is None or getattr(sequences, "loss_mask", None) is None:
            raise TypeError("sequences must be a data.collate.SequenceBatch (tokens, labels, loss_mask)")
        return cls(tokens=sequences.tokens, labels=sequences.labels, loss_mask=sequences.loss_mask,
                   advantages=advantages, images=images, num_images=num_images, image_index=image_index)

    @classmethod
    def sharing_images(cls, sequences, advantages: torch.Tensor,
                       images_per_row: Sequence) -> "PolicyBatch":
        """`from_sequences` for rows given their image tensors, holding each distinct tensor once.

        Rows that pass the same tensor (or PackedImages) object, a prompt's G samples, share its storage.
        """
        distinct: dict[int, int] = {}
        held, index = [], []
        for imgs in images_per_row:
            if id(imgs) not in distinct:
                distinct[id(imgs)] = sum(len(t) for t in held)
                held.append(imgs)
            index.extend(range(distinct[id(imgs)], distinct[id(imgs)] + len(imgs)))
        return cls.from_sequences(sequences, advantages, images=concat_images(held),
                                  num_images=torch.tensor([len(im) for im in images_per_row]),
                                  image_index=torch.tensor(index, dtype=torch.long))

    def row_images(self) -> Optional[torch.Tensor]:
        """The images of every row's slots in row order ([sum num_images, C, H, W] or PackedImages), or None."""
        if self.images is None or self.image_index is None:
            return self.images
        return self.images[self.image_index]

    @property
    def size(self) -> int:
        """Number of sequences."""
        return self.tokens.shape[0]

    def images_per_row(self, image_token_index: int) -> torch.Tensor:
        """[B] long: images of each row (`num_images`, or its placeholders when that is None)."""
        if self.num_images is not None:
            return self.num_images.long()
        return (self.tokens == image_token_index).sum(dim=1)

    def row_lengths(self, image_token_index: int) -> torch.Tensor:
        """[B] long: columns each row needs (through its last response label and its last image)."""
        cols = torch.arange(1, self.tokens.shape[1] + 1).expand_as(self.tokens)
        needed = torch.where(self.loss_mask.bool() | (self.tokens == image_token_index), cols, 0)
        return needed.max(dim=1).values.clamp(min=1)

    def token_costs(self, image_token_index: int, image_seq_len: int) -> torch.Tensor:
        """[B] long: decoder positions each row occupies once every image is expanded."""
        if image_seq_len < 0:
            raise ValueError(f"image_seq_len must be >= 0, got {image_seq_len}")
        extra = (self.tokens == image_token_index).sum(dim=1) * max(image_seq_len - 1, 0)
        return self.row_lengths(image_token_index) + extra

    def select(self, indices: Sequence[int], image_token_index: int) -> "PolicyBatch":
        """Rows `indices` (in that order), trimmed to the columns they need; images follow their rows."""
        idx = torch.as_tensor(list(indices), dtype=torch.long)
        if idx.numel() == 0:
            raise ValueError("select needs at least one row index")
        if int(idx.min()) < 0 or int(idx.max()) >= self.size:
            raise ValueError(f"row indices must lie in [0, {self.size}), got {idx.tolist()}")
        width = int(self.row_lengths(image_token_index)[idx].max())
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None or f.name in ("images", "image_index"):
                out[f.name] = value
            elif value.dim() == 2:
                out[f.name] = value[idx, :width]
            else:
                out[f.name] = value[idx]
        out["images"], out["image_index"] = _select_images(self, idx, image_token_index)
        if self.images is not None and self.num_images is None:
            out["num_images"] = self.images_per_row(image_token_index)[idx]
        return PolicyBatch(**out)

    def to(self, device: torch.device | str) -> "PolicyBatch":
        """A copy with every tensor on `device`."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        return PolicyBatch(**{k: None if v is None else v.to(device) for k, v in moved.items()})

    def with_logprobs(self, old_logp: Optional[torch.Tensor] = None,
                      ref_logp: Optional[torch.Tensor] = None) -> "PolicyBatch":
        """A copy carrying the given old/reference log-probs ([B, T] each)."""
        return replace(self, old_logp=old_logp, ref_logp=ref_logp)


def _check_2d(name: str, value: torch.Tensor, *, integer: bool = False, floating: bool = False,
              shape: Optional[tuple] = None) -> None:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != 2:
        raise ValueError(f"{name} must be [B, T], got shape {tuple(value.shape)}")
    if shape is not None and tuple(value.shape) != shape:
        raise ValueError(f"{name} shape {tuple(value.shape)} must equal tokens shape {shape}")
    if integer and value.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"{name} must be an integer tensor, got {value.dtype}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")


def _select_images(batch: PolicyBatch, idx: torch.Tensor,
                   image_token_index: int) -> tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """(images, image_index) of rows `idx`: the images they show, each once when the batch shares them."""
    if batch.images is None:
        return None, None
    counts = batch.images_per_row(image_token_index)
    starts = torch.cumsum(counts, 0) - counts
    slots = torch.cat([torch.arange(int(starts[i]), int(starts[i] + counts[i])) for i in idx.tolist()])
    if batch.image_index is None:
        return batch.images[slots], None
    shown = batch.image_index[slots]
    kept, remapped = torch.unique(shown, sorted=True, return_inverse=True)
    return batch.images[kept], remapped.long()


def micro_batches_by_tokens(lengths: Sequence[int], max_tokens: int) -> list[list[int]]:
    """Group row indices so each group's padded size (rows x longest row) stays <= max_tokens.

    Rows are visited longest first so similar lengths share a micro-batch (less padding); the
    result is deterministic. A single row longer than the budget is an error, never a silent cut.
    """
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive int, got {max_tokens!r}")
    lengths = [int(n) for n in lengths]
    if not lengths:
        raise ValueError("lengths must name at least one row")
    if min(lengths) < 1:
        raise ValueError(f"every row length must be >= 1, got {lengths}")
    too_long = [i for i, n in enumerate(lengths) if n > max_tokens]
    if too_long:
        raise ValueError(f"rows {too_long} need {max(lengths[i] for i in too_long)} tokens, more than "
                         f"max_tokens={max_tokens}; raise the micro-batch token budget")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    groups: list[list[int]] = []
    current: list[int] = []
    for i in order:
        # Longest-first: the group's first row is its longest, so its padded cost is rows * that.
        if current and (len(current) + 1) * lengths[current[0]] > max_tokens:
            groups.append(current)
            current = []
        current.append(i)
    groups.append(current)
    return groups


def data_parallel_shard(num_rows: int, dp_rank: int, dp_size: int) -> list[int]:
    """Contiguous, balanced share of rows [0, num_rows) for one data-parallel rank."""
    if dp_size < 1 or not 0 <= dp_rank < dp_size:
        raise ValueError(f"need 0 <= dp_rank < dp_size, got rank {dp_rank} of {dp_size}")
    if num_rows < dp_size:
        raise ValueError(f"{num_rows} rows cannot give each of {dp_size} data-parallel ranks a row")
    base, extra = divmod(num_rows, dp_size)
    start = dp_rank * base + min(dp_rank, extra)
    return list(range(start, start + base + (dp_rank < extra)))


def prompt_shard(num_prompts: int, prompts_per_mini_batch: int, dp_rank: int, dp_size: int) -> list[int]:
    """This data-parallel rank's prompts of a step: its share of every mini-batch, in order.

    Mini-batch j of the step is prompts [j*m, (j+1)*m); each rank takes a contiguous m/dp of
    each, so the j-th local mini-batch of every rank together is exactly global mini-batch j and
    the updates equal one process's.
    """
    if prompts_per_mini_batch < 1 or num_prompts % prompts_per_mini_batch:
        raise ValueError(f"{num_prompts} prompts do not split into mini-batches of {prompts_per_mini_batch}")
    if prompts_per_mini_batch % dp_size:
        raise ValueError(f"a mini-batch of {prompts_per_mini_batch} prompts does not split over "
                         f"{dp_size} data-parallel ranks")
    share = prompts_per_mini_batch // dp_size
    return [start + dp_rank * share + i for start in range(0, num_prompts, prompts_per_mini_batch)
            for i in range(share)]


def prompt_mini_batches(group_ids: Sequence, prompts_per_mini_batch: int) -> list[list[int]]:
    """Row indices of each mini-batch: consecutive groups of `prompts_per_mini_batch` prompts.

    A prompt's rollouts (rows sharing a group id) always stay in one mini-batch; prompts are taken
    in order of first appearance.
    """
    if not isinstance(prompts_per_mini_batch, int) or prompts_per_mini_batch < 1:
        raise ValueError(f"prompts_per_mini_batch must be a positive int, got {prompts_per_mini_batch!r}")
    keys = [g.item() if isinstance(g, torch.Tensor) else g for g in group_ids]
    if not keys:
        raise ValueError("group_ids must name at least one row")
    rows_of: dict = {}
    for row, key in enumerate(keys):
        rows_of.setdefault(key, []).append(row)
    prompts = list(rows_of.values())
    return [sum(prompts[i:i + prompts_per_mini_batch], [])
            for i in range(0, len(prompts), prompts_per_mini_batch)]
