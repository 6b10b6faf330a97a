"""FLIP's patch dropout: the kept patches come from (seed, epoch, sample), training sees only them,
evaluation sees every patch, and distributed, accumulated and compiled runs stay exact."""
import os

import numpy as np
import pytest
import torch

import altclip
import clip
import clippo
import data
import laclip
import train
from test_train import FAST, check_two_ranks_equal_one_rank, max_diff, rows, weights

CAPTIONS = list(data.Synthetic().caption_corpus(500))


def test_dropped_tokens_equal_a_tower_run_on_the_kept_patches_alone():
    torch.manual_seed(0)
    model = clip.build("tiny", captions=CAPTIONS).eval()
    v = model.visual
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    grid = (48 // model.cfg.patch_size) ** 2
    keep = torch.stack([torch.randperm(grid)[:grid // 2].sort().values for _ in range(3)])
    got = model.encode_image(images, keep=keep)
    # the naive form: embed every patch, add positions, then keep the class token and the chosen patches
    x = v.conv1(clip.normalize_pixels(images, model.cfg.image_mean, model.cfg.image_std)).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(3, 1, -1), x], 1) + v.positional_embedding
    x = torch.cat([x[:, :1], torch.stack([x[i, 1:][keep[i]] for i in range(3)])], 1)
    want = v.ln_post(v.transformer(v.ln_pre(x))[:, 0]) @ v.proj
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # no keep: every patch, and bit-identical to the tower before patch dropout existed
    x = v.conv1(clip.normalize_pixels(images, model.cfg.image_mean, model.cfg.image_std)).flatten(2).transpose(1, 2)
    x = torch.cat([v.class_embedding.expand(3, 1, -1), x], 1) + v.positional_embedding
    assert torch.equal(model.encode_image(images), v.ln_post(v.transformer(v.ln_pre(x))[:, 0]) @ v.proj)


@pytest.mark.parametrize("name", ["clip", "laclip", "clippo", "altclip"])
def test_training_transforms_draw_from_the_sample_and_evaluation_keeps_all(name, tmp_path):
    ds = data.Synthetic(0, "train", 20)
    if name == "clip":
        model = clip.build("tiny", captions=CAPTIONS)
    elif name == "laclip":
        model = laclip.build("tiny", captions=CAPTIONS)
    elif name == "clippo":
        model = clippo.build("tiny")
    else:
        teacher = clip.build("tiny", captions=CAPTIONS)
        torch.save({"model": teacher.state_dict(), "extra": teacher.extra_state()}, tmp_path / "t.pt")
        torch.save({"model": altclip.build(teacher=str(tmp_path / "t.pt"), captions=CAPTIONS).state_dict(),
                    "extra": altclip.build(teacher=str(tmp_path / "t.pt"), captions=CAPTIONS).extra_state()},
                   tmp_path / "s1.pt")
        model = altclip.build(stage="contrastive", init=str(tmp_path / "s1.pt"))
    grid = (model.cfg.image_size // model.cfg.patch_size) ** 2  # train.py's wrapper, around the model's transform
    t = data.PatchDropout(model.transform(True, data.RandomCrop(model.cfg.image_size)), grid, 0.75)
    a = t(ds.sample(3, np.random.default_rng([0, 0, 3, 102])), np.random.default_rng([0, 0, 3, 103]))
    b = t(ds.sample(3, np.random.default_rng([0, 0, 3, 102])), np.random.default_rng([0, 0, 3, 103]))
    c = t(ds.sample(4, np.random.default_rng([0, 0, 4, 102])), np.random.default_rng([0, 0, 4, 103]))
    assert a["patch_keep"].shape == (round(0.25 * grid),) and torch.equal(a["patch_keep"], b["patch_keep"])
    assert not torch.equal(a["patch_keep"], c["patch_keep"]) and a["patch_keep"].unique().numel() == len(a["patch_keep"])
    assert "patch_keep" not in model.transform(False)(ds.sample(3, np.random.default_rng(0)), None)
    batch = data.collate([a, c])
    model.train()
    out = model(batch)
    assert out["image"].shape[0] == 2 and torch.isfinite(model.loss(out))


def test_brivl_refuses_the_flag_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="brivl's image tower has none"):
        train.main(["--model", "brivl", "--patch-dropout", "0.5", "--steps", "1", "--out", str(tmp_path / "x"), *FAST])
    for ratio in ("1.0", "-0.1"):
        with pytest.raises(SystemExit):  # argparse's one line
            train.parse_args(["--model", "clip", "--patch-dropout", ratio])


def test_evaluation_is_unaffected_and_unmasked_tuning_switches_it_off(tmp_path):
    out = str(tmp_path / "pd")
    args = ["--model", "clip", "--batch-size", "8", *FAST, "--patch-dropout", "0.5", "--patch-dropout-until", "3"]
    train.main([*args, "--steps", "4", "--out", out])
    model, _ = clip.load(os.path.join(out, "checkpoint.pt"))  # load() is for use: every patch
    assert "patch_keep" not in model.transform(False)(data.Synthetic().sample(0, np.random.default_rng(0)), None)
    # unmasked tuning: step 4 ran on every patch, so it equals a run whose step 4 had no dropout at all
    ref = str(tmp_path / "ref")
    train.main([*args[:-2], "--steps", "3", "--out", ref, "--save-every", "3"])
    train.main(["--model", "clip", "--batch-size", "8", *FAST, "--steps", "4", "--out", ref, "--resume",
                "--allow-flag-changes"])
    assert max_diff(weights(out), weights(ref)) < 1e-6


def test_accumulated_steps_equal_one_big_step_with_patch_dropout(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--model", "clip", "--steps", "2", "--batch-size", "16", *FAST, "--patch-dropout", "0.5"]
    train.main([*common, "--out", a])
    train.main([*common, "--out", b, "--accum", "4"])
    assert max_diff(weights(a), weights(b)) < 1e-5


@pytest.mark.slow
def test_two_ranks_equal_one_rank_with_patch_dropout(tmp_path):
    check_two_ranks_equal_one_rank(tmp_path, ["--model", "clip", "--patch-dropout", "0.5"])
    assert rows(str(tmp_path / "two"))[0]["loss"] > 0


def test_the_default_run_ends_with_unmasked_tuning():
    def run(*flags):
        args, _ = train.parse_args(["--model", "clip", *flags])
        return args.steps, args.cooldown_steps, args.patch_dropout_until

    assert run() == (*clip.DEFAULT_RUN["softmax"], 0)
    steps, cooldown, until = run("--patch-dropout", "0.5")
    assert (steps, cooldown, until) == clip.PATCH_DROPOUT_RUN and 0 < until < steps - cooldown
    # given flags win: a length or an unmasked-from step given keeps the rest of the plain default
    assert run("--patch-dropout", "0.5", "--steps", "300") == (300, clip.DEFAULT_RUN["softmax"][1], 0)
    assert run("--patch-dropout", "0.5", "--patch-dropout-until", "0") == (*clip.DEFAULT_RUN["softmax"], 0)
    assert run("--patch-dropout", "0.5", "--patch-dropout-until", "100")[2] == 100
    assert run("--model", "laclip", "--patch-dropout", "0.5")[2] == 0  # laclip keeps train.py's defaults
