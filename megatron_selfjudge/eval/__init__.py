"""eval components."""
