"""Distillation (train.py): the fused term against open_clip's DistillClipLoss and the naive forms, exact
over ranks and traced by torch.compile; train.py --distill exact under --accum and resume; a stored teacher
(data.py reinforce) trains as the online one does; bad stored data skipped and counted."""
import contextlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import clip
import data
import train
from conftest import ROOT, free_port
from naive import distill_loss as naive_distill
from naive import distill_sigmoid_loss as naive_sigmoid_distill
from test_train import FAST, max_diff, rows, weights


def inputs(b, d=16, e=24, teachers=1, seed=0, dtype=torch.float64):
    """Student features (x, y), and per teacher (u, w) of another width, paired rows close but not equal."""
    g = torch.Generator().manual_seed(seed)
    unit = lambda t: F.normalize(t, dim=-1)  # noqa: E731
    x = unit(torch.randn(b, d, generator=g, dtype=dtype))
    y = unit(x + 0.8 * torch.randn(b, d, generator=g, dtype=dtype))
    us = [unit(torch.randn(b, e, generator=g, dtype=dtype)) for _ in range(teachers)]
    ws = [unit(u + 0.6 * torch.randn(b, e, generator=g, dtype=dtype)) for u in us]
    return x, y, us, ws


def value_and_grads(fn, x, y, us, ws, scale=14.0, teacher_scales=(30.0, 45.0), sigmoid=False):
    """fn's value and its gradients in every input: student features and scale, each teacher's too."""
    dt = x.dtype
    leaves = [t.clone().requires_grad_() for t in (x, y, *us, *ws)]
    s = torch.tensor(scale, dtype=dt, requires_grad=True)
    ts = [torch.tensor(teacher_scales[m], dtype=dt, requires_grad=True) for m in range(len(us))]
    xx, yy, uu, ww = leaves[0], leaves[1], leaves[2:2 + len(us)], leaves[2 + len(us):]
    if sigmoid:
        bias = torch.tensor(-4.0, dtype=dt, requires_grad=True)
        tb = [torch.tensor(-2.0 - m, dtype=dt) for m in range(len(us))]
        loss = fn(xx, yy, s, bias, uu, ww, ts, tb)
        wrt = [xx, yy, s, bias]
    else:
        loss = fn(xx, yy, s, uu, ww, ts)
        wrt = [xx, yy, s, *uu, *ww, *ts]
    return [loss.detach(), *torch.autograd.grad(loss, wrt)]


def assert_close(ours, ref, rtol):
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a.double(), b.double(), rtol=rtol, atol=rtol * max(b.abs().max().item(), 1e-30))


@pytest.mark.parametrize("b,teachers", [(1, 1), (5, 2), (77, 1), (300, 2)])
def test_matches_the_naive_form_with_teacher_gradients(b, teachers, monkeypatch):
    # 64-wide tiles: 300 rows take ragged last tiles in both directions; an ensemble averages after the softmax.
    monkeypatch.setattr(train, "BLOCK", 64)
    x, y, us, ws = inputs(b, teachers=teachers)
    assert_close(value_and_grads(train.distill_loss, x, y, us, ws), value_and_grads(naive_distill, x, y, us, ws), 1e-10)


@pytest.mark.parametrize("b", [4, 100, 257])
def test_matches_open_clip_distill_clip_loss(b, monkeypatch):
    pytest.importorskip("open_clip")
    from open_clip.loss import DistillClipLoss

    monkeypatch.setattr(train, "BLOCK", 64)
    x, y, us, ws = inputs(b, seed=b)

    def theirs(x, y, s, us, ws, ts):
        contrastive, distill = DistillClipLoss()(x, y, s, us[0], ws[0], ts[0])
        torch.testing.assert_close(clip.contrastive_loss(x, y, s), contrastive, rtol=1e-10, atol=0)
        return distill

    ref = value_and_grads(theirs, x, y, us, ws)
    assert_close(value_and_grads(train.distill_loss, x, y, us, ws), ref, 1e-6)
    # scales as open_clip's callers may hold them: shape [1] tensors, or plain floats
    one = lambda *a: train.distill_loss(*a[:2], a[2].reshape(1), *a[3:5], [t.reshape(1) for t in a[5]])  # noqa: E731
    assert_close(value_and_grads(one, x, y, us, ws), ref, 1e-6)
    torch.testing.assert_close(train.distill_loss(x, y, 14.0, us[0], ws[0], 30.0), ref[0], rtol=1e-10, atol=0)
    # In float32 (a training run's precision): within float32's rounding of the scale's summed gradient.
    assert_close(value_and_grads(train.distill_loss, x.float(), y.float(), [us[0].float()], [ws[0].float()]), ref, 2e-4)


@pytest.mark.parametrize("b,teachers", [(1, 1), (77, 2)])
def test_sigmoid_student_matches_the_naive_form(b, teachers, monkeypatch):
    monkeypatch.setattr(train, "BLOCK", 32)
    x, y, us, ws = inputs(b, teachers=teachers, seed=3)
    ours = value_and_grads(train.distill_sigmoid_loss, x, y, us, ws, sigmoid=True)
    assert_close(ours, value_and_grads(naive_sigmoid_distill, x, y, us, ws, sigmoid=True), 1e-10)


def test_compiles_without_graph_breaks():
    x, y, us, ws = inputs(40, teachers=2, dtype=torch.float32)
    for fused, naive, sigmoid in ((train.distill_loss, naive_distill, False),
                                  (train.distill_sigmoid_loss, naive_sigmoid_distill, True)):
        compiled = torch.compile(fused, backend="aot_eager", fullgraph=True)
        assert_close(value_and_grads(compiled, x, y, us, ws, sigmoid=sigmoid),
                     value_and_grads(naive, x.double(), y.double(), [u.double() for u in us], [w.double() for w in ws],
                                     sigmoid=sigmoid), 2e-4)  # float32 against float64


def test_tiles_never_hold_the_whole_matrix(monkeypatch):
    # 64-wide tiles: no product of a 300 x 300 problem, forward or backward, may have more than 64 x 64 elements.
    monkeypatch.setattr(train, "BLOCK", 64)
    x, y, us, ws = inputs(300, teachers=2, dtype=torch.float32)
    largest = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_mm(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    value_and_grads(train.distill_loss, x, y, us, ws)
    value_and_grads(train.distill_sigmoid_loss, x, y, us, ws, sigmoid=True)
    assert largest and max(largest) <= 64 * 64


MEMORY = textwrap.dedent("""
    import resource, sys, torch, torch.nn.functional as F
    import train
    b, d = 16384, 64
    g = torch.Generator().manual_seed(0)
    x, y, u = (F.normalize(torch.randn(b, d, generator=g), dim=-1) for _ in range(3))
    w = F.normalize(u + torch.randn(b, d, generator=g), dim=-1)
    x.requires_grad_(), y.requires_grad_()
    s = torch.tensor(14.0, requires_grad=True)
    train.distill_loss(x[:8], y[:8], s, u[:8], w[:8], torch.tensor(100.0)).backward()  # code and buffers loaded
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    train.distill_loss(x, y, s, u, w, torch.tensor(100.0)).backward()
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base)
""")


@pytest.mark.slow
def test_a_batch_of_16384_adds_a_tenth_of_the_naive_forms_memory_at_most():
    # open_clip's DistillClipLoss (the naive form) keeps at least four B x B fp32 matrices for its backward
    # (two student logit matrices, two teacher softmaxes): 4 GiB at B = 16384 (tests/bench/bench_loss.py
    # --loss distill measures its whole peak, 11 GiB). The fused term, measured in a fresh process:
    proc = subprocess.run([sys.executable, "-c", MEMORY], cwd=ROOT, env={**os.environ, "PYTHONPATH": ROOT},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    added = int(proc.stdout.split()[-1])
    assert added <= 0.1 * 4 * 16384 ** 2 * 4, f"{added / 2 ** 20:.0f} MB"


def _worker(rank, world, port, data, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    x, y, us, ws = data
    n = x.shape[0] // world
    part = lambda t: t[rank * n:(rank + 1) * n]  # noqa: E731
    shard = (part(x), part(y), [part(u) for u in us], [part(w) for w in ws])
    result[rank] = (value_and_grads(train.distill_loss, *shard), value_and_grads(train.distill_sigmoid_loss, *shard, sigmoid=True))
    dist.destroy_process_group()


def test_two_ranks_equal_one_process():
    # Each rank holds its rows; DDP averages the gradients, so the mean over ranks must be the whole batch's.
    world, data = 2, inputs(48, teachers=2, seed=5)
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), data, result), nprocs=world)
        parts = [result[r] for r in range(world)]
    for form, naive, sigmoid in ((0, naive_distill, False), (1, naive_sigmoid_distill, True)):
        ref = value_and_grads(naive, *data, sigmoid=sigmoid)
        got = [p[form] for p in parts]
        merged = []
        for i, r in enumerate(ref):
            per_rank = [g[i] / world for g in got]
            merged.append(sum(per_rank) if r.dim() == 0 else torch.cat(per_rank) if r.shape[0] == 48 else sum(per_rank))
        assert_close(merged, ref, 1e-10)


def test_the_training_loss_is_contrastive_plus_distillation_plus_interactive_terms(teacher):
    # train.py's loss of a distilled batch against the naive forms: the model's contrastive loss + weight x
    # DistillClipLoss's term + icl x CLIP-KD's interactive term (the student's images against the teacher's
    # texts, and the teacher's images against the student's texts); icl 0 is open_clip's sum.
    from naive import clip_loss

    student = clip.load(teacher)[0].train()
    x, y, us, ws = inputs(24, d=student.cfg.embed_dim, e=student.cfg.embed_dim, teachers=2, dtype=torch.float32)
    out = {"image": x, "text": y, "scale": torch.tensor(20.0)}
    teachers = [(u, w, torch.tensor(30.0 + m), None) for m, (u, w) in enumerate(zip(us, ws))]
    for weight, icl in ((1.0, 0.0), (2.0, 0.5)):
        distiller = train.Distiller([], weight, icl, stored=2)
        expected = (clip_loss(x, y, 20.0) + weight * naive_distill(x, y, 20.0, us, ws, [30.0, 31.0])
                    + icl * sum(clip_loss(x, w, 20.0) + clip_loss(u, y, 20.0) for u, w in zip(us, ws)) / 4)
        torch.testing.assert_close(student.loss(out) + distiller.loss(out, teachers), expected, rtol=1e-5, atol=1e-6)


# ---- train.py --distill


RUN = ["--model", "clip", "--size", "tiny", "--batch-size", "16", "--synthetic-size", "256", *FAST]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("teacher") / "run")
    train.main([*RUN, "--steps", "6", "--out", out])
    return os.path.join(out, "checkpoint.pt")


@pytest.mark.slow
def test_accum_and_resume_are_exact_with_a_teacher(tmp_path, teacher):
    whole, accum, cut = (str(tmp_path / n) for n in ("whole", "accum", "cut"))
    args = [*RUN, "--distill", teacher, "--distill", teacher, "--distill-weight", "2"]  # an ensemble of two
    train.main([*args, "--steps", "6", "--out", whole])
    train.main([*args, "--steps", "6", "--out", accum, "--accum", "4"])
    assert max_diff(weights(whole), weights(accum)) < 1e-5
    train.main([*args, "--steps", "3", "--out", cut])
    train.main([*args, "--steps", "6", "--out", cut, "--resume"])
    assert max_diff(weights(whole), weights(cut)) < 1e-6
    # 2 ranks x 8 under FSDP: the student sharded, the teachers whole on each rank
    from test_scale import finish as finish_ranks
    from test_scale import ranks

    sharded = str(tmp_path / "fsdp")
    finish_ranks(ranks(2, *[a if a != "16" else "8" for a in args], "--steps", "6", "--out", sharded, "--fsdp"))
    assert max_diff(weights(whole), weights(sharded)) < 1e-5
    plain = str(tmp_path / "plain")
    train.main([*RUN, "--steps", "6", "--out", plain])
    assert max_diff(weights(whole), weights(plain)) > 1e-3  # the teacher changed the run
    assert [r["loss"] for r in rows(whole) if "loss" in r][0] > [r["loss"] for r in rows(plain) if "loss" in r][0]


def reinforce(teacher, out, k, *flags):
    data.reinforce_main(["--teacher", teacher, "--out", out, "--augmentations", str(k), "--per-shard", "64",
                         "--batch-size", "40", *flags])
    return os.path.join(out, "{00000..%05d}.tar" % (sum(f.endswith(".tar") for f in os.listdir(out)) - 1))


@pytest.mark.slow
def test_stored_teacher_trains_as_the_online_one(tmp_path, teacher, capsys):
    shards = reinforce(teacher, str(tmp_path / "rf"), 2, "--synthetic-size", "64")
    assert "64 samples with 1 teacher(s) x 2 crops" in capsys.readouterr().out
    with tarfile.open(str(tmp_path / "rf" / "00000.tar")) as tar:
        names = tar.getnames()
        stored = np.load(io.BytesIO(tar.extractfile("000000000.teacher0.npy").read()))
        meta = json.loads(tar.extractfile("000000000.json").read())
    assert names[:4] == ["000000000.png", "000000000.txt", "000000000.json", "000000000.teacher0.npy"]
    t = clip.load(teacher)[0]
    # 2 crops, then the caption and each rewrite (the synthetic set carries rewrites, for laclip)
    assert stored.shape == (3 + len(meta["rewrites"]), t.cfg.embed_dim) and np.allclose(np.linalg.norm(stored, axis=1), 1, atol=1e-5)
    assert meta["teacher"]["scales"] == [pytest.approx(t.logit_scale.exp().item())]
    # 12 steps of 16 over 64 samples: epochs 0 and 1 (the two stored crops), then epoch 0's crops again.
    runs = {}
    for name, distill in (("online", teacher), ("stored", "stored")):
        runs[name] = str(tmp_path / name)
        train.main([*RUN, "--data", shards, "--steps", "12", "--distill", distill, "--out", runs[name]])
    assert max_diff(weights(runs["online"]), weights(runs["stored"])) < 1e-5
    # A different online teacher does not give the stored run: the comparison can fail.
    other = str(tmp_path / "other")
    train.main([*RUN, "--steps", "2", "--out", other, "--seed", "7"])
    train.main([*RUN, "--data", shards, "--steps", "12", "--distill", os.path.join(other, "checkpoint.pt"),
                "--out", str(tmp_path / "online2")])
    assert max_diff(weights(str(tmp_path / "online2")), weights(runs["stored"])) > 1e-4


def test_each_teacher_reads_the_text_the_student_drew(teacher):
    # laclip draws one of [caption, rewrites] per sample: the online teacher must read that one, and a stored
    # run must take that text's row (rows K.. of the stored matrix, marked here by their index).
    import laclip
    from PIL import Image

    student = laclip.build(init=teacher)
    crop = data.RandomCrop(student.cfg.image_size)
    online = data.WithTeachers(student.transform(True, crop), [clip.load(teacher)[0].cfg.image_size])
    offline = data.WithTeachers(student.transform(True, crop), stored=True)
    k, texts = 2, ["a red square", "a crimson square on grey", "the square is red", "red box in the middle"]
    marks = np.arange(k + len(texts), dtype=np.float32)[:, None].repeat(8, 1)
    picks = set()
    for seed in range(12):
        sample = {"image": Image.new("RGB", (60, 50), "red"), "text": texts[0], "rewrites": texts[1:],
                  "teacher": {"augmentations": k, "augmentation": seed % k, "embeddings": [marks], "scales": [50.0],
                              "biases": [0.0]}}
        out = online(sample, np.random.default_rng(seed))
        pick = next(i for i, t in enumerate(texts) if torch.equal(student.tokenizer([t])[0], out["text"]))
        picks.add(pick)
        assert out["teacher_text"] == texts[pick] and "text_pick" not in out
        assert torch.equal(out["teacher0_pixels"], out["image"])  # the same crop box, at the same size
        out = offline(sample, np.random.default_rng(seed))
        assert out["teacher0_text"][0].item() == k + pick and out["teacher0_image"][0].item() == seed % k
    assert len(picks) > 2  # the draws did take rewrites


def test_stored_teachers_are_decided_by_the_manifests_not_by_a_sample(tmp_path, teacher):
    # Shards of two reinforce runs mixed in one --data: one line at the start, naming both folders. A
    # sample whose teachers differ from its manifest's is skipped however early it comes.
    one = reinforce(teacher, str(tmp_path / "one"), 1, "--synthetic-size", "16")
    other = str(tmp_path / "other")
    train.main([*RUN, "--steps", "1", "--out", other, "--seed", "3", "--loss", "sigmoid"])
    two = reinforce(os.path.join(other, "checkpoint.pt"), str(tmp_path / "two"), 1, "--synthetic-size", "16")
    out = str(tmp_path / "run")
    with pytest.raises(data.DataError, match="hold different teachers") as err:
        train.main([*RUN, "--data", f"{one}::{two}", "--steps", "1", "--distill", "stored", "--out", out])
    assert "one" in str(err.value) and "two" in str(err.value)
    os.remove(os.path.join(str(tmp_path / "two"), "reinforce.json"))
    with pytest.raises(data.DataError, match="no reinforce.json"):
        train.main([*RUN, "--data", two, "--steps", "1", "--distill", "stored", "--out", out, "--overwrite"])
    with pytest.raises(ValueError, match="reinforced shards"):
        train.main([*RUN, "--steps", "1", "--distill", "stored", "--out", out, "--overwrite"])
    manifest = data.read_manifests([os.path.join(str(tmp_path / "one"), "00000.tar")])
    group = next(data.read_shard(os.path.join(str(tmp_path / "one"), "00000.tar"), []))[1]
    assert data.decode_sample("k", group, "p", manifest)["teacher"]["scales"] == [manifest[0]["scale"]]
    for changed in ({**manifest[0], "width": manifest[0]["width"] + 1}, {**manifest[0], "scale": 1.0}):
        with pytest.raises(data.SampleError, match="manifest"):
            data.decode_sample("k", group, "p", [changed])


def csv_with_rewrites(tmp_path, n=48):
    from PIL import Image

    colours = ["red", "green", "blue", "yellow", "purple", "orange"]
    lines = ["filepath\ttitle\trewrite"]
    for i in range(n):
        c = colours[i % len(colours)]
        Image.new("RGB", (40 + i, 36), c).save(tmp_path / f"{i}.jpg", quality=90)
        lines.append(f"{i}.jpg\ta {c} picture number {i}\tthe colour {c} fills picture {i}")
    (tmp_path / "data.tsv").write_text("\n".join(lines) + "\n")
    return str(tmp_path / "data.tsv")


@pytest.mark.slow
def test_laclip_rewrites_each_have_their_stored_embedding(tmp_path, teacher):
    # JPEGs of other sizes than the teacher's input, captions with a rewrite each: the stored text rows
    # follow [caption, rewrites], and laclip's draw among them finds its row.
    tsv = csv_with_rewrites(tmp_path)
    shards = reinforce(teacher, str(tmp_path / "rf"), 2, "--data", tsv, "--rewrite-columns", "rewrite")
    runs = {}
    for name, distill in (("online", teacher), ("stored", "stored")):
        runs[name] = str(tmp_path / name)
        train.main(["--model", "laclip", *RUN[2:], "--data", shards, "--steps", "5", "--distill", distill,
                    "--out", runs[name]])
    assert max_diff(weights(runs["online"]), weights(runs["stored"])) < 1e-5


def write_sample(tar, key, members):
    for ext, payload in members.items():
        info = tarfile.TarInfo(f"{key}.{ext}")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))


def test_bad_stored_teacher_data_is_skipped_and_counted(tmp_path, teacher, capsys):
    # Reinforced shards, then samples that claim what they do not hold: each skipped, the run goes on.
    shards = reinforce(teacher, str(tmp_path / "rf"), 1, "--synthetic-size", "64")
    with tarfile.open(str(tmp_path / "rf" / "00000.tar")) as tar:
        good = {m.name.split(".", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers() if m.name.startswith("000000000.")}
    huge = bytearray(good["teacher0.npy"])
    header = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1000000000, 1000000), }"
    huge[10:10 + len(header)] = header  # a header claiming 4 PB over the same bytes
    npy = lambda a: (lambda buf: (np.save(buf, a), buf.getvalue())[1])(io.BytesIO())  # noqa: E731
    meta = json.loads(good["json"])
    bad = {
        "nan": {**good, "teacher0.npy": npy(np.full((2, 32), np.nan, np.float32))},
        "huge": {**good, "teacher0.npy": bytes(huge)},
        "f64": {**good, "teacher0.npy": npy(np.zeros((2, 32)))},
        "rows": {**good, "teacher0.npy": npy(np.zeros((5, 32), np.float32))},
        "object": {**good, "teacher0.npy": b"\x93NUMPY\x01\x00v\x00{'descr': '|O', 'fortran_order': False, 'shape': (2,), }" + b" " * 50 + b"\n"},
        "missing": {k: v for k, v in good.items() if k != "teacher0.npy"},
        "k0": {**good, "json": json.dumps({**meta, "teacher": {**meta["teacher"], "augmentations": 0}}).encode()},
        "scales": {**good, "json": json.dumps({**meta, "teacher": {**meta["teacher"], "scales": ["x"]}}).encode()},
        "scale1e300": {**good, "json": json.dumps({**meta, "teacher": {**meta["teacher"], "scales": [1e300]}}).encode()},
        "3e38": {**good, "teacher0.npy": npy(np.full((2, 32), 3e38, np.float32))},  # finite, far from unit rows
    }
    with tarfile.open(str(tmp_path / "rf" / "00000.tar")) as src, tarfile.open(str(tmp_path / "rf" / "bad.tar"), "w") as tar:
        for name, members in bad.items():  # first, then the 64 good samples: read in order (--shuffle-buffer 1)
            write_sample(tar, name, members)
        for m in src.getmembers():
            tar.addfile(m, src.extractfile(m))
    out = str(tmp_path / "run")
    train.main([*RUN, "--data", str(tmp_path / "rf" / "bad.tar"), "--steps", "4", "--distill", "stored", "--out", out,
                "--shuffle-buffer", "1"])
    assert [r["skipped_samples"] for r in rows(out) if "skipped_samples" in r][-1] == len(bad)  # since the start
    assert f"'bad teacher data': {len(bad)}" in capsys.readouterr().out


def test_reinforce_refuses_more_crops_than_the_loader_reads(tmp_path, teacher):
    with pytest.raises(SystemExit):
        reinforce(teacher, str(tmp_path / "rf"), data.MAX_AUGMENTATIONS + 1, "--synthetic-size", "4")
    assert not os.path.exists(str(tmp_path / "rf"))


def test_flags_are_checked_in_one_line(tmp_path, teacher):
    out = str(tmp_path / "x")
    for flags, message in (([ "--distill", str(tmp_path / "none.pt")], "none.pt"),
                           (["--distill", "stored", "--distill", teacher], "give it alone"),
                           (["--distill", "stored", "--steps", "2"], "reinforced shards")):
        with pytest.raises(train.INPUT_ERRORS, match=message):
            train.main([*RUN, *flags, "--steps", "2", "--out", out, "--overwrite"])
    for flags, message in ((["--distill-weight", "nan"], "--distill-weight nan"),
                           (["--distill-icl", "-1"], "--distill-icl -1.0: from 0")):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            train.parse_args([*RUN, "--distill", teacher, *flags])
        assert message in err.getvalue()
