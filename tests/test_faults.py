"""A run never loses work: no silent overwrite, resume-or-start, fallback checkpoints, failed saves,
changed flags refused, one-line input errors, and torchrun restarts after a SIGKILLed rank."""
import errno
import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import clip
import data
import train
from conftest import ROOT
from test_train import FAST, max_diff, rows, weights
from train import NUMBERED

RUN = ["--batch-size", "8", *FAST]


def ckpt_step(path):
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def test_a_forgotten_resume_does_not_overwrite_the_run(tmp_path):
    out = str(tmp_path / "o5")
    train.main(["--steps", "4", "--out", out, *RUN[:-2], "--save-every", "2"])
    before = open(os.path.join(out, "metrics.jsonl")).read()
    with pytest.raises(SystemExit, match=r"already holds a run, at step 4 .*--resume.*--overwrite"):
        train.main(["--steps", "2", "--out", out, *RUN])
    assert ckpt_step(os.path.join(out, "checkpoint.pt")) == 4
    assert open(os.path.join(out, "metrics.jsonl")).read() == before
    train.main(["--steps", "2", "--out", out, *RUN, "--overwrite"])  # asked for: a new run
    assert ckpt_step(os.path.join(out, "checkpoint.pt")) == 2
    assert not os.path.exists(os.path.join(out, "checkpoint-0000004.pt"))
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2]


def test_resume_starts_a_new_run_when_there_is_no_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(["--steps", "2", "--out", out, *RUN, "--resume"])
    assert "starting a new run" in capsys.readouterr().out
    assert ckpt_step(os.path.join(out, "checkpoint.pt")) == 2
    train.main(["--steps", "3", "--out", out, *RUN, "--resume"])  # the same command, later: it continues
    assert "resuming from" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3]
    with pytest.raises(SystemExit, match="no checkpoint at"):  # a named file must exist
        train.main(["--out", out, "--resume", str(tmp_path / "nothere.pt")])


def test_unreadable_newest_checkpoint_falls_back_to_the_one_before(tmp_path, capsys):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train.main(["--steps", "8", "--out", whole, *RUN])
    train.main(["--steps", "8", "--out", cut, *RUN[:-2], "--save-every", "2"])
    assert sorted(os.listdir(cut)) == ["checkpoint-0000006.pt", "checkpoint-0000008.pt", "checkpoint.pt",
                                       "metrics.jsonl"]  # --keep 2
    with open(os.path.join(cut, "checkpoint.pt"), "r+b") as f:  # a partial copy: truncated in place
        f.truncate(1000)
    train.main(["--steps", "8", "--out", cut, *RUN, "--resume"])
    out = capsys.readouterr().out
    assert "checkpoint.pt does not load" in out and "resuming from" in out and "(step 6)" in out
    assert max_diff(weights(whole), weights(cut)) < 1e-6
    assert [r["step"] for r in rows(cut) if "loss" in r] == list(range(1, 9))
    assert os.path.exists(os.path.join(cut, "checkpoint.pt.unreadable"))  # kept for a look, out of the way


def test_a_failed_save_stops_the_run_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real, calls = torch.save, []

    def disk_full(obj, f, *args, **kw):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04 half a checkpoint")
            f.flush()
            # mid-write, no file under a checkpoint's own name holds the partial bytes
            for name in os.listdir(out):
                if NUMBERED.fullmatch(name) or name == "checkpoint.pt":
                    assert ckpt_step(os.path.join(out, name)) == 2, name
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(obj, f, *args, **kw)

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(SystemExit) as e:
        train.main(["--steps", "6", "--out", out, *RUN[:-2], "--save-every", "2"])
    message = str(e.value.code)
    assert "No space left on device" in message and "stopping at step 4" in message and "is intact" in message
    assert "\n" not in message
    assert ckpt_step(os.path.join(out, "checkpoint.pt")) == 2
    assert sorted(os.listdir(out)) == ["checkpoint-0000002.pt", "checkpoint.pt", "metrics.jsonl"]


def test_diverged_weights_are_never_saved_and_the_last_good_checkpoint_stays(tmp_path, monkeypatch):
    """A step whose update overflows the weights while its loss was still finite: with --keep 1 saving
    it would delete the one good checkpoint."""
    out, calls = str(tmp_path / "run"), []
    real = clip.CLIP.after_step

    def overflow(self):
        real(self)
        calls.append(1)
        if len(calls) == 6:
            with torch.no_grad():
                self.visual.proj[0, 0] = float("inf")

    monkeypatch.setattr(clip.CLIP, "after_step", overflow)
    with pytest.raises(SystemExit) as e:
        train.main(["--steps", "8", "--out", out, *RUN[:-2], "--save-every", "2", "--keep", "1"])
    message = str(e.value.code)
    assert "the weights (the loss was still finite) became non-finite by step 6" in message, message
    assert "step 4" in message and os.path.join(out, "checkpoint.pt") in message
    assert sorted(os.listdir(out)) == ["checkpoint-0000004.pt", "checkpoint.pt", "metrics.jsonl"]
    sd = weights(out)
    assert ckpt_step(os.path.join(out, "checkpoint.pt")) == 4 and all(torch.isfinite(v).all() for v in sd.values())


def test_one_run_per_out(tmp_path, capsys):
    out = str(tmp_path / "run")
    os.makedirs(out)
    data.lock_folder(out, "another run", "train.lock")  # held (a second open of the file: the kernel tells them apart)
    try:
        with pytest.raises(SystemExit, match=rf"{out} is in use by another command \(pid {os.getpid()} on "):
            train.main(["--steps", "2", "--out", out, *RUN])
        assert not os.path.exists(os.path.join(out, "metrics.jsonl"))
    finally:
        data.unlock_folder(out)
    with open(os.path.join(out, "train.lock"), "w") as f:  # left by a run that was SIGKILLed: stale
        f.write("pid 999999999 on elsewhere\n")
    train.main(["--steps", "2", "--out", out, *RUN])
    assert ckpt_step(os.path.join(out, "checkpoint.pt")) == 2
    assert not os.path.exists(os.path.join(out, "train.lock"))  # released on exit
    outside = tmp_path / "precious.txt"  # a lock file that is a link out of --out: refused, the target untouched
    outside.write_text("keep me")
    os.symlink(outside, os.path.join(out, "train.lock"))
    with pytest.raises(SystemExit, match="cannot lock"):
        train.main(["--steps", "3", "--out", out, *RUN, "--resume"])
    assert outside.read_text() == "keep me"


def test_a_torn_metrics_line_is_cut_on_resume_and_skipped_by_report(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(["--steps", "4", "--out", out, *RUN[:-2], "--save-every", "2"])
    torn = len(open(os.path.join(out, "metrics.jsonl")).readlines()) + 2
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 4, "note": "a field another tool added"}\n')  # kept as it is by the resume
        f.write('{"step": 5, "loss": 1.2')  # the crash came mid-write
    train.report(out)
    train.main(["--steps", "6", "--out", out, *RUN, "--resume"])
    assert f"metrics.jsonl: cut 1 line(s) that are not whole rows (line {torn};" in capsys.readouterr().out
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert {"step": 4, "note": "a field another tool added"} in rows(out)


def test_resume_refuses_flags_that_change_the_run(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--steps", "2", "--out", out, *RUN])
    with pytest.raises(SystemExit, match=r"(?s)flags differ.*--lr: 0.001 -> 0.002.*--seed: 0 -> 1"):
        train.main(["--steps", "4", "--out", out, *RUN, "--resume", "--lr", "0.002", "--seed", "1"])
    with pytest.raises(SystemExit, match=r"global batch .*: 8 -> 16"):
        train.main(["--steps", "4", "--out", out, *RUN[2:], "--batch-size", "16", "--resume"])
    with pytest.raises(SystemExit, match=r"--steps: 2 -> 1"):
        train.main(["--steps", "1", "--out", out, *RUN, "--resume"])
    train.main(["--steps", "3", "--out", out, *RUN, "--resume", "--log-every", "2"])  # more steps: fine
    train.main(["--steps", "4", "--out", out, *RUN, "--resume", "--lr", "0.002", "--allow-flag-changes"])
    assert ckpt_step(os.path.join(out, "checkpoint.pt")) == 4


def test_an_unexpected_error_while_deciding_keeps_its_type(tmp_path, monkeypatch):
    def broken(args, module):
        raise RuntimeError("disk went away")

    monkeypatch.setattr(train, "start_or_resume", broken)
    with pytest.raises(RuntimeError, match="disk went away"):
        train.main(["--steps", "1", "--out", str(tmp_path / "run"), *RUN])


@pytest.mark.parametrize("argv, named", [
    (["--data", "nothere.tsv"], "nothere.tsv: no such data file"),
    (["--out", "README.md"], "--out README.md is a file"),
    (["--tokenizer", "nothere.json"], "nothere.json: no such tokenizer file"),
    (["--size", "huge"], "unknown --size 'huge'"),
])
def test_input_errors_are_one_line_without_traceback(tmp_path, argv, named):
    proc = subprocess.run([sys.executable, "train.py", "--out", str(tmp_path / "run"), *argv, *RUN, "--steps", "1"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("train.py: error: ") and named in proc.stderr


# ----------------------------------------------------------------------------------------------
# torchrun --max-restarts: a rank SIGKILLed mid-run, or rank 0 killed while it writes a checkpoint

FAULT = ["--steps", "20", "--batch-size", "8", "--save-every", "5", *FAST[:-2]]


def torchrun(out, script="train.py", extra_env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "--max-restarts=1",
           script, *FAULT, "--out", out, "--resume"]
    env = dict(os.environ, PYTHONPATH=ROOT, **(extra_env or {}))
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def finish(proc, timeout=300):
    """The run's log; a run that hangs is killed whole (torchrun and its workers) and fails the test."""
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"the run hung for {timeout} s:\n{log[-4000:]}")
    assert proc.returncode == 0, log
    return log


def worker_pid(parent, rank, mark):
    """The torchrun worker of this rank: a child of parent whose environment holds mark."""
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            env = open(f"/proc/{pid}/environ", "rb").read().split(b"\0")
            ppid = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env and mark.encode() in env:
            return int(pid)
    return None


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    finish(torchrun(out))
    return out


def check_resumed_run(out, log, uninterrupted):
    assert "resuming from" in log, log
    assert max_diff(weights(uninterrupted), weights(out)) < 1e-6
    steps = [r["step"] for r in rows(out) if "loss" in r]
    assert steps == list(range(1, 21)), steps  # each step once: rows after the checkpoint were dropped


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the worker through /proc")
def test_sigkilled_rank_is_restarted_by_torchrun_and_the_run_is_exact(tmp_path, uninterrupted):
    out, mark = str(tmp_path / "run"), f"FAULT_TEST={os.getpid()}_{time.time()}"
    proc = torchrun(out, extra_env={"FAULT_TEST": mark.split("=")[1]})
    killed, deadline = None, time.time() + 240
    while proc.poll() is None and killed is None and time.time() < deadline:
        if glob.glob(os.path.join(out, "checkpoint-*.pt")):  # at least one checkpoint, then mid-run
            pid = worker_pid(proc.pid, 1, mark)
            if pid:
                os.kill(pid, signal.SIGKILL)
                killed = pid
        time.sleep(0.01)
    log = finish(proc)
    assert killed, log
    check_resumed_run(out, log, uninterrupted)


KILL_DURING_SAVE = """
import os, runpy, signal, torch
real, calls = torch.save, []
def save(obj, f, *args, **kw):
    calls.append(1)
    if len(calls) == 2 and os.environ["TORCHELASTIC_RESTART_COUNT"] == "0":
        f.write(b"PK\\x03\\x04 the first bytes of a checkpoint")
        f.flush()
        out = os.path.dirname(os.path.abspath(f.name))  # mid-write: every file named as a checkpoint is whole
        named = sorted(n for n in os.listdir(out) if n.startswith("checkpoint") and n.endswith(".pt"))
        steps = [torch.load(os.path.join(out, n), weights_only=False)["step"] for n in named]
        open(os.path.join(out, "..", "seen"), "w").write(" ".join(f"{n}:{s}" for n, s in zip(named, steps)))
        os.kill(os.getpid(), signal.SIGKILL)
    return real(obj, f, *args, **kw)
torch.save = save
runpy.run_path(os.path.join(os.environ["PYTHONPATH"], "train.py"), run_name="__main__")
"""


@pytest.mark.slow
def test_kill_during_a_checkpoint_write_resumes_from_the_last_complete_one(tmp_path, uninterrupted):
    script = tmp_path / "dies_while_saving.py"
    script.write_text(KILL_DURING_SAVE)
    out = str(tmp_path / "run")
    log = finish(torchrun(out, script=str(script)))
    assert "resuming from" in log and "(step 5)" in log, log  # the save at step 10 never completed
    assert open(tmp_path / "seen").read() == "checkpoint-0000005.pt:5 checkpoint.pt:5"  # none for step 10
    check_resumed_run(out, log, uninterrupted)
    assert not glob.glob(os.path.join(out, "*.tmp*"))  # the half-written file was cleared on restart
