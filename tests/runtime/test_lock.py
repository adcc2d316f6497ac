"""One run per run directory; unusable run directories end in one line and exit code 2."""
from __future__ import annotations

import errno
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from megatron_selfjudge.metrics import MetricsWriter
from megatron_selfjudge.runtime import lock as lock_mod
from megatron_selfjudge.runtime.lock import LOCK_FILE, RunDirError, RunLock, run_dir_errors

sys.path.insert(0, str(Path(__file__).parents[1]))
sys.path.insert(0, str(Path(__file__).parents[1] / "megatron"))
from dist_utils import run_distributed  # noqa: E402
from test_trainer import _cmd, _env  # noqa: E402

HOLD = "import sys, time\nfrom megatron_selfjudge.runtime.lock import RunLock\n" \
       "with RunLock(sys.argv[1]):\n    print('locked', flush=True)\n    time.sleep(600)\n"


def _hold(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def _one_line_exit_2(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("selfjudge:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def test_lock_excludes_a_second_holder_until_released(tmp_path):
    with RunLock(tmp_path / "run"):
        with pytest.raises(RunDirError, match=rf"in use by pid {os.getpid()} on host {socket.gethostname()} since "):
            with RunLock(tmp_path / "run"):
                pass
    with RunLock(tmp_path / "run"):  # released on exit
        pass
    assert (tmp_path / "run" / LOCK_FILE).read_text() == ""  # the file stays, emptied


@pytest.mark.slow
def test_second_train_refused_naming_the_holder_and_free_after_sigkill(tmp_path):
    run_dir = tmp_path / "run"
    holder = _hold(run_dir)
    try:
        proc = subprocess.run(_cmd(run_dir), env=_env(), capture_output=True, text=True, timeout=300)
        line = _one_line_exit_2(proc)
        assert f"run directory {run_dir} is in use by pid {holder.pid} on host {socket.gethostname()}" in line
        assert not (run_dir / "config.yaml").exists()  # refused before writing anything
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    with RunLock(run_dir):  # the kernel dropped the dead holder's lock: nothing stale
        pass


@pytest.mark.slow
def test_run_dir_that_is_a_file(tmp_path):
    path = tmp_path / "file"
    path.write_text("not a folder")
    line = _one_line_exit_2(subprocess.run(_cmd(path), env=_env(), capture_output=True, text=True, timeout=300))
    assert f"run directory {path} exists and is not a folder" in line
    line = _one_line_exit_2(subprocess.run(_cmd(path / "sub"), env=_env(), capture_output=True, text=True,
                                           timeout=300))
    assert f"run directory {path / 'sub'}: {path} is not a folder" in line


def test_read_only_run_dir():
    # chmod does not stop root, so as root the check runs as the unprivileged user "nobody".
    with tempfile.TemporaryDirectory() as top:
        os.chmod(top, 0o755)
        run_dir = Path(top) / "run"
        run_dir.mkdir()
        os.chmod(run_dir, 0o555)
        # The module is imported first: the interpreter's files may not be readable by "nobody".
        code = ("import os, sys\nfrom megatron_selfjudge.runtime.lock import RunLock, RunDirError\n"
                "if os.geteuid() == 0:\n    os.setgid(65534)\n    os.setuid(65534)\n"
                "try:\n    RunLock(sys.argv[1]).__enter__()\nexcept RunDirError as exc:\n    print(exc)\n")
        proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True, text=True,
                              timeout=60, cwd=top)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == (f"run directory {run_dir} is not writable ({run_dir / LOCK_FILE}): "
                                       "Permission denied")


def test_full_disk_while_recording_the_holder(tmp_path, monkeypatch):
    def full(*args):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(lock_mod.os, "pwrite", full)
    with pytest.raises(RunDirError) as err:
        with RunLock(tmp_path):
            pass
    assert str(err.value) == f"run directory {tmp_path}: no space left while writing: No space left on device"
    monkeypatch.undo()
    with RunLock(tmp_path):  # the failed attempt did not keep the lock
        pass


def test_full_disk_while_writing_metrics(tmp_path, monkeypatch):
    writer = MetricsWriter(tmp_path, tensorboard=False)
    real_open = Path.open

    def full(self, *args, **kwargs):
        f = real_open(self, *args, **kwargs)
        f.write = lambda text: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return f

    monkeypatch.setattr(Path, "open", full)
    with pytest.raises(RunDirError, match="no space left while writing"):
        with run_dir_errors(tmp_path):
            writer.log(1, {"loss": 1.0})


def test_unrelated_os_errors_pass_through(tmp_path):
    with pytest.raises(PermissionError):  # not a path of the run directory: not ours to rename
        with run_dir_errors(tmp_path / "run"):
            raise PermissionError(errno.EACCES, "Permission denied", "/etc/shadow")
    with pytest.raises(FileNotFoundError):
        with run_dir_errors(tmp_path):
            raise FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "x"))


def _two_ranks_one_locked_dir(rank: int, world: int, run_dir: str) -> tuple[str, str]:
    from megatron_selfjudge.runtime.lock import hold_run_dir

    try:
        with hold_run_dir(run_dir, is_main=rank == 0):
            return ("entered", "")
    except Exception as exc:  # each rank reports what it raised
        return (type(exc).__name__, str(exc))


@pytest.mark.slow
def test_other_ranks_stop_when_rank0_cannot_lock(tmp_path):
    with RunLock(tmp_path):  # another run holds the directory
        ranks = run_distributed(_two_ranks_one_locked_dir, 2, str(tmp_path), timeout=120)
    assert ranks[0][0] == "RunDirError" and "is in use by pid" in ranks[0][1]
    assert ranks[1] == ("RankFailedError", f"locking run directory {tmp_path} failed on rank 0; "
                                           "see that rank's error")
    assert run_distributed(_two_ranks_one_locked_dir, 2, str(tmp_path), timeout=120) == [("entered", "")] * 2


@pytest.mark.slow
def test_full_disk_during_training_is_one_line_exit_2(tmp_path):
    # sitecustomize runs at interpreter start: the run's first metrics write hits a full disk.
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import errno, os\nfrom megatron_selfjudge import metrics\n"
        "def log(self, *args, **kwargs):\n"
        "    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))\n"
        "metrics.MetricsWriter.log = log\n")
    env = {**_env(), "PYTHONPATH": os.pathsep.join(filter(None, [str(hook), os.environ.get("PYTHONPATH")]))}
    run_dir = tmp_path / "run"
    line = _one_line_exit_2(subprocess.run(_cmd(run_dir), env=env, capture_output=True, text=True, timeout=300))
    assert line == (f"selfjudge: run directory {run_dir}: no space left while writing ({run_dir / 'metrics.jsonl'}): "
                    "No space left on device")
    with RunLock(run_dir):  # released on the way out
        pass


def test_read_only_file_system_inside_and_outside(tmp_path):
    with pytest.raises(RunDirError, match=r"is not writable \(.*metrics.jsonl\): Read-only file system"):
        with run_dir_errors(tmp_path):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(tmp_path / "metrics.jsonl"))
    with pytest.raises(OSError, match="Read-only"):  # another file system's problem: left as it is
        with run_dir_errors(tmp_path / "run"):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), "/usr/lib/x")


def test_holder_description_stays_one_line(tmp_path):
    with RunLock(tmp_path):
        (tmp_path / LOCK_FILE).write_text(
            '{"pid": 7, "host": "h\\nx", "since": "T", "command": "selfjudge train\\n\\rfake: line"}\n')
        with pytest.raises(RunDirError) as err:
            with RunLock(tmp_path):
                pass
    assert str(err.value) == f"run directory {tmp_path} is in use by pid 7 on host h x since T " \
                             "(selfjudge train fake: line)"
