"""CLIPPO (Tschannen et al. 2022, "Image-and-Language Understanding from Pixels Only") in one file.

One Vision Transformer encodes both images and text, the text rendered as an image: no tokenizer,
no embedding table, no parameter that belongs to one modality. Text is drawn in GNU Unifont's
16 x 16 bitmap glyphs by the rules of big_vision's render_unifont (reproduced pixel for pixel when
a Unifont .hex file is given), pooled by a MAP head (a class token in the CPU-sized tiny preset)
and trained with CLIP's contrastive loss over the global batch. Optionally, a share of each batch
are pairs of neighbouring sentences from a text corpus, both sides rendered (--text-pairs).

Use it alone (it imports nothing from this repository):
    model, preprocess = load("checkpoint.pt", font="unifont-15.1.05.hex")
    model = build("ViT-B-16", font="unifont-15.1.05.hex")   # a new model from keywords
    python clippo.py predict --ckpt CKPT --image a.jpg --labels 'a dog,a cat'

Your own loop (runs as written with this file alone; four plain images stand in for data):
    import numpy as np, torch
    from PIL import Image
    import clippo
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "yellow")]
    captions = ["a red picture", "a green picture", "a blue picture", "a yellow picture"]
    model = clippo.build("tiny")                     # no tokenizer: text is rendered
    opt = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    transform, rng = model.transform(train=True), np.random.default_rng(0)
    for step in range(20):
        samples = [transform({"image": i, "text": t}, rng) for i, t in zip(images, captions)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        loss = model.loss(model(batch))                  # exact over every rank under torch.distributed
        loss.backward(); opt.step(); opt.zero_grad(); model.after_step()
    print(model.classify(images, ["red", "green", "blue", "yellow"]))   # [4, 4] probabilities

The interface is clip.py's (train.py and data.py use nothing else): build, create, add_args; the
model's transform, forward, loss, after_step, optimizer_groups, encode_texts, classify, extra_state
(with the glyphs of printable Latin-1), towers and shard_units. The transform renders the caption
(uint8 [H, W]); one tower encodes both sides. train.py's recipe around it is clip.py's (open_clip's);
the demo (--size tiny on the synthetic data) trains at lr 1e-3 with weight decay 0.1, as the loop above does.

Layout: the method (config, text rendering, the one tower, the model), building, weight loading;
then, behind banners, the regions copied from clip.py: transformer blocks, the contrastive loss,
image inputs, the weights reader, predict and the fused loss kernels.
"""

import argparse
import contextlib
import gzip
import inspect
import io
import json
import math
import os
import unicodedata
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# ----------------------------------------------------------------------------------------------
# Config
@dataclass
class Config:
    embed_dim: int = 768
    image_size: int = 224
    patch_size: int = 16
    width: int = 768
    layers: int = 12
    heads: int = 12
    pool: str = "map"  # map (attention pooling, the paper's), cls (a class token) or mean
    # A GNU Unifont .hex file (render_unifont's exact output), a .ttf/.otf, or None: Pillow's built-in font.
    font: str = None
    loss: str = "softmax"  # or sigmoid: SigLIP's pairwise loss, with a learnt logit bias


CONFIGS = {
    # Small enough to train on two CPU cores in minutes on the synthetic data: 80 px holds 5 rows of
    # about 12 characters, every prompt and nearly every synthetic caption whole. A class token, not
    # the paper's MAP head: at this size MAP learned shapes far more slowly (default run: zero-shot
    # 0.34 with MAP, 0.60 with a class token); --pool map brings it back.
    "tiny": Config(embed_dim=128, image_size=80, patch_size=16, width=128, layers=4, heads=4, pool="cls"),
    "ViT-B-16": Config(),  # the paper's model
    "ViT-L-16": Config(embed_dim=1024, width=1024, layers=24, heads=16),
}


# Images and rendered text both enter the ViT in [-1, 1] (big_vision's value_range(-1, 1)).
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)


# ----------------------------------------------------------------------------------------------
# Text rendering: render_unifont's layout over a glyph atlas, as array work
#
# Each code point is a 16 x 16 binary cell (an 8-wide Unifont glyph fills the left half, a code
# point missing from the font is an empty cell). A glyph keeps its inked columns plus one blank
# column on the left, at least 4 columns wide; glyph i goes to row floor(cumwidth_i / (size -
# max width)) in float32, rows are 16 px apart, and whatever falls below the image is cut.
CELL = 16


def hex_cell(bits):
    """32 hex digits (8 x 16) or 64 (16 x 16) -> a [16, 16] bool cell; the most significant bit is leftmost."""
    rows = np.frombuffer(bytes.fromhex(bits), np.uint8).reshape(CELL, -1)
    cell = np.zeros((CELL, CELL), bool)
    cell[:, :rows.shape[1] * 8] = np.unpackbits(rows, axis=1)
    return cell


def read_hex_font(path):
    """{code point: [16, 16] bool cell} from a GNU Unifont .hex file ('XXXX:' + 32 or 64 hex digits)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such font file; give a GNU Unifont .hex (Debian: apt install unifont, "
                                f"then /usr/share/unifont/unifont.hex), a .ttf/.otf, or no font for Pillow's own")
    glyphs, raw = {}, read_small_file(path, "font file", 1 << 26)  # GNU Unifont's: about 10 MiB unpacked
    if path.endswith(".gz"):
        with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
            raw = f.read(1 << 26)  # a bomb is cut at 64 MiB, then fails on its first line
    for n, line in enumerate(raw.decode("ascii", "replace").split("\n"), 1):
        code, sep, bits = line.strip().partition(":")
        if not line.strip() or line.startswith("#"):
            continue
        try:
            if not sep or len(bits) not in (32, 64) or not 0 <= int(code, 16) < 0x110000:
                raise ValueError
            glyphs[int(code, 16)] = hex_cell(bits)
        except ValueError:
            raise ValueError(f"{path}:{n}: not a .hex glyph line ('XXXX:', U+0000 to U+10FFFF, and 32 or 64 hex "
                             f"digits)") from None
    if not glyphs:
        raise ValueError(f"{path}: no glyphs; is it a GNU Unifont .hex file?")
    return glyphs


def _pillow_font(font):
    """The largest size of a TrueType/OpenType font (or Pillow's built-in one) whose lines fit 16 px."""
    from PIL import ImageFont

    if font is not None and not os.path.isfile(font):
        raise FileNotFoundError(f"{font}: no such font file; give a .hex/.ttf/.otf path, or no font for Pillow's own")
    for size in range(CELL, 5, -1):
        try:
            f = ImageFont.truetype(font, size) if font else ImageFont.load_default(size=size)
        except TypeError:  # Pillow < 10.1 has only the fixed 11-px bitmap font
            return ImageFont.load_default()
        except OSError as e:  # not a font: said once, when the renderer is made, not at the first odd character
            raise ValueError(f"{font}: not a font Pillow reads ({e}); give a .hex, .ttf or .otf file") from None
        if not hasattr(f, "getmetrics") or sum(f.getmetrics()) <= CELL:  # a bitmap font: take it as it is
            return f
    return f


class TextRenderer:
    """Strings -> uint8 [N, size, size] images of the text: ink 0 on background 127.

    font: a GNU Unifont .hex file (pixel for pixel big_vision's render_unifont), a .ttf/.otf file, or
    None for Pillow's built-in font; Pillow fonts are rasterised once per code point into the same
    16 x 16 cells and laid out by the same rules. glyphs: .hex lines that take precedence (how a
    checkpoint carries the glyphs it was trained with).
    """

    def __init__(self, font=None, image_size=224, max_chars=768, background=127, ink=0, glyphs=(), rasterise=None):
        if image_size < 2 * CELL:
            raise ValueError(f"image_size {image_size}: text rendering needs at least {2 * CELL} px")
        self.font, self.size, self.max_chars, self.background, self.ink = font, image_size, max_chars, background, ink
        self.hex = font is not None and font.endswith((".hex", ".hex.gz"))
        self._font = None if self.hex else _pillow_font(font)  # checked now; loaded again after a pickle (it does not pickle)
        # Code point -> row of the atlas; row 0 is the empty cell, -1 a code point not rasterised yet
        # (with a .hex font, or rasterise=False, a code point without a glyph stays an empty cell).
        rasterise = not self.hex if rasterise is None else rasterise
        self.index = np.full(0x110000, -1 if rasterise else 0, np.int32)
        self.columns = [np.zeros((CELL, 2), np.uint8)]  # per glyph: each column's 16 pixels as 2 bytes
        self.first, self.width = [0], [4]
        for cp, cell in (read_hex_font(font) if self.hex else {}).items():
            self.add(cp, cell)
        for line in glyphs:  # a checkpoint's: checked as a .hex file's lines are
            code, _, bits = str(line).partition(":")
            if not (code and len(code) <= 6 and len(bits) in (32, 64) and 0 <= int(code, 16) < 0x110000):
                raise ValueError(f"a glyph line {str(line)[:40]!r}: not 'XXXX:' (U+0000 to U+10FFFF) and 32 or 64 hex digits")
            self.add(int(code, 16), hex_cell(bits))
        self._freeze()

    def add(self, cp, cell):
        """Put one 16 x 16 cell in the atlas, trimmed to its ink as render_unifont trims it."""
        inked = np.flatnonzero(cell.any(0))
        first, last = (inked[0], inked[-1]) if inked.size else (0, 0)
        first = max(first - 1, 0)
        last = max(last + 1, first + 4)
        self.index[cp] = len(self.first)
        self.first.append(first)
        self.width.append(min(last, CELL) - first)  # a slice past the cell's edge stops at the edge
        self.columns.append(np.packbits(cell.T, axis=1))
        self._dirty = True

    def _freeze(self):
        if getattr(self, "_dirty", True):
            self._columns = np.stack(self.columns)
            self._first, self._width = np.array(self.first), np.array(self.width)
            self._dirty = False

    def _rasterise(self, cp):
        from PIL import Image, ImageDraw

        img = Image.new("L", (CELL, CELL), 0)
        ch = chr(cp)
        if unicodedata.category(ch)[0] not in "CZ":  # controls and separators draw nothing
            if self._font is None:
                self._font = _pillow_font(self.font)
            ImageDraw.Draw(img).text((1, 0), ch, fill=255, font=self._font)
        self.add(cp, np.asarray(img) > 127)

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_font"} | {"_font": None}

    def hex_lines(self, codepoints):
        """.hex lines of the cells used for these code points (what a checkpoint stores)."""
        self.glyph_ids(np.asarray(codepoints))
        out = []
        for cp in codepoints:
            g = self.index[cp]
            if g > 0:
                cols = self._columns[g]  # [16 columns, 2 bytes]
                cell = np.unpackbits(cols, axis=1).T  # [16 rows, 16 columns]
                out.append(f"{cp:04X}:" + np.packbits(cell, axis=1).tobytes().hex().upper())
        return out

    def glyph_ids(self, codes):
        g = self.index[codes]
        if (g < 0).any():  # a Pillow font meets new code points: rasterise each once
            for cp in np.unique(codes[g < 0]):
                self._rasterise(int(cp))
            self._freeze()
            g = self.index[codes]
        return g

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        n, size = len(texts), self.size
        lengths = np.fromiter(map(len, texts), np.int64, n)
        codes = np.frombuffer("".join(texts).encode("utf-32-le", "surrogatepass"), np.uint32).astype(np.int64)
        codes = np.where((codes >= 65) & (codes <= 90), codes + 32, codes)  # ASCII-only lower-casing, as TF's
        starts = np.cumsum(lengths) - lengths
        if lengths.max(initial=0) > self.max_chars:
            pos = np.arange(codes.size) - np.repeat(starts, lengths)
            codes = codes[pos < self.max_chars]
            lengths = np.minimum(lengths, self.max_chars)
            starts = np.cumsum(lengths) - lengths
        text = np.repeat(np.arange(n), lengths)
        g = self.glyph_ids(codes)
        w = self._width[g]
        right = np.cumsum(w)
        right -= np.repeat(right[starts[lengths > 0]] - w[starts[lengths > 0]], lengths[lengths > 0])
        left = right - w
        # Row of each glyph, in float32 as render_unifont computes it: a row ends before the next
        # glyph could overflow it, whatever the widest glyph of the text is.
        widest = np.zeros(n, np.int64)
        widest[lengths > 0] = np.maximum.reduceat(w, starts[lengths > 0]) if codes.size else 0
        row = np.floor(right.astype(np.float32) / (size - widest[text]).astype(np.float32)).astype(np.int64)
        new_row = np.ones(codes.size, bool)
        new_row[1:] = (text[1:] != text[:-1]) | (row[1:] != row[:-1])
        x = left - left[np.maximum.accumulate(np.where(new_row, np.arange(codes.size), 0))]
        rows = -(-size // CELL)
        keep = row < rows  # rows below the image are cut
        g, w, x, row, text = g[keep], w[keep], x[keep], row[keep], text[keep]
        # Every visible column of every glyph as 16 pixel values, then one scatter into the image.
        glyph = np.repeat(np.arange(g.size), w)
        offset = np.arange(glyph.size) - np.repeat(np.cumsum(w) - w, w)
        gg = g[glyph]
        column = np.unpackbits(self._columns[gg, self._first[gg] + offset], axis=1)  # [columns, 16] of 0/1
        column *= np.uint8((self.ink - self.background) % 256)  # 1 -> ink, 0 -> background, in uint8 arithmetic
        column += np.uint8(self.background)
        image = np.full((n, rows, CELL, size), self.background, np.uint8)
        image[text[glyph], row[glyph], :, x[glyph] + offset] = column
        image = image.reshape(n, rows * CELL, size)
        return np.ascontiguousarray(image[:, :size]) if rows * CELL > size else image


def pixels(rendered):
    """uint8 [..., H, W] rendered text -> [..., 3, H, W] in [-1, 1], as images enter the ViT."""
    x = rendered.float().div(127.5).sub(1)
    return x.unsqueeze(-3).expand(*x.shape[:-2], 3, *x.shape[-2:])


# ----------------------------------------------------------------------------------------------
# Tower: the one ViT for both modalities (CLIP's transformer blocks, copied at the end of this file)
class MAPHead(nn.Module):
    """Multi-head attention pooling (big_vision's MAPHead): a learned probe attends over the tokens,
    then a residual MLP on the pooled vector."""

    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.randn(1, 1, width) * width ** -0.5)
        self.q = nn.Linear(width, width)
        self.kv = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, width)
        self.ln = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, width * 4)), ("gelu", nn.GELU()), ("c_proj", nn.Linear(width * 4, width))]))

    def forward(self, x):
        b, n, w = x.shape
        q = self.q(self.probe).expand(b, -1, -1).view(b, 1, self.heads, -1).transpose(1, 2)
        k, v = self.kv(x).view(b, n, 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = self.out_proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, 1, w))
        return (x + self.mlp(self.ln(x)))[:, 0]


class VisionTransformer(nn.Module):
    """Patches -> LayerNorm -> pre-LN transformer -> final LayerNorm -> pooling -> linear head (big_vision's ViT,
    plus CLIP's ln_pre)."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.pool = cfg.pool
        if cfg.pool not in ("map", "cls", "mean"):
            raise ValueError(f"pool {cfg.pool!r}: choose map, cls or mean")
        tokens = (cfg.image_size // cfg.patch_size) ** 2 + (cfg.pool == "cls")
        # big_vision's initialisation: LeCun-normal patch embedding, position embeddings of std width^-0.5.
        self.conv1 = nn.Conv2d(3, cfg.width, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        nn.init.normal_(self.conv1.weight, std=(3 * cfg.patch_size ** 2) ** -0.5)
        nn.init.zeros_(self.conv1.bias)
        self.positional_embedding = nn.Parameter(torch.randn(tokens, cfg.width) * cfg.width ** -0.5)
        self.class_embedding = nn.Parameter(torch.randn(cfg.width) * cfg.width ** -0.5) if cfg.pool == "cls" else None
        # CLIP's LayerNorm on the embedded patches: text (mostly blank) and images enter the blocks at
        # one scale. Without it, and with the old 0.02 initialisations, the tiny tower learned
        # colour but stayed at chance on shape for hundreds of steps on the synthetic data, even
        # with shape labels.
        self.ln_pre = nn.LayerNorm(cfg.width)
        self.transformer = Transformer(cfg.width, cfg.layers, cfg.heads)
        self.ln_post = nn.LayerNorm(cfg.width)
        self.map_head = MAPHead(cfg.width, cfg.heads) if cfg.pool == "map" else None
        self.proj = nn.Linear(cfg.width, cfg.embed_dim)
        self.transformer.init_weights(cfg.width, cfg.layers)

    def forward(self, x, keep=None):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        pos = self.positional_embedding.to(x.dtype)
        cls = self.class_embedding is not None
        x = x + pos[int(cls):]
        if keep is not None:  # patch dropout: the kept patches, their positions already added
            x = keep_patches(x, keep)
        if cls:
            x = torch.cat([(self.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1), x], dim=1)
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        x = self.map_head(x) if self.pool == "map" else x[:, 0] if self.pool == "cls" else x.mean(1)
        return self.proj(x)


# ----------------------------------------------------------------------------------------------
# Model: images and rendered texts through the same tower, CLIP's contrastive loss
class CLIPPO(nn.Module):
    def __init__(self, cfg: Config, renderer=None, pairs=None, pair_ratio=0.0):
        super().__init__()
        self.cfg, self.pairs, self.pair_ratio = cfg, pairs, pair_ratio
        self.renderer = renderer or TextRenderer(cfg.font, cfg.image_size)
        self.visual = VisionTransformer(cfg)
        # The paper's temperature: learnable, starting at 10 (CLIP starts at 1/0.07).
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0)))
        if cfg.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss {cfg.loss!r}: choose softmax (CLIP) or sigmoid (SigLIP)")
        # SigLIP's bias starts at -10: nearly every pair is a negative (Zhai et al. 2023)
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if cfg.loss == "sigmoid" else None

    def encode_image(self, images, normalize=False, keep=None):
        x = self.visual(normalize_pixels(images, MEAN, STD), keep)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, rendered, normalize=False):
        """uint8 [N, H, W] text images (the renderer's output) -> [N, D]: the same ViT as the images."""
        return self.encode_image(pixels(rendered), normalize)

    def forward(self, batch):
        out = {"image": self.encode_image(batch["image"], normalize=True, keep=batch.get("patch_keep")),
               "text": self.encode_text(batch["text"], normalize=True),
               "scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["bias"] = self.logit_bias
        return out

    def loss(self, out):
        if "bias" in out:
            return sigmoid_loss(out["image"], out["text"], out["scale"], out["bias"])
        return contrastive_loss(out["image"], out["text"], out["scale"])

    @torch.no_grad()
    def after_step(self):
        self.logit_scale.clamp_(0, math.log(100))

    def transform(self, train, images=None):
        return Transform(images or self.preprocess(uint8=True), self.renderer, self.pairs if train else None, self.pair_ratio)

    def encode_texts(self, texts):
        rendered = torch.from_numpy(self.renderer(list(texts))).to(self.logit_scale.device)
        return self.encode_text(rendered, normalize=True)

    def preprocess(self, uint8=False):
        """PIL image -> what encode_image takes, as evaluation sees it (short side resized, centre crop)."""
        return ImageTransform(self.cfg.image_size, MEAN, STD, uint8)

    def classify(self, images, labels):
        """[N, C] probabilities of C label texts for N PIL images (label_probs: softmax, or sigmoid)."""
        return label_probs(self, images, labels)

    def optimizer_groups(self, weight_decay):
        return adamw_groups(self, weight_decay)

    def towers(self):
        return {"image": self.visual}  # one tower reads images and rendered texts

    def shard_units(self):
        # (residual blocks, towers) for train.py's --fsdp and --grad-checkpointing: one tower reads both
        return list(self.visual.transformer.resblocks), [self.visual]

    def extra_state(self):
        # The glyphs of printable Latin-1 travel with the weights: a Pillow font may rasterise a
        # little differently on another machine, and a .hex file may not be there at all.
        latin = [cp for cp in range(0x20, 0x100) if chr(cp).isprintable()]
        return {"config": asdict(self.cfg), "glyphs": self.renderer.hex_lines(latin)}


def read_text_pairs(path):
    """Pairs of neighbouring sentences: consecutive non-empty lines of a text file (one sentence a
    line), never across a blank line (a document or paragraph break)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such text corpus (--text-pairs); give a text file, one sentence a line")
    pairs, previous = [], None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if line and previous:
                pairs.append((previous, line))
            previous = line
    if not pairs:
        raise ValueError(f"{path}: no two neighbouring non-empty lines, so no text pairs (--text-pairs)")
    return pairs


class Transform:
    """One sample -> {'image': uint8 [3, H, W], 'text': uint8 [H, W] rendered caption}.

    With text pairs, each training sample is replaced with probability pair_ratio by a pair of
    neighbouring sentences (both rendered), drawn from the sample's own rng: the batches stay the
    same for any number of ranks and workers.
    """

    def __init__(self, images, renderer, pairs=None, pair_ratio=0.0):
        self.image, self.renderer, self.pairs, self.pair_ratio = images, renderer, pairs, pair_ratio

    def __call__(self, sample, rng):
        if self.pairs and rng.random() < self.pair_ratio:
            a, b = self.pairs[rng.integers(len(self.pairs))]
            rendered = torch.from_numpy(self.renderer([a, b]))
            return {"image": rendered[0].expand(3, *rendered.shape[1:]).clone(), "text": rendered[1]}
        return {"image": self.image(sample["image"], rng), "text": torch.from_numpy(self.renderer(sample["text"])[0])}


# ----------------------------------------------------------------------------------------------
# Building a model: build() from keywords, create() for train.py
RANGES = {"text_pair_ratio": (0, 1)}  # of the numeric flags (train.py checks them when parsed)


def add_args(parser):
    parser.add_argument("--font", default=None,
                        help="GNU Unifont .hex (exact render_unifont), .ttf or .otf; default: Pillow's built-in font")
    parser.add_argument("--pool", default=None, choices=["map", "cls", "mean"],
                        help="how the ViT's tokens are pooled (default: the --size preset's; map, the paper's, "
                             "except for tiny)")
    parser.add_argument("--text-pairs", default=None,
                        help="text file, one sentence a line: neighbouring sentences become extra rendered pairs")
    parser.add_argument("--text-pair-ratio", type=float, default=0.25, help="share of each batch that is text pairs")
    parser.add_argument("--loss", choices=["softmax", "sigmoid"], default=None,
                        help="softmax: CLIP's InfoNCE; sigmoid: SigLIP's pairwise loss with a learnt bias (default: "
                             "softmax, or an --init checkpoint's own)")
    parser.add_argument("--siglip", dest="loss", action="store_const", const="sigmoid", help="--loss sigmoid")


def build(size="tiny", font=None, pool=None, pairs=None, pair_ratio=0.0, loss=None):
    """A new CLIPPO of a preset's shapes. font: a .hex (GNU Unifont) or .ttf/.otf file, else the
    built-in glyphs; pool: map, cls or mean; pairs: (text, text) pairs mixed into batches at pair_ratio."""
    if size not in CONFIGS:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(CONFIGS)}")
    cfg = Config(**asdict(CONFIGS[size]))
    cfg.font, cfg.pool, cfg.loss = font, pool or cfg.pool, loss or "softmax"
    return CLIPPO(cfg, None, pairs, pair_ratio)


def from_extra(extra, font=None, pairs=None, pair_ratio=0.0):
    """The model a checkpoint's extra_state() describes (weights not loaded); font overrides its font."""
    cfg = check_config(Config, extra.get("config"), "the checkpoint")
    font = font or cfg.font
    glyphs = extra.get("glyphs", ())
    if font and font.endswith((".hex", ".hex.gz")) and not os.path.isfile(font):
        # The saved glyphs cover Latin-1; other code points render empty, as Unifont's gaps do.
        renderer = TextRenderer(None, cfg.image_size, glyphs=glyphs, rasterise=False)
    else:
        renderer = TextRenderer(font, cfg.image_size, glyphs=glyphs)
    return CLIPPO(cfg, renderer, pairs, pair_ratio)


def create(args, captions=(), extra=None):
    """train.py's entry: build() from the flags, from_extra() on resume, a checkpoint's weights for --init."""
    pairs = read_text_pairs(args.text_pairs) if getattr(args, "text_pairs", None) else None
    ratio = getattr(args, "text_pair_ratio", 0.0)
    if extra is None and getattr(args, "init", None):  # fine-tuning a clippo checkpoint
        return load(args.init, font=getattr(args, "font", None), pairs=pairs, pair_ratio=ratio)[0].train()
    if extra is not None:
        return from_extra(extra, getattr(args, "font", None), pairs, ratio)
    return build(args.size, args.font, getattr(args, "pool", None), pairs, ratio, getattr(args, "loss", None))


# ----------------------------------------------------------------------------------------------
# Weight loading: this repository's checkpoints
def read_checkpoint(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    ckpt = load_tensors(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("extra"), dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(f"{path}: not a train.py checkpoint of clippo (no 'model' and 'extra')")
    return ckpt


def load(path, device="cpu", font=None, pairs=None, pair_ratio=0.0):
    """(model, preprocess) from a train.py checkpoint; font overrides the one it was trained with."""
    with reading(path):
        ckpt = read_checkpoint(path)
        check_fits(lambda: from_extra(ckpt["extra"], font), ckpt["model"], path)
        model = from_extra(ckpt["extra"], font, pairs, pair_ratio)
        model.load_state_dict(ckpt["model"], strict=True)
        model.to(device).eval()
        return model, model.preprocess()


# ==== copied from clip.py: transformer (shared code, kept identical to clip.py's region) ====
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention holding nn.MultiheadAttention's parameter names, run through SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"{heads} attention heads do not divide the width {width}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)

    def forward(self, x, causal=False):
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, w)
        return self.out_proj(x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, quick_gelu=False, mlp_width=None):
        super().__init__()
        mlp_width = mlp_width or 4 * width
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, width))]))

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu=False, mlp_width=None):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu, mlp_width) for _ in range(layers)])

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x

    def init_weights(self, width, layers):
        # OpenAI's initialisation: residual projections shrink with depth so the stream's variance stays put.
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)


def keep_patches(x, keep):
    """x [B, N, W] -> [B, K, W]: the patches that keep [B, K] names (FLIP's patch dropout: train.py draws
    them, --patch-dropout; the batch carries them as 'patch_keep')."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
# ==== end of copy: transformer ====


# ==== copied from clip.py: loss (shared code, kept identical to clip.py's region) ====
def contrastive_loss(image_features, text_features, logit_scale, group=None):
    """Symmetric InfoNCE over the global batch (open_clip's meaning: logit_scale is already exp'd).

    On one process it equals the naive form, which holds the whole B x B logit matrix:
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(len(logits))
        (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    Here each rank computes its own image rows against the texts of all ranks (gathered with
    gradient); the text -> image direction reuses the same tiles, its column statistics combined
    across ranks. Every rank must pass the same number of rows.
    """
    text_features, pos = gather_texts(image_features, text_features, group)
    return infonce(image_features, text_features, logit_scale, pos, True, group)


def infonce(x, y, logit_scale, pos, two_way=False, group=None):
    """Mean over the rows of x of InfoNCE against the keys y; row i's positive is column pos[i].

    Rows only (two_way=False): y is any key set (pass it detached for no gradient to the keys).
    two_way also takes the column direction: y must then be the gather of every rank's equal-sized
    shard and pos this rank's columns; column statistics are combined across ranks. Under DDP's
    gradient averaging the result is the exact gradient of the global mean.
    """
    row, col = lse_tiles(x, y, logit_scale, two_way)
    # index_select, not y[pos]: its backward adds rows in place where indexing's sorts the indices
    pos_logit = (x * y.index_select(0, pos)).sum(1).to(row.dtype) * logit_scale.to(row.dtype)
    loss = row - pos_logit
    if two_way:
        loss = (loss + global_logsumexp(col, group).index_select(0, pos) - pos_logit) / 2
    return loss.mean()


def gather_texts(image_features, text_features, group=None):
    """(every rank's texts, gathered with gradient; the columns of this rank's positives among them)."""
    n, offset = image_features.shape[0], 0
    if _distributed(group):
        text_features = all_gather_with_grad(text_features, group)
        if text_features.shape[0] != n * dist.get_world_size(group):
            raise ValueError("the loss needs the same batch size on every rank")
        offset = dist.get_rank(group) * n
    return text_features, torch.arange(offset, offset + n, device=image_features.device)


def _distributed(group):
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_gather_with_grad(x, group=None):
    return _AllGather.apply(x, group) if _distributed(group) else x


def global_logsumexp(lse, group=None):
    """Combine per-rank log-sum-exp vectors into the global one: O(len) traffic, differentiable."""
    if not _distributed(group):
        return lse
    top = lse.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return _AllReduceSum.apply(torch.exp(lse - top), group).log() + top


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient into the rows this rank owns."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        n = grad.shape[0] // world
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(n, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
            return out, None
        grad = grad.contiguous().clone()  # gloo has no reduce_scatter
        dist.all_reduce(grad, group=ctx.group)
        return grad[rank * n:(rank + 1) * n], None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's loss depends on the sum, so the backward sums the gradients too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
# ==== end of copy: loss ====


# ==== copied from clip.py: optimizer (shared code, kept identical to clip.py's region) ====
def adamw_groups(model, weight_decay):
    """The AdamW parameter groups of the recipe (open_clip's rule): weight decay on weight matrices only,
    none on biases, norms, embeddings and 0-d scalars (the logit scale and bias); parameters that do not
    train (LiT locks, a frozen tower) left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
# ==== end of copy: optimizer ====


# ==== copied from clip.py: preprocess (shared code, kept identical to clip.py's region) ====
class ImageTransform:
    """PIL image -> [3, size, size] as the weights expect it (OpenAI's preprocess): the short side resized
    to size (bicubic), the centre cut out, normalised by mean and std, or with uint8 left as pixels for
    the model to normalise on its device (encode_image). Training's random crop is data.py's RandomCrop.
    A JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (Pillow's
    draft mode), never below the output's resolution."""

    def __init__(self, size, mean, std, uint8=False):
        self.size, self.mean, self.std, self.uint8 = size, mean, std, uint8

    def __call__(self, img, rng=None):
        w, h, side = *img.size, min(img.size)
        box, out = (0, 0, w, h), (max(self.size, round(w * self.size / side)), max(self.size, round(h * self.size / side)))
        if out[0] * out[1] > 4 * self.size * self.size:
            # A long strip (a 1 x 100000 PNG is 467 bytes) resized whole would hold billions of pixels: past
            # 4:1 the centre square is cut first, then resized; the pixels kept are the same but at its edges.
            box, out = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side), (self.size,) * 2
        if img.format == "JPEG":  # a no-op once decoded
            img.draft("RGB", out)
        if img.size[0] * img.size[1] > MAX_PIXELS:  # checked before the decode, which would hold it all
            raise ImageTooLarge(f"{getattr(img, 'source', 'image')}: {img.size[0]} x {img.size[1]} pixels, over "
                                f"the cap of {MAX_PIXELS} (a decompression bomb, or a scan to shrink first)")
        img, fx, fy = to_rgb(img), img.size[0] / w, img.size[1] / h  # drafted: the box in the smaller image
        img = img.resize(out, Image.BICUBIC, box=(box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy))
        left, top = (out[0] - self.size) // 2, (out[1] - self.size) // 2
        x = torch.from_numpy(np.array(img, dtype=np.uint8)[top:top + self.size, left:left + self.size]).permute(2, 0, 1)
        return x if self.uint8 else normalize_pixels(x, self.mean, self.std)


@torch.no_grad()
def embed_images(model, preprocess, images, chunk=64):
    """[N, D] normalised image features for PIL images or image files, `chunk` images decoded and encoded
    at a time: memory does not grow with N."""
    device, images, out = next(model.parameters()).device, list(images), []
    for i in range(0, len(images), chunk):
        pixels = torch.stack([preprocess(read_image(x) if isinstance(x, (str, os.PathLike)) else to_rgb(x))
                              for x in images[i:i + chunk]])
        out.append(model.encode_image(pixels.to(device), normalize=True).float())
    return torch.cat(out) if out else torch.empty(0)
# ==== end of copy: preprocess ====


# ==== copied from clip.py: tensor-files (shared code, kept identical to clip.py's region) ====
# The boundary for weights files, which come from anywhere: nothing in them runs (tensors and plain
# containers only), nothing they claim is allocated before it is checked against the file's own size,
# and whatever goes wrong while one is read is one line naming it (reading()).
class BadInput(ValueError):
    """A file or folder the user gave that cannot be used; the message names it and says what is wrong."""


def one_line(err):
    """An exception as one short line (a pickle, zip or torch error can run to paragraphs)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "").split(". ")[0][:160]
    return f"{type(err).__name__}: {first}".rstrip(": ")


@contextlib.contextmanager
def reading(what):
    """with reading(path): ... -- whatever the block raises while it reads and checks `path` (a file or
    folder the user gave) becomes one BadInput line naming it: what an input holds is the input's fault,
    whichever line of ours it trips. Code outside such a block is ours, and keeps its traceback (and
    here too with TRAIN_TRACEBACK=1)."""
    try:
        yield
    except (BadInput, ImportError, FileNotFoundError):  # one line already, or a package to install
        raise
    except Exception as err:
        if os.environ.get("TRAIN_TRACEBACK"):
            raise
        message = str(err) if isinstance(err, ValueError) and str(what) in str(err) else f"{what}: {one_line(err)}"
        raise BadInput(" ".join(message.split("\n"))[:600]) from None


def tensor_bytes(t, where):
    """The bytes a tensor claims, once it is checked to lie within its storage, not expanded past it."""
    n = t.numel()
    if t.is_complex() or t.is_quantized or t.layout != torch.strided:
        raise ValueError(f"{where}: a {t.dtype} {str(t.layout).replace('torch.', '')} tensor; weights are real and dense")
    if n == 0:
        return 0
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{where}: a tensor with a negative stride")
    elements = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    extent = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride()))
    if extent > elements or n > elements:  # stride 0 or overlapping rows: more elements than stored
        raise ValueError(f"{where}: a tensor of {tuple(t.shape)} expanded over {max(elements, 0)} stored elements")
    return n * t.element_size()


def check_tensors(obj, path):
    """obj (what a weights file held) with every tensor checked (tensor_bytes), walked as a graph (each
    object once, so shared containers cost nothing twice), and the bytes all tensors claim at most twice
    the file's size: a few KB of views cannot become gigabytes of weights."""
    limit = 2 * os.path.getsize(path) + (1 << 20)
    seen, stack, claimed = set(), [obj], 0
    while stack:
        x = stack.pop()
        if id(x) not in seen:
            seen.add(id(x))
            claimed += tensor_bytes(x, path) if isinstance(x, torch.Tensor) else 0
            if claimed > limit:
                raise ValueError(f"{path}: its tensors claim over {limit} bytes from a file of {os.path.getsize(path)}")
            stack.extend(x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ())
    return obj


def load_tensors(path):
    """torch.load of a file that may come from anywhere: tensors and plain containers only (weights_only:
    nothing in it runs), a .safetensors file through safetensors, every tensor checked (check_tensors);
    a damaged or foreign file is one ValueError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not os.path.isfile(path):
        raise ValueError(f"{path}: not a regular file; pass a weights file")
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ImportError(f"{path} is a .safetensors file: pip install safetensors to read it") from None
            return check_tensors(load_file(path), path)
        return check_tensors(torch.load(path, map_location="cpu", weights_only=True), path)
    except ImportError:
        raise
    except Exception as e:  # truncated, empty, garbage, a TorchScript archive, a pickle of more than tensors
        if str(e).startswith(path):
            raise ValueError(str(e)) from None
        raise ValueError(f"{path}: not a weights file this reads ({one_line(e)}); check that the download is "
                         f"complete and that it holds weights only") from None


def read_small_file(path, what, max_bytes=1 << 24):
    """The bytes of a file a command reads beside the weights (a config, a tokenizer, an image, --texts): a
    regular file (a FIFO would block, /dev/zero never end) of at most max_bytes."""
    import stat

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file; pass a {what}")
        if st.st_size > max_bytes:
            raise ValueError(f"{path}: {st.st_size} bytes, more than a {what} may have ({max_bytes})")
        return f.read(max_bytes)


# What a config field may hold is read off its default: ints (not bools) and floats in sane ranges,
# finite; sizes, widths, heads and layers at least 1; None only where the default is None. Layers at
# most MAX_LAYERS: each costs the (meta-device) build time whatever the file holds.
POSITIVE = ("width", "heads", "layers", "dim", "image_size", "patch_size", "context_length", "vocab_size",
            "temperature", "pool_size")
MAX_LAYERS = 256
# Sizes a config may claim, by field name: past these a crafted file would cost time or memory that its
# own size does not bound (a 16M x 16M box grid, a 1M-pixel side). A model file adds its own in LIMITS.
LIMITS = {"image_size": 4096, "context_length": 4096, "patch_size": 1024}


def check_config(cls, values, where):
    """A dataclass config built from a file's dict field by field: unknown fields, wrong types and values
    out of range are one ValueError naming the field, before any model is built."""
    from dataclasses import MISSING, fields

    if not isinstance(values, dict):
        raise ValueError(f"{where}: the config is a {type(values).__name__}, not a table of fields")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown config fields {unknown[:5]}; weights of another model or version?")
    for name, value in values.items():
        f = known[name]
        default = f.default if f.default is not MISSING else None
        kind = f.type if isinstance(f.type, type) else type(default)
        if isinstance(default, tuple) and default and (not isinstance(value, (tuple, list)) or len(value) != len(default)):
            raise ValueError(f"{where}: config field {name} = {value!r:.60} needs {len(default)} values")
        if name.endswith(("std", "eps")) and value is not None and not (
                all(v > 0 for v in value) if isinstance(value, (tuple, list)) else isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{where}: config field {name} = {value!r:.60} must be above 0")
        ok = (value is None and default is None) or (
            kind is bool and isinstance(value, bool)) or (
            kind is int and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 24
            and (value >= 1 or not name.endswith(POSITIVE)) and (value <= MAX_LAYERS or not name.endswith("layers"))) or (
            kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 or not name.endswith(POSITIVE))) or (
            kind is str and isinstance(value, str) and len(value) < 1 << 26) or (
            kind in (tuple, list) and isinstance(value, (tuple, list)) and len(value) <= 64 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
        if not ok:
            raise ValueError(f"{where}: config field {name} = {value!r:.60} is not a valid {kind.__name__}")
        limit = {**LIMITS, **getattr(cls, "LIMITS", {})}.get(name)
        if limit is not None and isinstance(value, (int, float)) and value > limit:
            raise ValueError(f"{where}: config field {name} = {value} is over {limit}")
    return cls(**values)


def check_fits(make, sd, where, strict=True):
    """sd checked against the model make() builds, before that model is built: make() runs on the meta
    device (no memory), and missing, unexpected or misshapen tensors are one ValueError naming the
    file. A config that claims a huge model over a few tensors is refused here, not after allocating."""
    with torch.device("meta"):
        shell = make()
    own = shell.state_dict()
    missing = [k for k in own if k not in sd] if strict else []
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} where the config has {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        said = [f"{len(x)} {kind} (first: {x[0]})" for kind, x in (("missing", missing), ("unexpected", unexpected),
                                                                    ("of the wrong shape", wrong)) if x]
        raise ValueError(f"{where}: weights that do not fit their config: {'; '.join(said)}")
# ==== end of copy: tensor-files ====


# ==== copied from clip.py: image-files (shared code, kept identical to clip.py's region) ====
def normalize_pixels(images, mean, std):
    """uint8 pixels [..., 3, H, W] -> floats normalised by mean and std, on the pixels' device. Images
    already in floats are taken as normalised and pass through."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(std, device=images.device).view(3, 1, 1)
    return (images.float().div_(255) - mean) / std


# Decoding holds the whole image (4 bytes a pixel in Pillow, then a copy): larger images are refused
# before their decode (a JPEG first drafted down to what the preprocessing needs), as are larger files
# and JPEGs of more progressive scans (each decodes every pixel again; encoders write about 10).
MAX_PIXELS, MAX_IMAGE_BYTES, MAX_JPEG_SCANS = 40_000_000, 64 << 20, 100


class ImageTooLarge(OSError):
    reason = "image too large"


def to_rgb(img):
    """RGB, with 16-bit and 32-bit integer images scaled to 8 bits (Pillow's convert clips them: white)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        x = np.clip(np.asarray(img).astype(np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)  # 0..65535 -> 0..255
        return Image.fromarray(x, "L").convert("RGB")
    return img.convert("RGB")


def read_image(path):
    """A PIL image of a regular file of at most MAX_IMAGE_BYTES (a FIFO or device would block or never
    end), decoded here (a JPEG's decode waits for the preprocessing, which may draft it smaller), so a
    damaged or oversized file is one ValueError naming it."""
    payload = read_small_file(path, "image file", MAX_IMAGE_BYTES)
    try:
        img = Image.open(io.BytesIO(payload), formats=("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"))  # no EPS
        img.source, scans = path, payload.count(b"\xff\xda") if img.format in ("JPEG", "MPO") else 1
        if scans > MAX_JPEG_SCANS or (img.size[0] * img.size[1] > MAX_PIXELS and img.format != "JPEG"):
            raise ImageTooLarge(f"{img.size[0]} x {img.size[1]} pixels in {scans} scans, over the caps of "
                                f"{MAX_PIXELS} pixels and {MAX_JPEG_SCANS} scans")
        if img.format != "JPEG":
            img.load()
        return img
    except Exception as e:  # Pillow: OSError, SyntaxError, DecompressionBombError, ValueError
        lines = str(e).strip().splitlines() or [""]
        reason = lines[0][:200] if type(e) is ValueError else f"{type(e).__name__}: {lines[0][:200]}"
        raise ValueError(f"{path}: not a readable image ({reason}); check the file or leave it out") from None
# ==== end of copy: image-files ====


# ==== copied from clip.py: predict (shared code, kept identical to clip.py's region) ====
def link(model, sims):
    """Probabilities from cosine similarities [N, C] with the model's own link: a softmax over the last
    dimension at the logit scale (learnt, or BriVL's fixed 1 / temperature), rows summing to 1; for a
    sigmoid-loss model (it has a logit_bias) each pair's sigmoid on its own, as SigLIP's demos show."""
    scale = model.logit_scale.exp().item()
    if getattr(model, "logit_bias", None) is not None:
        return torch.sigmoid(scale * sims + model.logit_bias.item())
    return (scale * sims).softmax(-1)


@torch.no_grad()
def label_probs(model, images, labels):
    """[N, C]: for N PIL images (or image files) and C label texts, each image's label probabilities
    from the model's eval preprocessing, features and link(); the model runs in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        labels = list(labels)  # encoded 256 at a time: 20,000 texts cost what 256 do, but their features
        text = torch.cat([model.encode_texts(labels[i:i + 256]).float() for i in range(0, len(labels), 256)])
        return link(model, embed_images(model, model.preprocess(), images) @ text.T)
    finally:
        model.train(was_training)


IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def predict_main(argv=None):
    me = os.path.basename(__file__)
    p = argparse.ArgumentParser(prog=f"{me} predict", description="zero-shot labels for images, captions ranked for "
                                "images, or images ranked for a text")
    p.add_argument("--ckpt", required=True, help="OUT/checkpoint.pt, or any weights load() reads")
    p.add_argument("--image", nargs="+", default=[], help="image files")
    p.add_argument("--labels", default=None, help="comma-separated labels, e.g. 'a dog,a cat'")
    p.add_argument("--texts", default=None, help="a file of captions, one a line, to rank for each image")
    p.add_argument("--images", default=None, help="a folder of images to rank for --query")
    p.add_argument("--query", action="append", default=[], help="with --images: the text to rank them for")
    p.add_argument("--top", type=int, default=5, help="rows shown per image or query")
    p.add_argument("--json", action="store_true", help="one JSON object per image (or query), most probable first")
    p.add_argument("--device", default="cpu")
    options = {"tokenizer": (str, "for weights that carry no tokenizer, or to replace theirs"),
               "font": (str, "a Unifont .hex file instead of the glyphs the weights carry"),
               "image_size": (int, "the input size of official weights")}
    for name in inspect.signature(load).parameters.keys() & options.keys():  # what this file's load() takes
        p.add_argument(f"--{name.replace('_', '-')}", type=options[name][0], help=options[name][1])
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    if args.device.split(":")[0] not in ("cpu", "cuda", "mps") or (args.device.startswith("cuda") and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: cpu, or cuda where a GPU is present")
    try:
        if args.images:
            if not os.path.isdir(args.images):
                raise FileNotFoundError(f"{args.images}: no such folder (--images takes a folder of images)")
            found = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.lower().endswith(IMAGE_FILES))
            candidates = [f for f in found if os.path.isfile(f)]  # not FIFOs, devices, sockets, folders
            if len(candidates) < len(found):
                print(f"{me} predict: left out {len(found) - len(candidates)} entries of {args.images} that are not "
                      f"regular files (first: {next(f for f in found if f not in candidates)})", file=sys.stderr)
            if not candidates or not args.query:
                raise ValueError(f"--images needs image files in {args.images} and at least one --query")
            queries = args.query
        else:  # --texts: a regular file of at most 64 MiB (a FIFO or /dev/zero is refused, not read)
            lines = read_small_file(args.texts, "--texts file", 1 << 26).decode("utf-8", "replace").splitlines() \
                if args.texts else (args.labels or "").split(",")
            queries, candidates = args.image, [t.strip() for t in lines if t.strip()]
            if not queries or not candidates:
                raise ValueError("pass --image FILE... with --labels 'a,b,...' or --texts FILE (or --images DIR --query TEXT)")
            for path in queries:
                if not os.path.isfile(path):
                    raise (ValueError(f"{path}: not a regular file; pass image files") if os.path.exists(path) else
                           FileNotFoundError(f"{path}: no such image file"))
        model, preprocess = load(args.ckpt, **{k: getattr(args, k) for k in options if getattr(args, k, None) is not None})
        model.to(args.device)
        if getattr(model, "tokenizer", True) is None:
            raise ValueError(f"{args.ckpt} carries no tokenizer: pass --tokenizer")
        if args.images:  # images ranked for each query: the link over the images
            with torch.no_grad():
                probs = link(model, model.encode_texts(queries).float() @ embed_images(model, preprocess, candidates).T)
        else:
            probs = model.classify(queries, candidates)  # [images, labels]
    except (FileNotFoundError, ValueError, ImportError, OSError) as err:
        raise SystemExit(f"{me} predict: {err}") from None
    except Exception as err:  # a model built from the user's file, run on the user's inputs: theirs, in one line
        if os.environ.get("TRAIN_TRACEBACK"):
            raise
        raise SystemExit(f"{me} predict: {args.ckpt}: {one_line(err)} (TRAIN_TRACEBACK=1 shows where)") from None
    key, kind = ("query", "images") if args.images else ("image", "labels")
    for q, row in zip(queries, probs):
        order = row.argsort(descending=True).tolist()
        if args.json:
            print(json.dumps({key: q, kind: [candidates[i] for i in order], "probs": [round(row[i].item(), 6) for i in order]},
                             ensure_ascii=False))
            continue
        print(q)
        for i in order[:args.top]:
            print(f"  {row[i].item():6.1%}  {candidates[i]}")
# ==== end of copy: predict ====


# ==== copied from clip.py: kernel (shared code, kept identical to clip.py's region) ====
# lse_tiles(x, y, scale, two_way) -> (row_lse [n], col_lse [k] or [0]): the log-sum-exps of t = scale *
# x @ y.T along rows and (two_way) columns from the same tiles, x this rank's rows (n x D), y the keys.
# t is never kept: the backward makes the tiles again (2 B^2 D forward, 6 B^2 D backward). For g_row, g_col:
#     G_ij = g_row_i * exp(t_ij - row_lse_i) + g_col_j * exp(t_ij - col_lse_j)
#     dx = scale * G @ y,  dy = scale * G.T @ x,  d(scale) = sum(G * x @ y.T)
# At once: one BLOCK x BLOCK tile of t on the PyTorch path (every device); on the Triton path (CUDA) the
# forward's tiles stay in registers, the backward's G in chunks of at most WORKSPACE (or 4 k D) elements.
BLOCK = 1024  # tile edge of the PyTorch path: a 1024 x 1024 fp32 tile is 4 MB
WORKSPACE = 2 ** 27  # elements of the Triton backward's G chunk, or 4 k d if larger: memory stays O(B D)
_NS = __name__.replace(".", "_")  # one op namespace per file, so copies of this code can coexist


def _acc_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least


def _lse_torch(x, y, scale, two_way):
    n, k = x.shape[0], y.shape[0]
    acc = _acc_dtype(x)
    s = scale.to(acc)
    row = torch.full((n,), -math.inf, device=x.device, dtype=acc)
    col = torch.full((k if two_way else 0,), -math.inf, device=x.device, dtype=acc)
    for i in range(0, n, BLOCK):
        for j in range(0, k, BLOCK):
            t = (x[i:i + BLOCK] @ y[j:j + BLOCK].T).to(acc) * s
            row[i:i + BLOCK] = torch.logaddexp(row[i:i + BLOCK], t.logsumexp(1))
            if two_way:  # the same tile gives the column statistics: one pass for both directions
                col[j:j + BLOCK] = torch.logaddexp(col[j:j + BLOCK], t.logsumexp(0))
    return row, col


def _lse_backward_torch(x, y, scale, row, col, g_row, g_col):
    n, k = x.shape[0], y.shape[0]
    acc = row.dtype
    s = scale.to(acc)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device)
    ds = torch.zeros((), dtype=acc, device=x.device)
    for i in range(0, n, BLOCK):
        xi = x[i:i + BLOCK]
        for j in range(0, k, BLOCK):
            yj = y[j:j + BLOCK]
            raw = (xi @ yj.T).to(acc)
            t = raw * s
            g = torch.exp(t - row[i:i + BLOCK, None]) * g_row[i:i + BLOCK, None]
            if col.numel():
                g += torch.exp(t - col[None, j:j + BLOCK]) * g_col[None, j:j + BLOCK]
            ds += (g * raw).sum()
            g = g.to(x.dtype)
            dx[i:i + BLOCK] += (g @ yj).to(acc) * s
            dy[j:j + BLOCK] += (g.T @ xi).to(acc) * s
    return dx.to(x.dtype), dy.to(y.dtype), ds.to(scale.dtype)


def _use_triton(x):
    # The Triton kernels run on CUDA, where Triton is installed and the file carries them (the kernel-triton
    # region: brivl.py's queue loss is small and leaves it out); TRITON_INTERPRET=1 runs them on the CPU
    # (slowly): that is how CI tests them. Elsewhere the PyTorch tiles run.
    return (globals().get("triton") is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


@torch.library.custom_op(f"{_NS}::lse_tiles", mutates_args=())
def lse_tiles(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, two_way: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_lse [n], col_lse [k] or [0]) of scale * x @ y.T, never materialising it."""
    if _use_triton(x):
        row, col = _lse_triton(x.contiguous(), y.contiguous(), scale, two_way)
        return row.to(_acc_dtype(x)), col.to(_acc_dtype(x))
    return _lse_torch(x, y, scale, two_way)


@lse_tiles.register_fake
def _lse_tiles_fake(x, y, scale, two_way):
    return x.new_empty(x.shape[0], dtype=_acc_dtype(x)), x.new_empty(y.shape[0] if two_way else 0, dtype=_acc_dtype(x))


@torch.library.custom_op(f"{_NS}::lse_tiles_backward", mutates_args=())
def lse_tiles_backward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                       g_row: torch.Tensor, g_col: torch.Tensor, need_x: bool, need_y: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _lse_backward_triton(x.contiguous(), y.contiguous(), scale, row, col, g_row, g_col, need_x, need_y)
    return _lse_backward_torch(x, y, scale, row, col, g_row, g_col)


@lse_tiles_backward.register_fake
def _lse_tiles_backward_fake(x, y, scale, row, col, g_row, g_col, need_x, need_y):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _lse_setup(ctx, inputs, output):
    x, y, scale, _ = inputs
    ctx.save_for_backward(x, y, scale, *output)


def _lse_backward(ctx, g_row, g_col):
    x, y, scale, row, col = ctx.saved_tensors
    g_row = torch.zeros_like(row) if g_row is None else g_row
    g_col = torch.zeros_like(col) if g_col is None else g_col
    need_x, need_y, need_s = ctx.needs_input_grad[:3]
    dx, dy, ds = lse_tiles_backward(x, y, scale, row, col, g_row, g_col, need_x, need_y)
    return dx if need_x else None, dy if need_y else None, ds if need_s else None, None


lse_tiles.register_autograd(_lse_backward, setup_context=_lse_setup)
# ==== end of copy: kernel ====


# ==== copied from clip.py: kernel-triton (shared code, kept identical to clip.py's region) ====
try:  # Triton ships with CUDA builds of torch; without it the PyTorch tiles run everywhere.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


if triton is not None:
    @triton.jit
    def _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BD: tl.constexpr):
        # x[rm] @ y[rn].T in fp32, D in chunks of BD; rows and columns past the ends read as zeros.
        raw = tl.zeros([BM, BN], dtype=tl.float32)
        for d0 in range(0, d, BD):
            rd = d0 + tl.arange(0, BD)
            xa = tl.load(X + rm[:, None] * sxn + rd[None, :] * sxd, mask=(rm[:, None] < n) & (rd[None, :] < d), other=0.0)
            yb = tl.load(Y + rn[:, None] * syn + rd[None, :] * syd, mask=(rn[:, None] < k) & (rd[None, :] < d), other=0.0)
            raw += tl.dot(xa, tl.trans(yb), input_precision=PREC)
        return raw

    @triton.jit
    def _lse_fwd_kernel(X, Y, SCALE, OFFSET, ROW, COL, n, k, d, sxn, sxd, syn, syd,
                        TWO_WAY: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        # Program (row block, column split): sums of exp(t - offset) over its tiles, added atomically.
        # offset = the largest |t| possible less 80, so no exp overflows fp32 (see _lse_triton).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        s = tl.load(SCALE).to(tl.float32)
        c = tl.load(OFFSET)
        row_sum = tl.zeros([BM], dtype=tl.float32)
        for jb in range(tl.program_id(1), tl.cdiv(k, BN), SPLIT):
            rn = jb * BN + tl.arange(0, BN)
            raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
            e = tl.where((rm[:, None] < n) & (rn[None, :] < k), tl.exp(raw * s - c), 0.0)
            row_sum += tl.sum(e, 1)
            if TWO_WAY:
                tl.atomic_add(COL + rn, tl.sum(e, 0), mask=rn < k)
        tl.atomic_add(ROW + rm, row_sum, mask=rm < n)

    @triton.jit
    def _grad_tile_kernel(X, Y, SCALE, ROW, COL, GROW, GCOL, G, DSP, n, k, d, sxn, sxd, syn, syd, sgn,
                          TWO_WAY: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BD: tl.constexpr):
        # One tile of scale * G for a chunk of rows, written out, and the tile's share of d(scale).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        s = tl.load(SCALE).to(tl.float32)
        raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
        t = raw * s
        row = tl.load(ROW + rm, mask=rm < n, other=0.0)
        g = tl.exp(t - row[:, None]) * tl.load(GROW + rm, mask=rm < n, other=0.0)[:, None]
        if TWO_WAY:
            col = tl.load(COL + rn, mask=rn < k, other=0.0)
            g += tl.exp(t - col[None, :]) * tl.load(GCOL + rn, mask=rn < k, other=0.0)[None, :]
        inside = (rm[:, None] < n) & (rn[None, :] < k)
        g = tl.where(inside, g, 0.0)
        tl.store(DSP + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(g * raw, 1), 0))
        tl.store(G + rm[:, None] * sgn + rn[None, :], (g * s).to(G.dtype.element_ty), mask=inside)


def _tiles(x):
    big = x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # exact fp32; half types use their own dot
    return dict(PREC=prec, BM=128 if big else 64, BN=128 if big else 64, BD=64 if x.shape[1] >= 64 else 32,
                num_warps=4, num_stages=3)


def _lse_triton(x, y, scale, two_way):
    n, k = x.shape[0], y.shape[0]
    # exp(t - offset) must neither overflow (t - offset <= 80 < 88) nor, for a whole row or column,
    # underflow: exact while a row or column has a logit within 167 of the largest possible |t|,
    # which always holds for unit features with scale <= 83, and in practice at CLIP's cap of 100.
    offset = _offset(x, y, scale)
    row = torch.zeros(n, device=x.device, dtype=torch.float32)
    col = torch.zeros(k if two_way else 0, device=x.device, dtype=torch.float32)
    meta = _tiles(x)
    # Enough programs to fill the GPU: split the columns when there are few row blocks.
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    blocks = triton.cdiv(n, meta["BM"])
    split = max(1, min(triton.cdiv(k, meta["BN"]), triton.cdiv(4 * sms, blocks)))
    _lse_fwd_kernel[(blocks, split)](x, y, scale.reshape(1), offset, row, col, n, k, x.shape[1], x.stride(0),
                                     x.stride(1), y.stride(0), y.stride(1), TWO_WAY=two_way, SPLIT=split, **meta)
    return row.log() + offset, col.log() + offset


def _mm_f32(a, b):
    # fp32 result of a half-precision product, accumulated and written in fp32 by cuBLAS where torch can
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8
            pass
    return (a @ b).float()


def _lse_backward_triton(x, y, scale, row, col, g_row, g_col, need_x, need_y):
    # The kernel writes scale * G for a chunk of rows into a workspace; dx and dy are then plain matrix
    # products (cuBLAS's speed) and each tile is recomputed once. Adding into dx and dy from inside the
    # kernel instead costs an atomic per element per tile, an order of magnitude slower.
    n, k, d = x.shape[0], y.shape[0], x.shape[1]
    two_way = col.numel() > 0
    meta = _tiles(x)
    bm, bn = meta["BM"], meta["BN"]
    rows = min(n, max(bm, max(WORKSPACE, 4 * k * d) // max(k, 1) // bm * bm))
    work = torch.empty(rows, k, device=x.device, dtype=x.dtype)
    dsp = torch.empty(triton.cdiv(rows, bm) * triton.cdiv(k, bn), device=x.device, dtype=torch.float32)
    # Full-size outputs even when not needed: the op's fake (for torch.compile) promises these shapes.
    dx = torch.empty_like(x) if need_x else torch.zeros_like(x)
    dy = torch.zeros(y.shape, device=x.device, dtype=torch.float32)
    ds = torch.zeros((), device=x.device, dtype=torch.float32)
    row, g_row = row.float(), g_row.float()
    col, g_col = (col.float(), g_col.float()) if two_way else (row, g_row)
    for i in range(0, n, rows):
        m = min(rows, n - i)
        g, xi = work[:m], x[i:i + m]
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bn))
        _grad_tile_kernel[grid](xi, y, scale.reshape(1), row[i:i + m], col, g_row[i:i + m], g_col, g, dsp, m, k, d,
                                xi.stride(0), xi.stride(1), y.stride(0), y.stride(1), g.stride(0),
                                TWO_WAY=two_way, **meta)
        ds += dsp[:grid[0] * grid[1]].sum()
        if need_x:
            torch.mm(g, y, out=dx[i:i + m])
        if need_y:
            dy += _mm_f32(g.T, xi)
    return dx, dy.to(y.dtype), ds.to(scale.dtype)


def _offset(a, b, scale):
    # The largest |logit| possible less 80: exp(t - offset) never overflows fp32 (see _lse_triton).
    bound = (scale.float().abs() * torch.linalg.vector_norm(a, dim=1, dtype=torch.float32).max()
             * torch.linalg.vector_norm(b, dim=1, dtype=torch.float32).max())
    return torch.clamp(bound - 80, min=0).reshape(1)
# ==== end of copy: kernel-triton ====


# ==== copied from clip.py: sigmoid (shared code, kept identical to clip.py's region) ====
def sigmoid_loss(image_features, text_features, logit_scale, logit_bias, group=None):
    """SigLIP's pairwise sigmoid loss over the global batch (Zhai et al. 2023; open_clip's SigLipLoss
    normalisation: the sum over every image-text pair, divided by the images of the batch).

    On one process it equals the naive form, which holds the whole B x B logit matrix:
        logits = logit_scale * image_features @ text_features.T + logit_bias
        labels = 2 * torch.eye(len(logits)) - 1          # +1 for the pair, -1 otherwise
        -F.logsigmoid(labels * logits).sum() / len(logits)
    Every pair's term stands alone, so the sum splits into softplus(logit) over all pairs, as if every
    pair were negative, less each positive's logit (-log sigmoid(u) = softplus(u) - u): the first part
    is sigmoid_tiles' row sums, the second a dot product per row. Each rank takes its own images
    against the texts of every rank (gathered with gradient); under DDP's gradient averaging the result
    is the exact gradient of the global mean. Every rank must pass the same number of rows.
    """
    text_features, pos = gather_texts(image_features, text_features, group)
    # rows averaged below: every row's gradient is the same, so the op may make the gradients in its forward
    eager = torch.is_grad_enabled() and any(t.requires_grad for t in (image_features, text_features, logit_scale, logit_bias))
    rows = sigmoid_tiles(image_features, text_features, logit_scale, logit_bias, eager)[0]
    pos_logit = ((image_features * text_features.index_select(0, pos)).sum(1).to(rows.dtype) * logit_scale.to(rows.dtype)
                 + logit_bias.to(rows.dtype))
    return (rows - pos_logit).mean()


# SigLIP's tiles: sigmoid_tiles(x, y, scale, bias, eager) -> sum_j softplus(t_ij) per row, t = scale *
# x @ y.T + bias (SigLIP's loss is that less the positive's logit: -log sigmoid(u) = softplus(u) - u).
# With P_ij = g_i * sigmoid(t_ij) for incoming row weights g:
#     dx = scale * P @ y,  dy = scale * P.T @ x,  d(scale) = sum(P * x @ y.T),  d(bias) = sum(P)
# sigmoid_loss averages the rows, so every g_i is the same g and these are g times the gradients for
# g = 1: when a gradient will be wanted (eager) the forward makes those from the same tiles and the
# backward only scales them, 3 B^2 D in all, as the naive form's one product forward and two backward.


def _sig_torch(x, y, scale, bias, grads):
    """Row sums of softplus(t), and with grads the gradients for g = 1 (else empty)."""
    n, k = x.shape[0], y.shape[0]
    acc = _acc_dtype(x)
    s, b = scale.to(acc), bias.to(acc)
    rows = torch.zeros(n, device=x.device, dtype=acc)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if grads else x.new_empty(0)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device) if grads else x.new_empty(0)
    dsb = torch.zeros(2, dtype=acc, device=x.device) if grads else x.new_empty(0, dtype=acc)
    for i in range(0, n, BLOCK):
        xi = x[i:i + BLOCK]
        for j in range(0, k, BLOCK):
            yj = y[j:j + BLOCK]
            raw = (xi @ yj.T).to(acc)
            t = raw * s + b
            rows[i:i + BLOCK] += F.softplus(t).sum(1)
            if grads:
                p = torch.sigmoid(t)
                dsb[0] += (p * raw).sum()
                dsb[1] += p.sum()
                p = p.to(x.dtype)
                dx[i:i + BLOCK] += (p @ yj).to(acc) * s
                dy[j:j + BLOCK] += (p.T @ xi).to(acc) * s
    return rows, dx.to(x.dtype), dy.to(y.dtype), dsb


@torch.library.custom_op(f"{_NS}::sigmoid_tiles", mutates_args=())
def sigmoid_tiles(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eager: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row sums [n], then for g = 1: dx, dy, and d(scale), d(bias) as [2]; the last three empty unless eager)."""
    if _use_triton(x):
        return _sig_triton(x.contiguous(), y.contiguous(), scale, bias, eager)
    return _sig_torch(x, y, scale, bias, eager)


@sigmoid_tiles.register_fake
def _sigmoid_tiles_fake(x, y, scale, bias, eager):
    acc, n = _acc_dtype(x), x.shape[0]
    if eager:
        return x.new_empty(n, dtype=acc), torch.empty_like(x), torch.empty_like(y), x.new_empty(2, dtype=acc)
    return x.new_empty(n, dtype=acc), x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=acc)


def _sig_setup(ctx, inputs, output):
    x, y, scale, bias, _ = inputs
    ctx.save_for_backward(scale, bias, *output[1:])


def _sig_backward(ctx, g, *_):
    scale, bias, dx, dy, dsb = ctx.saved_tensors
    if not dsb.numel():
        raise RuntimeError("sigmoid_tiles made no gradients: call it with eager=True when a gradient is wanted")
    c = g[0].to(dsb.dtype)  # the caller averages the rows: every g_i is g_0 (no check, no sync)
    need = ctx.needs_input_grad
    return (dx * c.to(dx.dtype) if need[0] else None, dy * c.to(dy.dtype) if need[1] else None,
            (dsb[0] * c).to(scale.dtype).reshape(scale.shape) if need[2] else None,
            (dsb[1] * c).to(bias.dtype).reshape(bias.shape) if need[3] else None, None)


sigmoid_tiles.register_autograd(_sig_backward, setup_context=_sig_setup)


if triton is not None:
    @triton.jit
    def _sig_tile_kernel(X, Y, SCALE, BIAS, ROWS, P, DSP, n, k, d, sxn, sxd, syn, syd, spn, GRAD: tl.constexpr,
                         PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        # One tile of t = scale * x @ y.T + bias: its softplus row sums (added atomically) and, GRAD,
        # scale * sigmoid(t) written out with the tile's shares of d(scale) and d(bias).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        s = tl.load(SCALE).to(tl.float32)
        raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
        t = raw * s + tl.load(BIAS).to(tl.float32)
        inside = (rm[:, None] < n) & (rn[None, :] < k)
        sp = tl.where(inside, tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t))), 0.0)  # softplus, stable
        tl.atomic_add(ROWS + rm, tl.sum(sp, 1), mask=rm < n)
        if GRAD:
            p = tl.where(inside, 1.0 / (1.0 + tl.exp(-t)), 0.0)
            at = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 2
            tl.store(DSP + at, tl.sum(tl.sum(p * raw, 1), 0))
            tl.store(DSP + at + 1, tl.sum(tl.sum(p, 1), 0))
            tl.store(P + rm[:, None] * spn + rn[None, :], (p * s).to(P.dtype.element_ty), mask=inside)


def _sig_triton(x, y, scale, bias, grads):
    # As _lse_backward_triton: the kernel writes a chunk of rows of scale * P into a workspace and dx, dy
    # are cuBLAS products of it; without grads, the row sums alone.
    n, k, d = x.shape[0], y.shape[0], x.shape[1]
    meta = _tiles(x)
    bm, bn = meta["BM"], meta["BN"]
    rows = torch.zeros(n, device=x.device, dtype=torch.float32)
    if not grads:
        _sig_tile_kernel[(triton.cdiv(n, bm), triton.cdiv(k, bn))](
            x, y, scale.reshape(1), bias.reshape(1), rows, rows, rows, n, k, d, x.stride(0), x.stride(1),
            y.stride(0), y.stride(1), 0, GRAD=False, **meta)
        return rows, x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    chunk = min(n, max(bm, max(WORKSPACE, 4 * k * d) // max(k, 1) // bm * bm))
    work = torch.empty(chunk, k, device=x.device, dtype=x.dtype)
    dsp = torch.empty(triton.cdiv(chunk, bm) * triton.cdiv(k, bn) * 2, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dy = torch.zeros(y.shape, device=x.device, dtype=torch.float32)
    dsb = torch.zeros(2, device=x.device, dtype=torch.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        p, xi = work[:m], x[i:i + m]
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bn))
        _sig_tile_kernel[grid](xi, y, scale.reshape(1), bias.reshape(1), rows[i:i + m], p, dsp, m, k, d, xi.stride(0),
                               xi.stride(1), y.stride(0), y.stride(1), p.stride(0), GRAD=True, **meta)
        dsb += dsp[:grid[0] * grid[1] * 2].view(-1, 2).sum(0)
        torch.mm(p, y, out=dx[i:i + m])
        dy += _mm_f32(p.T, xi)
    return rows, dx, dy.to(y.dtype), dsb
# ==== end of copy: sigmoid ====


if __name__ == "__main__":

    if sys.argv[1:2] != ["predict"]:
        raise SystemExit("usage: python clippo.py predict --ckpt CHECKPOINT --image A.jpg --labels 'a dog,a cat' "
                         "(the labels are rendered as images; train with: torchrun train.py --model clippo)")
    predict_main(sys.argv[2:])
