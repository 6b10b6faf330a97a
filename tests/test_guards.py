"""Guards a mutation audit found blind: each test here fails when the code it names is broken in a small,
plausible way (a rank counted with <=, a matrix left out of weight decay, a shuffle not reseeded per
epoch, a gradient scaled under --accum, a flag allowed to change on resume)."""
import contextlib
import os

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import clip
import data
import naive
import train
from test_shards import make_shards

MODELS = list(train.MODELS)


def test_retrieval_metrics_equal_the_definition():
    # 12 one-hot-ish rows with known ranks: row i's own pair scores i-th best for i < 12, and one tie
    n, d = 12, 16
    image = torch.zeros(n, d)
    text = torch.zeros(n, d)
    for i in range(n):
        image[i, i] = 1.0
        text[i, i] = 1.0 - 0.05 * i  # the pair's similarity falls with i
        for j in range(i):
            text[j, i] = 1.0 - 0.05 * i + 0.01 * (j + 1)  # i earlier texts beat it for image i
    text[0, 11] = text[11, 11]  # a tie: it must not push pair 11 down
    got = train.retrieval_metrics(image, text, chunk=5)
    want = naive.recall(image @ text.T)
    assert got.keys() == want.keys() and all(got[k] == pytest.approx(want[k]) for k in want), (got, want)
    assert 0 < want["i2t_r5"] < want["i2t_r10"] < 1  # the ranks spread over every k checked
    rng = torch.Generator().manual_seed(0)
    a, b = torch.randn(50, 8, generator=rng), torch.randn(50, 8, generator=rng)
    got, want = train.retrieval_metrics(a, b, chunk=7), naive.recall(a @ b.T)
    assert all(got[k] == pytest.approx(want[k]) for k in want)


@pytest.mark.parametrize("name", MODELS)
def test_weight_decay_falls_on_every_trainable_matrix_and_nothing_else(name):
    module = train.import_model(name)
    args, _ = train.parse_args(["--model", name, "--steps", "1"] + (["--stage", "contrastive"] if name == "altclip" else []))
    model = module.create(args, ["a red circle", "a blue square"] * 20)
    groups = model.optimizer_groups(0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    matrices = {n for n, p in model.named_parameters() if p.requires_grad and p.ndim >= 2 and "embedding" not in n}
    assert decay == matrices and decay and no_decay == trainable - matrices
    assert "logit_scale" in no_decay or name == "brivl"  # brivl's temperature is fixed
    assert all(g["weight_decay"] == 0.1 for g in groups if g["weight_decay"] > 0)
    if name == "clip":
        sig = clip.build("tiny", captions=["a red circle"] * 10, loss="sigmoid")
        sig_no = {n for n, p in sig.named_parameters() if any(p is q for g in sig.optimizer_groups(0.1)
                                                                if g["weight_decay"] == 0 for q in g["params"])}
        assert {"logit_scale", "logit_bias"} <= sig_no


def test_shard_order_and_shuffle_buffer_are_reseeded_every_epoch(tmp_path):
    make_shards(tmp_path / "many", n_shards=6, per_shard=4)
    make_shards(tmp_path / "one", n_shards=1, per_shard=12)
    many = data.ShardBatches(data.Shards(str(tmp_path / "many")), None, 4)
    orders = [many.shards_of(0, epoch)[0] for epoch in range(4)]
    assert len({tuple(o) for o in orders}) > 1 and all(sorted(o) == sorted(orders[0]) for o in orders)
    one = data.ShardBatches(data.Shards(str(tmp_path / "one"), buffer=4), None, 4)
    streams = [[key for key, _, _ in one.raw(0, epoch, [])] for epoch in range(4)]
    assert len({tuple(s) for s in streams}) > 1 and all(sorted(s) == sorted(streams[0]) for s in streams)
    # the same epoch twice: the same order (what resume relies on)
    assert [k for k, _, _ in one.raw(0, 2, [])] == streams[2] and many.shards_of(0, 2)[0] == orders[2]


@pytest.mark.parametrize("name", ["clip", "brivl"])
def test_gradients_before_the_step_equal_for_accum_1_and_4(name):
    module = train.import_model(name)
    args, _ = train.parse_args(["--model", name, "--steps", "1", "--batch-size", "8"])
    captions = ["a red circle", "a blue square", "a green cross"] * 10
    torch.manual_seed(0)
    model = module.create(args, captions)
    transform = model.transform(True)
    ds = data.Synthetic(0, "train", 8)
    samples = [transform(ds.sample(i, np.random.default_rng(i)), np.random.default_rng(i)) for i in range(8)]
    batch = data.collate(samples)
    grads = []
    for accum in (1, 4):
        clone = module.create(args, captions, extra=model.extra_state())
        clone.load_state_dict(model.state_dict())
        train.train_step(clone, lambda last: contextlib.nullcontext(), clone.loss, dict(batch), accum,
                         torch.autocast("cpu", enabled=False), torch.device("cpu"))
        grads.append({n: p.grad.clone() for n, p in clone.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for n in grads[0]:  # a uniform scale (x accum, / accum) would be far outside this
        diff, size = (grads[0][n] - grads[1][n]).abs().max(), grads[0][n].abs().max()
        assert diff <= 1e-5 * size + 1e-8, (n, diff, size)


# What may differ on resume, pinned: adding a name here lets that flag silently change a resumed run.
MAY_CHANGE = {"steps", "out", "resume", "overwrite", "allow_flag_changes", "keep", "workers", "log_every",
              "save_every", "eval_every", "compile", "device", "dist_timeout", "val_data", "val_size",
              "zeroshot_data", "zeroshot_templates", "accum", "batch_size", "report_to", "fsdp",
              "sharded_checkpoint", "grad_checkpointing", "epochs", "train_num_samples", "allow_changed_inputs"}


def test_flags_that_may_change_on_resume_are_pinned_and_every_other_is_refused():
    assert train.MAY_CHANGE_ON_RESUME == MAY_CHANGE
    for name in MODELS:
        args, module = train.parse_args(["--model", name, "--steps", "4"])
        defaults = {a.dest: a.default for a in train.build_parser(module)._actions}
        saved = {"args": dict(vars(args)), "step": 2, "samples_seen": 2 * args.batch_size}
        for key, value in vars(args).items():
            if key in MAY_CHANGE:
                continue
            changed = (not value if isinstance(value, bool) else value + 1 if isinstance(value, int)
                       else value * 2 + 1 if isinstance(value, float) else f"{value}x" if isinstance(value, str)
                       else "other")
            now = argparse_copy(args, key, changed)
            diffs = train.changed_flags(saved, now, defaults, 1)
            assert any(d.startswith(f"--{key.replace('_', '-')}:") for d in diffs), (name, key, value, changed)


def argparse_copy(args, key, value):
    out = type(args)(**vars(args))
    setattr(out, key, value)
    return out


class CountSyncs(TorchDispatchMode):
    """Counts aten._local_scalar_dense: what .item(), int(t), float(t) and bool(t) dispatch to, each a
    wait on the device (on CUDA the host stalls until every queued kernel has run)."""

    def __init__(self):
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.n += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("name", MODELS)
def test_a_training_step_never_waits_on_the_device(name):
    """Forward, loss and backward of one step, every model: no host sync (the text trim happens on the
    CPU as the loader hands the batch over)."""
    module = train.import_model(name)
    extra = ["--stage", "contrastive"] if name == "altclip" else []
    args, _ = train.parse_args(["--model", name, "--steps", "1", *extra])
    model = module.create(args, ["a red circle", "a blue square", "a small green cross"] * 10)
    transform = model.transform(True)
    ds = data.Synthetic(0, "train", 8, resolution=args.synthetic_resolution)
    batch = data.collate([transform(ds.sample(i, np.random.default_rng(i)), np.random.default_rng(i)) for i in range(8)])
    batch = transform.finish(batch) if hasattr(transform, "finish") else batch
    model.train()
    with CountSyncs() as syncs:
        loss = model.loss(model(batch))
        loss.backward()
    assert syncs.n == 0, f"{name}: {syncs.n} host syncs in a training step"
    if name == "clip":  # the trim, on the CPU before the step: after the batch's longest text
        assert clip.trim_padding(torch.tensor([[5, 0, 7, 0, 0], [5, 9, 0, 0, 0]])).tolist() == [[5, 0, 7], [5, 9, 0]]


def refused(parse, argv):
    """The one argparse line parse(argv) exits with, or None if it parsed."""
    import io

    with contextlib.redirect_stderr(io.StringIO()) as err:
        try:
            parse(argv)
        except SystemExit:
            return err.getvalue().strip().splitlines()[-1]
    return None


# (model, flag, the values at and inside its range, the values just past it): a cap checked one past its
# value, or an "above" made "at least", lets a value through that the run then fails on (a queue of 0, a
# temperature of 0 dividing by it, 10^8 text sets per sample, a 100,000-pixel side running out of memory).
EDGES = [("clip", "--batch-size", ["1", str(1 << 20)], ["0", str((1 << 20) + 1)]),
         ("clip", "--epochs", ["0.01", "1000000"], ["0", "1000000.1", "1e300", "inf", "nan"]),
         ("clip", "--beta2", ["0", "0.999"], ["1", "-0.1"]),
         ("clip", "--seed", ["0", str(2 ** 53)], ["-1", str(2 ** 53 + 1)]),
         ("clip", "--lr", ["0", "1e-3"], ["-1e-9", "nan"]),
         ("clip", "--synthetic-resolution", ["8", "512"], ["7", "513"]),
         ("clip", "--shuffle-buffer", ["1", str(1 << 24)], ["0", str((1 << 24) + 1)]),
         ("brivl", "--temperature", ["0.0001", "100"], ["0", "100.5"]),
         ("brivl", "--queue-size", ["1", str(1 << 20)], ["0", str((1 << 20) + 1)]),
         ("brivl", "--image-size", ["8", "4096"], ["7", "4097"]),
         ("brivl", "--momentum", ["0", "1"], ["1.01"]),
         ("clippo", "--text-pair-ratio", ["0", "1"], ["1.01", "-0.01"]),
         ("laclip", "--max-rewrites", ["0", "64"], ["65", "100000000"]),
         ("clip", "--ema", ["0", "0.9999"], ["1", "-0.1"]),
         ("clip", "--layer-decay", ["0.0001", "1"], ["0", "1.01"]),
         ("clip", "--context-length", ["0", "4096"], ["4097", "-1"]),
         ("clip", "--lora-dropout", ["0", "0.5"], ["1", "-0.1"])]


@pytest.mark.parametrize("model,flag,inside,past", EDGES, ids=[f"{e[0]}{e[1]}" for e in EDGES])
def test_numeric_flags_are_refused_just_past_their_range_and_taken_at_it(model, flag, inside, past):
    base = ["--model", model, *(["--steps", "10"] if flag != "--epochs" else [])]
    for value in inside:
        assert refused(train.parse_args, [*base, flag, value]) is None, (flag, value)
    for value in past:
        line = refused(train.parse_args, [*base, f"{flag}={value}"])  # = : argparse reads -1 as a flag
        assert line is not None and f"{flag} " in line and "from" in line, (flag, value, line)


def test_the_data_commands_check_their_numbers_the_same_way(tmp_path):
    """data.py rewrite, reinforce, shards and sample: a huge timeout was an OverflowError in a C timeval,
    a huge seed one in numpy, a huge --n a folder filling without end."""
    import subprocess
    import sys

    captions = tmp_path / "c.txt"
    captions.write_text("a red circle\n")
    rewrite = ["--captions", str(captions), "--out", str(tmp_path / "r.txt"), "--endpoint", "http://127.0.0.1:9"]
    for flags, said in ((["--timeout", "1e300"], "--timeout 1e+300: from 0 to"), (["--timeout", "0"], "above 0"),
                        (["--top-p", "0"], "above 0"), (["--top-p", "1.5"], "--top-p"), (["--temperature", "nan"], "nan"),
                        (["--concurrency", "0"], "--concurrency 0"), (["--concurrency", "1025"], "--concurrency 1025"),
                        (["--retries", "-1"], "--retries -1")):
        line = refused(data.rewrite_main, [*rewrite, *flags])
        assert line is not None and said in line, (flags, line)
    for flags, said in ((["--augmentations", "1025"], "--augmentations 1025: from 1 to 1024"),
                        (["--augmentations", "0"], "--augmentations 0"), (["--seed", str(2 ** 64)], "--seed"),
                        (["--per-shard", str((1 << 20) + 1)], "--per-shard")):
        line = refused(data.reinforce_main, ["--teacher", "t.pt", "--data", "synthetic", "--out", str(tmp_path / "o"),
                                             *flags])
        assert line is not None and said in line, (flags, line)
    for argv, said in ((["sample", "--out", str(tmp_path / "s"), "--n", str((1 << 20) + 1)], "--n 1048577"),
                       (["sample", "--out", str(tmp_path / "s"), "--seed", str(2 ** 64)], "--seed"),
                       (["shards", "--csv", "x.csv", "--out", str(tmp_path / "h"), "--per-shard", "0"], "--per-shard 0")):
        proc = subprocess.run([sys.executable, "data.py", *argv], capture_output=True, text=True, timeout=60,
                              cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        assert proc.returncode == 2 and said in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert not os.path.exists(tmp_path / "s")


def test_the_checks_behind_the_parser_hold_at_their_edges(tmp_path):
    """The same bounds where a caller reaches them without the parser: Distiller.from_args, lora_spec,
    read_manifests, and the fingerprint of shards (names and sizes)."""
    import argparse
    import json

    ns = dict(distill=["t.pt"], distill_weight=1.0, distill_icl=1.0, distill_model="clip")
    for bad in ({"distill_weight": -0.5}, {"distill_icl": -1.0}, {"distill_weight": float("inf")}):
        with pytest.raises(ValueError, match="finite weights"):
            train.Distiller.from_args(argparse.Namespace(**{**ns, **bad}), "cpu", None)
    with pytest.raises(ValueError, match="at most 16 teachers"):
        train.Distiller.from_args(argparse.Namespace(**{**ns, "distill": ["t.pt"] * 17}), "cpu", None)
    with pytest.raises(Exception) as err:  # 16 pass the cap and reach the (missing) files
        train.Distiller.from_args(argparse.Namespace(**{**ns, "distill": [str(tmp_path / "t.pt")] * 16}), "cpu", None)
    assert "at most" not in str(err.value)
    assert train.lora_spec(4, dropout=0.99)["dropout"] == 0.99
    for bad in (1.0, -0.01):
        with pytest.raises(ValueError):
            train.lora_spec(4, dropout=bad)
    teacher = {"fingerprint": "f", "width": 8, "scale": 10.0, "bias": 0.0}
    for n, ok in ((16, True), (17, False)):
        folder = tmp_path / f"m{n}"
        folder.mkdir()
        (folder / "reinforce.json").write_text(json.dumps({"teachers": [teacher] * n}))
        if ok:
            assert len(data.read_manifests([str(folder / "00000.tar")])) == 16
        else:
            with pytest.raises(data.DataError, match="at most 16"):
                data.read_manifests([str(folder / "00000.tar")])
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"x" * 10)
    args = argparse.Namespace(data=str(shards / "{00000..00000}.tar"))
    before = train.input_fingerprints(args)
    (shards / "00000.tar").write_bytes(b"x" * 11)  # the same name, another size: another data set
    assert train.input_fingerprints(args) != before


def test_a_files_size_cap_holds_at_its_edge(tmp_path):
    (tmp_path / "f").write_bytes(b"x" * 100)
    assert data.read_text(str(tmp_path / "f"), 100) == b"x" * 100
    with pytest.raises(ValueError, match="101 bytes, over the 100"):
        (tmp_path / "f").write_bytes(b"x" * 101)
        data.read_text(str(tmp_path / "f"), 100)


def test_the_demo_recipe_stays_in_the_demo(tmp_path):
    demo, _ = train.parse_args(["--model", "clip", "--size", "tiny"])
    assert (demo.steps, demo.warmup, demo.lr_schedule) == (430, 20, "const-cooldown")
    (tmp_path / "d.tsv").write_text("filepath\ttitle\n")
    mine, _ = train.parse_args(["--model", "clip", "--size", "tiny", "--data", str(tmp_path / "d.tsv"), "--steps", "50"])
    assert mine.warmup != 20 and mine.lr_schedule != "const-cooldown"  # your data: train.py's own defaults


def test_a_tokenizer_whose_end_token_is_not_the_weights_is_one_line(tmp_path):
    import clip

    tok = clip.train_bpe(data.Synthetic().caption_corpus(500), vocab_size=300, context_length=16)
    cfg = clip.Config(embed_dim=16, image_size=16, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2,
                      context_length=16, vocab_size=tok.vocab_size, eos_id=tok.eot, text_width=32, text_layers=1,
                      text_heads=2)
    model = clip.CLIP(cfg, tok)
    extra = model.extra_state()
    for eos, ok in ((tok.eot, True), (tok.eot - 1, False)):
        torch.save({"model": model.state_dict(), "extra": {**extra, "config": {**extra["config"], "eos_id": eos}}},
                   tmp_path / "w.pt")
        if ok:
            clip.load(str(tmp_path / "w.pt"))
        else:
            with pytest.raises(Exception, match="pool the text at"):
                clip.load(str(tmp_path / "w.pt"))


def test_lora_dropout_is_off_in_eval():
    lora = train.LoRA(6, 4, 0, 6, 2, 2.0, dropout=0.5)
    with torch.no_grad():
        lora.B.normal_()
    w = torch.zeros(6, 4)
    lora.eval()
    plain = (lora.B @ lora.A).detach()
    assert torch.allclose(lora(w), plain) and torch.allclose(lora(w), plain)  # every column, every call
    lora.train()
    assert not torch.allclose(lora(w), plain)  # some column dropped (or scaled up) in training


def test_a_preset_on_the_synthetic_data_keeps_open_clips_recipe_and_epochs_count_every_rank():
    big, _ = train.parse_args(["--model", "clip", "--size", "ViT-B-32", "--steps", "100"])
    assert (big.lr, big.wd) == (5e-4, 0.2)  # only the tiny demo takes the demo's rates
    import argparse

    args = argparse.Namespace(steps=None, epochs=2, batch_size=8, warmup=None)
    train.steps_from_epochs(args, 100, 2)
    assert args.steps == 13 and args.warmup == 1  # ceil(2 x 100 / (8 x 2 ranks)); a tenth of it, at least 1
