"""Fine-tuning as the field does (train.py): EMA weights against their closed form, exact over resume and
ranks, saved as the weights users load; layer-wise learning-rate decay's rate for every parameter,
read off the update AdamW made, with LoRA, LiT's locks and FSDP; D = 1 is today's run."""
import math
import os

import pytest
import torch

import clip
import train
from test_train import FAST, finish, max_diff, rows, torchrun, weights

RUN = ["--model", "clip", "--size", "tiny", "--batch-size", "16", "--synthetic-size", "256", *FAST]


def ckpt(out):
    return torch.load(os.path.join(out, "checkpoint.pt"), map_location="cpu", weights_only=False)


def recorded(monkeypatch):
    """Every trained parameter before the EMA's first update and after each optimizer step, by name."""
    seen = []
    init, update = train.EMA.__init__, train.EMA.update

    def start(self, *a, **kw):
        init(self, *a, **kw)
        seen.append({n: p.detach().clone() for n, p in self.params.items()})

    def step(self):
        seen.append({n: p.detach().clone() for n, p in self.params.items()})
        update(self)

    monkeypatch.setattr(train.EMA, "__init__", start)
    monkeypatch.setattr(train.EMA, "update", step)
    return seen


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_its_closed_form_over_the_recorded_weights(tmp_path, monkeypatch, warmup):
    seen, d, steps = recorded(monkeypatch), 0.8, 6
    out = str(tmp_path / "run")
    train.main([*RUN, "--steps", str(steps), "--ema", str(d), "--out", out, *(["--ema-warmup"] if warmup else [])])
    decays = [min(d, (1 + t) / (10 + t)) if warmup else d for t in range(steps)]
    saved = ckpt(out)
    for name in seen[0]:  # e_T = prod_t d_t p_0 + sum_t (1 - d_t) prod_{s > t} d_s p_t, written out, not iterated
        want = math.prod(decays) * seen[0][name].double()
        for t in range(1, steps + 1):
            want += (1 - decays[t - 1]) * math.prod(decays[t:]) * seen[t][name].double()
        assert torch.allclose(saved["model"][name].double(), want, atol=1e-6), name
        assert torch.equal(saved["raw"][name], seen[-1][name])  # the trained weights, as they are
    assert saved["ema"]["updates"] == steps
    model, _ = clip.load(os.path.join(out, "checkpoint.pt"))  # load() takes the averaged weights
    assert all(torch.equal(model.state_dict()[k], saved["model"][k].float()) for k in saved["model"])


def test_ema_resumes_exactly_and_its_metrics_sit_beside_the_raw_ones(tmp_path):
    args = [*RUN, "--ema", "0.9", "--ema-warmup", "--eval-every", "3"]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train.main([*args, "--steps", "6", "--out", whole])
    train.main([*args, "--steps", "3", "--out", cut])
    train.main([*args, "--steps", "6", "--out", cut, "--resume"])
    a, b = ckpt(whole), ckpt(cut)
    assert max_diff(a["model"], b["model"]) == 0 and max_diff(a["raw"], b["raw"]) == 0  # bit for bit on the CPU
    assert a["ema"]["updates"] == b["ema"]["updates"] == 6
    evals = [r for r in rows(whole) if "zeroshot_top1" in r]
    assert [r["step"] for r in evals] == [3, 6] and all("ema_zeroshot_top1" in r and "ema_val_loss" in r for r in evals)
    assert max_diff(a["model"], a["raw"]) > 1e-4  # the average is not the last weights
    with pytest.raises(SystemExit, match="--ema: 0.9 -> 0.5"):
        train.main([*RUN, "--ema", "0.5", "--ema-warmup", "--steps", "8", "--out", whole, "--resume"])


@pytest.mark.slow
def test_ema_and_layer_decay_on_two_ranks_equal_one_and_fsdp(tmp_path):
    args = [*RUN[:-len(FAST)], *FAST, "--steps", "4", "--ema", "0.7", "--layer-decay", "0.6", "--val-size", "0"]
    one, two, fsdp = (str(tmp_path / n) for n in ("one", "two", "fsdp"))
    train.main([*args, "--out", one])
    two_args = [a if a != "16" else "8" for a in args]  # 2 ranks x 8 == 1 rank x 16
    finish(torchrun(2, *two_args, "--out", two))
    finish(torchrun(2, *two_args, "--out", fsdp, "--fsdp"))
    for other in (two, fsdp):
        assert max_diff(ckpt(one)["model"], ckpt(other)["model"]) < 1e-5, other
        assert max_diff(ckpt(one)["raw"], ckpt(other)["raw"]) < 1e-5


def step_sizes(base, out, flags):
    """Each parameter's largest move in one AdamW step from base's weights at lr 1e-3 and no weight decay,
    over the lr: its learning-rate scale (Adam's first step moves each element by lr x g / (|g| + eps))."""
    train.main(["--model", "clip", "--size", "tiny", "--init", base, "--steps", "1", "--lr", "1e-3", "--wd", "0",
                "--warmup", "1", "--lr-schedule", "const", "--batch-size", "16", "--synthetic-size", "64",
                "--val-size", "0", "--workers", "0", "--grad-clip", "0", "--out", out, *flags])
    start, end = torch.load(base, weights_only=False)["model"], weights(out)
    return {k: (end[k] - start[k]).abs().max().item() / 1e-3 for k in start if k in end}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "run")
    train.main([*RUN, "--steps", "2", "--out", out])
    return os.path.join(out, "checkpoint.pt")


def test_layer_decay_moves_each_parameter_at_its_rate(tmp_path, base):
    d, n = 0.5, 4  # the tiny preset: 4 blocks a tower
    moved = step_sizes(base, str(tmp_path / "ld"), ["--layer-decay", str(d)])
    want = {"visual.conv1.weight": d ** (n + 1), "visual.class_embedding": d ** (n + 1),
            "visual.positional_embedding": d ** (n + 1), "token_embedding.weight": d ** (n + 1),
            "positional_embedding": d ** (n + 1), "visual.ln_post.weight": 1, "visual.proj": 1, "ln_final.weight": 1,
            "text_projection": 1, **{f"{tower}resblocks.{i}.mlp.c_fc.weight": d ** (n - i)
                                     for tower in ("visual.transformer.", "transformer.") for i in range(n)}}
    for name, scale in want.items():
        assert moved[name] == pytest.approx(scale, rel=2e-3), (name, moved[name], scale)
    plain = step_sizes(base, str(tmp_path / "plain"), [])
    one = step_sizes(base, str(tmp_path / "one"), ["--layer-decay", "1"])
    assert plain == one and all(v == pytest.approx(1, rel=2e-3) for k, v in plain.items() if "mlp.c_fc.weight" in k)
    assert max_diff(weights(str(tmp_path / "plain")), weights(str(tmp_path / "one"))) == 0  # D = 1: today's run


def test_layer_decay_with_lit_locks_and_lora(tmp_path, base):
    d = 0.5
    locked = step_sizes(base, str(tmp_path / "lit"), ["--layer-decay", str(d), "--lock-image"])
    assert all(locked[k] == 0 for k in locked if k.startswith("visual."))  # a locked tower does not move
    assert locked["transformer.resblocks.3.mlp.c_fc.weight"] == pytest.approx(d, rel=2e-3)
    out = str(tmp_path / "lora")
    train.main(["--model", "clip", "--size", "tiny", "--init", base, "--steps", "1", "--lr", "1e-3", "--wd", "0",
                "--warmup", "1", "--lr-schedule", "const", "--batch-size", "16", "--synthetic-size", "64",
                "--val-size", "0", "--workers", "0", "--grad-clip", "0", "--out", out, "--lora", "2",
                "--layer-decay", str(d)])
    state = ckpt(out)["lora"]["state"]
    groups = ckpt(out)["optimizer"]["param_groups"]
    assert sorted({g["lr_scale"] for g in groups}) == [d ** 4, d ** 3, d ** 2, d]  # adapters sit in the blocks
    for i in range(4):  # an adapter's B starts at 0: its first step is lr x its block's scale
        b = state[f"transformer.resblocks.{i}.attn.parametrizations.in_proj_weight.1.B"]
        assert b.abs().max().item() / 1e-3 == pytest.approx(d ** (4 - i), rel=2e-3)


@pytest.mark.parametrize("model", ["brivl", "clippo", "laclip"])
def test_every_model_takes_layer_decay_and_ema(tmp_path, model):
    out = str(tmp_path / model)
    train.main(["--model", model, "--size", "tiny", "--steps", "2", "--layer-decay", "0.7", "--ema", "0.5",
                "--out", out, "--batch-size", "16", "--synthetic-size", "64", *FAST])
    saved = ckpt(out)
    scales = sorted({g["lr_scale"] for g in saved["optimizer"]["param_groups"]})
    assert scales[-1] == 1.0 and len(scales) >= 4 and min(scales) < 0.7 ** 2
    assert saved["ema"]["updates"] == 2 and max_diff(saved["model"], saved["raw"]) > 0
    loaded, _ = train.import_model(model).load(os.path.join(out, "checkpoint.pt"))  # the averaged weights
    assert all(torch.equal(loaded.state_dict()[k], saved["model"][k].float()) for k in saved["model"])


@pytest.mark.parametrize("model", ["clip", "clippo"])
def test_the_raw_weights_of_an_ema_run_export_for_load_and_predict(tmp_path, model):
    out = str(tmp_path / "run")
    train.main(["--model", model, "--size", "tiny", "--steps", "3", "--ema", "0.5", "--out", out, "--batch-size", "16",
                "--synthetic-size", "64", *FAST])
    saved, module = ckpt(out), train.import_model(model)
    for raw, key in ((False, "model"), (True, "raw")):
        folder = str(tmp_path / f"w{raw}")
        train.export(os.path.join(out, "checkpoint.pt"), folder, "weights", raw=raw)
        loaded, _ = module.load(os.path.join(folder, "model.pt"))
        assert all(torch.equal(loaded.state_dict()[k], saved[key][k].float()) for k in saved[key]), key
    assert max_diff(saved["model"], saved["raw"]) > 1e-5
    with pytest.raises(ValueError, match="no --ema run's raw weights"):
        train.export(os.path.join(str(tmp_path / "wFalse"), "model.pt"), str(tmp_path / "again"), "weights", model, raw=True)


@pytest.mark.parametrize("model,extra", [("clip", []), ("altclip", ["--stage", "contrastive"])])
def test_heads_and_the_temperature_train_at_lr_whichever_tower_runs_first(model, extra):
    args, module = train.parse_args(["--model", model, "--size", "tiny", "--steps", "1", "--out", "unused", *extra])
    torch.manual_seed(0)
    built = module.create(args, datalib_corpus())
    d, scales = 0.5, train.layer_scales(built, 0.5)
    heads = {"clip": ["text_projection", "visual.proj", "logit_scale", "ln_final.weight"],
             "altclip": ["text_projection.weight", "logit_scale"]}[model]  # altclip runs its text tower first
    assert all(scales[h] == 1 for h in heads), {h: scales[h] for h in heads}
    assert scales["visual.conv1.weight"] == d ** 5  # 4 blocks a tiny tower: the embeddings one below the first


def datalib_corpus():
    import data

    return data.Synthetic().caption_corpus(500)


def test_ema_load_names_a_missing_average_and_a_plain_run_has_no_raw_weights(tmp_path):
    with pytest.raises(ValueError, match="lack bias"):
        train.EMA(torch.nn.Linear(2, 2), 0.9).load({"weight": torch.zeros(2, 2)})
    out = str(tmp_path / "plain")
    train.main([*RUN, "--steps", "1", "--out", out])
    assert ckpt(out)["raw"] is None and ckpt(out).get("ema") is None
    with pytest.raises(ValueError, match="no --ema run's raw weights"):
        train.export(os.path.join(out, "checkpoint.pt"), str(tmp_path / "w"), "weights", raw=True)


def test_a_lora_run_with_ema_resumes_its_averaged_adapters(tmp_path, base):
    args = ["--model", "clip", "--size", "tiny", "--init", base, "--lora", "2", "--ema", "0.9", "--batch-size", "16",
            "--synthetic-size", "64", *FAST]
    whole, cut = str(tmp_path / "whole"), str(tmp_path / "cut")
    train.main([*args, "--steps", "3", "--out", whole])
    train.main([*args, "--steps", "2", "--out", cut])
    train.main([*args, "--steps", "3", "--out", cut, "--resume"])
    assert max_diff(ckpt(whole)["ema"]["weights"], ckpt(cut)["ema"]["weights"]) == 0
