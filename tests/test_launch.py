"""Launching as users do: the Slurm scripts and the Dockerfile lint clean; the per-node launcher runs
torchrun with a c10d rendezvous and the expected rank layout; SIGUSR1 sent to the job step (as
`#SBATCH --signal=USR1@120` does) reaches the training processes through the launcher, which
saves, and the batch script requeues the job.

Slurm itself is not installed here: `srun` and `scontrol` are stand-ins written by the tests that
do what Slurm does for these scripts (start one task per node in its own process group with
SLURM_NODEID/SLURM_PROCID set; expand the node list; record `requeue`).
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest
import torch

from megatron_selfjudge.metrics import read_metrics
from megatron_selfjudge.runtime.setup import free_port

ROOT = Path(__file__).resolve().parents[1]
SLURM = ROOT / "examples" / "slurm"
SCRIPTS = sorted([*SLURM.glob("*.sbatch"), *SLURM.glob("*.sh")])
VENV_BIN = Path(sys.executable).parent
TIMEOUT = 600
JOB_ID = "4242"
# The launches below run the CPU (gloo) path, as CI does; a CUDA machine would need one GPU per process.
CPU_ONLY = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU (gloo) launch; one GPU per process needed here")

FAKE_SRUN = """#!/usr/bin/env bash
# Stand-in for srun: one task per node of the allocation, each in its own process group (as
# slurmstepd starts tasks), with SLURM_NODEID/SLURM_PROCID/SLURM_LOCALID; exit code: the highest.
while [[ $# -gt 0 && "$1" == --* ]]; do echo "srun $1" >> "$FAKE_SLURM_LOG"; shift; done
pids=()
for ((node = 0; node < ${SLURM_NNODES:-1}; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node SLURM_LOCALID=0 setsid "$@" &
  pids+=("$!")
  echo "$!" >> "$FAKE_SLURM_DIR/step_pids"
done
rc=0
for pid in "${pids[@]}"; do
  r=0; wait "$pid" || r=$?
  if (( r > rc )); then rc=$r; fi
done
exit "$rc"
"""
FAKE_SCONTROL = """#!/usr/bin/env bash
# Stand-in for scontrol: `show hostnames LIST` (comma-separated names only) and `requeue JOBID`.
if [[ "$1" == show && "$2" == hostnames ]]; then tr ',' '\\n' <<< "$3"; exit 0; fi
if [[ "$1" == requeue ]]; then echo "requeue $2" >> "$FAKE_SLURM_LOG"; exit 0; fi
echo "fake scontrol: unsupported: $*" >&2
exit 1
"""


def _tool(name: str) -> str:
    path = shutil.which(name, path=f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    assert path, f"{name} is not installed: `make setup` installs it (requirements.txt pins it)"
    return path


def _slurm_env(tmp_path: Path, **extra: str) -> dict:
    """The environment of a job step on one node, with the stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in (("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "TORCHELASTIC_")) and k not in (
               "RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "TRITON_INTERPRET", "NPROC_PER_NODE")}
    env.update(PATH=f"{bin_dir}{os.pathsep}{VENV_BIN}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               SLURM_JOB_ID=JOB_ID, SLURM_JOB_NAME="selfjudge", SLURM_NNODES="1", SLURM_NODEID="0",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_JOB_NODELIST="localhost", SLURM_SUBMIT_DIR=str(ROOT),
               FAKE_SLURM_LOG=str(tmp_path / "slurm.log"), FAKE_SLURM_DIR=str(tmp_path))
    env.update(extra)
    return env


# --- lint ------------------------------------------------------------------------------------

def test_scripts_are_found():
    names = {p.name for p in SCRIPTS}
    assert {"single_node.sbatch", "multi_node.sbatch", "launch.sh", "common.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_slurm_scripts_pass_bash_n_and_shellcheck(script):
    subprocess.run(["bash", "-n", str(script)], check=True, capture_output=True, text=True)
    proc = subprocess.run([_tool("shellcheck"), "-x", str(script.relative_to(ROOT))], cwd=ROOT,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_sbatch_scripts_carry_the_preemption_options():
    for name in ("single_node.sbatch", "multi_node.sbatch"):
        text = (SLURM / name).read_text()
        for option in ("--signal=USR1@120", "--requeue", "--open-mode=append", "--output=%x-%j.out",
                       "--ntasks-per-node=1"):
            assert f"#SBATCH {option}" in text, (name, option)


def test_dockerfile_passes_hadolint():
    proc = subprocess.run([_tool("hadolint"), str(ROOT / "docker" / "Dockerfile")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- the launcher ------------------------------------------------------------------------------

def test_launcher_refuses_outside_a_job(tmp_path):
    env = _slurm_env(tmp_path)
    env.pop("SLURM_JOB_ID")
    proc = subprocess.run(["bash", str(SLURM / "launch.sh"), "env"], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode != 0 and "launch.sh runs inside a Slurm job" in proc.stderr


def _layout(output: str) -> list[tuple[int, int, int]]:
    """(rank, node, local rank) of each `rank R: node N, local rank L of K` line of `selfjudge env`."""
    return [(int(r), int(n), int(lr)) for r, n, lr in
            re.findall(r"^  rank (\d+): node (\d+), local rank (\d+) of \d+", output, re.M)]


@CPU_ONLY
def test_launcher_rendezvous_and_rank_layout(tmp_path):
    env = _slurm_env(tmp_path, NPROC_PER_NODE="2", MASTER_ADDR="localhost", MASTER_PORT=str(free_port()))
    proc = subprocess.run(["bash", str(SLURM / "launch.sh"), "env", f"trainer.run_dir={tmp_path / 'run'}"],
                          env=env, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = proc.stdout
    assert _layout(out) == [(0, 0, 0), (1, 0, 1)], out
    assert f"TORCHELASTIC_RUN_ID={JOB_ID}" in out  # the c10d rendezvous is named by the job id
    assert "process group: gloo over 2 ranks" in out
    assert "ok    shared run directory: shared by all 2 ranks" in out
    assert "pre-flight: all checks pass" in out
    assert out.count("versions:") == 1  # printed by rank 0 only


@CPU_ONLY
@pytest.mark.slow
def test_two_nodes_meet_in_one_rendezvous(tmp_path):
    """Two launchers, as srun starts them on two nodes (here both on this host), one process each."""
    port = str(free_port())
    procs = []
    for node in (0, 1):
        env = _slurm_env(tmp_path, SLURM_NNODES="2", SLURM_NODEID=str(node), SLURM_PROCID=str(node),
                         SLURM_JOB_NODELIST="localhost,localhost", NPROC_PER_NODE="1", MASTER_ADDR="localhost",
                         MASTER_PORT=port)
        procs.append(subprocess.Popen(["bash", str(SLURM / "launch.sh"), "env", f"trainer.run_dir={tmp_path / 'run'}"],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = [p.communicate(timeout=TIMEOUT) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]
    out = next(o for o, _ in outs if "ranks:" in o)
    layout = _layout(out)
    assert [r for r, _, _ in layout] == [0, 1]
    assert sorted(n for _, n, _ in layout) == [0, 1] and [lr for _, _, lr in layout] == [0, 0]
    assert "process group: gloo over 2 ranks" in out


# --- preemption through sbatch -> srun -> launcher -> torchrun -> trainer --------------------------

TRAIN = ["trainer.sft_steps=2", "optim.sft_warmup_steps=0", "trainer.max_steps=60", "trainer.save_every=0", "trainer.prompts_per_step=4",
         "trainer.mini_batch_prompts=2", "rollout.n=4", "rollout.max_response_len=8", "data.synthetic_sft=16",
         "data.synthetic_unlabeled=64", "data.synthetic_test=4", "model.num_layers=1"]


def _preempt_through_sbatch(tmp_path: Path, after_step: int, send: Callable[[int], None], *extra: str) -> None:
    """Start single_node.sbatch on 2 CPU ranks, `send(step pid)` after `after_step`, check save and requeue."""
    run_dir = tmp_path / "run"
    env = _slurm_env(tmp_path, SLURM_GPUS_ON_NODE="2", MASTER_PORT=str(free_port()))
    batch = subprocess.Popen(["bash", str(SLURM / "single_node.sbatch"), *TRAIN, *extra, f"trainer.run_dir={run_dir}"],
                             cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + TIMEOUT
    while not any(r["step"] >= after_step for r in read_metrics(run_dir)):
        assert batch.poll() is None, batch.stdout.read()[-4000:]
        assert time.monotonic() < deadline, "no training step within the timeout"
        time.sleep(0.05)
    [step_pid] = (tmp_path / "step_pids").read_text().split()
    send(int(step_pid))
    output, _ = batch.communicate(timeout=TIMEOUT)
    assert batch.returncode == 0, output[-4000:]
    assert "preempted: saved step" in output
    assert "stopped by SIGUSR1 (torchrun exit 0); exit 75 to requeue" in output
    # torchrun survives the signal and returns only after its processes saved and exited: had it
    # died, the launcher would return at once and Slurm would kill the step in the middle of the save.
    assert output.index("preempted: saved step") < output.index("stopped by SIGUSR1")
    assert f"requeue {JOB_ID}" in (tmp_path / "slurm.log").read_text()
    stopped = max(r["step"] for r in read_metrics(run_dir))
    assert after_step <= stopped < 60
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == f"step_{stopped:08d}"


@CPU_ONLY
@pytest.mark.slow
def test_sigusr1_to_the_job_step_saves_and_requeues(tmp_path):
    # The launcher's process group (launcher and torchrun) is signalled; the training processes sit in
    # sessions of their own (torchrun starts them so), so they hear of it only through the launcher.
    _preempt_through_sbatch(tmp_path, 1, lambda pid: os.killpg(pid, signal.SIGUSR1))


def _signal_every_process(pid: int) -> None:
    import psutil

    for proc in [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.send_signal(signal.SIGUSR1)


@CPU_ONLY
@pytest.mark.slow
def test_sigusr1_to_every_process_of_the_step_saves(tmp_path):
    # With trainer.save_every=2 the checkpoint writer's helper processes exist by step 3.
    _preempt_through_sbatch(tmp_path, 3, _signal_every_process, "trainer.save_every=2")


# --- the image's pins (docker/container_requirements.py) -------------------------------------------

def _container_requirements():
    import importlib.util

    spec = importlib.util.spec_from_file_location("container_requirements", ROOT / "docker" / "container_requirements.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_container_pins_leave_the_containers_packages_alone(tmp_path):
    cr = _container_requirements()
    ngc = tmp_path / "constraint.txt"
    ngc.write_text("numpy==1.26.4\nPillow==11.0.0\ntyping_extensions==4.12.2\n")
    req_lines = (ROOT / "requirements.txt").read_text().splitlines()
    cons_lines = (ROOT / "constraints.txt").read_text().splitlines()
    drop = {cr.normalize(n) for n in cr.CONTAINER_BUILT} | {cr.requirement_name(x) for x in ngc.read_text().splitlines()}
    kept_req = {cr.requirement_name(x) for x in cr.keep_lines(req_lines, drop)} - {None}
    kept_cons = {cr.requirement_name(x) for x in cr.keep_lines(cons_lines, drop)} - {None}
    every_req = {cr.requirement_name(x) for x in req_lines} - {None}
    assert {"torch", "triton", "numpy", "pillow"} & (kept_req | kept_cons) == set()
    assert "typing-extensions" not in kept_cons
    assert kept_req == every_req - {"torch", "triton", "numpy", "pillow"}
    assert "megatron-core" in kept_req and cr.pinned_version(req_lines, "torch") == "2.13.0"


@pytest.mark.parametrize("python, torch, message", [
    ((3, 10), "2.13.0a0+gitabc", "container Python 3.10 is older than 3.11"),
    ((3, 12), "2.10.0a0+b4e4ee81d3", "container torch 2.10.0a0+b4e4ee81d3 is not the 2.13 line"),
])
def test_container_check_refuses_an_image_that_does_not_fit(python, torch, message):
    cr = _container_requirements()
    with pytest.raises(SystemExit, match=re.escape(message)):
        cr.check_image(python, torch, "2.13.0")
    cr.check_image((3, 12), "2.13.0a0+gitabc", "2.13.0")  # NVIDIA's pre-release of the pinned line fits
