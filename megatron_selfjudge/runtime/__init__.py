"""Process-level run state: what keeps a run directory, its ranks and its child processes sound.

- `lock`: the exclusive run-directory lock and one-line errors for unusable run directories.
- `preflight`: checks of the config against the platform and the ranks, before any model is built.
- `run_state`: what a run directory must hold before a run continues in it (config drift, checkpoints).
- `ranks`: agreement between ranks (any rank's flag, one rank's failure raised everywhere).
- `children`: helper processes (checkpoint writer, symbolic-answer worker) die with the run.
- `files`: crash-safe file replacement (metrics.jsonl on resume).
- `faults`: the test-only hook that kills the process at a named point (crash tests).

This file imports nothing, and `children`, `lock`, `files` and `faults` load no torch, so helper
processes (the symbolic-answer worker) can import them cheaply.
"""
