"""Tar shards: layout, bad members, splitting over ranks x workers, mid-epoch resume, the CSV tool,
ImageFolder zero-shot and shard validation through train.py."""
import io
import json
import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import data
import train
from conftest import ROOT

COLORS = {"red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 90, 235), "yellow": (235, 215, 40)}


def jpeg(color, seed):
    rng = np.random.default_rng(seed)
    img = np.clip(np.array(color) + rng.normal(0, 12, (32, 32, 3)), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


def add(tar, name, payload):
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    tar.addfile(info, io.BytesIO(payload))


def make_shards(root, n_shards=6, per_shard=20, corrupt=(), captionless=(), truncated=()):
    """Shards of coloured squares in webdataset's layout; returns {key: colour}. corrupt: no image header;
    truncated: a header that reads, pixels that do not."""
    os.makedirs(root, exist_ok=True)
    truth, k = {}, 0
    for s in range(n_shards):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w") as tar:
            for _ in range(per_shard):
                name = list(COLORS)[k % 4]
                key = f"{k:09d}"
                payload = b"\xff\xd8 not really a jpeg" if k in corrupt else jpeg(COLORS[name], k)
                add(tar, f"{key}.jpg", payload[:len(payload) // 2] if k in truncated else payload)
                if k not in captionless:
                    add(tar, f"{key}.txt", f"a {name} square".encode())
                add(tar, f"{key}.json", json.dumps({"key": key, "label": k % 4}).encode())
                truth[key] = name
                k += 1
    return truth


def key_of(sample, rng):
    return {"key": torch.tensor(int(sample["text"] != ""))}


def test_brace_expansion_and_sources(tmp_path):
    assert data.expand_braces("d/{008..011}.tar") == ["d/008.tar", "d/009.tar", "d/010.tar", "d/011.tar"]
    assert data.expand_braces("{a,b}/{0..1}.tar") == ["a/0.tar", "a/1.tar", "b/0.tar", "b/1.tar"]
    make_shards(tmp_path / "a", 2, 2)
    make_shards(tmp_path / "b", 3, 2)
    paths, weights = data.shard_list(f"{tmp_path}/a/{{00000..00001}}.tar::{tmp_path}/b", "1::4")
    assert len(paths) == 5 and weights[0] == pytest.approx(1 / 14) and weights[-1] == pytest.approx(4 / 14)
    with pytest.raises(FileNotFoundError, match="00007"):
        data.shard_list(f"{tmp_path}/a/{{00007..00009}}.tar")
    with pytest.raises(ValueError, match="--resampled"):
        data.Shards(f"{tmp_path}/a::{tmp_path}/b", "1::4")


def test_members_grouped_by_key_and_bad_ones_reported(tmp_path):
    truth = make_shards(tmp_path, 1, 10, corrupt={3}, captionless={5})
    path = str(tmp_path / "00000.tar")
    problems = []
    groups = list(data.read_shard(path, problems))
    assert [k for k, _ in groups] == sorted(truth) and problems == []
    reasons = []
    for key, group in groups:
        try:
            s = data.decode_sample(key, group, path)
            assert s["text"] == f"a {truth[key]} square" and s["label"] == int(key) % 4 and s["image"].size == (32, 32)
        except data.SampleError as e:
            reasons.append((key, e.reason))
    assert reasons == [("000000003", "unreadable image"), ("000000005", "missing or empty caption")]
    # A truncated tar keeps the samples before the damage; an empty one is reported.
    raw = open(path, "rb").read()
    (tmp_path / "cut.tar").write_bytes(raw[: len(raw) // 2 + 100])
    problems = []
    kept = list(data.read_shard(str(tmp_path / "cut.tar"), problems))
    assert 0 < len(kept) < 10 and problems == ["truncated or unreadable shard"]
    with tarfile.open(tmp_path / "empty.tar", "w"):
        pass
    problems = []
    assert list(data.read_shard(str(tmp_path / "empty.tar"), problems)) == [] and problems == ["empty shard"]


@pytest.mark.parametrize("n_shards", [6, 3])  # more shards than the 4 slots, and fewer
def test_slots_split_an_epoch_without_overlap(tmp_path, n_shards):
    truth = make_shards(tmp_path, n_shards, 10)
    shards = data.Shards(f"{tmp_path}/{{00000..{n_shards - 1:05d}}}.tar", buffer=7)
    seen = []
    for rank in range(2):
        b = data.ShardBatches(shards, key_of, 4, rank=rank, world=2, workers=2)
        for w in range(2):
            seen += [key for key, _, _ in b.raw(rank * 2 + w, 0, [])]
    assert sorted(seen) == sorted(truth)  # every sample once, over 2 ranks x 2 workers
    b = data.ShardBatches(shards, key_of, 4, rank=0, world=2, workers=2)
    assert [k for k, _, _ in b.raw(0, 0, [])] != [k for k, _, _ in b.raw(0, 1, [])]  # reshuffled each epoch


def collect(batches, n, workers=0):
    out = []
    for batch, info in data.loader(batches, workers=workers):
        out.append((batch["image"].clone(), info["position"]))
        if len(out) == n:
            return out


@pytest.mark.parametrize("workers", [0, 2])
def test_mid_epoch_resume_continues_the_stream(tmp_path, workers):
    make_shards(tmp_path, 4, 15, corrupt={7, 20})
    shards = data.Shards(str(tmp_path), buffer=10)
    transform = lambda s, rng: {"image": torch.from_numpy(np.asarray(s["image"], dtype=np.float32)[:2, :2, 0])}  # noqa
    whole = collect(data.ShardBatches(shards, transform, 8, workers=workers, seed=3), 12, workers)
    # Stop after batch 5 (past an epoch boundary for some slot), as a checkpoint would record it.
    at = {}
    for _, (slot, epoch, consumed) in whole[:5]:
        at[str(slot)] = [epoch, consumed]
    position = {"slots": max(1, workers), "at": at}
    rest = collect(data.ShardBatches(shards, transform, 8, workers=workers, seed=3, position=position, start=5), 7,
                   workers)
    for (a, _), (b, _) in zip(whole[5:], rest):
        assert torch.equal(a, b)
    assert any(p[1] >= 1 for _, p in whole)  # the stream went on into a second epoch
    with pytest.raises(data.DataError, match="same number of ranks and workers"):
        data.ShardBatches(shards, transform, 8, workers=workers + 3, position=position)


def test_csv_to_shards_tool(tmp_path):
    lines = ["filepath,title"]
    for i in range(7):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg(COLORS["red"], i))
        lines.append(f"{i}.jpg,a red thing number {i}")
    lines.append("missing.jpg,gone")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "data.py", "shards", "--csv", str(tmp_path / "t.csv"), "--out",
                          str(tmp_path / "sh"), "--per-shard", "3"], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "missing.jpg" in out.stderr and sorted(os.listdir(tmp_path / "sh")) == ["00000.tar", "00001.tar", "00002.tar"]
    index = data.ShardIndex(str(tmp_path / "sh"))
    assert len(index) == 7
    assert sorted(index.sample(i, None)["text"] for i in range(7)) == sorted(f"a red thing number {i}" for i in range(7))


def image_folder(root, per_class=6):
    for name, color in COLORS.items():
        os.makedirs(root / name, exist_ok=True)
        for i in range(per_class):
            (root / name / f"{i}.jpg").write_bytes(jpeg(color, 1000 + i))
    (root / "classnames.txt").write_text("\n".join(f"{n} square" for n in sorted(COLORS)) + "\n")


def test_image_folder(tmp_path):
    image_folder(tmp_path)
    f = data.ImageFolder(str(tmp_path))
    assert f.classnames["en"] == [f"{n} square" for n in sorted(COLORS)] and len(f) == 24
    assert [f.sample(i, None)["label"] for i in (0, 23)] == [0, 3]
    assert len(data.IMAGENET_TEMPLATES) == 80 and all("{}" in t for t in data.IMAGENET_TEMPLATES)
    (tmp_path / "tpl.txt").write_text("a photo of a {}.\nno placeholder\n")
    assert data.ImageFolder(str(tmp_path), str(tmp_path / "tpl.txt")).templates["en"] == ["a photo of a {}."]
    (tmp_path / "classnames.txt").write_text("one\ntwo\n")
    with pytest.raises(ValueError, match="classnames.txt: 2 names for 4"):
        data.ImageFolder(str(tmp_path))


@pytest.mark.slow
@pytest.mark.parametrize("decode", ["workers", "gpu-decode"])
def test_train_on_shards_with_bad_samples_then_resume(tmp_path, monkeypatch, decode):
    # --gpu-decode: the same skips (the workers still read every header and decode what cannot be
    # deferred, the truncated JPEGs among them), and the same exact resume.
    truth = make_shards(tmp_path / "train", 8, 25, corrupt={2, 111}, captionless={50, 199}, truncated={7, 160})
    make_shards(tmp_path / "val", 1, 24)
    image_folder(tmp_path / "folder")
    out = str(tmp_path / "run")
    common = ["--data", f"{tmp_path}/train/{{00000..00007}}.tar", "--val-data", str(tmp_path / "val"),
              "--zeroshot-data", str(tmp_path / "folder"), "--batch-size", "16", "--workers", "0",
              "--log-every", "1", "--warmup", "2", "--out", out, "--shuffle-buffer", "50"]
    if decode == "gpu-decode":
        common.append("--gpu-decode")
    calls = []

    def stop_after_12(self, control, world):  # as if SIGTERM arrived during step 12
        calls.append(1)
        return len(calls) == 12

    monkeypatch.setattr(train.StopRequest, "agreed", stop_after_12)
    train.main([*common, "--steps", "24"])
    monkeypatch.undo()
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["step"] == 12 and ckpt["data"]["slots"] == 1
    metrics = train.main([*common, "--steps", "24", "--resume"])
    rows = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl"))]
    assert sum(r.get("skipped_samples", 0) for r in rows) >= 6  # 6 bad of 200 in the first epoch alone
    assert sum(r.get("skips", {}).get("unreadable image", 0) for r in rows) >= 4  # corrupt and truncated
    assert {"val_loss", "i2t_r1", "zeroshot_top1", "zeroshot_top5"} <= metrics.keys()
    assert metrics["zeroshot_top5"] == 1.0  # 4 classes: top-5 always holds the right one
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["data"]["at"]["0"][0] >= 1  # 384 samples: into the second epoch of 200
    assert len(truth) == 200
    other = str(tmp_path / "whole")
    common[common.index(out)] = other
    train.main([*common, "--steps", "24"])
    a = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)["model"]
    b = torch.load(os.path.join(other, "checkpoint.pt"), weights_only=True)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


@pytest.mark.slow
def test_two_ranks_on_shards_stopped_and_resumed_equal_an_uninterrupted_run(tmp_path):
    """Each rank streams its own shards: the checkpoint must hold every rank's position, not rank 0's
    alone, for the resumed ranks to continue where each stood."""
    from test_train import FAST, finish, max_diff, torchrun, weights

    make_shards(tmp_path / "s", n_shards=4, per_shard=12, corrupt={5, 17, 29, 41})  # one bad sample a shard
    common = ["--model", "clip", "--data", str(tmp_path / "s"), "--batch-size", "4", "--shuffle-buffer", "6", *FAST,
              "--lr-schedule", "const", "--val-size", "0"]  # const: a run extended on resume keeps its rates
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    finish(torchrun(2, *common, "--steps", "6", "--out", whole))
    logged = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl")) if '"loss"' in line]
    rank0 = sum(sum(r.get("skips", {}).values()) for r in logged)  # rank 0's own; the count is every rank's
    assert sum(r["skipped_samples"] for r in logged) > rank0 > 0
    finish(torchrun(2, *common, "--steps", "3", "--out", cut))
    position = torch.load(os.path.join(cut, "checkpoint.pt"), weights_only=False)["data"]
    assert position["slots"] == 2 and sorted(position["at"]) == ["0", "1"], position
    finish(torchrun(2, *common, "--steps", "6", "--out", cut, "--resume"))
    assert max_diff(weights(whole), weights(cut)) < 1e-6


def test_the_sample_cap_holds_at_its_edge_and_every_skip_is_counted_in_its_batch(tmp_path):
    with tarfile.open(tmp_path / "cap.tar", "w") as tar:  # a sample of 60 + 40 bytes
        add(tar, "a.txt", b"x" * 60)
        add(tar, "a.json", b"y" * 40)
    (_, group), = data.read_shard(str(tmp_path / "cap.tar"), [], max_bytes=100)
    assert sorted(group) == ["json", "txt"]  # at the cap: read
    (_, group), = data.read_shard(str(tmp_path / "cap.tar"), [], max_bytes=99)
    assert list(group) == [data.TOO_LARGE]  # one past: only the reason kept
    # one good sample, then 100 that do not decode, then good ones: a batch that holds a good sample goes on
    # (the stop is for 100 in a row with nothing to show), and its info counts every skip, the shard's own too
    root = tmp_path / "many"
    root.mkdir()
    with tarfile.open(root / "00000.tar", "w") as tar:
        for k in range(112):
            bad = 1 <= k <= 100
            add(tar, f"{k:05d}.jpg", b"\xff\xd8 not a jpeg" if bad else jpeg(COLORS["red"], k))
            add(tar, f"{k:05d}.txt", b"a red square")
    with tarfile.open(root / "00000.tar") as tar:
        last = tar.getmembers()[-2].offset_data  # the last sample's image
    raw = open(root / "00000.tar", "rb").read()
    (root / "00000.tar").write_bytes(raw[: last + 10])  # cut inside it: the shard's own problem
    shards = data.Shards(f"{root}/00000.tar", buffer=1)
    batches = data.ShardBatches(shards, lambda s, rng: {"x": torch.zeros(1)}, 4, rank=0, world=1, workers=1)
    stream = iter(batches)
    skips = [next(stream)[1]["skips"] for _ in range(3)]  # the third batch starts the second pass
    assert skips[0] == ["unreadable image"] * 100 and skips[1] == [] and skips[2] == ["truncated or unreadable shard"]
