"""Helper processes die with the run, also when the run is killed with SIGKILL.

Every child a training process starts, and how each one learns that the run is gone:

- megatron dist_checkpointing's result-queue Manager: a "spawn" server process started at the
  first checkpoint save and kept for the whole run. `guard_children` makes megatron take its
  queue from a Manager started here, whose initializer sets PR_SET_PDEATHSIG(SIGKILL).
- the checkpoint writer's per-file worker processes ("fork"): an `os.register_at_fork` hook
  sets PR_SET_PDEATHSIG(SIGKILL) in every child forked by the run.
- multiprocessing's resource_tracker (fork + exec, so no Python hook runs in it): it exits by
  itself when the last write end of its pipe closes, i.e. once the run and the two above are gone.
- the math-verify worker (rewards/answers.py, a subprocess fed on stdin): a watchdog thread in the
  worker exits as soon as its parent pid changes. stdin EOF alone is not enough: a forked
  child that inherited the pipe keeps it open, and a busy worker does not read it.

PR_SET_PDEATHSIG fires when the *thread* that created the child ends, not the process, so it is
used only for children started by the main thread; others (and non-Linux systems) get the
watchdog thread. Both re-check the parent after arming, in case it died in between.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, Optional

_PR_SET_PDEATHSIG = 1
_WATCH_INTERVAL_S = 0.2

# Resolved in the parent (`guard_children`), so a forked child calls it without loading anything.
_prctl: Optional[Callable[..., int]] = None
# Set just before each fork and read in the child (its memory is a copy of the parent's).
_fork_parent = {"pid": 0, "main_thread": True}
_manager: Any = None
_installed = False


def _load_prctl() -> Optional[Callable[..., int]]:
    global _prctl
    if _prctl is None and sys.platform.startswith("linux"):
        try:
            _prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl
        except (OSError, AttributeError):
            _prctl = None
    return _prctl


def start_parent_watchdog(parent_pid: int, interval: float = _WATCH_INTERVAL_S) -> threading.Thread:
    """A daemon thread that ends this process (exit code 1) once its parent is no longer `parent_pid`."""
    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(interval)
        os._exit(1)

    thread = threading.Thread(target=watch, name="parent-watchdog", daemon=True)
    thread.start()
    return thread


def ignore_job_signals() -> None:
    """In a helper process: ignore the signals a scheduler sends to every process of a job step.

    Slurm's `--signal=USR1@120` (and SIGTERM on preemption) reaches every process of the step under
    proctrack/cgroup. The trainer turns them into a checkpoint save, which needs its helpers (the
    checkpoint writer's Manager) alive; the helpers die with the trainer instead (die_with_parent).
    """
    for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT):
        try:
            signal.signal(sig, signal.SIG_IGN)
        except ValueError:  # not this process's main thread: Python cannot change dispositions here
            return


def die_with_parent(parent_pid: int, started_by_main_thread: bool = True) -> str:
    """In a child process: end it when `parent_pid` dies, and ignore job-wide stop signals
    (ignore_job_signals); returns "pdeathsig" or "watchdog" (how it ends)."""
    ignore_job_signals()
    prctl = _load_prctl()
    if started_by_main_thread and prctl is not None and prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) == 0:
        if os.getppid() != parent_pid:  # the parent died before the signal was armed
            os._exit(1)
        return "pdeathsig"
    start_parent_watchdog(parent_pid)
    return "watchdog"


def _before_fork() -> None:
    _fork_parent["pid"] = os.getpid()
    _fork_parent["main_thread"] = threading.current_thread() is threading.main_thread()


def _after_fork_in_child() -> None:
    die_with_parent(_fork_parent["pid"], _fork_parent["main_thread"])


def _guarded_results_queue() -> Any:
    """megatron's checkpoint-writer result queue, served by a Manager that dies with this process."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async
    import multiprocessing as mp
    from multiprocessing.managers import SyncManager

    global _manager
    if filesystem_async._results_queue is None:
        manager = SyncManager(ctx=mp.get_context("spawn"))  # what megatron's ctx.Manager() builds
        manager.start(initializer=die_with_parent,
                      initargs=(os.getpid(), threading.current_thread() is threading.main_thread()))
        _manager = manager  # keeps the server up; shut down by its finaliser at exit
        filesystem_async._results_queue = manager.Queue()
    return filesystem_async._results_queue


def guard_children() -> None:
    """Make every helper process this run starts die with it (see the module docstring); idempotent."""
    global _installed
    if _installed:
        return
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    _load_prctl()
    # megatron-core 0.16.1 builds its queue lazily in this function (filesystem_async.py).
    filesystem_async._get_write_results_queue = _guarded_results_queue
    os.register_at_fork(before=_before_fork, after_in_child=_after_fork_in_child)
    _installed = True
