"""LoRA (train.py, for every model): adapters against the naive W x + (alpha / R) B A x, step 0 == base,
the merged checkpoint == the adapted model, only the adapters train (no optimizer state for the base),
exact under DDP, FSDP and resume, exports merged (open_clip, transformers) and as a peft adapter that
peft loads at our features; no adapter code in the models' forward."""
import copy
import json
import os

import pytest
import torch
import torch.nn.functional as F

import clip
import train
from test_interop import SMALL, TEXTS, features, images, randomised
from test_interop import tokenizer  # noqa: F401  (a fixture)
from test_train import FAST, finish, max_diff, torchrun, weights

ALL = ("q", "k", "v", "out", "mlp")


def small(tokenizer, **changes):
    from dataclasses import replace

    cfg = replace(SMALL, vocab_size=tokenizer.vocab_size, eos_id=tokenizer.eot, **changes)
    return randomised(clip.CLIP(cfg, tokenizer))


def adapted(model, rank=4, seed=1, **spec):
    """The model with adapters (train.add_lora), random ones (B too): a fresh B is zero, and a zero update
    would hide a wrong merge. Returns (model, spec, layout)."""
    spec, layout = train.add_lora(model, train.lora_spec(rank, **spec))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith((".A", ".B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model, spec, layout


def save_lora(model, spec, layout, path):
    """A checkpoint as train.py writes one: merged weights, and the base and adapters under 'lora'."""
    merged, state = train.merged_weights(model.state_dict(), spec, layout)
    torch.save({"model": merged, "extra": model.extra_state(), "optimizer": {}, "step": 0,
                "lora": {"spec": spec, "layout": {k: [list(s) for s in v] for k, v in layout.items()}, "state": state}},
               path)
    return str(path)


def test_adapter_is_the_naive_low_rank_update():
    # on the fused q, k, v projection each part's rows take their own update; on a Linear, the whole weight
    attn = clip.Attention(24, 4)
    torch.nn.init.normal_(attn.in_proj_weight, std=0.2)
    ref = copy.deepcopy(attn)
    model = torch.nn.Module()
    model.attn = attn
    model.towers = lambda: {"t": attn}
    adapted(model, rank=3, alpha=6.0, targets=("k", "out"))
    k, out = attn.parametrizations.in_proj_weight[0], attn.out_proj.parametrizations.weight[0]
    with torch.no_grad():
        ref.in_proj_weight[24:48] += 2.0 * k.B @ k.A
        ref.out_proj.weight += 2.0 * out.B @ out.A
    x = torch.randn(2, 5, 24)
    torch.testing.assert_close(attn(x, causal=True), ref(x, causal=True), rtol=1e-5, atol=1e-6)
    assert "lora" not in type(attn).forward.__code__.co_names  # the forward is the plain one


def test_fresh_adapters_change_nothing_and_only_they_train(tokenizer):  # noqa: F811
    model = small(tokenizer)
    base = features(model)
    train.add_lora(model, train.lora_spec(4, targets=ALL))
    assert all(torch.equal(a, b) for a, b in zip(base, features(model)))  # B starts at zero: step 0 is the base
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.endswith((".A", ".B")) for n in trainable)
    groups = model.optimizer_groups(0.2)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for n, p in model.named_parameters() if n in trainable}
    scale = small(tokenizer)
    train.add_lora(scale, train.lora_spec(2, train_scale=True))
    assert "logit_scale" in {n for n, p in scale.named_parameters() if p.requires_grad}
    # every targeted projection of both towers: q, k, v, out and the MLP's two layers, per block
    blocks = SMALL.vision_layers + SMALL.text_layers
    assert len(trainable) == 2 * 6 * blocks


@pytest.mark.parametrize("targets", [("q", "v"), ALL])
def test_merged_weights_equal_the_adapted_model(tokenizer, targets):  # noqa: F811
    model, spec, layout = adapted(small(tokenizer), alpha=8, targets=targets)
    before = features(model)
    assert (before[0] - features(small(tokenizer))[0]).abs().max() > 1e-3  # the adapters do something
    merged, state = train.merged_weights(model.state_dict(), spec, layout)
    plain = small(tokenizer)
    plain.load_state_dict(merged)  # strict: a plain model's names, nothing left over
    assert all(".parametrizations." in k for k in state)
    for a, b in zip(before, features(plain)):
        assert (a - b).abs().max() < 1e-5


def test_a_lora_checkpoint_loads_merged_and_exports(tmp_path, tokenizer):  # noqa: F811
    model, spec, layout = adapted(small(tokenizer), targets=("q", "v", "mlp"), towers=("text",))
    assert spec["towers"] == ["text"] and all(k.startswith("transformer.") for k in layout)
    path = save_lora(model, spec, layout, tmp_path / "ckpt.pt")
    loaded, _ = clip.load(path)  # clip.load alone: the checkpoint's model is the merged one
    for a, b in zip(features(model), features(loaded)):
        assert (a - b).abs().max() < 1e-5
    # merged exports read by the other tools at our features
    open_clip = pytest.importorskip("open_clip")
    train.export(path, str(tmp_path / "oc"), "open_clip")
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")
    ids = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(TEXTS)
    with torch.no_grad():
        got = oc.eval().encode_image(images()), oc.encode_text(ids)
    for a, b in zip(features(model), got):
        assert (a - b).abs().max() < 1e-4
    transformers = pytest.importorskip("transformers")
    train.export(path, str(tmp_path / "hf"), "hf")
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
    model, spec, layout = adapted(small(tokenizer), alpha=2, targets=targets, towers=towers)
    with torch.no_grad():
        model.logit_scale.fill_(3.1)  # trained with --lora-train-scale: the base folder holds it
    out = str(tmp_path / "peft")
    lines = train.export(save_lora(model, spec, layout, tmp_path / "ckpt.pt"), out, "peft")
    assert "PeftModel.from_pretrained" in lines[-1]
    config = json.load(open(os.path.join(out, "adapter", "adapter_config.json")))
    assert config["r"] == 4 and config["lora_alpha"] == 2 and config["peft_type"] == "LORA"
    base = transformers.CLIPModel.from_pretrained(os.path.join(out, "base"))
    assert base.logit_scale.item() == pytest.approx(3.1)
    pm = peft.PeftModel.from_pretrained(base, os.path.join(out, "adapter")).eval()
    adapted_modules = {n.split(".lora_A")[0] for n, _ in pm.named_parameters() if "lora_A" in n}
    assert len(adapted_modules) == sum(2 if t == "mlp" else 1 for t in targets) * (
        SMALL.vision_layers + (0 if towers == ("image",) else SMALL.text_layers))
    ids = model.tokenizer(TEXTS)
    with torch.no_grad():
        image = pm.get_image_features(pixel_values=images())
        text = pm.get_text_features(input_ids=ids, attention_mask=(ids != 0).long())
    image, text = (getattr(x, "pooler_output", x) for x in (image, text))
    mine = features(model)
    assert (image - mine[0]).abs().max() < 1e-4 and (text - mine[1]).abs().max() < 1e-4
    from test_interop import save_ours
    with pytest.raises(ValueError, match="no LoRA adapters"):
        train.export(save_ours(small(tokenizer), tmp_path / "plain.pt"), str(tmp_path / "x"), "peft")


def test_bad_lora_settings_in_a_checkpoint_are_one_line(tmp_path, tokenizer):  # noqa: F811
    model, spec, layout = adapted(small(tokenizer), rank=2)
    good = torch.load(save_lora(model, spec, layout, tmp_path / "good.pt"), weights_only=False)
    for lora, said in (({**good["lora"], "spec": {**spec, "rank": "2"}}, "rank"),
                       ({**good["lora"], "spec": {**spec, "targets": ["q", "zz"]}}, "targets"),
                       ({**good["lora"], "spec": {**spec, "run": 1}}, "run"),
                       ({**good["lora"], "spec": {**spec, "alpha": float("nan")}}, "alpha"),
                       ({**good["lora"], "spec": [1, 2]}, "not a table"),
                       ({**good["lora"], "spec": {**spec, "alpha": 1e300}}, "alpha"),
                       ({**good["lora"], "spec": {**spec, "targets": "qv"}}, "targets"),
                       ({**good["lora"], "spec": {**spec, "train_scale": "no"}}, "train_scale"),
                       ({**good["lora"], "layout": {"visual.nose": [[0, 1]]}}, "nose"),
                       ({**good["lora"], "layout": {"x": "all"}}, "layout"),
                       ({**good["lora"], "state": {}}, "parametrizations")):
        path = str(tmp_path / "bad.pt")
        torch.save({**good, "lora": lora}, path)
        with pytest.raises(clip.BadInput, match=said):
            train.read_peft(clip, path)


def test_adapters_train_where_their_weights_did(tokenizer):  # noqa: F811
    model = small(tokenizer).lock(image=True)
    spec, layout = train.add_lora(model, train.lora_spec(2))
    assert spec["towers"] == ["text"] and all(k.startswith("transformer.") for k in layout)  # LiT: the unlocked tower
    with pytest.raises(ValueError, match="locked"):
        train.add_lora(small(tokenizer).lock(image=True), train.lora_spec(2, towers=["image"]))
    with pytest.raises(ValueError, match="nose"):
        train.add_lora(small(tokenizer), train.lora_spec(2, towers=["nose"]))


# ---- train.py --lora

BASE = ["--model", "clip", "--size", "tiny", "--synthetic-size", "256", *FAST]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("base") / "run")
    train.main([*BASE, "--steps", "4", "--batch-size", "16", "--out", out])
    return os.path.join(out, "checkpoint.pt")


def adapters(ck):
    return [k for k in ck["lora"]["state"] if k.endswith((".A", ".B"))]


def test_init_with_lora_moves_the_features_and_leaves_the_base(tmp_path, base):
    out = str(tmp_path / "run")
    train.main([*BASE, "--init", base, "--lora", "4", "--steps", "6", "--batch-size", "16", "--out", out])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    start = torch.load(base, weights_only=False)["model"]
    state, layout = ck["lora"]["state"], ck["lora"]["layout"]
    for k, v in start.items():  # the base bit for bit: as it was where no adapter sits, kept apart where one does
        if k in layout:
            stem = k.rsplit(".", 1)
            assert torch.equal(state[f"{stem[0]}.parametrizations.{stem[1]}.original"], v)
        else:
            assert torch.equal(ck["model"][k], v)
    assert adapters(ck) and ck["lora"]["spec"]["rank"] == 4 and "lora" not in ck["extra"]
    assert len(ck["optimizer"]["state"]) == len(adapters(ck))  # AdamW state for the adapters alone
    tuned, plain = clip.load(os.path.join(out, "checkpoint.pt"))[0], clip.load(base)[0]
    x = torch.randint(0, 255, (4, 3, 48, 48), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        moved = (tuned.encode_image(x, normalize=True) - plain.encode_image(x, normalize=True)).abs().max()
    assert moved > 1e-4, moved


def test_compiles_and_matches_eager(tokenizer):  # noqa: F811
    model = adapted(small(tokenizer), rank=2, targets=ALL)[0].train()
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
    ck = torch.load(os.path.join(one, "checkpoint.pt"), weights_only=False)
    assert max(ck["lora"]["state"][k].abs().max().item() for k in adapters(ck) if k.endswith(".B")) > 0  # they moved


def test_a_resumed_run_keeps_its_checkpoints_adapters(tmp_path, base):
    out = str(tmp_path / "run")
    train.main([*BASE, "--init", base, "--lora", "4", "--steps", "2", "--batch-size", "8", "--out", out])
    train.main([*BASE, "--init", base, "--lora", "8", "--lora-alpha", "3", "--steps", "3", "--batch-size", "8",
                "--out", out, "--resume", "--allow-flag-changes"])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["step"] == 3 and ck["lora"]["spec"]["rank"] == 4 and ck["lora"]["spec"]["alpha"] == 4.0
    plain = str(tmp_path / "plain")  # adapters cannot join a run that trained without them
    train.main([*BASE, "--steps", "1", "--batch-size", "8", "--out", plain])
    with pytest.raises(ValueError, match="cannot join a run on resume"):
        train.main([*BASE, "--lora", "2", "--steps", "2", "--batch-size", "8", "--out", plain, "--resume",
                    "--allow-flag-changes"])


def test_lit_lock_and_lora(tmp_path, base):
    out = str(tmp_path / "run")
    train.main([*BASE, "--init", base, "--lora", "2", "--lock-image", "--steps", "2", "--batch-size", "8", "--out", out])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["lora"]["spec"]["towers"] == ["text"] and not any(k.startswith("visual.") for k in ck["lora"]["layout"])
    for flags, said in ((["--lora-towers", "image"], "locked"), (["--lock-image-unlocked-layers", "1"], "unlock"),
                        (["--lora-targets", "q,x"], "targets")):
        with pytest.raises(ValueError, match=said):
            train.main([*BASE, "--init", base, "--lora", "2", "--lock-image", *flags, "--steps", "2", "--out",
                        str(tmp_path / "x"), "--overwrite"])


@pytest.mark.parametrize("model", ["laclip", "clippo", "brivl"])
def test_other_models_take_lora(tmp_path, model):
    import importlib

    module = importlib.import_module(model)
    out = str(tmp_path / "run")
    flags = ["--queue-size", "64"] if model == "brivl" else []
    train.main(["--model", model, "--size", "tiny", "--synthetic-size", "64", *FAST, "--lora", "2", "--steps", "2",
                "--batch-size", "8", "--out", out, *flags])
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    trained = [k for k in adapters(ck) if "momentum" not in k]
    assert trained and len(ck["optimizer"]["state"]) == len(trained)  # brivl's momentum copies: adapters, frozen
    loaded = module.load(os.path.join(out, "checkpoint.pt"))[0]  # merged: a plain model
    assert not any("parametrizations" in k for k in loaded.state_dict())
    if model == "brivl":  # the momentum copies' adapters follow the query towers' by the momentum update
        state = ck["lora"]["state"]
        moved = [k for k in trained if k.endswith(".B") and state[k].abs().max() > 0]
        twin = [k.replace("visual.", "visual_momentum.", 1).replace("textual.", "textual_momentum.", 1) for k in moved]
        assert moved and all(state[t].abs().max() > 0 for t in twin)


@pytest.mark.slow
def test_altclip_takes_lora_on_its_xlmr_student_through_both_stages(tmp_path, base):
    import altclip

    stage1, stage2 = str(tmp_path / "s1"), str(tmp_path / "s2")
    common = ["--model", "altclip", "--synthetic-size", "64", *FAST, "--lora", "2", "--lora-targets", "q,v,out,mlp",
              "--steps", "2", "--batch-size", "8"]
    train.main([*common, "--teacher", base, "--out", stage1])
    ck = torch.load(os.path.join(stage1, "checkpoint.pt"), weights_only=False)
    # the image tower is locked (the teacher's): adapters on the XLM-R student alone: q, v, out and the MLP's two
    assert ck["lora"]["spec"]["towers"] == ["text"] and all(k.startswith("text_model.") for k in ck["lora"]["layout"])
    assert len(ck["optimizer"]["state"]) == len(adapters(ck)) == 2 * 5 * altclip.CONFIGS["tiny"].text_layers
    model = altclip.load(os.path.join(stage1, "checkpoint.pt"))[0]  # merged
    assert not any("parametrizations" in k for k in model.state_dict())
    train.main([*common, "--stage", "contrastive", "--init", os.path.join(stage1, "checkpoint.pt"), "--out", stage2])
    s2 = torch.load(os.path.join(stage2, "checkpoint.pt"), weights_only=False)
    # stage 2's frozen base is stage 1 with its adapters merged in, bit for bit, not stage 1's base
    merged = model.state_dict()
    for k, spans in s2["lora"]["layout"].items():
        stem = k.rsplit(".", 1)
        assert torch.equal(s2["lora"]["state"][f"{stem[0]}.parametrizations.{stem[1]}.original"], merged[k])
    assert any(not torch.equal(merged[k], ck["lora"]["state"][f"{k.rsplit('.', 1)[0]}.parametrizations.weight.original"])
               for k in ck["lora"]["layout"])


def test_brivls_momentum_copies_take_adapters_that_do_not_train():
    import data

    args, module = train.parse_args(["--model", "brivl", "--size", "tiny", "--steps", "1", "--out", "unused"])
    model = module.create(args, data.Synthetic().caption_corpus(300))
    train.add_lora(model, train.lora_spec(2))
    adapters = {n: p for n, p in model.named_parameters() if n.endswith((".A", ".B"))}
    follow = {n for n in adapters if "_momentum." in n}
    assert follow and len(follow) < len(adapters)
    assert all(adapters[n].requires_grad == (n not in follow) for n in adapters)  # moved by the momentum update only
    grouped = {id(p) for g in model.optimizer_groups(0.1) for p in g["params"]}
    assert grouped == {id(adapters[n]) for n in adapters if n not in follow}
