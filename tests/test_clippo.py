"""clippo.py: render_unifont's layout pixel for pixel, the one-ViT model, text pairs, checkpoints."""
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import clippo

CJK = "\u4e2d"  # a 16-wide glyph
RIGHT_EDGE, NEAR_EDGE, FULL = "\ue000", "\ue001", "\ue002"  # ink only in column 15 / 13; ink everywhere
UPPER_PLANE = "\U00020000"  # a 6-digit code point in the font
MISSING = "\u20ac\U0001f600"  # not in the font: empty cells


def make_font(path, seed=0):
    """A tiny .hex font with random glyphs; returns {code point: [16, 16] bool} as the test reads it."""
    rng = np.random.default_rng(seed)
    cells = {}
    for ch in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,'\u00c4\u00e4":
        cell = np.zeros((16, 16), bool)
        lo = int(rng.integers(0, 3))
        hi = int(rng.integers(lo + 1, 8))
        cell[2:14, lo:hi] = rng.random((12, hi - lo)) < 0.5  # 8 wide, inked somewhere in columns lo..hi-1
        cell[8, lo] = True
        cells[ord(ch)] = cell
    cells[ord(" ")] = np.zeros((16, 16), bool)
    for ch in (CJK, UPPER_PLANE):
        cells[ord(ch)] = rng.random((16, 16)) < 0.4
    for ch, col in ((RIGHT_EDGE, 15), (NEAR_EDGE, 13)):
        cells[ord(ch)] = np.zeros((16, 16), bool)
        cells[ord(ch)][3:12, col] = True
    cells[ord(FULL)] = np.ones((16, 16), bool)
    lines = []
    for cp, cell in cells.items():
        wide = cell[:, 8:].any() or cp in (ord(CJK), ord(UPPER_PLANE), ord(RIGHT_EDGE), ord(NEAR_EDGE), ord(FULL))
        bits = cell if wide else cell[:, :8]
        code = f"{cp:04X}" if cp < 0x10000 else f"{cp:06X}"
        lines.append(code + ":" + "".join(f"{int(''.join('1' if b else '0' for b in row), 2):0{len(row) // 4}X}"
                                          for row in bits))
    path.write_text("\n".join(lines) + "\n")
    return cells


def parse_hex(lines):
    """The test's own reading of .hex lines."""
    cells = {}
    for line in lines:
        code, bits = line.strip().split(":")
        per_row = len(bits) // 16
        cell = np.zeros((16, 16), bool)
        for r in range(16):
            value = int(bits[r * per_row:(r + 1) * per_row], 16)
            for c in range(per_row * 4):
                cell[r, c] = (value >> (per_row * 4 - 1 - c)) & 1
        cells[int(code, 16)] = cell
    return cells


def reference_render(text, cells, size, max_chars=768):
    """render_unifont's rules, glyph by glyph (slow and plain)."""
    text = "".join(chr(ord(c) + 32) if "A" <= c <= "Z" else c for c in text)[:max_chars]
    glyphs = []
    for c in text:
        cell = cells.get(ord(c), np.zeros((16, 16), bool))
        inked = [j for j in range(16) if cell[:, j].any()]
        first, last = (inked[0], inked[-1]) if inked else (0, 0)
        first = max(first - 1, 0)
        last = max(last + 1, first + 4)
        glyphs.append(cell[:, first:last])  # a slice past column 16 stops there, as TF's does
    img = np.full((size, size), 127, np.uint8)
    if not glyphs:
        return img
    div = np.float32(size - max(g.shape[1] for g in glyphs))
    rows, total = {}, 0
    for g in glyphs:
        total += g.shape[1]
        rows.setdefault(int(np.floor(np.float32(total) / div)), []).append(g)
    for r, gs in rows.items():
        line = np.concatenate(gs, axis=1)
        assert line.shape[1] <= size
        y = 16 * r
        if y < size:
            h = min(16, size - y)
            img[y:y + h, :line.shape[1]][line[:h]] = 0
    return img


def random_texts(rng, count, max_len):
    alphabet = list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,'\u00c4\u00e4") + \
        [CJK, RIGHT_EDGE, NEAR_EDGE, FULL, UPPER_PLANE, *MISSING]
    weights = np.array([1.0] * (len(alphabet) - 7) + [0.3] * 7)
    return ["".join(rng.choice(alphabet, size=int(rng.integers(0, max_len)), p=weights / weights.sum()))
            for _ in range(count)]


@pytest.fixture(scope="module")
def font(tmp_path_factory):
    path = tmp_path_factory.mktemp("font") / "tiny.hex"
    return str(path), make_font(path)


@pytest.mark.parametrize("size", [224, 80, 40])
def test_hex_font_renders_as_render_unifont(font, size):
    path, cells = font
    renderer = clippo.TextRenderer(path, size)
    rng = np.random.default_rng(size)
    texts = random_texts(rng, 60, 1000) + ["", "A", "a" * 900, FULL * 40, " " * 100, CJK * 300]
    out = renderer(texts)
    assert out.shape == (len(texts), size, size) and out.dtype == np.uint8
    for text, img in zip(texts, out):
        assert np.array_equal(img, reference_render(text, cells, size)), repr(text[:40])
    assert np.array_equal(renderer(texts[3])[0], out[3])  # one at a time == in a batch


def test_layout_rules_that_matter(font):
    path, cells = font
    r = clippo.TextRenderer(path, 224)
    ink = r(["A", "a", "\u00c4", "\u00e4", "", RIGHT_EDGE, MISSING[0] + "a"]) == 0
    assert np.array_equal(ink[0], ink[1])  # ASCII is lower-cased ...
    assert not np.array_equal(ink[2], ink[3])  # ... and nothing else is (TensorFlow's lower)
    assert not ink[4].any()
    # Ink only in the last column: the kept slice [14, 18) stops at the cell's edge, 2 columns wide.
    assert ink[5][:, 1].any() and not ink[5][:, 0].any()
    # A code point missing from the font is an empty cell 4 columns wide, not a crash.
    assert np.array_equal(ink[6][:, 4:], (r(["a"])[0] == 0)[:, :-4])
    # Fourteen rows of 16 px fill 224 px; the rest is cut.
    long = r(["a" * 768])[0] == 0
    assert long[-16:].any() and len({i // 16 for i in np.flatnonzero(long.any(1))}) == 14


def test_pillow_font_uses_the_same_layout():
    r = clippo.TextRenderer(None, 96)  # Pillow's built-in font: works on a bare machine
    texts = ["a photo of a red circle.", "Mixed CASE, digits 0123 and \u00e4\u00f6\u00fc", "", "x" * 300]
    out = r(texts)
    assert set(np.unique(out)) == {0, 127}
    cps = sorted({ord(c) for t in texts for c in t.lower()})
    cells = parse_hex(r.hex_lines(cps))
    for text, img in zip(texts, out):
        assert np.array_equal(img, reference_render(text, cells, 96))
    # What a checkpoint stores renders the same without the font.
    again = clippo.TextRenderer(None, 96, glyphs=r.hex_lines(cps), rasterise=False)
    assert np.array_equal(again(texts), out)


def test_font_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.hex"):
        clippo.TextRenderer(str(tmp_path / "nothere.hex"))
    (tmp_path / "bad.hex").write_text("0041:00FF\n")
    with pytest.raises(ValueError, match="bad.hex:1"):
        clippo.TextRenderer(str(tmp_path / "bad.hex"))


def tiny(**kw):
    return clippo.CLIPPO(clippo.Config(**{**dict(embed_dim=32, image_size=48, patch_size=16, width=32, layers=2,
                                                heads=2), **kw}))


def test_one_vit_and_nothing_modality_specific():
    torch.manual_seed(0)
    model = tiny()
    names = [n for n, _ in model.named_parameters()]
    assert all(n.startswith("visual.") or n == "logit_scale" for n in names), names
    assert not any(isinstance(m, nn.Embedding) for m in model.modules())
    assert model.logit_scale.exp().item() == pytest.approx(10.0)
    rendered = torch.from_numpy(model.renderer(["a red circle"]))
    # Rendered text through the image path is the text embedding: one encoder for both.
    assert torch.equal(model.encode_text(rendered), model.encode_image(clippo.pixels(rendered)))
    emb = model.encode_texts(["a red circle", "a blue square"])
    assert emb.shape == (2, 32) and torch.allclose(emb.norm(dim=1), torch.ones(2))


def test_text_and_image_tokens_enter_the_transformer_at_one_scale():
    # Without ln_pre, text tokens (mostly blank) entered at half an image's scale, and the tiny ViT
    # learned colour but not shape on the synthetic data.
    torch.manual_seed(0)
    model = tiny()
    seen = []
    model.visual.transformer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].std(-1).mean().item()))
    model.encode_texts(["a red circle"])
    model.encode_image(torch.rand(1, 3, 48, 48) * 2 - 1)
    assert seen == [pytest.approx(1.0, abs=0.05)] * 2


def test_map_head_is_multi_head_attention_pooling():
    torch.manual_seed(0)
    head = clippo.MAPHead(32, 4)
    x = torch.randn(3, 9, 32)
    mha = nn.MultiheadAttention(32, 4, batch_first=True)
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([head.q.weight, head.kv.weight]))
        mha.in_proj_bias.copy_(torch.cat([head.q.bias, head.kv.bias]))
        mha.out_proj.load_state_dict(head.out_proj.state_dict())
    pooled = mha(head.probe.expand(3, -1, -1), x, x, need_weights=False)[0]
    expected = (pooled + head.mlp(head.ln(pooled)))[:, 0]
    torch.testing.assert_close(head(x), expected)


def test_pool_defaults_to_the_preset():
    # The paper's MAP head for the paper's models; the tiny CPU preset uses a class token (README).
    assert clippo.CONFIGS["ViT-B-16"].pool == clippo.CONFIGS["ViT-L-16"].pool == "map"
    default = clippo.create(SimpleNamespace(size="tiny", font=None, pool=None))
    assert default.cfg.pool == "cls" and default.visual.map_head is None
    chosen = clippo.create(SimpleNamespace(size="tiny", font=None, pool="map"))
    assert chosen.cfg.pool == "map" and chosen.visual.map_head is not None


@pytest.mark.parametrize("pool", ["map", "cls", "mean"])
def test_pooling_options_train(pool):
    torch.manual_seed(0)
    model = tiny(pool=pool)
    batch = {"image": torch.randn(4, 3, 48, 48), "text": torch.from_numpy(model.renderer(["a", "b c", "d", "e f g"]))}
    loss = model.loss(model(batch))
    loss.backward()
    assert torch.isfinite(loss) and model.visual.conv1.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="pool"):
        tiny(pool="max")


def test_text_pairs(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("first sentence.\nsecond sentence.\nthird one.\n\nnew document.\nits second line.\nlonely\n\n")
    pairs = clippo.read_text_pairs(str(corpus))
    assert pairs == [("first sentence.", "second sentence."), ("second sentence.", "third one."),
                     ("new document.", "its second line."), ("its second line.", "lonely")]
    renderer = clippo.TextRenderer(None, 48)
    sample = {"image": Image.new("RGB", (64, 64)), "text": "a caption"}
    always = clippo.Transform(clippo.ImageTransform(48, clippo.MEAN, clippo.STD, True), renderer, pairs, 1.0)
    out = always(sample, np.random.default_rng(0))
    a, b = next(p for p in pairs if torch.equal(out["text"], torch.from_numpy(renderer(p[1])[0])))
    rendered = torch.from_numpy(renderer(a)[0])
    assert out["image"].dtype == torch.uint8 and torch.equal(out["image"], rendered.expand(3, 48, 48))
    # the model normalises shipped pixels as the text side's pixels(): [-1, 1]
    torch.testing.assert_close(clippo.normalize_pixels(out["image"], clippo.MEAN, clippo.STD), clippo.pixels(rendered))
    quarter = clippo.Transform(clippo.ImageTransform(48, clippo.MEAN, clippo.STD, True), renderer, pairs, 0.25)
    caption = torch.from_numpy(renderer("a caption")[0])
    n_pairs = sum(not torch.equal(quarter(sample, np.random.default_rng(i))["text"], caption) for i in range(400))
    assert 70 < n_pairs < 130
    model = clippo.build("tiny", pairs=pairs, pair_ratio=1.0)
    caption = torch.from_numpy(model.renderer("a caption")[0])
    assert torch.equal(model.transform(False)(sample, np.random.default_rng(0))["text"], caption)  # never at eval
    (tmp_path / "one.txt").write_text("only one line\n\nand another alone\n")
    with pytest.raises(ValueError, match="one.txt"):
        clippo.read_text_pairs(str(tmp_path / "one.txt"))


def test_checkpoint_round_trip(tmp_path):
    import train

    out = str(tmp_path / "run")
    train.main(["--model", "clippo", "--steps", "2", "--batch-size", "8", "--out", out, "--workers", "0",
                "--val-size", "16", "--save-every", "0"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    model, preprocess = clippo.load(os.path.join(out, "checkpoint.pt"))
    args = SimpleNamespace(font=None)
    again = clippo.create(args, extra=ckpt["extra"])
    again.load_state_dict(ckpt["model"])
    again.eval()
    texts = ["a photo of a red circle.", "\u00e9t\u00e9"]
    torch.testing.assert_close(model.encode_texts(texts), again.encode_texts(texts))
    assert len(ckpt["extra"]["glyphs"]) > 150  # printable Latin-1 travels with the weights
