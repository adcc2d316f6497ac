"""synth components."""
