"""The model-family interface: everything that differs between models, behind one object.

A family owns, for its models:
  - the text side: its tokenizer, and how a prompt record becomes prompt ids (chat template,
    image placeholders) and preprocessed images (`prompt_ids`, `images`);
  - the module side: how this rank's megatron module is built (`builder`), what the data path
    must know about a built module (`describe` -> `ModelInfo`: placeholder id, decoder positions
    per image, length cap), its forward on a micro-batch (`run`), the part that holds the
    vocabulary and the output layer (`language_model`) and the inference wrapper the rollout
    engine drives (`inference_wrapper`);
  - conversion to and from HF weight names (`export_hf`, `load_hf`), which the tiny families do
    not support.
The trainer, the rollout engine, forward and batching ask the family and never name a model.
Where a label's logits live follows from `ModelInfo.image_seq_len` (forward.label_positions): a
family whose placeholder expands into several decoder positions (LLaVA) says how many; one whose
processor already writes one token per image embedding (Qwen2.5-VL) says 0.

Families are found by name (`model.preset`) or, for a module, from the tag its family's builder
put on it (else by asking each family whether the module is one of its own: `family_of`).
Built-in families are imported on first use; others register with `register_family`.
"""
from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional, Sequence

if TYPE_CHECKING:  # only for annotations: importing this module stays light (config validation reads the names)
    import torch

    from megatron_selfjudge.config import Config
    from megatron_selfjudge.megatron.batching import PolicyBatch

_BUILTIN_FAMILIES: dict[str, str] = {
    "tiny-llava": "megatron_selfjudge.megatron.models.tiny:TinyLlavaFamily",
    "tiny-gpt": "megatron_selfjudge.megatron.models.tiny:TinyGPTFamily",
    "qwen2.5-vl": "megatron_selfjudge.megatron.models.qwen_family:QwenVLFamily",
    "qwen2.5": "megatron_selfjudge.megatron.models.qwen_family:QwenTextFamily",
}
_REGISTERED: dict[str, type["ModelFamily"]] = {}


class NotSupported(NotImplementedError):
    """The family cannot do this (e.g. HF conversion of a tiny in-process model)."""


@dataclass(frozen=True)
class ModelInfo:
    """What the data path needs to know about a (possibly wrapped) megatron module on this rank."""

    family: type["ModelFamily"]
    multimodal: bool
    image_token_index: int  # placeholder id in tokens (never matches for a text-only model)
    image_seq_len: int  # decoder positions one placeholder expands to; 0: placeholders are not expanded
    max_seq_len: Optional[int]  # decoder cap the model truncates beyond (None: no such cap)
    pipeline_parallel: bool
    device: "torch.device"
    dtype: "torch.dtype"


class ModelFamily(abc.ABC):
    """One model family. Class methods work on built modules; an instance serves one run's config."""

    name: ClassVar[str]
    multimodal: ClassVar[bool]

    def __init__(self, cfg: "Config"):
        self.cfg = cfg

    # ---- text side ----
    @property
    @abc.abstractmethod
    def tokenizer(self) -> Any:
        """Encodes and decodes text; has eos_token_id, pad_token_id and vocab_size."""

    @abc.abstractmethod
    def prompt_ids(self, question: str, num_images: int, instruction: str) -> list[int]:
        """Token ids of a prompt: the question, the format instruction and `num_images` image placeholders."""

    def expand_images(self, ids: list[int], images: Any) -> list[int]:
        """Prompt ids as the module takes them, given the record's preprocessed images (`images()`).

        For a processor that writes one token per image embedding (Qwen2.5-VL) the placeholders
        of `prompt_ids` grow to each image's count; by default the ids are unchanged.
        """
        return ids

    def images(self, images: Sequence[Any]) -> Optional["torch.Tensor"]:
        """Preprocessed pixels of a record's images (None for a text-only family)."""
        if self.multimodal:
            raise NotImplementedError(f"{type(self).__name__} must preprocess its images")
        return None

    def num_images(self, images: Sequence[Any]) -> int:
        """Image placeholders a record with these images gets in its prompt."""
        return len(images) if self.multimodal else 0

    # ---- sizes, for the pre-flight checks and the memory estimate ----
    def parameter_count(self) -> int:
        """Parameters of the whole policy (all TP/PP shards together), from the config alone."""
        raise NotSupported(f"model family {self.name!r} does not know its parameter count before building")

    def image_positions(self) -> int:
        """Decoder positions one image adds to a sequence beyond its prompt tokens (0: none)."""
        return 0

    def tensor_parallel_splits(self) -> list[tuple[str, int]]:
        """(what, count) of the family's own dimensions that tensor parallelism splits evenly."""
        return []

    # ---- module side ----
    @abc.abstractmethod
    def module_builder(self) -> Callable[[], "torch.nn.Module"]:
        """A zero-argument function that builds this rank's pipeline stage of the policy."""

    def builder(self) -> Callable[[], "torch.nn.Module"]:
        """`module_builder`, with each module it builds tagged with its family (see `family_of`).

        The trainer builds the policy and its frozen copies with it.
        """
        make, family = self.module_builder(), type(self)

        def build() -> "torch.nn.Module":
            module = make()
            module.model_family = family
            return module
        return build

    @classmethod
    @abc.abstractmethod
    def describe(cls, bare: "torch.nn.Module") -> Optional[ModelInfo]:
        """ModelInfo of an unwrapped module if it belongs to this family, else None."""

    @classmethod
    @abc.abstractmethod
    def run(cls, model: "torch.nn.Module", micro: "PolicyBatch", info: ModelInfo) -> "torch.Tensor":
        """This pipeline stage's output for a micro-batch: batch-first logits [b, s, V/tp] on the last stage."""

    @classmethod
    def language_model(cls, bare: "torch.nn.Module") -> "torch.nn.Module":
        """The decoder part: has vocab_size, max_sequence_length and (on the last stage) output_layer."""
        return bare

    @classmethod
    def inference_wrapper(cls, model: "torch.nn.Module", wrapper_config: Any, context: Any,
                          images: Optional["torch.Tensor"], extra_per_row: int) -> Any:
        """megatron-core inference wrapper for a generation batch (`images` in row order, or None)."""
        from megatron.core.inference.model_inference_wrappers.gpt.gpt_inference_wrapper import (
            GPTInferenceWrapper,
        )

        if images is not None:
            raise NotImplementedError(f"{cls.__name__} has no multimodal inference wrapper")
        return GPTInferenceWrapper(model, wrapper_config, context)

    # ---- HF conversion ----
    def export_hf(self, model: "torch.nn.Module") -> Iterator[tuple[str, "torch.Tensor"]]:
        """This rank's weights under HF names, one gathered tensor at a time."""
        raise NotSupported(f"model family {self.name!r} has no HF weight names")

    def load_hf(self, model: "torch.nn.Module", path: str) -> None:
        """Load an HF folder's weights into this rank's module."""
        raise NotSupported(f"model family {self.name!r} cannot load HF weights")


def register_family(cls: type[ModelFamily]) -> type[ModelFamily]:
    """Add a family under `cls.name` (usable as a class decorator); refuses to shadow a name."""
    name = getattr(cls, "name", None)
    if not isinstance(name, str) or not name:
        raise ValueError(f"{cls!r} needs a non-empty `name`")
    if name in _BUILTIN_FAMILIES or name in _REGISTERED:
        raise ValueError(f"model family {name!r} is already registered")
    _REGISTERED[name] = cls
    return cls


def unregister_family(name: str) -> None:
    """Remove a family added by register_family (tests)."""
    _REGISTERED.pop(name, None)


def family_names() -> list[str]:
    """Every name `model.preset` accepts."""
    return sorted(set(_BUILTIN_FAMILIES) | set(_REGISTERED))


def family_class(name: str) -> type[ModelFamily]:
    """The family registered under `name`."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in _BUILTIN_FAMILIES:
        raise ValueError(f"model.preset: unknown model family {name!r}; known: {', '.join(family_names())}")
    module_name, attr = _BUILTIN_FAMILIES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def build_family(cfg: "Config") -> ModelFamily:
    """The family object of a run (`model.preset`)."""
    return family_class(cfg.model.preset)(cfg)


def family_of(model: "torch.nn.Module") -> ModelInfo:
    """ModelInfo of a (possibly DDP / Float16Module-wrapped) module, from the family it belongs to."""
    from megatron.core.utils import unwrap_model

    bare = unwrap_model(model)
    tagged = getattr(bare, "model_family", None)  # set by ModelFamily.builder
    if tagged is not None:
        info = tagged.describe(bare)
        if info is None:
            raise TypeError(f"{type(bare).__name__} was built by {tagged.__name__}, which does not recognise it")
        return info
    for name in family_names():  # a module built outside a family: ask each one
        info = family_class(name).describe(bare)
        if info is not None:
            return info
    raise TypeError(f"no model family knows a {type(bare).__name__} (known families: {', '.join(family_names())})")
