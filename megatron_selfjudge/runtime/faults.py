"""Test hook for crash tests: SIGKILL this process at a named point of the code.

Set ``SELFJUDGE_TEST_KILL_AT`` to a comma-separated list of point names (e.g.
``metrics_rewrite``); the first time the process reaches a listed point it kills itself with
SIGKILL, exactly as an out-of-memory kill or a lost node would. Unset (always, outside tests), a
point costs one environment lookup. Points:

- ``metrics_rewrite``: `write_atomic` of metrics.jsonl (on resume), after the new content is on
  disk in the temporary file and before it replaces the old file.

``SELFJUDGE_TEST_SIGTERM_AT`` works the same way with `sigterm_point`, which sends the process a
SIGTERM (as a scheduler would) instead. Points:

- ``teardown``: trainer.main, after the run returned and before the process groups are destroyed.
"""
from __future__ import annotations

import os
import signal

KILL_AT_ENV = "SELFJUDGE_TEST_KILL_AT"
SIGTERM_AT_ENV = "SELFJUDGE_TEST_SIGTERM_AT"


def _listed(env: str, name: str) -> bool:
    spec = os.environ.get(env)
    return bool(spec) and name in (p.strip() for p in spec.split(","))


def kill_point(name: str) -> None:
    """SIGKILL the process here when SELFJUDGE_TEST_KILL_AT lists `name` (crash tests only)."""
    if _listed(KILL_AT_ENV, name):
        os.kill(os.getpid(), signal.SIGKILL)


def sigterm_point(name: str) -> None:
    """Send this process a SIGTERM here when SELFJUDGE_TEST_SIGTERM_AT lists `name` (preemption tests only)."""
    if _listed(SIGTERM_AT_ENV, name):
        os.kill(os.getpid(), signal.SIGTERM)
