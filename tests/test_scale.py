"""Past one GPU's memory: FSDP2 == DDP == one process, resume across FSDP and DDP (whole and sharded
checkpoints), activation checkpointing exact, fp16 with a gradient scaler, schedules, two "nodes"."""
import copy
import json
import re
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import clip
import data
import train
from conftest import ROOT, free_port

FAST = ["--workers", "0", "--val-size", "0", "--log-every", "1", "--warmup", "2", "--lr-schedule", "cosine", "--save-every", "0"]


def ranks(n, *args):
    """n processes of train.py wired as torchrun wires them (env://), without torchrun's own start-up."""
    port = free_port()
    procs = []
    for r in range(n):
        env = {**os.environ, "RANK": str(r), "WORLD_SIZE": str(n), "LOCAL_RANK": str(r), "LOCAL_WORLD_SIZE": str(n),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "TRAIN_TRACEBACK": "1"}
        procs.append(subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    return procs


def finish(procs, timeout=300):
    outs = [p.communicate(timeout=timeout)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out
    return outs[0]


def checkpoint(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)


def max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].float() - b[k].float()).abs().max().item() for k in a)


def loss_steps(out):
    return [r["step"] for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r]


def test_fsdp_sharded_sigterm_then_resume_under_ddp(tmp_path):
    # FSDP with sharded checkpoints, stopped by SIGTERM, continued as a DDP run: the same weights as one
    # process trained straight through on the same global batches.
    one, cut = str(tmp_path / "one"), str(tmp_path / "cut")
    args = ["--steps", "8", *FAST]
    train.main([*args, "--batch-size", "16", "--out", one])
    procs = ranks(2, *args, "--batch-size", "8", "--out", cut, "--fsdp", "--sharded-checkpoint")
    metrics, deadline = os.path.join(cut, "metrics.jsonl"), time.time() + 120
    while time.time() < deadline and not (os.path.exists(metrics) and len(open(metrics).readlines()) >= 2):
        time.sleep(0.05)
    for p in procs:  # as a scheduler does: every process
        p.send_signal(signal.SIGTERM)
    finish(procs)
    stopped = checkpoint(cut)
    assert 2 <= stopped["step"] < 8 and stopped["model"] is None  # the weights are in the shards
    assert os.path.isdir(os.path.join(cut, stopped["sharded"]))
    finish(ranks(2, *args, "--batch-size", "8", "--out", cut, "--resume"))
    assert max_diff(checkpoint(one)["model"], checkpoint(cut)["model"]) < 1e-5
    assert loss_steps(cut) == list(range(1, 9))


def test_ddp_then_fsdp_with_accumulation_equals_one_process(tmp_path):
    # A DDP run's whole checkpoint continued under FSDP with --accum 2 (GradCache replay), evaluation
    # included; FSDP's final checkpoint is a whole one that a plain optimizer loads.
    one, run = str(tmp_path / "one"), str(tmp_path / "run")
    args = [*FAST[:2], "--val-size", "16", *FAST[4:]]
    train.main(["--steps", "5", "--batch-size", "16", "--out", one, *args])
    finish(ranks(2, "--steps", "3", "--batch-size", "8", "--out", run, *args))
    out = finish(ranks(2, "--steps", "5", "--batch-size", "8", "--accum", "2", "--out", run, "--resume", "--fsdp", *args))
    assert "resuming from" in out and "zeroshot_top1" in out
    total, held = map(float, re.search(r"([\d.]+)M parameters \(([\d.]+)M held by each rank, FSDP\)", out).groups())
    assert held < 0.52 * total  # the weights are sharded over the 2 ranks (the 0-d logit scale stays whole)
    a, b = checkpoint(one), checkpoint(run)
    assert max_diff(a["model"], b["model"]) < 1e-5
    assert b["optimizer"]["state"].keys() == a["optimizer"]["state"].keys()  # opt.state_dict()'s layout, as DDP's
    assert max(max((a["optimizer"]["state"][i][k].float() - v.float()).abs().max().item() for k, v in s.items())
               for i, s in b["optimizer"]["state"].items()) < 1e-5
    model, _ = clip.load(os.path.join(run, "checkpoint.pt"))
    torch.optim.AdamW(model.optimizer_groups(0.1)).load_state_dict(b["optimizer"])  # a plain optimizer takes it


def test_brivl_fsdp_with_grad_checkpointing_equals_one_process(tmp_path):
    # Momentum encoders and queues under FSDP: the momentum update pairs shards with shards.
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--model", "brivl", "--queue-size", "32", "--steps", "3", *FAST]
    train.main([*args, "--batch-size", "16", "--out", one])
    finish(ranks(2, *args, "--batch-size", "8", "--out", two, "--fsdp", "--grad-checkpointing"))
    a, b = checkpoint(one)["model"], checkpoint(two)["model"]
    assert max_diff(a, b) < 1e-5
    assert torch.equal(a["queue_ptr"], b["queue_ptr"]) and int(b["queue_ptr"]) == 16


@pytest.mark.slow
def test_two_nodes_equal_one_process(tmp_path):
    # Two torchrun invocations, one process each, meeting at a c10d rendezvous: the README's multi-node command.
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--steps", "3", *FAST]
    train.main([*args, "--batch-size", "16", "--out", one])
    port = free_port()
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                               "--nproc-per-node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}",
                               "--rdzv-id", "two-nodes", "train.py", *args, "--batch-size", "8", "--out", two],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for node in (0, 1)]
    finish(procs)
    assert max_diff(checkpoint(one)["model"], checkpoint(two)["model"]) < 1e-5
    assert checkpoint(two)["samples_seen"] == 3 * 16


def make(name, **kw):
    args, module = train.parse_args(["--model", name, "--batch-size", "8"] + (["--queue-size", "32"] if name == "brivl" else []))
    ds = data.Synthetic()
    torch.manual_seed(0)
    model = module.create(args, [ds.captions(i)[0][0] for i in range(200)])
    t = model.transform(True)
    batch = data.collate([t(ds.sample(i, np.random.default_rng(i)), np.random.default_rng(i)) for i in range(8)])
    return model.train(), {k: v for k, v in batch.items() if not k.startswith("_") and k != "label"}


@pytest.mark.parametrize("name", ["clip", "brivl", "clippo", "laclip"])
def test_grad_checkpointing_gives_the_same_gradients(name):
    model, batch = make(name)
    other = copy.deepcopy(model)
    runs = []
    first = other.shard_units()[0][0]
    inner = first.forward
    first.forward = lambda *a, **k: (runs.append(1), inner(*a, **k))[1]
    train.checkpoint_blocks(other)
    model.loss(model(batch)).backward()
    other.loss(other(batch)).backward()
    assert len(runs) == 2 * (2 if name == "clippo" else 1)  # forward, then the recompute in the backward
    for (n, p), q in zip(model.named_parameters(), other.parameters()):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=1e-6, msg=n)


def test_fp16_with_a_gradient_scaler_and_optimizer_flags(tmp_path):
    out = str(tmp_path / "fp16")
    train.main(["--steps", "2", "--batch-size", "8", "--precision", "fp16", "--beta1", "0.8", "--beta2", "0.95",
                "--eps", "1e-8", "--out", out, *FAST])
    ckpt = checkpoint(out)
    assert ckpt["scaler"]["scale"] > 1  # the scaler ran and its state travels with the checkpoint
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    assert ckpt["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95) and ckpt["optimizer"]["param_groups"][0]["eps"] == 1e-8
    assert all(np.isfinite(r["loss"]) for r in map(json.loads, open(os.path.join(out, "metrics.jsonl"))) if "loss" in r)


def test_lr_schedules():
    def lrs(*argv):
        args, _ = train.parse_args(["--steps", "10", "--warmup", "2", "--lr", "1", *argv])
        return [round(train.lr_at(s, args), 6) for s in range(10)]

    assert lrs("--lr-schedule", "const") == [0.5] + [1.0] * 9
    assert lrs("--lr-schedule", "const-cooldown", "--cooldown-steps", "4") == [0.5, 1, 1, 1, 1, 1, 1, 0.75, 0.5, 0.25]
    # a cooldown longer than the run: it cools down all along (after the warmup)
    assert lrs("--lr-schedule", "const-cooldown", "--cooldown-steps", "40") == [0.5, 1, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]
    assert lrs() == lrs("--lr-schedule", "const-cooldown", "--cooldown-steps", "120")  # clip's default recipe
    cos = lrs("--lr-schedule", "cosine")
    assert cos[:3] == [0.5, 1.0, 1.0] and cos[-1] == pytest.approx(0.5 * (1 + np.cos(np.pi * 7 / 8)), abs=1e-6)
    with pytest.raises(SystemExit):
        train.parse_args(["--lr-schedule", "const-cooldown", "--cooldown-steps", "0"])
    with pytest.raises(SystemExit):
        train.parse_args(["--sharded-checkpoint"])  # without --fsdp
