"""Process-level run state: what keeps a run directory, its ranks and its child processes sound.

- `lock`: the exclusive run-directory lock and one-line errors for unusable run directories.
- `ranks`: agreement between ranks (any rank's flag, one rank's failure raised everywhere).
- `children`: helper processes (checkpoint writer, symbolic-answer worker) die with the run.
- `faults`: the test-only hook that kills the process at a named point (crash tests).

This package imports no torch at import time, so helper processes can use it cheaply.
"""
