"""Test hook for crash tests: SIGKILL this process at a named point of the code.

Set ``SELFJUDGE_TEST_KILL_AT`` to a comma-separated list of point names (e.g.
``metrics_rewrite``); the first time the process reaches a listed point it kills itself with
SIGKILL, exactly as an out-of-memory kill or a lost node would. Unset (always, outside tests), a
point costs one environment lookup. Points:

- ``metrics_rewrite``: `write_atomic` of metrics.jsonl (on resume), after the new content is on
  disk in the temporary file and before it replaces the old file.
"""
from __future__ import annotations

import os
import signal

KILL_AT_ENV = "SELFJUDGE_TEST_KILL_AT"


def kill_point(name: str) -> None:
    """SIGKILL the process here when SELFJUDGE_TEST_KILL_AT lists `name` (crash tests only)."""
    spec = os.environ.get(KILL_AT_ENV)
    if spec and name in (p.strip() for p in spec.split(",")):
        os.kill(os.getpid(), signal.SIGKILL)
