"""Helper processes of a run die with it, also when the run is killed with SIGKILL."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1]))
from test_trainer import _start  # noqa: E402

# Starts the symbolic worker, then a long-lived process that inherits the worker's stdin pipe
# (as a forked checkpoint writer would), prints both pids and waits to be killed.
PARENT = """
import json, subprocess, sys, time
from megatron_selfjudge.rewards.answers import symbolic_worker
worker = symbolic_worker()
assert worker.compare("x+1", "1+x")
fd = worker._proc.stdin.fileno()
holder = subprocess.Popen(["sleep", "120"], pass_fds=[fd])
print(json.dumps({"worker": worker._proc.pid, "holder": holder.pid}), flush=True)
time.sleep(600)
"""


def _gone_within(pids: list[int], seconds: float) -> list[int]:
    """The pids still alive (zombies count as gone) after waiting up to `seconds`."""
    deadline = time.monotonic() + seconds
    while True:
        alive = []
        for pid in pids:
            try:
                if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                    alive.append(pid)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_symbolic_worker_exits_when_the_run_is_killed():
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    pids = json.loads(parent.stdout.readline())
    try:
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        # Its stdin is still open (the holder has it): only the parent check can end the worker.
        assert _gone_within([pids["worker"]], 5.0) == []
    finally:
        for pid in pids.values():
            try:
                psutil.Process(pid).kill()
            except psutil.NoSuchProcess:
                pass


# The guarded run's multiprocessing children: megatron's writer-queue Manager ("spawn"), the
# resource tracker, and a forked process, as the checkpoint writer forks its per-file workers.
GUARDED = """
import multiprocessing as mp, time
from megatron_selfjudge.runtime import children
children.guard_children()
from megatron.core.dist_checkpointing.strategies import filesystem_async
filesystem_async._get_write_results_queue()  # what megatron's writer calls at the first save
forked = mp.get_context("fork").Process(target=time.sleep, args=(120,))
forked.start()
print(forked.pid, flush=True)
time.sleep(600)
"""


def test_writer_manager_and_forked_workers_die_with_a_killed_parent():
    parent = subprocess.Popen([sys.executable, "-c", GUARDED], stdout=subprocess.PIPE, text=True)
    forked = int(parent.stdout.readline())
    everyone = psutil.Process(parent.pid).children(recursive=True)
    try:
        commands = [" ".join(c.cmdline()) for c in everyone]
        assert forked in [c.pid for c in everyone]
        assert any("multiprocessing.spawn" in c for c in commands), commands  # the Manager
        assert any("resource_tracker" in c for c in commands), commands
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _gone_within([c.pid for c in everyone], 5.0) == []
    finally:
        for child in everyone:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass


# A child forked by a helper thread that then ends. prctl(2): PR_SET_PDEATHSIG fires when the
# creating *thread* ends, so such a child gets the watchdog: alive while the parent is, gone with it.
THREAD_FORK = """
import multiprocessing as mp, threading, time
from megatron_selfjudge.runtime import children
children.guard_children()
box = []
def start():
    proc = mp.get_context("fork").Process(target=time.sleep, args=(120,))
    proc.start()
    box.append(proc.pid)
thread = threading.Thread(target=start)
thread.start()
thread.join()
print(box[0], flush=True)
time.sleep(600)
"""


def test_child_forked_by_an_ended_thread_lives_until_the_parent_dies():
    parent = subprocess.Popen([sys.executable, "-c", THREAD_FORK], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    try:
        time.sleep(1.0)
        assert psutil.Process(child).status() != psutil.STATUS_ZOMBIE  # outlived the thread that forked it
        parent.send_signal(signal.SIGKILL)
        parent.wait(timeout=30)
        assert _gone_within([child], 5.0) == []  # the watchdog saw the parent go
    finally:
        try:
            psutil.Process(child).kill()
        except psutil.NoSuchProcess:
            pass


def _is_manager(proc: psutil.Process) -> bool:
    try:
        return "multiprocessing.spawn" in " ".join(proc.cmdline())
    except psutil.Error:
        return False


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU/gloo end-to-end run, as tests/test_trainer.py")
def test_children_of_a_killed_training_run_die_with_it(tmp_path):
    # SFT, then the initial copy is saved (the checkpoint writer starts) and rewards are computed.
    proc = _start(tmp_path, "trainer.sft_steps=2", "optim.sft_warmup_steps=0", "trainer.max_steps=3")
    try:
        root = psutil.Process(proc.pid)
        seen: dict[int, str] = {}
        deadline = time.monotonic() + 600
        while not any(_is_manager(psutil.Process(pid)) for pid in seen if psutil.pid_exists(pid)) \
                or not (tmp_path / "metrics.jsonl").exists():
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline, "no checkpoint writer and first step in time"
            for child in root.children(recursive=True):
                try:
                    seen.setdefault(child.pid, " ".join(child.cmdline())[:200])
                except psutil.Error:
                    pass
            time.sleep(0.05)
        for child in root.children(recursive=True):  # the latest snapshot before the kill
            try:
                seen.setdefault(child.pid, " ".join(child.cmdline())[:200])
            except psutil.Error:
                pass
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert any("resource_tracker" in cmd for cmd in seen.values()), seen
    alive = _gone_within(list(seen), 5.0)
    survivors = {pid: seen[pid] for pid in alive}
    for pid in alive:
        psutil.Process(pid).kill()
    assert survivors == {}
