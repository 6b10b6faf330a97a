"""LoRA: adapters against the naive W x + (alpha / R) B A x, step 0 == base, merge == unmerged, only the
adapters train (no optimizer state for the base), exact under DDP and resume, exports merged (open_clip,
transformers) and as a peft adapter that peft loads at our features."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import clip
import train
from test_interop import SMALL, TEXTS, features, images, randomised, save_ours
from test_interop import tokenizer  # noqa: F401  (a fixture)
from test_train import FAST, finish, max_diff, torchrun, weights

ALL = ("q", "k", "v", "out", "mlp")


def small(tokenizer, **changes):
    from dataclasses import replace

    cfg = replace(SMALL, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot, **changes)
    return randomised(clip.CLIP(cfg, tokenizer))


def trained(model, seed=1):
    """Random adapters (B too): a fresh B is zero, and a zero update would hide a wrong merge."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def test_adapter_is_the_naive_low_rank_update():
    lora = clip.LoRA(24, 40, rank=3, alpha=6.0)
    with torch.no_grad():
        lora.B.normal_()
    x = torch.randn(5, 7, 24)
    torch.testing.assert_close(lora(x), (6.0 / 3) * x @ lora.A.T @ lora.B.T)
    # and in place, on the fused q, k, v projection: each part's rows take its own update
    attn = clip.Attention(24, 4)
    torch.nn.init.normal_(attn.in_proj_weight, std=0.2)
    ref = copy.deepcopy(attn)
    clip.add_lora([type("B", (), {"attn": attn, "mlp": torch.nn.ModuleDict({"c_fc": torch.nn.Linear(24, 8)})})()],
                  clip.lora_spec(3, 6.0, ("k", "out")))
    trained(attn)
    with torch.no_grad():
        w = ref.in_proj_weight
        w[24:48] += 2.0 * attn.lora["k"].B @ attn.lora["k"].A
        ref.out_proj.weight += 2.0 * attn.lora["out"].B @ attn.lora["out"].A
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(attn(x, causal=True), ref(x, causal=True), rtol=1e-5, atol=1e-6)


def test_fresh_adapters_change_nothing_and_only_they_train(tokenizer):  # noqa: F811
    model = small(tokenizer)
    base = features(model)
    model.add_lora(4, targets=ALL)
    assert all(torch.equal(a, b) for a, b in zip(base, features(model)))  # B starts at zero: step 0 is the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora." in n for n in trainable)
    groups = model.optimizer_groups(0.2)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for n, p in model.named_parameters() if ".lora." in n}
    assert "logit_scale" in {n for n, p in small(tokenizer).add_lora(2, train_scale=True).named_parameters()
                             if p.requires_grad}
    # every targeted projection of both towers: q, k, v, out and the MLP's two layers, per block
    blocks = SMALL.vision_layers + SMALL.text_layers
    assert len(trainable) == 2 * 6 * blocks


@pytest.mark.parametrize("targets", [("q", "v"), ALL])
def test_merge_equals_the_unmerged_model(tokenizer, targets):  # noqa: F811
    model = trained(small(tokenizer).add_lora(4, alpha=8, targets=targets))
    before = features(model)
    assert (before[0] - features(small(tokenizer))[0]).abs().max() > 1e-3  # the adapters do something
    model.merge_lora()
    assert not any(".lora." in k for k in model.state_dict())
    assert all(p.requires_grad for p in model.parameters())  # a plain model again
    for a, b in zip(before, features(model)):
        assert (a - b).abs().max() < 1e-5


def test_a_lora_checkpoint_loads_merged_and_exports(tmp_path, tokenizer):  # noqa: F811
    model = trained(small(tokenizer).add_lora(4, targets=("q", "v", "mlp"), towers=("text",)))
    path = save_ours(model, tmp_path / "ckpt.pt")
    loaded, _ = clip.load(path)  # clip.load alone: the checkpoint holds the base and the adapters
    assert loaded.lora_spec is None and not any(".lora." in k for k in loaded.state_dict())
    for a, b in zip(features(model), features(loaded)):
        assert (a - b).abs().max() < 1e-5
    # merged exports read by the other tools at our features
    open_clip = pytest.importorskip("open_clip")
    clip.export(path, str(tmp_path / "oc"), "open_clip")
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    ids = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(TEXTS)
    with torch.no_grad():
        got = oc.eval().encode_image(images()), oc.encode_text(ids)
    for a, b in zip(features(model), got):
        assert (a - b).abs().max() < 1e-4
    transformers = pytest.importorskip("transformers")
    clip.export(path, str(tmp_path / "hf"), "hf")
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    ids = model.tokenizer(TEXTS)
    with torch.no_grad():
        got = hf.get_image_features(pixel_values=images()), hf.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
    for a, b in zip(features(model), (getattr(x, "pooler_output", x) for x in got)):
        assert (a - b).abs().max() < 1e-4


@pytest.mark.parametrize("targets,towers", [(("q", "v"), None), (ALL, ("image",))])
def test_peft_loads_the_adapter_export_at_our_features(tmp_path, tokenizer, targets, towers):  # noqa: F811
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    model = trained(small(tokenizer).add_lora(4, alpha=2, targets=targets, towers=towers))
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # trained with --lora-train-scale: the base folder holds it
    out = str(tmp_path / "peft")
    lines = clip.export(save_ours(model, tmp_path / "ckpt.pt"), out, "peft")
    assert "PeftModel.from_pretrained" in lines[-1]
    config = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    base = transformers.CLIPModel.from_pretrained(os.path.join(out, "base"))
    assert base.logit_scale.item() == pytest.approx(3.1)
    pm = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    adapted = {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if "lora_A" in n}
    assert len(adapted) == sum(2 if t == "mlp" else 1 for t in targets) * (
        SMALL.vision_layers + (0 if towers == ("image",) else SMALL.text_layers))
    ids = model.tokenizer(TEXTS)
    with torch.no_grad():
        image = pm.get_image_features(pixel_values=images())
        text = pm.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    mine = features(model)
    assert (image - mine[0]).abs().max() < 1e-4 and (text - mine[1]).abs().max() < 1e-4
    with pytest.raises(ValueError, match="no LoRA adapters"):
        clip.export(save_ours(small(tokenizer), tmp_path / "plain.pt"), str(tmp_path / "x"), "peft")


def test_bad_lora_settings_in_a_checkpoint_are_one_line(tmp_path, tokenizer):  # noqa: F811
    model = small(tokenizer).add_lora(2)
    for spec, said in (({**model.lora_spec, "rank": "2"}, "rank"), ({**model.lora_spec, "targets": ["q", "zz"]}, "targets"),
                       ({**model.lora_spec, "rank": 3}, "do not fit"), ({**model.lora_spec, "run": 1}, "run"),
                       ({**model.lora_spec, "alpha": float("nan")}, "alpha"), ([1, 2], "not a dict"),
                       ({**model.lora_spec, "alpha": 1e300}, "alpha"), ({**model.lora_spec, "targets": "qv"}, "targets"),
                       ({**model.lora_spec, "train_scale": "no"}, "train_scale"),
                       ({**model.lora_spec, "towers": ["nose"]}, "nose")):
        path = str(tmp_path / "bad.pt")
        torch.save({"model": model.state_dict(), "extra": {**model.extra_state(), "lora": spec}}, path)
        with pytest.raises(clip.BadInput, match=said):
            clip.load(path)
    # adapters whose merge overflows: one line, not weights of inf
    sd = {k: (torch.full_like(v, 1e30) if ".lora." in k else v) for k, v in model.state_dict().items()}
    torch.save({"model": sd, "extra": model.extra_state()}, str(tmp_path / "inf.pt"))
    with pytest.raises(clip.BadInput, match="not finite"):
        clip.load(str(tmp_path / "inf.pt"))


def test_merge_gives_back_what_trained_before(tokenizer):  # noqa: F811
    model = small(tokenizer).lock(image=True)
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add_lora(2).merge_lora()
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert not before["visual.proj"] and not before["visual.class_embedding"] and before["text_projection"]


# ---- train.py --lora

BASE = ["--model", "clip", "--size", "tiny", "--synthetic-size", "256", *FAST]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "run")
    train.main([*BASE, "--steps", "4", "--batch-size", "16", "--out", out])
    return os.path.join(out, "checkpoint.pt")


def test_init_with_lora_moves_the_features_and_leaves_the_base(tmp_path, base):
    out = str(tmp_path / "run")
    train.main([*BASE, "--init", base, "--lora", "4", "--steps", "6", "--batch-size", "16", "--out", out])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    start = torch.load(base, weights_only=False)["model"]
    assert all(torch.equal(ck["model"][k], v) for k, v in start.items())  # the base bit for bit
    lora = [k for k in ck["model"] if ".lora." in k]
    assert lora and ck["extra"]["lora"]["rank"] == 4
    # AdamW state for the adapters alone
    assert len(ck["optimizer"]["state"]) == len(lora)
    tuned, plain = clip.load(os.path.join(out, "checkpoint.pt"))[0], clip.load(base)[0]
    x = torch.randint(0, 255, (4, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved = (tuned.encode_image(x, normalize=True) - plain.encode_image(x, normalize=True)).abs().max()
    assert moved > 1e-4, moved


def test_compiles_and_matches_eager(tokenizer):  # noqa: F811
    model = trained(small(tokenizer).add_lora(2, targets=ALL, dropout=0.0)).train()
    batch = {"image": torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8), "text": model.tokenizer(TEXTS + ["x"])}
    grads = []
    for fn in (model, torch.compile(model, backend="aot_eager", fullgraph=True)):
        model.zero_grad()
        model.loss(fn(batch)).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.slow
def test_two_ranks_of_8_equal_one_of_16_and_resume_is_exact(tmp_path, base):
    from test_scale import finish as finish_ranks
    from test_scale import ranks

    args = [*BASE, "--init", base, "--lora", "4", "--lora-targets", "q,v,out,mlp", "--lora-train-scale", "--steps", "4"]
    one, two, sharded, cut = (str(tmp_path / n) for n in ("one", "two", "fsdp", "cut"))
    train.main([*args, "--batch-size", "16", "--out", one])
    finish(torchrun(2, *args, "--batch-size", "8", "--out", two))
    assert max_diff(weights(one), weights(two)) < 1e-5
    finish_ranks(ranks(2, *args, "--batch-size", "8", "--out", sharded, "--fsdp"))  # the frozen base sharded too
    assert max_diff(weights(one), weights(sharded)) < 1e-5
    train.main([*args[:-1], "2", "--batch-size", "16", "--out", cut])
    train.main([*args, "--batch-size", "16", "--out", cut, "--resume"])
    assert max_diff(weights(one), weights(cut)) < 1e-6
    # the adapters did move (their B starts at zero)
    assert max(weights(one)[k].abs().max().item() for k in weights(one) if k.endswith(".B")) > 0


def test_a_resumed_run_keeps_its_checkpoints_adapters(tmp_path, base):
    out = str(tmp_path / "run")
    train.main([*BASE, "--init", base, "--lora", "4", "--steps", "2", "--batch-size", "8", "--out", out])
    train.main([*BASE, "--init", base, "--lora", "8", "--lora-alpha", "3", "--steps", "3", "--batch-size", "8",
                "--out", out, "--resume", "--allow-flag-changes"])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["step"] == 3 and ck["extra"]["lora"]["rank"] == 4 and ck["extra"]["lora"]["alpha"] == 4.0


def test_lit_lock_and_lora(tmp_path, base):
    out = str(tmp_path / "run")
    train.main([*BASE, "--init", base, "--lora", "2", "--lock-image", "--steps", "2", "--batch-size", "8", "--out", out])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["extra"]["lora"]["towers"] == ["text"] and not any(k.startswith("visual.") and ".lora." in k for k in ck["model"])
    for flags, said in ((["--lora-towers", "image"], "locked"), (["--lock-image-unlocked-layers", "1"], "unlock"),
                        (["--lora-targets", "q,x"], "targets")):
        with pytest.raises(ValueError, match=said):
            train.main([*BASE, "--init", base, "--lora", "2", "--lock-image", *flags, "--steps", "2", "--out",
                        str(tmp_path / "x"), "--overwrite"])


@pytest.mark.parametrize("model", ["laclip", "clippo"])
def test_other_models_take_lora(tmp_path, model):
    import importlib

    module = importlib.import_module(model)
    out = str(tmp_path / "run")
    train.main(["--model", model, "--size", "tiny", "--synthetic-size", "64", *FAST, "--lora", "2", "--steps", "2",
                "--batch-size", "8", "--out", out])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    lora = [k for k in ck["model"] if ".lora." in k]
    assert lora and len(ck["optimizer"]["state"]) == len(lora)
    loaded = module.load(os.path.join(out, "checkpoint.pt"))[0]  # merged on load
    assert not any(".lora." in k for k in loaded.state_dict())


@pytest.mark.slow
def test_altclip_takes_lora_on_its_xlmr_student_through_both_stages(tmp_path, base):
    import altclip

    stage1, stage2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    common = ["--model", "altclip", "--synthetic-size", "64", *FAST, "--lora", "2", "--lora-targets", "q,v,out,mlp",
              "--steps", "2", "--batch-size", "8"]
    train.main([*common, "--teacher", base, "--out", stage1])
    ck = torch.load(os.path.join(stage1, "checkpoint.pt"), weights_only=False)
    lora = [k for k in ck["model"] if ".lora." in k]
    # the image tower is locked (the teacher's): adapters on the XLM-R student alone, 6 per layer
    assert lora and all(k.startswith("text_model.") for k in lora) and len(ck["optimizer"]["state"]) == len(lora)
    assert ck["extra"]["lora"]["towers"] == ["text"]
    # the hooked adapters merge: random ones (a trained B is tiny), through a checkpoint and load()
    unmerged = altclip.build(extra=ck["extra"]).add_lora(**ck["extra"]["lora"])
    unmerged.load_state_dict(ck["model"])
    trained(unmerged).eval()
    path = save_ours(unmerged, tmp_path / "random.pt")
    model = altclip.load(path)[0]
    assert not any(".lora" in k for k in model.state_dict())
    ids, mask = model.tokenizer(["a red circle", "ein blauer Kreis"])
    with torch.no_grad():
        plain = altclip.load(os.path.join(stage1, "checkpoint.pt"))[0].text_model(ids, mask)
        ours, merged = unmerged.text_model(ids, mask), model.text_model(ids, mask)
    assert (ours - merged).abs().max() < 1e-5 and (ours - plain).abs().max() > 1e-3
    assert (copy.deepcopy(unmerged).merge_lora().text_model(ids, mask) - ours).abs().max() < 1e-5
    train.main([*common, "--stage", "contrastive", "--init", os.path.join(stage1, "checkpoint.pt"), "--out", stage2])
    s2 = weights(stage2)
    assert any(".lora." in k for k in s2)
    # stage 2's frozen base is stage 1 with its adapters merged in, bit for bit, not stage 1's base
    merged = altclip.load(os.path.join(stage1, "checkpoint.pt"))[0].state_dict()
    text = [k for k in merged if k.startswith("text_model.") and k in s2]
    assert text and all(torch.equal(s2[k], merged[k]) for k in text)
    assert any(not torch.equal(s2[k], ck["model"][k]) for k in text)
