"""megatron components."""
