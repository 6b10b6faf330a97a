"""Data for every model: the embedded synthetic set, CSV/TSV files, and a deterministic loader.

A data set yields raw samples (dicts with a PIL 'image', a caption 'text' and whatever else it has:
'captions' paraphrases, 'texts' per language, 'label'); the model's transform turns a sample into
tensors inside the loader workers. Every random choice for a sample is drawn from (seed, epoch,
sample index), and global batch k always holds the same samples, so batches do not depend on the
number of ranks or loader workers, and a run resumes mid-epoch from its step alone.
"""
import csv
import os

import numpy as np
import torch
from PIL import Image


# Every random stream is seeded with a distinct non-zero last word: numpy's SeedSequence ignores
# trailing zeros, so [seed, 0, i] and [seed, 0, i, 0] would otherwise be one and the same stream.
CONTENT, CAPTION, AUGMENT, ORDER = 101, 102, 103, 104


class SampleError(Exception):
    """One unusable sample (unreadable image, empty caption): skipped and counted, never fatal."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason} {detail}".strip())
        self.reason = reason


# ----------------------------------------------------------------------------------------------
# The synthetic default: one coloured shape per image; class = colour x shape (40 classes)

# name, Chinese, German stem, RGB
COLORS = [("red", "红色", "rot", (220, 40, 40)), ("green", "绿色", "grün", (40, 190, 60)),
          ("blue", "蓝色", "blau", (50, 90, 235)), ("yellow", "黄色", "gelb", (235, 215, 40)),
          ("purple", "紫色", "violett", (150, 50, 200)), ("cyan", "青色", "türkis", (40, 210, 215)),
          ("orange", "橙色", "orangefarben", (245, 140, 20)), ("white", "白色", "weiß", (240, 240, 240))]
# name, Chinese, German noun, German gender
SHAPES = [("circle", "圆形", "Kreis", "m"), ("square", "正方形", "Quadrat", "n"),
          ("triangle", "三角形", "Dreieck", "n"), ("cross", "十字", "Kreuz", "n"), ("diamond", "菱形", "Raute", "f")]
SIZES = [("small", "小", "klein", (0.20, 0.26)), ("medium", "中等", "mittelgroß", (0.28, 0.34)),
         ("large", "大", "groß", (0.36, 0.44))]
# Dark, muted backgrounds, so no background is mistaken for an object's colour.
BACKGROUNDS = [("black", "黑色", "schwarz", (15, 15, 15)), ("gray", "灰色", "grau", (95, 95, 95)),
               ("brown", "棕色", "braun", (90, 60, 35)), ("navy", "深蓝色", "dunkelblau", (20, 25, 80)),
               ("dark green", "深绿色", "dunkelgrün", (25, 60, 30))]
POSITIONS = [("in the top left", "左上角", "oben links"), ("at the top", "上方", "oben"),
             ("in the top right", "右上角", "oben rechts"), ("on the left", "左边", "links"),
             ("in the center", "中间", "in der Mitte"), ("on the right", "右边", "rechts"),
             ("in the bottom left", "左下角", "unten links"), ("at the bottom", "下方", "unten"),
             ("in the bottom right", "右下角", "unten rechts")]

EN_TEMPLATES = ["a {size} {color} {shape} on a {bg} background",
                "a photo of a {color} {shape} {pos}",
                "{pos} there is a {size} {shape} colored {color}",
                "a {color} {shape} sits {pos} of a {bg} picture",
                "an image showing a {size} {color} {shape}"]
ZH_TEMPLATES = ["{bg}背景上的一个{size}的{color}{shape}", "一张{color}{shape}的照片，在{pos}", "{pos}有一个{size}的{color}{shape}"]
DE_TEMPLATES = ["{np} auf {bg}em Hintergrund", "{pos} ist {np}"]

ZEROSHOT_TEMPLATES = {"en": ["a photo of a {}.", "a picture of a {}.", "an image showing a {}.", "a {} on a background."],
                      "zh": ["一张{}的照片。", "一个{}。", "{}的图片。"],
                      "de": ["ein Foto: {}.", "{}."]}
_ENDING = {"m": "er", "n": "es", "f": "e"}


def _de_np(size, color, shape, gender):
    # German adjectives after "ein"/"eine" take the strong endings of the noun's gender.
    article = "eine" if gender == "f" else "ein"
    return f"{article} {size}{_ENDING[gender]} {color}{_ENDING[gender]} {shape}"


def classnames(lang="en"):
    names = []
    for c in COLORS:
        for s in SHAPES:
            names.append({"en": f"{c[0]} {s[0]}", "zh": f"{c[1]}{s[1]}", "de": f"{c[2]}{_ENDING[s[3]]} {s[2]}"}[lang])
    return names


def _shape_mask(shape, dx, dy):
    if shape == "circle":
        return dx ** 2 + dy ** 2 <= 1
    if shape == "square":
        return np.maximum(abs(dx), abs(dy)) <= 0.8
    if shape == "diamond":
        return abs(dx) + abs(dy) <= 1
    if shape == "triangle":  # apex up
        return (dy <= 0.75) & (abs(dx) <= 0.95 * (dy + 1) / 1.75)
    return ((abs(dx) <= 0.3) & (abs(dy) <= 1)) | ((abs(dy) <= 0.3) & (abs(dx) <= 1))  # cross


class Synthetic:
    """Procedural image-caption pairs, deterministic from (seed, split, index); 'val' is held out."""

    resolution = 64
    languages = ("en", "zh", "de")
    _grid = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5  # pixel centres, shared

    def __init__(self, seed=0, split="train", size=100_000, templates=0):
        # templates: how many English templates captions are drawn from (0: all); the others are
        # still offered as 'rewrites' (LaCLIP's text augmentation, compared with CLIP on 1 template).
        self.seed, self.split, self.size, self.n_templates = seed, split, size, templates or len(EN_TEMPLATES)
        self.split_id = {"train": 0, "val": 1}[split]
        self.classnames = {lang: classnames(lang) for lang in self.languages}
        self.templates = ZEROSHOT_TEMPLATES

    def __len__(self):
        return self.size

    def attributes(self, index):
        rng = np.random.default_rng([self.seed, self.split_id, index, CONTENT])
        c, s, z, b = (int(rng.integers(len(v))) for v in (COLORS, SHAPES, SIZES, BACKGROUNDS))
        r = rng.uniform(*SIZES[z][3]) * self.resolution
        cx, cy = rng.uniform(r, self.resolution - r, size=2)
        return rng, c, s, z, b, r, cx, cy

    def image(self, index):
        rng, c, s, z, b, r, cx, cy = self.attributes(index)
        n = self.resolution
        bg = np.array(BACKGROUNDS[b][3]) + rng.integers(-15, 16, size=3)
        fg = np.array(COLORS[c][3]) + rng.integers(-25, 26, size=3)
        yy, xx = self._grid
        mask = _shape_mask(SHAPES[s][0], (xx - cx) / r, (yy - cy) / r)
        img = np.where(mask[..., None], fg, bg) + rng.normal(0, 10, size=(n, n, 3)).astype(np.float32)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    def captions(self, index):
        """All captions of a sample: English paraphrases, and one sentence per other language."""
        _, c, s, z, b, r, cx, cy = self.attributes(index)
        pos = int(cy * 3 // self.resolution) * 3 + int(cx * 3 // self.resolution)
        en = [t.format(size=SIZES[z][0], color=COLORS[c][0], shape=SHAPES[s][0], bg=BACKGROUNDS[b][0],
                       pos=POSITIONS[pos][0]) for t in EN_TEMPLATES]
        en[2] = en[2][0].upper() + en[2][1:]
        zh = [t.format(size=SIZES[z][1], color=COLORS[c][1], shape=SHAPES[s][1], bg=BACKGROUNDS[b][1],
                       pos=POSITIONS[pos][1]) for t in ZH_TEMPLATES]
        np_de = _de_np(SIZES[z][2], COLORS[c][2], SHAPES[s][2], SHAPES[s][3])
        de = [t.format(np=np_de, bg=BACKGROUNDS[b][2], pos=POSITIONS[pos][2]) for t in DE_TEMPLATES]
        de[1] = de[1][0].upper() + de[1][1:]
        return en, zh, de, c * len(SHAPES) + s

    def sample(self, index, rng):
        en, zh, de, label = self.captions(index)
        k = int(rng.integers(self.n_templates))  # the caption of this epoch
        return {"image": self.image(index), "text": en[k], "captions": en, "label": label,
                "rewrites": en[:k] + en[k + 1:],
                "texts": {"en": en[k], "zh": zh[k % len(zh)], "de": de[k % len(de)]}}

    def caption_corpus(self, limit=5000):
        for i in range(min(limit, self.size)):
            en, zh, de, _ = self.captions(i)
            yield from en


# ----------------------------------------------------------------------------------------------
# CSV / TSV in open_clip's layout


class CsvData:
    """Image path and caption columns (open_clip's --csv-img-key / --csv-caption-key / --csv-separator)."""

    def __init__(self, path, img_key="filepath", caption_key="title", separator=None, rewrite_keys=(),
                 rewrite_files=()):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such data file; pass --data synthetic, a .csv/.tsv file, or fix the path")
        if separator is None:
            separator = "," if path.endswith(".csv") else "\t"
        self.path, self.root = path, os.path.dirname(os.path.abspath(path))
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter=separator)
            missing = [k for k in (img_key, caption_key, *rewrite_keys) if k not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{path}: no column {' or '.join(map(repr, missing))} (columns: {reader.fieldnames}); "
                                 f"name yours with --csv-img-key / --csv-caption-key / --rewrite-columns, "
                                 f"or set --csv-separator")
            rows = [(r[img_key], r[caption_key], [r[k] or "" for k in rewrite_keys]) for r in reader]
        if not rows:
            raise ValueError(f"{path}: no rows under the header")
        self.images, self.texts = [r[0] for r in rows], [r[1] for r in rows]
        # Rewrites: extra columns, and/or LaCLIP's layout of one text file per source aligned by line.
        self.rewrites = [r[2] for r in rows] if rewrite_keys or rewrite_files else None
        for rf in rewrite_files:
            if not os.path.isfile(rf):
                raise FileNotFoundError(f"{rf}: no such rewrite file (--rewrite-files)")
            with open(rf, encoding="utf-8") as f:
                lines = f.read().splitlines()
            if len(lines) != len(rows):  # a short file (a generator still running) leaves the rest without
                print(f"data.py: {rf} has {len(lines)} lines for {len(rows)} rows of {path}", flush=True)
            for i, r in enumerate(self.rewrites):
                r.append(lines[i] if i < len(lines) else "")

    def __len__(self):
        return len(self.images)

    def sample(self, index, rng):
        text = (self.texts[index] or "").strip()
        if not text:
            raise SampleError("empty caption")
        path = os.path.join(self.root, self.images[index])
        try:
            with Image.open(path) as img:
                img = img.convert("RGB")  # decodes now, so a truncated file fails here
        except FileNotFoundError:
            raise SampleError("missing image", path) from None
        except Exception as e:
            raise SampleError("unreadable image", f"{path} ({type(e).__name__}: {e})") from None
        sample = {"image": img, "text": text}
        if self.rewrites is not None:
            sample["rewrites"] = [r for r in self.rewrites[index] if r.strip()]
        return sample

    def caption_corpus(self, limit=100_000):
        return (t for t in self.texts[:limit] if t)


# ----------------------------------------------------------------------------------------------
# Loading batches


MAX_TRIES = 100


def load_sample(data, transform, index, epoch, seed, skips, notes=None):
    """data[index] through the transform; a bad sample is replaced by the next good one and counted.

    notes collects what is worth counting but not skipping (a sample without its rewrites)."""
    first_error = None
    for t in range(MAX_TRIES):
        i = (index + t) % len(data)
        try:
            sample = data.sample(i, np.random.default_rng([seed, epoch, i, CAPTION]))
            out = transform(sample, np.random.default_rng([seed, epoch, i, AUGMENT]))
        except SampleError as e:
            skips.append(e.reason)
            first_error = first_error or f"sample {i}: {e}"
            continue
        if "label" in sample:
            out["label"] = torch.tensor(sample["label"])
        if notes is not None and "rewrites" in sample and not sample["rewrites"]:
            notes.append("no rewrites: original caption used")
        return out
    raise RuntimeError(f"{getattr(data, 'path', 'data')}: {MAX_TRIES} samples in a row could not be read "
                       f"(first: {first_error}); check the image paths and captions")


def collate(items):
    return {k: torch.stack([it[k] for it in items]) for k in items[0]}


class TrainBatches(torch.utils.data.Dataset):
    """Item k is this rank's share of global batch k of an endless stream of shuffled epochs."""

    def __init__(self, data, transform, batch_size, rank=0, world=1, seed=0):
        self.data, self.transform, self.b, self.rank, self.world, self.seed = data, transform, batch_size, rank, world, seed
        self._perm = (None, None)

    def __len__(self):
        return 2 ** 62

    def order(self, epoch):
        if self._perm[0] != epoch:
            self._perm = (epoch, np.random.default_rng([self.seed, epoch, ORDER]).permutation(len(self.data)))
        return self._perm[1]

    def __getitem__(self, k):
        skips, notes, items = [], [], []
        first = k * self.b * self.world + self.rank * self.b
        for p in range(first, first + self.b):
            epoch, i = divmod(p, len(self.data))
            items.append(load_sample(self.data, self.transform, int(self.order(epoch)[i]), epoch, self.seed, skips, notes))
        batch = collate(items)
        batch["_skips"], batch["_notes"] = skips, notes
        return batch


class EvalBatches(torch.utils.data.Dataset):
    """The data in order, this rank's contiguous share, in batches."""

    def __init__(self, data, transform, batch_size, rank=0, world=1, seed=0):
        n = len(data)
        self.lo, self.hi = rank * n // world, (rank + 1) * n // world
        self.data, self.transform, self.b, self.seed = data, transform, batch_size, seed

    def __len__(self):
        return -(-(self.hi - self.lo) // self.b)

    def __getitem__(self, k):
        skips = []
        idx = range(self.lo + k * self.b, min(self.hi, self.lo + (k + 1) * self.b))
        batch = collate([load_sample(self.data, self.transform, i, 0, self.seed, skips) for i in idx])
        batch["_skips"], batch["_notes"] = skips, []
        return batch


def _worker_init(_):
    torch.set_num_threads(1)


def loader(batches, start=0, stop=None, workers=0):
    """Batches start..stop-1 of a TrainBatches / EvalBatches, each built whole by one worker."""
    stop = len(batches) if stop is None else stop
    return torch.utils.data.DataLoader(batches, batch_size=None, sampler=range(start, stop), num_workers=workers,
                                       worker_init_fn=_worker_init, prefetch_factor=4 if workers else None,
                                       persistent_workers=False)


def build(args):
    """(train, val) data sets from the command line."""
    if args.data == "synthetic":
        return (Synthetic(args.seed, "train", args.synthetic_size, args.synthetic_templates),
                Synthetic(args.seed, "val", args.val_size))
    kw = dict(img_key=args.csv_img_key, caption_key=args.csv_caption_key, separator=args.csv_separator)
    split = lambda v: [x for x in (v or "").split(",") if x]  # noqa: E731
    train = CsvData(args.data, rewrite_keys=split(args.rewrite_columns), rewrite_files=split(args.rewrite_files), **kw)
    val = CsvData(args.val_data, **kw) if args.val_data else None
    return train, val


def add_args(parser):
    parser.add_argument("--data", default="synthetic", help="'synthetic' (embedded default) or a .csv/.tsv file")
    parser.add_argument("--val-data", default=None, help="held-out .csv/.tsv for retrieval metrics")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default=None, help="default: ',' for .csv, tab otherwise")
    parser.add_argument("--synthetic-size", type=int, default=100_000, help="samples in a synthetic epoch")
    parser.add_argument("--val-size", type=int, default=1000, help="held-out synthetic samples for eval")
    parser.add_argument("--synthetic-templates", type=int, default=0,
                        help="draw synthetic captions from the first N English templates only (0: all)")
    parser.add_argument("--rewrite-columns", default=None, help="CSV columns holding caption rewrites, comma-separated")
    parser.add_argument("--rewrite-files", default=None,
                        help="text files of rewrites, one per source, aligned by line with --data (LaCLIP's layout)")
