"""rollout components."""
