"""Label-free multimodal GRPO on megatron-core: majority-vote (MM-UPT) and Actor-Judge rewards."""

__version__ = "0.1.0"
