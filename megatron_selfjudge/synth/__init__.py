"""`selfjudge synth`: new training questions written by the policy itself (MM-UPT in-context / direct synthesis)."""
