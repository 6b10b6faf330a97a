"""train.py end to end: learning, DDP == single process, SIGTERM + resume == uninterrupted, bad input."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from PIL import Image

import clip
import train
from conftest import ROOT

FAST = ["--workers", "0", "--val-size", "32", "--log-every", "1", "--warmup", "2", "--lr-schedule", "cosine", "--save-every", "0"]


def torchrun(nproc, *args, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "train.py", *args]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(proc, timeout=240):
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out
    return out


def weights(out_dir):
    return torch.load(os.path.join(out_dir, "checkpoint.pt"), map_location="cpu", weights_only=False)["model"]


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def rows(out_dir):
    return [json.loads(line) for line in open(os.path.join(out_dir, "metrics.jsonl"))]


MODELS = [["--model", "clip"], ["--model", "laclip", "--multi-text"], ["--model", "clippo"], ["--model", "brivl"]]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=lambda m: " ".join(m[1:]))
def test_two_ranks_equal_one_rank(tmp_path, model):
    check_two_ranks_equal_one_rank(tmp_path, model)


def check_two_ranks_equal_one_rank(tmp_path, model):
    # The global batch is the same 16 samples either way; the loss is exact over it, so the weights agree.
    a, b = str(tmp_path / "one"), str(tmp_path / "two")
    train.main([*model, "--steps", "3", "--batch-size", "16", "--out", a, *FAST])  # in this process: no start-up
    finish(torchrun(2, *model, "--steps", "3", "--batch-size", "8", "--out", b, *FAST))
    assert max_diff(weights(a), weights(b)) < 1e-5
    assert rows(b)[0]["loss"] == pytest.approx(rows(a)[0]["loss"], rel=1e-5)
    # The evaluation too: the validation loss over full global batches, R@k over every held-out pair.
    eval_a, eval_b = rows(a)[-1], rows(b)[-1]
    assert eval_a.keys() == eval_b.keys() and "val_loss" in eval_a and "i2t_r1" in eval_a
    assert eval_b["val_loss"] == pytest.approx(eval_a["val_loss"], rel=1e-4)
    assert all(eval_b[k] == eval_a[k] for k in eval_a if k.startswith(("i2t", "t2i")))
    # The weights did move, so the comparison is not one of untouched initial weights.
    first = torch.load(os.path.join(a, "checkpoint.pt"), weights_only=False)
    assert first["step"] == 3 and first["optimizer"]["state"]


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS, ids=lambda m: " ".join(m[1:]))
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, model):
    check_sigterm_then_resume(tmp_path, model)


def check_sigterm_then_resume(tmp_path, model):
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    args = [*model, "--steps", "30", "--batch-size", "16", *FAST]
    train.main([*args, "--out", whole])
    proc = torchrun(1, *args, "--out", cut, start_new_session=True)
    metrics = os.path.join(cut, "metrics.jsonl")
    deadline = time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 3):
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # as a scheduler does: the whole process group
    out, _ = proc.communicate(timeout=120)
    stopped = torch.load(os.path.join(cut, "checkpoint.pt"), weights_only=False)["step"]
    assert 3 <= stopped < 30, out
    train.main([*args, "--out", cut, "--resume"])
    assert max_diff(weights(whole), weights(cut)) < 1e-6
    assert [r["step"] for r in rows(cut) if "loss" in r] == list(range(1, 31))


def test_accumulation_is_exact(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(["--steps", "3", "--batch-size", "16", "--out", a, *FAST])
    train.main(["--steps", "3", "--batch-size", "16", "--accum", "4", "--out", b, *FAST])
    assert max_diff(weights(a), weights(b)) < 1e-5
    assert rows(b)[0]["loss"] == pytest.approx(rows(a)[0]["loss"], rel=1e-5)


@pytest.mark.slow
def test_learning_happens(tmp_path):
    out = str(tmp_path / "run")
    metrics = train.main(["--steps", "150", "--batch-size", "64", "--out", out, "--workers", "0", "--val-size", "400",
                          "--log-every", "50", "--warmup", "20"])
    losses = [r["loss"] for r in rows(out) if "loss" in r]
    print(losses, metrics)
    assert losses[-1] < 0.75 * losses[0]
    assert metrics["zeroshot_top1"] > 0.15  # 40 classes: chance is 0.025
    assert metrics["i2t_r5"] > 0.1  # chance 5 / 400


def test_checkpoint_holds_what_resume_needs(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--steps", "2", "--batch-size", "8", "--out", out, *FAST])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert {"model", "optimizer", "step", "rng", "samples_seen", "extra"} <= ckpt.keys()
    assert ckpt["step"] == 2 and ckpt["samples_seen"] == 16
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    model, _ = clip.load(os.path.join(out, "checkpoint.pt"))  # our checkpoints load through clip.load too
    assert model.encode_texts(["a red circle"]).shape == (1, 128)
    row = rows(out)[0]
    assert {"step", "loss", "lr", "samples_per_s"} <= row.keys()
    assert {"zeroshot_top1", "i2t_r1", "t2i_r1", "i2t_r5", "t2i_r10"} <= rows(out)[-1].keys()


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    out = str(tmp_path / "run")
    real, calls = clip.CLIP.loss, []

    def poisoned(self, o):
        calls.append(1)
        loss = real(self, o)
        return loss * float("nan") if len(calls) > 4 else loss

    monkeypatch.setattr(clip.CLIP, "loss", poisoned)
    with pytest.raises(SystemExit, match="loss became nan"):
        train.main(["--steps", "8", "--batch-size", "8", "--out", out, *FAST[:-2], "--save-every", "2"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ckpt["step"] == 4
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_unknown_model_lists_choices():
    with pytest.raises(SystemExit, match="unknown --model 'vit'; choose one of: clip"):
        train.main(["--model", "vit"])


def test_resume_from_a_missing_file_says_so(tmp_path):
    with pytest.raises(SystemExit, match="no checkpoint at"):
        train.main(["--out", str(tmp_path), "--resume", str(tmp_path / "nothere.pt")])


def test_missing_data_file_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.tsv"):
        train.main(["--data", str(tmp_path / "nothere.tsv"), "--out", str(tmp_path), "--steps", "1"])


def test_bad_samples_are_skipped_and_counted(tmp_path):
    os.makedirs(tmp_path / "img")
    lines = ["filepath\ttitle"]
    for i in range(10):
        Image.new("RGB", (40, 40), (25 * i, 100, 200)).save(tmp_path / "img" / f"{i}.png")
        lines.append(f"img/{i}.png\ta picture number {i}")
    (tmp_path / "img" / "3.png").write_bytes(b"not a png")  # unreadable
    lines[7] = "img/6.png\t   "  # empty caption
    lines.append("img/missing.png\ta lost picture")
    (tmp_path / "train.tsv").write_text("\n".join(lines) + "\n")
    out = str(tmp_path / "run")
    train.main(["--data", str(tmp_path / "train.tsv"), "--steps", "3", "--batch-size", "11", "--out", out,
                "--size", "tiny", *FAST])
    assert rows(out)[-1]["skipped_samples"] == 9  # 3 bad of 11 in each of 3 epochs


def test_all_bad_data_is_a_clear_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"junk")
    (tmp_path / "t.csv").write_text("filepath,title\n" + "x.png,a caption\n" * 5)
    with pytest.raises(RuntimeError, match="could not be read"):
        train.main(["--data", str(tmp_path / "t.csv"), "--steps", "1", "--batch-size", "2", "--out", str(tmp_path),
                    *FAST])


def test_missing_csv_column_names_the_flag(tmp_path):
    (tmp_path / "t.csv").write_text("path,caption\nx.png,a caption\n")
    with pytest.raises(ValueError, match="--csv-img-key"):
        train.main(["--data", str(tmp_path / "t.csv"), "--out", str(tmp_path), "--steps", "1"])
