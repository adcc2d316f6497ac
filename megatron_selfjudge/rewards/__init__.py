"""rewards components."""
