"""Long captions (train.py --context-length, --long-captions): Long-CLIP's stretch of the text positions
row by row, short texts embedded exactly as before, the coarse image features against Long-CLIP's own
PCA, the objective exact over ranks and micro-batches, and the stretched model read by open_clip and
transformers at its new length."""
import argparse
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F

import clip
import data
import naive
import train
from test_interop import randomised, save_ours
from test_train import FAST, finish, max_diff, torchrun, weights


@pytest.fixture(scope="module")
def base():
    """A small CLIP of 77 positions, every tensor random (a row moved or mixed up cannot hide)."""
    tok = clip.train_bpe(data.Synthetic().caption_corpus(2000), vocab_size=600, context_length=77)
    cfg = clip.Config(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=2,
                      context_length=77, vocab_size=tok.vocab_size, eos_id=tok.eot, text_width=64, text_layers=2,
                      text_heads=2)
    return randomised(clip.CLIP(cfg, tok))


def stretched(model, n):
    return train.with_context_length(clip, argparse.Namespace(context_length=n, model="clip"), model, (),
                                     fresh=False).eval()


def long_text(words=60):
    return "a red circle. " + " ".join(["on the left"] * (words // 3)) + " and a big blue square"


def test_the_stretch_keeps_twenty_rows_and_spreads_the_rest(base):
    old = base.positional_embedding.detach()
    model = stretched(base, 248)
    new = model.positional_embedding.detach()
    assert new.shape == (248, old.shape[1]) and model.cfg.context_length == model.tokenizer.context_length == 248
    assert torch.equal(new[:20], old[:20])
    for i in range(57):  # row 20 + 4i is row 20 + i, bit for bit; the three after it lie between it and the next
        assert torch.equal(new[20 + 4 * i], old[20 + i]), i
        nxt = old[21 + i] if i < 56 else 2 * old[76] - old[75]  # past the last row: its last step carried on
        for j in (1, 2, 3):
            assert torch.allclose(new[20 + 4 * i + j], (1 - j / 4) * old[20 + i] + j / 4 * nxt, atol=1e-6), (i, j)
    odd = train.stretch_positions(old.double(), 100)  # another length: linear between the rows it falls on
    x = 20 + (torch.arange(80, dtype=torch.float64) * 57 / 80)
    o = old.double()
    want = torch.stack([o[min(int(v), 75)] + (v - min(int(v), 75)) * (o[min(int(v), 75) + 1] - o[min(int(v), 75)])
                        for v in x])  # past row 76: along the last step
    assert torch.allclose(odd[20:], want, atol=1e-12) and torch.equal(odd[:20], old.double()[:20])
    assert torch.equal(train.stretch_positions(old, 50), old[:50])  # shorter: the first rows


def test_a_short_text_embeds_exactly_as_before_and_a_long_one_reads_on(base):
    model = stretched(base, 248)
    short = ["a red circle", "a big blue square on the left", "A photo of a green cross"]
    assert max(len(base.tokenizer.tokenizer.encode(t).ids) for t in short) + 2 <= 20
    with torch.no_grad():
        assert torch.equal(model.encode_texts(short), base.encode_texts(short))
        far = [long_text() + " on a red background", long_text() + " on a blue background"]
        assert len(model.tokenizer.tokenizer.encode(far[0]).ids) > 100
        a, b = model.encode_texts(far)
        assert (a - b).abs().max() > 1e-3  # the 248-position model reads past token 77
        a, b = base.encode_texts(far)
        assert torch.equal(a, b)  # the 77-position one cannot


def test_the_stretch_refuses_what_it_cannot_stretch(tmp_path):
    with pytest.raises(ValueError, match="no text positions"):
        train.main(["--model", "clippo", "--size", "tiny", "--steps", "1", "--context-length", "100",
                    "--out", str(tmp_path / "c"), "--batch-size", "8", "--synthetic-size", "16", *FAST])
    with pytest.raises(ValueError, match="image and text features alone"):  # brivl's momentum keys
        train.main(["--model", "brivl", "--size", "tiny", "--steps", "1", "--long-captions", "--out",
                    str(tmp_path / "b"), "--batch-size", "8", "--synthetic-size", "16", *FAST])
    fresh = str(tmp_path / "fresh")  # a new model is built at the length asked
    small = ["--model", "clip", "--size", "tiny", "--steps", "1", "--batch-size", "8", "--synthetic-size", "16", *FAST]
    train.main([*small, "--context-length", "21", "--out", fresh])
    assert weights(fresh)["positional_embedding"].shape[0] == 21
    with pytest.raises(ValueError, match="21 positions"):  # only one row past the 20 kept: nothing to spread
        train.main([*small, "--init", os.path.join(fresh, "checkpoint.pt"), "--context-length", "60",
                    "--out", str(tmp_path / "x")])


def test_the_coarse_features_are_long_clips_pca_and_the_loss_its_objective():
    g = torch.Generator().manual_seed(0)
    # features with a spread-out spectrum, so the top 8 components are well apart
    image = F.normalize(torch.randn(64, 24, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 24,
                        dtype=torch.float64), dim=-1)
    mean, basis = train.principal_basis(image, 8)
    assert torch.allclose(mean + (image - mean) @ basis @ basis.T, naive.long_clip_pca(image, 8), atol=1e-6)  # geev is less exact than eigh
    text, short = (F.normalize(torch.randn(64, 24, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
                   for _ in range(2))
    img = image.clone().requires_grad_()
    scale = torch.tensor(10.0, dtype=torch.float64)
    ours = train.long_caption_loss(lambda o: clip.contrastive_loss(o["image"], o["text"], o["scale"]),
                                   {"image": img, "text": text, "short": short, "scale": scale}, components=8)
    coarse = F.normalize(naive.long_clip_pca(image, 8), dim=-1)
    want = naive.clip_loss(image, text, scale) + naive.clip_loss(coarse, short, scale)
    assert torch.allclose(ours, want, atol=1e-6)
    ours.backward()
    ref_text, ref_short = text.detach().clone().requires_grad_(), short.detach().clone().requires_grad_()
    (naive.clip_loss(image, ref_text, scale) + naive.clip_loss(coarse, ref_short, scale)).backward()
    assert torch.allclose(text.grad, ref_text.grad, atol=1e-6) and torch.allclose(short.grad, ref_short.grad, atol=1e-6)
    assert img.grad.abs().max() > 0


def long_table(folder, n=48):
    """A TSV of synthetic images whose captions run past 77 tokens, the first sentence a short one."""
    os.makedirs(folder, exist_ok=True)
    source, lines = data.Synthetic(0, "train", n, resolution=32), ["filepath\ttitle"]
    for i in range(n):
        source.image(i).save(os.path.join(folder, f"{i}.png"))
        caption = source.captions(i)[0][0]
        lines.append(f"{i}.png\t{caption}. " + long_text(30 + i % 7) + f" {caption}")
    with open(os.path.join(folder, "long.tsv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(folder, "long.tsv")


@pytest.mark.slow
def test_long_captions_on_two_ranks_and_in_micro_batches_equal_one_process(tmp_path, base):
    # features 64 wide and a global batch of 48: the top 32 components of the whole batch are not those of
    # either rank's 24 (each of which spans at most 23 directions: its own projection would be the identity)
    wide = randomised(clip.CLIP(dataclasses.replace(base.cfg, embed_dim=64), base.tokenizer))
    init = save_ours(wide, tmp_path / "base.pt")
    table = long_table(str(tmp_path / "data"), 96)
    args = ["--model", "clip", "--init", init, "--context-length", "248", "--long-captions", "--data", table,
            "--steps", "2", "--batch-size", "48", "--lr", "1e-3", "--val-size", "0", "--workers", "0",
            "--warmup", "1", "--save-every", "0", "--eval-every", "0"]
    one, accum, two = (str(tmp_path / n) for n in ("one", "accum", "two"))
    train.main([*args, "--out", one])
    train.main([*args, "--out", accum, "--accum", "2"])
    finish(torchrun(2, *[a if a != "48" else "24" for a in args], "--out", two))
    assert weights(one)["positional_embedding"].shape[0] == 248
    assert max_diff(weights(one), weights(accum)) < 1e-5
    assert max_diff(weights(one), weights(two)) < 1e-5


def test_a_stretched_export_loads_in_open_clip_and_transformers_at_its_length(tmp_path, base):
    open_clip = pytest.importorskip("open_clip")
    transformers = pytest.importorskip("transformers")
    model = stretched(base, 248)
    ckpt = save_ours(model, tmp_path / "long.pt")
    texts = [long_text() + " on a red background", "a red circle"]
    ids = model.tokenizer(texts)
    with torch.no_grad():
        mine = model.encode_text(ids)
    train.export(ckpt, str(tmp_path / "oc"), "open_clip")
    oc = open_clip.create_model_and_transforms(f"local-dir:{tmp_path / 'oc'}")[0].eval()
    theirs = open_clip.get_tokenizer(f"local-dir:{tmp_path / 'oc'}")(texts)
    assert theirs.shape[1] == 248 and torch.equal(theirs[0, :120], ids[0, :120])
    with torch.no_grad():
        assert (oc.encode_text(theirs) - mine).abs().max() < 1e-4
    train.export(ckpt, str(tmp_path / "hf"), "hf")
    hf = transformers.CLIPModel.from_pretrained(str(tmp_path / "hf")).eval()
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    enc = tok(texts, padding="max_length", max_length=248, return_tensors="pt")
    assert hf.config.text_config.max_position_embeddings == 248 and enc.input_ids[0, :120].tolist() == ids[0, :120].tolist()
    with torch.no_grad():
        text = hf.get_text_features(input_ids=enc.input_ids, attention_mask=enc.attention_mask)
    assert (getattr(text, "pooler_output", text) - mine).abs().max() < 1e-4
    for source in (ckpt, str(tmp_path / "oc"), str(tmp_path / "hf")):  # our readers (predict's too) at the new length
        again, _ = clip.load(source)
        assert again.cfg.context_length == again.tokenizer.context_length == 248, source
        with torch.no_grad():
            assert (again.encode_text(again.tokenizer(texts)) - mine).abs().max() < 1e-4, source


def test_long_captions_pick_the_drawn_text_and_run_long_then_short():
    seen = []
    inner = lambda sample, rng: {"text": torch.zeros(3, dtype=torch.long), "text_pick": torch.tensor(1)}  # noqa: E731
    out = data.LongCaptions(inner, lambda ts: [ts])({"text": "First one. rest", "rewrites": ["Second one. more"]}, None)
    assert out["short_text"] == ["Second one"]  # the rewrite the model drew, up to its first '. '

    def forward(batch):
        seen.append(len(batch["text"]))
        return {"image": batch["image"], "text": batch["text"].float(), "scale": torch.tensor(1.0)}

    long, short = torch.arange(6).view(2, 3), torch.arange(6, 12).view(2, 3)
    out = train.long_caption_forward(forward)({"image": torch.zeros(2, 4), "text": long, "short_text": short})
    assert seen == [4] and torch.equal(out["text"], long.float()) and torch.equal(out["short"], short.float())


def test_a_fresh_model_keeps_its_own_draw_and_the_same_length_changes_nothing(base, monkeypatch):
    assert stretched(base, 77) is base
    made = []
    create = clip.create

    def recording(*a, **kw):
        made.append(create(*a, **kw))
        return made[-1]

    monkeypatch.setattr(clip, "create", recording)
    fresh = train.with_context_length(clip, argparse.Namespace(context_length=100, model="clip"), base, (), fresh=True)
    assert fresh is made[-1] and not torch.equal(fresh.positional_embedding[:20], base.positional_embedding[:20])


def test_the_coarse_features_pass_their_gradient_to_the_image():
    g = torch.Generator().manual_seed(1)
    image = F.normalize(torch.randn(48, 24, generator=g, dtype=torch.float64) * torch.linspace(3, 0.1, 24,
                        dtype=torch.float64), dim=-1)
    text, short = (F.normalize(torch.randn(48, 24, generator=g, dtype=torch.float64), dim=-1) for _ in range(2))
    scale, ours, ref = torch.tensor(10.0, dtype=torch.float64), image.clone().requires_grad_(), image.clone().requires_grad_()
    train.long_caption_loss(lambda o: clip.contrastive_loss(o["image"], o["text"], o["scale"]),
                            {"image": ours, "text": text, "short": short, "scale": scale}, components=8).backward()
    mean, basis = train.principal_basis(image, 8)  # the basis a constant of the step; the features carry the gradient
    coarse = F.normalize(mean + (ref - mean) @ basis @ basis.T, dim=-1)
    (naive.clip_loss(ref, text, scale) + naive.clip_loss(coarse, short, scale)).backward()
    assert torch.allclose(ours.grad, ref.grad, atol=1e-9)
