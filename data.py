"""Data for every model: the embedded synthetic set, CSV/TSV files, tar shards, and a deterministic loader.

A data set yields raw samples (dicts with a PIL 'image', a caption 'text' and whatever else it has:
'rewrites', 'texts' per language, 'label', detector 'boxes'); the model's transform turns a sample
into tensors inside the loader workers, and the loader hands out (batch, info) pairs, info saying
which samples were skipped and why. Every random choice for a sample is drawn from (seed, epoch,
sample index), a shard sample's from (seed, epoch, its key). Synthetic and CSV data: global batch k
always holds the same samples, so batches do not depend on the number of ranks or loader workers, and
a run resumes mid-epoch from its step alone.
Shards are streamed: each loader slot (rank x worker) reads its shards through a shuffle buffer, and
a checkpoint records each slot's position (Position), so a resume with the same ranks and workers
continues the stream exactly.
"""
import contextlib
import copy
import csv
import hashlib
import io
import json
import math
import os
import re
import stat
import sys
import tarfile
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image


# Every random stream is seeded with a distinct non-zero last word: numpy's SeedSequence ignores
# trailing zeros, so [seed, 0, i] and [seed, 0, i, 0] would otherwise be one and the same stream.
CONTENT, CAPTION, AUGMENT, ORDER = 101, 102, 103, 104


class DataError(RuntimeError):
    """The data as a whole cannot be used (every sample in a row unreadable): the message names the files."""


class SampleError(Exception):
    """One unusable sample (unreadable image, empty caption): skipped and counted, never fatal."""

    def __init__(self, reason, detail=""):
        super().__init__(f"{reason} {detail}".strip())
        self.reason = reason


def sample_reason(e):
    """The reason a sample is skipped under, for any exception its read, decode or transform raised: a
    scraped sample may be malformed in ways nobody listed, and one of them must never end a run. A bug of
    ours fails every sample alike, so it still stops the run (MAX_TRIES in a row), its type named."""
    if isinstance(e, SampleError) or isinstance(getattr(e, "reason", None), str):  # a model's own reason too
        return e.reason
    if isinstance(e, UnicodeError):
        return "bad text"
    if isinstance(e, (OSError, SyntaxError)):  # what Pillow raises for a damaged image
        return getattr(e, "reason", "unreadable image")
    return f"bad sample ({type(e).__name__})"


# A caption longer than this is cut here, before any tokenizer (or BPE trainer) sees it: tokenizers keep
# at most a few hundred tokens, and their cost grows with the text's length.
MAX_TEXT_CHARS = 8192


def clean_caption(value, where, what="caption"):
    """An outside text as the models may take it: a str (else SampleError 'bad text'), cut to
    MAX_TEXT_CHARS, lone surrogates (a JSON '\\ud800', undecodable bytes) replaced, stripped."""
    if not isinstance(value, str):
        raise SampleError("bad text", f"{where}: the {what} is a {type(value).__name__}, not text")
    value = value[:MAX_TEXT_CHARS]
    if has_surrogate(value):
        value = value.encode("utf-8", "replace").decode("utf-8")
    return value.strip()


def _no_constant(name):
    raise ValueError(f"{name} is not JSON")


def parse_json(payload, where):
    """A sample's .json member as a dict, or SampleError 'bad json': not UTF-8, not JSON, NaN or Infinity
    (not JSON, though Python's parser takes them), nested past the parser's depth, or not an object."""
    try:
        meta = json.loads(payload.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError) as e:
        raise SampleError("bad json", f"{where}.json ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise SampleError("bad json", f"{where}.json holds a {type(meta).__name__}, not an object")
    return meta


# The raster formats a sample may be in: Pillow opens others too, EPS among them, whose decode runs the
# file as a PostScript program in Ghostscript where that is installed.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
# A progressive JPEG decodes every pixel once a scan: encoders write about 10 (libjpeg's default), a
# crafted file thousands in a few hundred kB (1,010 scans of 6000 x 6000: 23 s). At 100 a sample at the
# pixel cap decodes in about 2.5 s on one core (docs/robustness.md).
MAX_JPEG_SCANS = 100


def open_image(payload, where):
    """A PIL image of an image file's bytes with only its header read. The model's transform decodes
    it, and may first ask the JPEG decoder for a smaller version (draft mode) where its crop allows,
    or hand the file's bytes (img.encoded) on to be decoded on the GPU (--gpu-decode). What the decode
    would cost is bounded here, before it: the format, and a JPEG's scans (each a pass over the pixels;
    their markers cannot occur inside a scan's data, where a 0xFF byte is always followed by 0x00)."""
    try:
        img = Image.open(io.BytesIO(payload), formats=IMAGE_FORMATS)
    except Exception as e:
        raise SampleError("unreadable image", f"{where} ({type(e).__name__}: {e})") from None
    scans = payload.count(b"\xff\xda") if img.format in ("JPEG", "MPO") else 0
    if scans > MAX_JPEG_SCANS:
        raise SampleError("too many scans", f"{where} ({scans} JPEG scans, over the cap of {MAX_JPEG_SCANS})")
    img.source, img.encoded = where, payload
    return img


def apply(transform, sample, rng, where):
    """transform(sample, rng). The pixels decode in there, so a truncated or corrupt image fails there:
    PIL raises OSError (SyntaxError for some PNG damage), which becomes a SampleError naming the file;
    an image over the model's pixel cap raises an OSError whose reason says so."""
    try:
        return transform(sample, rng)
    except (OSError, SyntaxError) as e:
        where = getattr(sample.get("image"), "source", where)
        raise SampleError(getattr(e, "reason", "unreadable image"), f"{where} ({type(e).__name__}: {e})") from None


# A sample's files are read whole into memory: larger ones are skipped unread (--max-sample-bytes).
MAX_SAMPLE_BYTES = 64 << 20


def read_file(path, max_bytes=MAX_SAMPLE_BYTES):
    """A data file's bytes. Only a regular file is read: a FIFO would block the run and a device never
    end (they are opened without blocking, then refused); a file over max_bytes is skipped unread."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SampleError("missing image", path) from None
    except OSError as e:
        raise SampleError("unreadable image", f"{path} ({type(e).__name__}: {e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_size > max_bytes:
        os.close(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SampleError("not a regular file", f"{path} (a FIFO, device, socket or folder)")
        raise SampleError("sample too large", f"{path} ({st.st_size} bytes, over --max-sample-bytes {max_bytes})")
    with os.fdopen(fd, "rb") as f:
        try:
            payload = f.read(max_bytes + 1)
        except OSError as e:
            raise SampleError("unreadable image", f"{path} ({type(e).__name__}: {e})") from None
    if len(payload) > max_bytes:  # it grew after the size was read
        raise SampleError("sample too large", f"{path} (over --max-sample-bytes {max_bytes})")
    return payload


def read_table(path, separator, max_bytes=MAX_SAMPLE_BYTES):
    """[(line number, fields or a reason it cannot be read)] of a CSV/TSV file, its header first.

    Tab-separated files are read as their writers mean them: one row a line, split at tabs, no quote
    processing (a stray quote in a caption cannot swallow the rows after it); a field wholly in
    double quotes is unquoted. Comma-separated files follow the CSV rules; a quoted field that runs
    over lines is said once. A line that is not UTF-8 is kept as its reason, to be skipped and counted
    when its sample is drawn: one bad line never refuses the whole file, nor does a field over
    max_bytes (the sample cap; Python's csv module would stop the file at 131,072 characters)."""
    text = read_text(path, None, "data file").decode("utf-8", "surrogateescape")  # bad bytes: lone surrogates
    if text.startswith("\ufeff"):  # a byte-order mark, as spreadsheet programs write
        text = text[1:]
    rows = []
    if separator == "\t":
        for i, line in enumerate(text.split("\n"), 1):  # only \n ends a row: \u2028 in a caption does not
            line = line[:-1] if line.endswith("\r") else line
            if line.strip():
                rows.append((i, [unquote(field) for field in line.split("\t")]))
    else:
        csv.field_size_limit(max(len(text) + 1, 131_072))  # no field can be longer than the file
        reader = csv.reader(io.StringIO(text, newline=""), delimiter=separator)
        start, spans = 1, []
        for fields in reader:
            if any(field.strip() for field in fields):
                rows.append((start, fields))
            if reader.line_num > start and any("\n" in field for field in fields):
                spans.append(start)
            start = reader.line_num + 1
        if spans:
            print(f"data.py: {path}: {len(spans)} quoted fields run over several lines (first: line {spans[0]}); "
                  f"each was read as one row. An unbalanced quote? Check those lines", file=sys.stderr)
    return [(i, "not UTF-8" if any(has_surrogate(f) for f in fields) else
             f"a field over --max-sample-bytes {max_bytes}" if any(len(f) > max_bytes for f in fields) else fields)
            for i, fields in rows]


def read_text(path, max_bytes, what="file"):
    """The bytes of a file a command was given (a data table, rewrites, class names, templates): a
    regular file only (a FIFO would block, /dev/zero never end), at most max_bytes (None: its size)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such {what}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file (a FIFO, device or folder); pass a {what}")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"{path}: {st.st_size} bytes, over the {max_bytes} a {what} may have")
        data = f.read(st.st_size + 1)
    if len(data) > st.st_size:
        raise ValueError(f"{path}: grew while it was read; pass a finished {what}")
    return data


def unquote(field):
    if len(field) >= 2 and field[0] == field[-1] == '"' and '"' not in field[1:-1].replace('""', ""):
        return field[1:-1].replace('""', '"')
    return field


def has_surrogate(s):
    try:  # in C: a lone surrogate (an undecodable byte, above) does not encode
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


# ----------------------------------------------------------------------------------------------
# Writing: every file a command writes (checkpoints, metrics, shards, exports, reports) goes through
# write_file, and every folder a command fills is held by lock_folder while it does


def write_file(path, payload):
    """path <- payload (str, bytes, or a function writing into a binary file), whole or not at all: written
    under a new temporary name beside it (never through a link someone left there), flushed, then renamed
    over path, which replaces a link rather than its target. Something at path that is not a regular
    file (a folder, link, FIFO, device) is one OSError naming it: nothing is written into it or through it."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"{path}: exists and is not a regular file (a folder, link, FIFO or device); move it "
                                f"away or write elsewhere")
    tmp = f"{path}.tmp{os.getpid()}"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)  # what a killed writer of this pid left; a link there goes, its target stays
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    try:
        with open(tmp, "wb", opener=lambda p, _: os.open(p, flags, 0o644)) as f:
            if callable(payload):
                payload(f)
            else:
                f.write(payload.encode("utf-8") if isinstance(payload, str) else payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def fingerprint(path):
    """sha256 of a file's bytes, or of a folder's regular files (names, sizes and bytes, one level): what a
    run depends on (a teacher, a tokenizer, --init weights), recorded so a resume can tell it changed."""
    h = hashlib.sha256()
    files = [path] if not os.path.isdir(path) else sorted(
        os.path.join(path, f) for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))
    for f in files:
        h.update(f"{os.path.basename(f)}\0{os.path.getsize(f)}\0".encode("utf-8", "replace"))
        with open(f, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as stream:
            if not stat.S_ISREG(os.fstat(stream.fileno()).st_mode):
                raise ValueError(f"{f}: not a regular file")
            for block in iter(lambda: stream.read(1 << 24), b""):
                h.update(block)
    return h.hexdigest()


def open_append(path, binary=False):
    """A text file (or binary) opened to add at its end (metrics.jsonl, rewrites, scores), created if
    missing: never through a link, never a FIFO, device or folder (one OSError naming it instead)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0), 0o644)
    except OSError as e:
        raise OSError(f"{path}: cannot be appended to ({e.strerror}): a link, folder or special file there? Move it "
                      f"away") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(f"{path}: not a regular file (a FIFO or device); move it away")
    return os.fdopen(fd, "ab") if binary else os.fdopen(fd, "a", encoding="utf-8", newline="\n")


_locks = {}  # folder -> the open lock file of this process's command there


def lock_folder(folder, who, name=".lock"):
    """Hold FOLDER/NAME (pid and host inside) until unlock_folder or the process ends: a second command
    writing the same folder is refused in one line instead of interleaving its files with the first's.
    The lock is the kernel's (flock), so a command that dies in any way releases it; the file is opened
    without following a link, and one that vanished as it was opened is tried again."""
    import fcntl
    import socket

    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:  # a file of that name, a path through a file, no permission
        raise SystemExit(f"{who}: cannot make the folder {folder} ({e.strerror}); pass a new folder") from None
    path = os.path.join(folder, name)
    for _ in range(10):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK, 0o644)
        except OSError as e:  # a link (ELOOP), a folder, a FIFO with no reader
            raise SystemExit(f"{who}: cannot lock {path} ({e.strerror}): remove what is there, or use another "
                             f"folder") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise SystemExit(f"{who}: {path} is not a regular file: remove it, or use another folder")
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "a process"
            os.close(fd)
            raise SystemExit(f"{who}: {folder} is in use by another command ({holder}, holding {path}); wait for it to "
                             f"end, or pass another folder") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.lstat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            _locks[folder] = (fd, path)
            return
        os.close(fd)  # the holder removed it as we opened it: lock the new one
    raise SystemExit(f"{who}: could not lock {path}; is another command starting on {folder}?")


def unlock_folder(folder):
    fd, path = _locks.pop(folder, (None, None))
    if fd is not None:
        with contextlib.suppress(OSError):
            os.remove(path)  # removed while still held: no one can lock the old file after
        os.close(fd)


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


_NOISE = []
MAX_RESOLUTION = 512  # 512 x 512 x 3 noise values fit in the table's 2^20


def _noise():
    if not _NOISE:  # once per process: 4 MB, the same in every process (its seed is fixed)
        _NOISE.append(np.random.default_rng([0, CONTENT]).normal(0, 10, size=1 << 20).astype(np.float32))
    return _NOISE[0]


class Synthetic:
    """Procedural image-caption pairs, deterministic from (seed, split, index); 'val' is held out."""

    languages = ("en", "zh", "de")

    def __init__(self, seed=0, split="train", size=100_000, templates=0, parallel=False, resolution=64):
        # templates: how many English templates captions are drawn from (0: all); the others are
        # still offered as 'rewrites' (LaCLIP's text augmentation, compared with CLIP on 1 template).
        # parallel: text only (no image is drawn), captions in every language (AltCLIP's stage 1).
        # resolution: the images' side; drawn at the model's input size they need no resize, and
        # every resolution draws the same scene (shape, place and size are fractions of the side).
        if not 8 <= resolution <= MAX_RESOLUTION:  # the noise table holds one image of at most this side
            raise ValueError(f"--synthetic-resolution {resolution}: choose 8 to {MAX_RESOLUTION} pixels")
        self.seed, self.split, self.size, self.n_templates = seed, split, size, templates or len(EN_TEMPLATES)
        self.parallel, self.resolution = parallel, resolution
        self._grid = np.mgrid[0:resolution, 0:resolution].astype(np.float32) + 0.5  # pixel centres
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

    def image(self, index, scene=None):
        rng, c, s, z, b, r, cx, cy = scene or self.attributes(index)
        n = self.resolution
        bg = np.array(BACKGROUNDS[b][3], np.float32) + rng.integers(-15, 16, size=3)
        fg = np.array(COLORS[c][3], np.float32) + rng.integers(-25, 26, size=3)
        yy, xx = self._grid
        mask = _shape_mask(SHAPES[s][0], (xx - cx) / r, (yy - cy) / r)
        # Pixel noise (std 10): a window of one table of normal draws, at a place drawn per image. A
        # fresh draw per image made the data cost a third of the default run's step on two cores.
        start = int(rng.integers(len(_noise()) - n * n * 3))
        img = np.where(mask[..., None], fg, bg) + _noise()[start:start + n * n * 3].reshape(n, n, 3)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))

    def captions(self, index, scene=None):
        """All captions of a sample: English paraphrases, and one sentence per other language."""
        _, c, s, z, b, r, cx, cy = scene or self.attributes(index)
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
        scene = self.attributes(index)  # drawn once for the captions and the image
        en, zh, de, label = self.captions(index, scene)
        k = int(rng.integers(self.n_templates))  # the caption of this epoch
        sample = {"text": en[k], "captions": en, "label": label, "rewrites": en[:k] + en[k + 1:],
                  "texts": {"en": en[k], "zh": zh[k % len(zh)], "de": de[k % len(de)]}}
        if not self.parallel:
            sample["image"] = self.image(index, scene)
        return sample

    def caption_corpus(self, limit=5000):
        for i in range(min(limit, self.size)):
            en, zh, de, _ = self.captions(i)
            yield from (en + zh + de) if self.parallel else en


# ----------------------------------------------------------------------------------------------
# CSV / TSV in open_clip's layout


class CsvData:
    """Image path and caption columns (open_clip's --csv-img-key / --csv-caption-key / --csv-separator)."""

    def __init__(self, path, img_key="filepath", caption_key="title", separator=None, rewrite_keys=(),
                 rewrite_files=(), max_bytes=MAX_SAMPLE_BYTES):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such data file; pass --data synthetic, a .csv/.tsv file, or fix the path")
        if separator is None:
            separator = "," if path.endswith(".csv") else "\t"
        self.path, self.root, self.max_bytes = path, os.path.dirname(os.path.abspath(path)), max_bytes
        table = read_table(path, separator, max_bytes)
        header = table[0][1] if table and not isinstance(table[0][1], str) else None
        missing = [k for k in (img_key, caption_key, *rewrite_keys) if k not in (header or [])]
        if missing:
            raise ValueError(f"{path}: no column {' or '.join(map(repr, missing))} (columns: {header}); "
                             f"name yours with --csv-img-key / --csv-caption-key / --rewrite-columns, "
                             f"or set --csv-separator")
        columns = [header.index(k) for k in (img_key, caption_key, *rewrite_keys)]
        rows, self.bad = [], {}  # bad: row -> why it cannot be read (skipped and counted when drawn)
        for line, fields in table[1:]:
            if isinstance(fields, str) or len(fields) != len(header):
                why = fields if isinstance(fields, str) else f"{len(fields)} fields, not {len(header)}"
                self.bad[len(rows)] = f"{path}:{line}: {why}"
                fields = [""] * len(header)
            rows.append((fields[columns[0]], fields[columns[1]], [fields[c] for c in columns[2:]]))
        if not rows:
            raise ValueError(f"{path}: no rows under the header")
        if self.bad:
            print(f"data.py: {path}: {len(self.bad)} of {len(rows)} rows cannot be read and will be skipped "
                  f"(first: {next(iter(self.bad.values()))})", file=sys.stderr)
        self.images, self.texts = [r[0] for r in rows], [r[1] for r in rows]
        # Rewrites: extra columns, and/or LaCLIP's layout of one text file per source aligned by line.
        self.rewrites = [r[2] for r in rows] if rewrite_keys or rewrite_files else None
        for rf in rewrite_files:
            # one rewrite a line: only \n ends a line (a \u2028 inside a rewrite must not shift the rest)
            text = read_text(rf, None, "rewrite file (--rewrite-files)").decode("utf-8", "replace")
            lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
            if lines and lines[-1] == "":
                lines.pop()
            if len(lines) != len(rows):  # a short file (a generator still running) leaves the rest without
                print(f"data.py: {rf} has {len(lines)} lines for {len(rows)} rows of {path}", flush=True)
            for i, r in enumerate(self.rewrites):
                r.append(lines[i] if i < len(lines) else "")

    def __len__(self):
        return len(self.images)

    def sample(self, index, rng):
        if index in self.bad:
            raise SampleError("unreadable row", self.bad[index])
        where = f"{self.path} row {index + 2}"
        text = clean_caption(self.texts[index] or "", where)
        if not text:
            raise SampleError("empty caption", where)
        path = os.path.join(self.root, self.images[index])
        sample = {"image": open_image(read_file(path, self.max_bytes), path), "text": text}
        if self.rewrites is not None:
            rewrites = (clean_caption(r, where, "rewrite") for r in self.rewrites[index])
            sample["rewrites"] = [r for r in rewrites if r]
        return sample

    def caption_corpus(self, limit=100_000):
        return (t for t in self.texts[:limit] if t)


class ParallelText:
    """Translations, no images (AltCLIP's stage 1): a TSV/CSV whose English column is --csv-caption-key
    (or 'en'); every other column is a language. A file without that header reads as English, then
    one translation per line."""

    def __init__(self, path, caption_key="title", separator=None):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such data file; pass a TSV of (english, translation) lines")
        if separator is None:
            separator = "," if path.endswith(".csv") else "\t"
        self.path = path
        table = read_table(path, separator)
        rows = [fields if not isinstance(fields, str) else None for _, fields in table]
        self.lines = [line for line, _ in table]
        if not rows or rows[0] is None:
            raise ValueError(f"{path}: empty file, or a first line that is not UTF-8")
        header = rows[0]
        english = caption_key if caption_key in header else "en" if "en" in header else None
        if english is None:  # no header: english, then translations
            header = ["en"] + [f"text{i}" for i in range(1, max(len(r) for r in rows if r))]
            english = "en"
        else:
            rows, self.lines = rows[1:], self.lines[1:]
        if len(header) < 2:
            raise ValueError(f"{path}: one column only; parallel text needs the English and at least one translation "
                             f"(set --csv-separator if the columns are not tab-separated)")
        self.en = header.index(english)
        self.header, self.rows = header, rows

    def __len__(self):
        return len(self.rows)

    def sample(self, index, rng):
        row, line = self.rows[index], self.lines[index]
        if row is None:
            raise SampleError("unreadable row", f"{self.path}:{line}: not UTF-8")
        if len(row) != len(self.header):
            raise SampleError("malformed line", f"{self.path}:{line}: {len(row)} fields, not {len(self.header)}")
        where = f"{self.path}:{line}"
        texts = {("en" if i == self.en else name): clean_caption(t, where) for i, (name, t) in enumerate(zip(self.header, row))}
        if not all(texts.values()):
            raise SampleError("empty caption", f"{self.path}:{line}")
        return {"text": texts["en"], "texts": texts}

    def caption_corpus(self, limit=100_000):
        return (t for r in self.rows[:limit] if r for t in r if t.strip())


# ----------------------------------------------------------------------------------------------
# Tar shards in the webdataset / img2dataset layout, read as streams with the standard library

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def expand_braces(pattern):
    """'d/{00000..00123}.tar' (zero padding kept) and 'd/{a,b}.tar', any number of braces."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    r = re.fullmatch(r"(\d+)\.\.(\d+)", m.group(1))
    items = [str(i).zfill(len(r.group(1))) for i in range(int(r.group(1)), int(r.group(2)) + 1)] if r \
        else m.group(1).split(",")
    return [x for item in items for x in expand_braces(pattern[:m.start()] + item + pattern[m.end():])]


def is_shards(spec):
    return spec is not None and spec != "synthetic" and all(
        s.endswith(".tar") or os.path.isdir(s) or "{" in s for s in spec.split("::"))


def shard_list(spec, weights=None):
    """(paths, per-shard weights) from 'A/{000..099}.tar::B/{000..009}.tar' (or folders of .tar files)."""
    sources = spec.split("::")
    factors = [float(w) for w in weights.split("::")] if weights else [1.0] * len(sources)
    if len(factors) != len(sources):
        raise ValueError(f"--data-weights has {len(factors)} values for {len(sources)} sources in --data")
    paths, per_shard = [], []
    for source, factor in zip(sources, factors):
        found = sorted(os.path.join(source, f) for f in os.listdir(source) if f.endswith(".tar")) \
            if os.path.isdir(source) else expand_braces(source)
        present = [f for f in found if os.path.isfile(f)]
        if not present:
            raise FileNotFoundError(f"{source}: no shard found (first expected: {found[0] if found else source}); "
                                    f"check the path and the {{000..999}} range")
        if len(present) < len(found):  # img2dataset leaves gaps where a shard failed to download
            print(f"data.py: {len(found) - len(present)} of {len(found)} shards of {source} are missing "
                  f"(e.g. {next(f for f in found if f not in present)}); training on the rest", file=sys.stderr)
        paths += present
        per_shard += [factor] * len(present)
    return paths, np.array(per_shard) / sum(per_shard)


# The members a sample's decode reads; others (img2dataset's .parquet rows, extra views, masks) are
# passed over unread, so they neither fill the shuffle buffer nor count against the sample's bytes.
MAX_TEACHERS = 16  # teachers a reinforced shard may store (data.py reinforce writes at most as many)
READ_EXTS = {"txt", "json", "cls", *IMAGE_EXTS, *(f"teacher{m}.npy" for m in range(MAX_TEACHERS))}


def read_shard(path, problems, max_bytes=MAX_SAMPLE_BYTES):
    """Yield (key, {extension: bytes}) for the samples of a tar, members grouped by webdataset's key
    (the path up to the first dot of the file name). A damaged tar ends early, and says so. Only the
    READ_EXTS members are read, and a sample's at most max_bytes of them: past that the rest are not
    read (the stream skips past them) and its group says so under TOO_LARGE."""
    key, group, n, size = None, {}, 0, 0
    try:
        with tarfile.open(path, "r|*") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                folder, name = os.path.split(member.name)
                if "." not in name or name.startswith("."):
                    continue
                stem, ext = name.split(".", 1)
                if (folder, stem) != key:
                    if group:
                        yield key[1], group
                        n += 1
                    key, group, size = (folder, stem), {}, 0
                ext = ext.lower()
                if ext not in READ_EXTS:
                    group.setdefault(UNREAD, 0)  # a sample of unread members only is still a sample
                    continue
                size += member.size
                if size > max_bytes or TOO_LARGE in group:
                    if TOO_LARGE not in group:  # what was read of it goes: only the reason stays buffered
                        group.clear()
                        group[TOO_LARGE] = f"{member.name}: the sample's members pass --max-sample-bytes {max_bytes}"
                    continue
                group[ext] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, OSError) as e:
        problems.append("truncated or unreadable shard")
        print(f"data.py: {path}: {type(e).__name__}: {e}; the samples before the damage are used", file=sys.stderr)
        return  # the group being read when the damage hit may be incomplete: dropped
    if group:
        yield key[1], group
        n += 1
    if n == 0:
        problems.append("empty shard")


TOO_LARGE = ""  # keys no file extension can be
UNREAD = "/"


def decode_sample(key, group, path, teachers=None):
    """{'image', 'text'} plus what a .json member holds ('rewrites', 'texts', 'label', 'boxes'), or SampleError."""
    where = f"{path}:{key}"
    if TOO_LARGE in group:
        raise SampleError("sample too large", f"{path}:{group[TOO_LARGE]}")
    meta = parse_json(group["json"], where) if "json" in group else {}
    text = clean_caption(group["txt"].decode("utf-8", "replace"), where) if "txt" in group else ""
    if not text:
        raise SampleError("missing or empty caption", where)
    ext = next((e for e in IMAGE_EXTS if e in group), None)
    if ext is None:
        raise SampleError("no image", where)
    sample = {"image": open_image(group[ext], f"{where}.{ext}"), "text": text}
    if isinstance(meta.get("rewrites"), list):
        rewrites = (clean_caption(r, where, "rewrite") for r in meta["rewrites"][:MAX_REWRITES] if isinstance(r, str))
        sample["rewrites"] = [r for r in rewrites if r]
    if isinstance(meta.get("texts"), dict):
        sample["texts"] = {str(lang)[:32]: clean_caption(t, where, f"{lang} text") for lang, t in meta["texts"].items()}
    if "boxes" in meta:  # detector boxes (BriVL): [[x0, y0, x1, y1], ...] in the image's pixels
        boxes = meta["boxes"]
        if not (isinstance(boxes, list) and all(isinstance(b, list) and len(b) == 4 and
                                                 all(isinstance(c, (int, float)) for c in b) for b in boxes)):
            raise SampleError("bad boxes", f"{where}.json: 'boxes' must be a list of [x0, y0, x1, y1]")
        sample["boxes"] = boxes
    if "teacher" in meta:  # clip.py reinforce's stored teachers (MobileCLIP's reinforced data)
        sample["teacher"] = stored_teacher(meta["teacher"], group, 1 + len(sample.get("rewrites", ())), where, teachers)
    label = meta.get("label", group.get("cls"))
    if isinstance(label, bytes) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, int) and not isinstance(label, bool) and 0 <= label < 2 ** 31:  # else not a class
        sample["label"] = label
    return sample


MAX_REWRITES = 64  # a sample's rewrites read (clip.py reinforce stores as many)
MAX_AUGMENTATIONS = 1024  # stored crops per sample (clip.py reinforce's --augmentations)
MAX_SCALE = 1000.0  # a stored teacher's logit scale, and |bias|: CLIP clamps its scale at 100


def stored_teacher(spec, group, texts, where, teachers=None):
    """A reinforced sample's teachers (data.py reinforce): {'augmentations': K, 'seed', 'scales', 'biases',
    'embeddings': [float32 [K + texts, E] per teacher]}: rows 0..K-1 the teacher's embeddings of the K
    stored crops, then one per text (the caption, then each rewrite). Checked whole, and against the
    teachers the shards' manifests name (read_manifests), if given: a bad one is SampleError 'bad
    teacher data'."""
    def bad(why):
        return SampleError("bad teacher data", f"{where}: {why}")

    if not isinstance(spec, dict):
        raise bad("'teacher' is not an object")
    k, seed, scales, biases = (spec.get(f) for f in ("augmentations", "seed", "scales", "biases"))
    integer = lambda v, top: isinstance(v, int) and not isinstance(v, bool) and 0 <= v < top  # noqa: E731
    if not (integer(k, MAX_AUGMENTATIONS + 1) and k > 0 and integer(seed, 1 << 63)):
        raise bad(f"'augmentations' must be an integer from 1 to {MAX_AUGMENTATIONS} and 'seed' one from 0")
    if not (isinstance(scales, list) and isinstance(biases, list) and 0 < len(scales) == len(biases) <= MAX_TEACHERS
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= MAX_SCALE for v in scales + biases)
            and all(v > 0 for v in scales)):
        raise bad(f"'scales' and 'biases' must be lists of numbers, one per teacher (at most {MAX_TEACHERS}), scales from above 0 "
                  f"and |biases| up to {MAX_SCALE}")
    if teachers is not None and [(t["scale"], t["bias"]) for t in teachers] != list(zip(scales, biases)):
        raise bad("its teachers (their number, scales or biases) are not those its shards' manifest names")
    embeddings = []
    for m in range(len(scales)):
        if f"teacher{m}.npy" not in group:
            raise bad(f"no teacher{m}.npy member")
        e = read_npy(group[f"teacher{m}.npy"], f"{where}.teacher{m}.npy")
        if e.shape[0] != k + texts:
            raise bad(f"teacher{m}.npy holds {e.shape[0]} rows; {k} crops and {texts} texts make {k + texts}")
        if teachers is not None and e.shape[1] != teachers[m]["width"]:
            raise bad(f"teacher{m}.npy is {e.shape[1]} wide; its shards' manifest says {teachers[m]['width']}")
        norms = np.linalg.norm(e.astype(np.float64), axis=1)
        if not np.all(np.abs(norms - 1) < 1e-3):  # reinforce stores unit rows
            raise bad(f"teacher{m}.npy: rows of norm {norms.min():.3g} to {norms.max():.3g}; embeddings are unit vectors")
        embeddings.append(e)
    return {"augmentations": k, "seed": seed, "scales": [float(v) for v in scales], "biases": [float(v) for v in biases],
            "embeddings": embeddings, "augmentation": 0}


MANIFEST = "reinforce.json"  # beside reinforced shards: the teachers they hold


def write_manifest(folder, teachers, augmentations, seed):
    """What python data.py reinforce stores, said once for its shards: each teacher's fingerprint (of its
    weights), embedding width, scale and bias; the crops per sample and their seed."""
    write_file(os.path.join(folder, MANIFEST), json.dumps({"teachers": teachers, "augmentations": augmentations,
                                                          "seed": seed}, indent=2))


def read_manifests(paths):
    """The stored teachers of a training set's shards, from the manifest beside each source's shards,
    checked and compared before any sample is read: [{'fingerprint', 'width', 'scale', 'bias'}]. Shards
    without one, or of other teachers mixed in one --data, are one DataError naming them."""
    found = {}
    for folder in sorted({os.path.dirname(os.path.abspath(p)) for p in paths}):
        path = os.path.join(folder, MANIFEST)
        if not os.path.lexists(path):
            raise DataError(f"{folder}: no {MANIFEST} beside its shards; --distill stored trains on shards written by "
                            f"python data.py reinforce --teacher T --data D --out O")
        try:
            m = json.loads(read_text(path, 1 << 20, "manifest").decode("utf-8"), parse_constant=_no_constant)
            teachers = m["teachers"]
            ok = isinstance(teachers, list) and 0 < len(teachers) <= MAX_TEACHERS and all(
                isinstance(t, dict) and set(t) == {"fingerprint", "width", "scale", "bias"} and isinstance(t["fingerprint"], str)
                and isinstance(t["width"], int) and 0 < t["width"] <= 1 << 16 and all(
                    isinstance(t[k], (int, float)) and not isinstance(t[k], bool) and abs(t[k]) <= MAX_SCALE for k in ("scale", "bias"))
                and t["scale"] > 0 for t in teachers)
        except (ValueError, KeyError, TypeError, RecursionError, UnicodeError) as e:
            raise DataError(f"{path}: not a manifest of data.py reinforce ({type(e).__name__})") from None
        if not ok:
            raise DataError(f"{path}: its teachers are not a list of fingerprint, width, scale and bias (at most "
                            f"{MAX_TEACHERS}, scales above 0 and up to {MAX_SCALE})")
        found[folder] = teachers
    first, *rest = found.items()
    for folder, teachers in rest:
        if teachers != first[1]:
            raise DataError(f"--distill stored: the shards in {first[0]} and in {folder} hold different teachers; train on "
                            f"shards of one teacher (set) at a time")
    return first[1]


def read_npy(payload, where):
    """A finite float32 matrix of a .npy file's bytes. The header is read with numpy's parser (literals only,
    never a pickle) and the size it claims checked against the bytes there before anything is allocated."""
    f = io.BytesIO(payload)
    try:
        version = np.lib.format.read_magic(f)
        read = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran, dtype = read(f)
    except Exception as e:  # not a .npy, a header numpy refuses, a version we do not read
        raise SampleError("bad teacher data", f"{where} is not a .npy matrix ({type(e).__name__})") from None
    if (dtype != np.dtype("<f4") or fortran or len(shape) != 2 or not 0 < shape[1] <= 1 << 16
            or shape[0] * shape[1] * 4 != len(payload) - f.tell()):
        raise SampleError("bad teacher data", f"{where}: a {dtype} {shape} array in {len(payload)} bytes; "
                          f"float32 rows of at most 65536 are stored")
    e = np.frombuffer(payload, "<f4", offset=f.tell()).reshape(shape)
    if not np.isfinite(e).all():
        raise SampleError("bad teacher data", f"{where}: not finite")
    return e


def augment_rng(seed, epoch, key):
    """A shard sample's random stream (its crop, its text, its patches), from (seed, epoch, its key): the
    same on any rank, loader worker or shuffle order, so clip.py reinforce can draw a sample's crops of
    epoch k before any training does. A reinforced sample brings its own seed and number of crops K,
    and its epoch e draws as epoch e mod K did (ShardBatches)."""
    word = int.from_bytes(hashlib.blake2b(str(key).encode("utf-8", "replace"), digest_size=8).digest(), "little")
    return np.random.default_rng([seed, epoch, word, AUGMENT])


def raw_samples(data, seed, problems, part=(0, 1), by_source=False, skipped=False):
    """(key, sample) for every sample of a training set once, in order (reinforce, filter, curate): shards'
    samples under their own keys; a table's or the synthetic set's as epoch 0 draws their captions, keyed
    by index (by_source: a table's by its image path). part (p, P): every P-th shard or sample from the
    p-th, one of P workers' share. A sample that cannot be read is skipped, its reason added to problems
    (and with skipped, yielded as (key, {'skipped': reason}))."""
    def failed(key, e):
        problems.append(sample_reason(e))
        return [(key, {"skipped": problems[-1]})] if skipped else []

    if isinstance(data, Shards):
        for path in data.paths[part[0]::part[1]]:
            for key, group in read_shard(path, problems, data.max_bytes):
                try:
                    sample = decode_sample(key, group, path)
                except Exception as e:  # whatever one sample holds (sample_reason)
                    yield from failed(key, e)
                    continue
                yield key, sample
        return
    for i in range(part[0], len(data), part[1]):
        key = data.images[i] if by_source and isinstance(data, CsvData) else f"{i:09d}"
        try:
            sample = data.sample(i, np.random.default_rng([seed, 0, i, CAPTION]))
        except Exception as e:
            yield from failed(key, e)
            continue
        yield key, sample


class Shards:
    """A training set of tar shards, streamed. Only its shard list lives here; ShardBatches reads."""

    def __init__(self, spec, weights=None, resampled=False, buffer=2000, max_bytes=MAX_SAMPLE_BYTES):
        self.spec, self.paths, self.weights = spec, *shard_list(spec, weights)
        self.max_bytes = max_bytes
        if weights and not resampled:
            raise ValueError("--data-weights needs --resampled: without it every shard is read once an epoch")
        self.resampled, self.buffer = resampled, buffer
        self.teachers = None  # stored teachers (read_manifests): each sample's are checked against them

    def caption_corpus(self, limit=100_000):
        """Captions of the first shards, for a tokenizer trained on the data."""
        n = 0
        for path in self.paths:
            for _, group in read_shard(path, [], self.max_bytes):
                if "txt" in group:
                    yield group["txt"][:MAX_TEXT_CHARS * 4].decode("utf-8", "replace")
                    n += 1
                    if n >= limit:
                        return


class ShardBatches(torch.utils.data.IterableDataset):
    """This rank's training batches from tar shards, resumable mid-epoch.

    The shards are split over slots = ranks x loader workers. Each epoch a slot reads its shards (a
    permutation of all shards drawn from (seed, epoch) and dealt round-robin; or, resampled, shards
    drawn with replacement by weight) through a shuffle buffer, and worker w of rank r yields batches
    w, w + W, ... of that rank, so the loader hands out batches in order. Every batch carries its
    slot's position (epoch, raw samples consumed), which the checkpoint stores; a resumed run reads
    past exactly those samples without decoding them. Which samples share a batch depends on the
    number of slots, so a resume needs the same ranks x workers.
    """

    def __init__(self, data, transform, batch_size, rank=0, world=1, seed=0, workers=0, position=None, start=0):
        self.data, self.transform, self.b, self.rank, self.world, self.seed = data, transform, batch_size, rank, world, seed
        self.start = start  # the first batch's number: loader worker 0 then plays the slot of batch `start`
        self.workers = max(1, workers)
        self.slots = self.world * self.workers
        self.position = {}
        if position:  # {slot: (epoch, consumed)} from a checkpoint
            if position["slots"] != self.slots:
                raise DataError(f"the checkpoint's data position is for {position['slots']} slots (ranks x "
                                 f"--workers); resume with the same number of ranks and workers to continue the "
                                 f"stream exactly")
            self.position = {int(k): tuple(v) for k, v in position["at"].items()}

    def shards_of(self, slot, epoch):
        """(paths, sample stride): shards dealt to slot, or all shards when there are fewer than slots."""
        rng = np.random.default_rng([self.seed, epoch, ORDER])
        paths, n = self.data.paths, len(self.data.paths)
        if self.data.resampled:
            picks = rng.choice(n, size=max(n, self.slots), p=self.data.weights)
        else:
            picks = rng.permutation(n)
        if len(picks) >= self.slots:
            return [paths[i] for i in picks[slot::self.slots]], 1
        return [paths[i] for i in picks], self.slots  # every slot reads all, keeps every slots-th sample

    def raw(self, slot, epoch, problems):
        """The slot's raw samples of one epoch, in shuffle-buffer order: (key, group, path)."""
        paths, stride = self.shards_of(slot, epoch)
        rng = np.random.default_rng([self.seed, epoch, slot, ORDER])
        buffer, i = [], 0
        for path in paths:
            for key, group in read_shard(path, problems, self.data.max_bytes):
                i += 1
                if stride > 1 and (i - 1) % stride != slot:
                    continue
                buffer.append((key, group, path))
                if len(buffer) >= self.data.buffer:
                    j = int(rng.integers(len(buffer)))
                    buffer[j], buffer[-1] = buffer[-1], buffer[j]
                    yield buffer.pop()
        rng.shuffle(buffer)
        yield from buffer

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n_workers = (info.id, info.num_workers) if info else (0, 1)
        if n_workers != self.workers:
            raise RuntimeError(f"ShardBatches was set up for {self.workers} workers, runs under {n_workers}")
        slot = self.rank * self.workers + (w + self.start) % self.workers
        epoch, consumed = self.position.get(slot, (0, 0))
        problems, skips, notes, items = [], [], [], []
        while True:
            stream, seen, first_error = self.raw(slot, epoch, problems), 0, None
            for key, group, path in stream:
                seen += 1
                if seen <= consumed:
                    continue  # already trained on before the checkpoint
                try:
                    sample = decode_sample(key, group, path, self.data.teachers)
                    stored = sample.get("teacher")
                    if stored:  # the crops its teachers saw, cycled
                        stored["augmentation"] = epoch % stored["augmentations"]
                        rng = augment_rng(stored["seed"], stored["augmentation"], key)
                    else:
                        rng = augment_rng(self.seed, epoch, key)
                    out = apply(self.transform, sample, rng, f"{path}:{key}")
                except Exception as e:  # whatever one sample holds, the run goes on (sample_reason)
                    skips.append(sample_reason(e))
                    first_error = first_error or f"{type(e).__name__}: {e}"[:300]
                    if len(skips) >= MAX_TRIES and not items:
                        raise DataError(f"{self.data.spec}: {MAX_TRIES} samples in a row could not be used "
                                           f"(first: {first_error})") from None
                    continue
                if "label" in sample:
                    out["label"] = torch.tensor(sample["label"])
                if "rewrites" in sample and not sample["rewrites"]:
                    notes.append("no rewrites: original caption used")
                items.append(out)
                if len(items) == self.b:
                    yield collate(items), {"skips": skips + problems, "notes": notes, "position": (slot, epoch, seen)}
                    problems.clear()  # in place: the epoch's reader goes on adding to this list
                    skips, notes, items = [], [], []
            if seen == 0:
                raise DataError(f"{self.data.spec}: no readable sample in the shards of slot {slot} "
                                   f"({', '.join(self.shards_of(slot, epoch)[0][:3])} ...); check the files")
            epoch, consumed = epoch + 1, 0


class ShardIndex:
    """A held-out set of (uncompressed) tar shards, indexed once for random access: validation data."""

    def __init__(self, spec, max_bytes=MAX_SAMPLE_BYTES):
        self.spec, self.path, self.max_bytes = spec, spec, max_bytes
        paths, _ = shard_list(spec)
        self.items = []  # (path, key, {ext: (offset, size)})
        for path in paths:
            groups = {}
            try:
                with tarfile.open(path) as tar:
                    for m in tar:
                        folder, name = os.path.split(m.name)
                        if m.isfile() and "." in name and not name.startswith("."):
                            stem, ext = name.split(".", 1)
                            if ext.lower() in READ_EXTS:
                                groups.setdefault(f"{folder}/{stem}", {})[ext.lower()] = (m.offset_data, m.size)
            except (tarfile.TarError, EOFError, OSError) as e:
                print(f"data.py: {path}: {type(e).__name__}: {e}; indexing the samples before the damage",
                      file=sys.stderr)
            self.items += [(path, key, g) for key, g in groups.items()]
        if not self.items:
            raise ValueError(f"{spec}: no sample in these shards")

    def __len__(self):
        return len(self.items)

    def sample(self, index, rng):
        path, key, members = self.items[index]
        if sum(size for _, size in members.values()) > self.max_bytes:
            raise SampleError("sample too large", f"{path}:{key}: its members pass --max-sample-bytes {self.max_bytes}")
        group = {}
        with open(path, "rb") as f:
            for ext, (offset, size) in members.items():
                f.seek(offset)
                group[ext] = f.read(size)
        return decode_sample(key, group, path)

    def caption_corpus(self, limit=100_000):
        for i in range(min(limit, len(self))):
            try:
                yield self.sample(i, None)["text"]
            except SampleError:
                continue


# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation (OpenAI, CLIP repository,
# notebooks/Prompt_Engineering_for_ImageNet.ipynb), written as "|"-separated data.
IMAGENET_TEMPLATES = (
    "a bad photo of a {}.|a photo of many {}.|a sculpture of a {}.|a photo of the hard to see {}.|"
    "a low resolution photo of the {}.|a rendering of a {}.|graffiti of a {}.|a bad photo of the {}.|"
    "a cropped photo of the {}.|a tattoo of a {}.|the embroidered {}.|a photo of a hard to see {}.|"
    "a bright photo of a {}.|a photo of a clean {}.|a photo of a dirty {}.|a dark photo of the {}.|"
    "a drawing of a {}.|a photo of my {}.|the plastic {}.|a photo of the cool {}.|a close-up photo of a {}.|"
    "a black and white photo of the {}.|a painting of the {}.|a painting of a {}.|a pixelated photo of the {}.|"
    "a sculpture of the {}.|a bright photo of the {}.|a cropped photo of a {}.|a plastic {}.|"
    "a photo of the dirty {}.|a jpeg corrupted photo of a {}.|a blurry photo of the {}.|a photo of the {}.|"
    "a good photo of the {}.|a rendering of the {}.|a {} in a video game.|a photo of one {}.|a doodle of a {}.|"
    "a close-up photo of the {}.|a photo of a {}.|the origami {}.|the {} in a video game.|a sketch of a {}.|"
    "a doodle of the {}.|a origami {}.|a low resolution photo of a {}.|the toy {}.|a rendition of the {}.|"
    "a photo of the clean {}.|a photo of a large {}.|a rendition of a {}.|a photo of a nice {}.|"
    "a photo of a weird {}.|a blurry photo of a {}.|a cartoon {}.|art of a {}.|a sketch of the {}.|"
    "a embroidered {}.|a pixelated photo of a {}.|itap of the {}.|a jpeg corrupted photo of the {}.|"
    "a good photo of a {}.|a plushie {}.|a photo of the nice {}.|a photo of the small {}.|"
    "a photo of the weird {}.|the cartoon {}.|art of the {}.|a drawing of the {}.|a photo of the large {}.|"
    "a black and white photo of a {}.|the plushie {}.|a dark photo of a {}.|itap of a {}.|graffiti of the {}.|"
    "a toy {}.|itap of my {}.|a photo of a cool {}.|a photo of a small {}.|a tattoo of the {}.").split("|")


class ImageFolder:
    """Zero-shot classification on an ImageNet-style folder: one sub-folder per class.

    Class names: classnames.txt in the folder (one a line, in the sorted order of the sub-folders),
    else the sub-folder names with '_' as spaces. Templates: a file (one a line, '{}' for the name)
    or CLIP's 80 ImageNet templates."""

    def __init__(self, root, templates=None):
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{root}: no such folder (--zeroshot-data wants one sub-folder per class)")
        classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        if not classes:
            raise ValueError(f"{root}: no class sub-folders (--zeroshot-data wants one sub-folder per class)")
        names = [c.replace("_", " ") for c in classes]
        listed = os.path.join(root, "classnames.txt")
        if os.path.isfile(listed):
            names = [line.strip() for line in read_text(listed, 1 << 24, "class name file").decode("utf-8", "replace")
                     .splitlines() if line.strip()]
            if len(names) != len(classes):
                raise ValueError(f"{listed}: {len(names)} names for {len(classes)} class folders; one a line, "
                                 f"in the sorted order of the folders")
        if templates:
            tpl = [line.strip() for line in read_text(templates, 1 << 24, "template file (--zeroshot-templates)")
                   .decode("utf-8", "replace").splitlines() if "{}" in line]
            if not tpl:
                raise ValueError(f"{templates}: no line with '{{}}' where the class name goes")
        else:
            tpl = IMAGENET_TEMPLATES
        self.path, self.classnames, self.templates = root, {"en": names}, {"en": tpl}
        exts = tuple("." + e for e in IMAGE_EXTS)
        self.items = [(os.path.join(root, c, f), k) for k, c in enumerate(classes)
                      for f in sorted(os.listdir(os.path.join(root, c))) if f.lower().endswith(exts)]
        if not self.items:
            raise ValueError(f"{root}: no .jpg/.jpeg/.png/.webp images in the class folders")

    def __len__(self):
        return len(self.items)

    def sample(self, index, rng):
        path, label = self.items[index]
        image = open_image(read_file(path), path)
        return {"image": image, "text": self.classnames["en"][label], "label": label}


# ----------------------------------------------------------------------------------------------
# Training images: the augmentation every ViT model trains with, run here so that each model file keeps
# only its evaluation preprocessing. The model's transform calls it (model.transform(True, images=...)).

# Decoding holds the whole image (4 bytes a pixel in Pillow, then a copy): larger images are refused
# before their decode; JPEGs are first drafted down to what the crop needs.
MAX_PIXELS = 40_000_000


class ImageTooLarge(OSError):
    reason = "image too large"


class RandomCrop:
    """PIL image -> uint8 [3, size, size]: RandomResizedCrop (scale 0.9-1, open_clip's training crop), its
    box drawn from the sample's rng as the transform's first draw (a teacher's view drawn from a copy of
    the rng is the same box), bicubic. uint8: the model normalises on its device, and the loader ships a
    quarter of float32's bytes.

    A JPEG not decoded yet and much larger than the crop needs is decoded at 1/2, 1/4 or 1/8 scale by
    the decoder itself (Pillow's draft mode), never below the output's resolution; the box is drawn on
    the full-size image all the same. defer=True (train.py --gpu-decode) leaves RGB and grayscale JPEGs
    undecoded: the transform returns {"jpeg": the file's bytes, "box", "out"} and finish() decodes the
    batch's JPEGs on the training device (nvjpeg on CUDA), crops and resizes them there."""

    def __init__(self, size, scale=(0.9, 1.0), defer=False, draft=True, max_pixels=MAX_PIXELS):
        self.size, self.scale, self.defer, self.draft, self.max_pixels = size, scale, defer, draft, max_pixels

    def box(self, w, h, rng):
        for _ in range(10):  # torchvision's RandomResizedCrop rule, with the sample's rng
            area = w * h * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return x0, y0, x0 + cw, y0 + ch
        side = min(w, h)
        return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side

    def __call__(self, img, rng):
        w, h = img.size
        box, out = self.box(w, h, rng), (self.size, self.size)
        if self.defer and deferrable(img) and w * h <= self.max_pixels:
            return {"jpeg": img.encoded, "box": box, "out": out}  # plain values: one pickle through the pipe
        if self.draft and img.format == "JPEG":  # a no-op once decoded
            img.draft("RGB", (math.ceil(w * self.size / (box[2] - box[0])), math.ceil(h * self.size / (box[3] - box[1]))))
        if img.size[0] * img.size[1] > self.max_pixels:  # before the decode, which would hold it all
            raise ImageTooLarge(f"{getattr(img, 'source', 'image')}: {img.size[0]} x {img.size[1]} pixels, over "
                                f"the cap of {self.max_pixels} (a decompression bomb, or a scan to shrink first)")
        from_file = img.format is not None
        img = to_rgb(img)
        if img.size != (w, h):  # drafted: the box to the nearest whole pixels of the smaller image
            fx, fy = img.size[0] / w, img.size[1] / h
            box = (round(box[0] * fx), round(box[1] * fy), round(box[2] * fx), round(box[3] * fy))
        if from_file and box[2] - box[0] >= out[0] and box[3] - box[1] >= out[1]:
            # a downscale of a file's image: torch's antialiased bicubic on uint8 channels-last, about 4x
            # Pillow's speed and within a few levels of it; images made in memory keep Pillow's pixels
            x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
            return resize_pixels(x[:, box[1]:box[3], box[0]:box[2]], out)
        return torch.from_numpy(np.array(img.resize(out, Image.BICUBIC, box=box), dtype=np.uint8)).permute(2, 0, 1)

    def finish(self, images, device, notes=None):
        """uint8 [B, 3, size, size] on the device from a batch's list of ready pixels and deferred JPEGs.
        The JPEGs decode together (torchvision.io.decode_jpeg); one the device decoder refuses is decoded
        by Pillow, one Pillow cannot read either becomes a black image, counted in notes: the batch keeps
        its size, as every rank's must."""
        out = torch.empty(len(images), 3, self.size, self.size, dtype=torch.uint8, device=device)
        deferred = [i for i, x in enumerate(images) if isinstance(x, dict)]
        for i, x in enumerate(images):
            if not isinstance(x, dict):
                out[i] = x.to(device, non_blocking=True)
        jpegs = [torch.frombuffer(bytearray(images[i]["jpeg"]), dtype=torch.uint8) for i in deferred]
        for i, pixels in zip(deferred, decode_jpegs(jpegs, device)):
            box, size = images[i]["box"], images[i]["out"]
            if pixels is None:
                pixels = decode_with_pillow(images[i]["jpeg"], device)
            if pixels is None:
                pixels = torch.zeros(3, box[3], box[2], dtype=torch.uint8, device=device)
                if notes is not None:
                    notes.append("unreadable image on the device: a black image in its place")
            out[i] = resize_pixels(pixels[:, box[1]:box[3], box[0]:box[2]], size)
        return out


def to_rgb(img):
    """RGB, with 16-bit and 32-bit integer images scaled to 8 bits (Pillow's convert clips them: white)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        x = np.clip(np.asarray(img).astype(np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(x, "L").convert("RGB")
    return img.convert("RGB")


def deferrable(img):
    """A JPEG file opened but not decoded yet, in a mode every decoder reads, with its end marker (a
    truncated one is decoded, and skipped, in the loader as on the CPU path)."""
    data = getattr(img, "encoded", None)
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and bool(getattr(img, "tile", None))
            and data is not None and data.rstrip(b"\0")[-2:] == b"\xff\xd9")


def decode_with_pillow(jpeg, device):
    try:
        img = Image.open(io.BytesIO(jpeg), formats=("JPEG",)).convert("RGB")
    except (OSError, SyntaxError):
        return None
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(device)


def decode_jpegs(jpegs, device):
    """RGB uint8 [3, H, W] on the device per JPEG (1-D uint8 CPU tensors), None where one fails."""
    if not jpegs:
        return []
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: decode them one by one
            decoded = []
            for jpeg in jpegs:
                try:
                    decoded.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def resize_pixels(x, out):
    """uint8 [3, h, w] -> uint8 [3, H, W] for out = (W, H), antialiased bicubic (Pillow's kernel) on x's
    device: uint8 channels-last on the CPU; in float32, then rounded, elsewhere."""
    x = x[None].contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu":
        return F.interpolate(x, size=(out[1], out[0]), mode="bicubic", antialias=True)[0]
    y = F.interpolate(x.float(), size=(out[1], out[0]), mode="bicubic", antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)[0]


def to_device(batch, device, images=None, notes=None):
    """A loader batch on the device: tensors moved, a list of deferred JPEGs under 'image' finished by the
    RandomCrop that deferred them, other values (a batch's texts for a teacher) left as they are."""
    out = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    if isinstance(batch.get("image"), list):
        out["image"] = images.finish(batch["image"], device, notes)
    return out


class PatchDropout:
    """FLIP's patch dropout (Li et al. 2023), around a ViT model's training transform: each image keeps a
    random round((1 - ratio) * N) of its N patch tokens ('patch_keep', which the model's image tower
    reads), and the tower runs on those alone (cheaper in proportion). They are drawn from the sample's
    own rng after every other draw, so they depend only on (seed, epoch, sample), as every other choice
    does: ranks, loader workers, --accum replays and resumes all see the same ones."""

    def __init__(self, transform, patches, ratio):
        self.transform, self.patches, self.keep = transform, patches, max(1, round((1 - ratio) * patches))

    def __call__(self, sample, rng):
        out = self.transform(sample, rng)
        if "image" in out:  # AltCLIP's stage 1 reads text alone
            out["patch_keep"] = torch.from_numpy(np.sort(rng.permutation(self.patches)[:self.keep]))
        return out

    def finish(self, batch):
        return self.transform.finish(batch) if hasattr(self.transform, "finish") else batch


# ----------------------------------------------------------------------------------------------
# Teachers' inputs for distillation (train.py --distill): a wrapper around the model's training transform


class WithTeachers:
    """A training transform plus what distillation needs. Online teachers (sizes: each one's input side):
    'teacher{m}_pixels', the student's crop box cut afresh from the image at the teacher's size (the box is
    the first draw of the sample's rng, so a copy of the rng draws it), and 'teacher_text', the caption the
    student drew (a string: each teacher tokenizes it itself). Stored teachers (python data.py reinforce):
    'teacher{m}_image', '_text', '_scale', '_bias', their embeddings of this crop and of this caption.
    A model transform that draws among a sample's texts says which under 'text_pick' (0: the caption,
    then each rewrite)."""

    def __init__(self, inner, sizes=(), stored=False):
        self.inner, self.stored = inner, stored
        self.views = [RandomCrop(size, draft=False) for size in sizes]

    def __call__(self, sample, rng):
        if "image" not in sample:  # distillation compares image features: there are none to compare
            raise SampleError("no image to distil", "a text-only sample; --distill trains on image-text pairs")
        pixels = [view(fresh_image(sample["image"]), copy.deepcopy(rng)) for view in self.views]
        out = self.inner(sample, rng)
        texts = [sample["text"], *(r for r in sample.get("rewrites", ()) if r and r.strip())]
        pick = int(out.pop("text_pick", 0))
        if self.stored:
            out.update(stored_rows(sample, pick))
        for m, x in enumerate(pixels):
            out[f"teacher{m}_pixels"] = x
        if self.views:
            out["teacher_text"] = texts[pick]
        return out

    def finish(self, batch):
        return self.inner.finish(batch) if hasattr(self.inner, "finish") else batch


class LongCaptions:
    """A training transform plus Long-CLIP's short caption: 'short_text', the token ids of the drawn text
    up to its first '. ' (Long-CLIP's rule for ShareGPT4V's captions), by the model's own tokenizer. The
    two leave the CPU trimmed together (stacked through the model's finish)."""

    def __init__(self, inner, tokenizer):
        self.inner, self.tokenizer = inner, tokenizer

    def __call__(self, sample, rng):
        out = self.inner(sample, rng)
        texts = [sample["text"], *(r for r in sample.get("rewrites", ()) if r and r.strip())]
        drawn = texts[int(out.get("text_pick", 0))]
        out["short_text"] = self.tokenizer([drawn.split(". ")[0]])[0]
        return out

    def finish(self, batch):
        if not hasattr(self.inner, "finish") or batch["text"].shape != batch["short_text"].shape:
            return self.inner.finish(batch) if hasattr(self.inner, "finish") else batch
        both = self.inner.finish({**batch, "text": torch.stack([batch["text"], batch["short_text"]], 1)})
        return {**both, "text": both["text"][:, 0], "short_text": both["text"][:, 1]}


def fresh_image(img):
    """The sample's image as a teacher reads it: a file's bytes opened afresh (the student's crop may have
    decoded its copy at a reduced JPEG draft size), an image made in memory as it is."""
    if getattr(img, "encoded", None) is None:
        return img
    return open_image(img.encoded, getattr(img, "source", "image"))


def stored_rows(sample, pick):
    """The stored teachers' embeddings of the sample's crop (ShardBatches says which of the K) and of its
    caption number `pick` (0: the caption, then each rewrite), as tensors."""
    stored = sample.get("teacher")
    if not stored:
        raise SampleError("bad teacher data", "--distill stored: a sample without teacher embeddings (write them "
                          "with python data.py reinforce --teacher T --data D --out O, and train on O)")
    out, k = {}, stored["augmentation"]
    for m, (e, scale, bias) in enumerate(zip(stored["embeddings"], stored["scales"], stored["biases"])):
        out[f"teacher{m}_image"] = torch.from_numpy(e[k].copy())
        out[f"teacher{m}_text"] = torch.from_numpy(e[stored["augmentations"] + pick].copy())
        out[f"teacher{m}_scale"] = torch.tensor(scale, dtype=torch.float32)
        out[f"teacher{m}_bias"] = torch.tensor(bias, dtype=torch.float32)
    return out


# ----------------------------------------------------------------------------------------------
# python data.py reinforce: teachers' embeddings stored with the data (MobileCLIP's reinforced data)


def reinforce(teachers, data, out, augmentations=2, seed=0, per_shard=10_000, batch_size=64, fingerprints=None):
    """Shards OUT/00000.tar, ... in which every sample of `data` holds its image (the file's own bytes; a
    PNG for one made in memory), its caption and rewrites, and for teacher m the float32 matrix
    KEY.teacher{m}.npy: the teacher's embeddings of the K crops that training epochs 0..K-1 draw for the
    sample under `seed` (augment_rng), then of each text. Returns (samples written, reasons of those
    skipped). `train.py --data 'OUT/{00000..N}.tar' --distill stored` then runs no teacher: epoch e draws
    epoch e mod K's crop, one the teachers saw. OUT/reinforce.json names the teachers (write_manifest)."""
    views = [RandomCrop(t.cfg.image_size, draft=False) for t in teachers]
    scales = [t.logit_scale.exp().item() for t in teachers]
    biases = [t.logit_bias.item() if getattr(t, "logit_bias", None) is not None else 0.0 for t in teachers]
    if not all(0 < s <= MAX_SCALE and abs(b) <= MAX_SCALE for s, b in zip(scales, biases)):  # what training reads back
        raise ValueError(f"a teacher's logit scale or bias ({scales}, {biases}) is past the {MAX_SCALE} stored teachers may have")
    problems, pending, written, last = [], [], 0, None
    widths = [t.encode_texts(["a"]).shape[1] for t in teachers]
    write_manifest(out, [{"fingerprint": f, "width": w, "scale": s, "bias": b} for f, w, s, b in
                         zip(fingerprints or [""] * len(teachers), widths, scales, biases)], augmentations, seed)
    shards = ShardWriter(out, per_shard)

    @torch.no_grad()
    def flush():
        embedded = []
        for m, t in enumerate(teachers):
            device = t.logit_scale.device
            pixels = torch.stack([x for item in pending for x in item["pixels"][m]])
            texts = [text for item in pending for text in item["texts"]]
            image = torch.cat([t.encode_image(pixels[i:i + 256].to(device), normalize=True) for i in range(0, len(pixels), 256)])
            text = torch.cat([t.encode_texts(texts[i:i + 256]) for i in range(0, len(texts), 256)])
            embedded.append((image.float().cpu().numpy(), text.float().cpu().numpy()))
        at = 0
        for i, item in enumerate(pending):
            n, members = len(item["texts"]), item["members"]
            for m, (image, text) in enumerate(embedded):
                buf = io.BytesIO()
                np.save(buf, np.concatenate([image[i * augmentations:(i + 1) * augmentations], text[at:at + n]]).astype("<f4"))
                members.append((f"teacher{m}.npy", buf.getvalue()))
            shards.write(item["key"], members)
            at += n
        pending.clear()

    for key, sample in raw_samples(data, seed, problems):
        key = str(key) if str(key) != last else f"{key}_"  # a key repeated next to itself would join the two samples
        try:
            payload, ext = stored_image(sample["image"])
            texts = [sample["text"], *sample.get("rewrites", ())[:MAX_REWRITES]]  # as many as decode_sample reads back
            # each crop cut from the stored bytes, opened as the loader will open them
            pixels = [[view(open_image(payload, key), augment_rng(seed, e, key)) for e in range(augmentations)]
                      for view in views]
        except Exception as e:  # whatever one sample holds: skipped and counted
            problems.append(sample_reason(e))
            continue
        last = key
        meta = {"teacher": {"augmentations": augmentations, "seed": seed, "scales": scales, "biases": biases}}
        if len(texts) > 1:
            meta["rewrites"] = texts[1:]
        if "label" in sample:
            meta["label"] = sample["label"]
        members = [(ext, payload), ("txt", texts[0].encode("utf-8")), ("json", json.dumps(meta).encode("utf-8"))]
        pending.append({"key": key, "members": members, "texts": texts, "pixels": pixels})
        written += 1
        if len(pending) * augmentations >= batch_size:  # crops held for the teachers: at most a batch (and one sample's)
            flush()
    if pending:
        flush()
    shards.close()
    return written, problems


def reinforce_main(argv=None):
    import argparse

    from train import import_model

    p = argparse.ArgumentParser(prog="data.py reinforce", description="teachers' embeddings stored in shards, "
                                "for train.py --distill stored")
    p.add_argument("--teacher", action="append", required=True, help="teacher weights; again for an ensemble")
    p.add_argument("--teacher-model", default="clip", help="the model file that reads the teachers (default clip)")
    p.add_argument("--out", required=True, help="a new folder for the shards")
    p.add_argument("--augmentations", type=int, default=2, help="crops stored per sample (K)")
    p.add_argument("--seed", type=int, default=0, help="the seed of the training runs whose crops are stored")
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=64, help="crops the teachers embed at once")
    p.add_argument("--device", default="cpu")
    add_args(p)
    args = p.parse_args(argv)
    check_numbers(p, args, {**RANGES, "augmentations": (1, MAX_AUGMENTATIONS), "per_shard": (1, 1 << 20),
                            "batch_size": (1, 1 << 20)})
    if len(args.teacher) > MAX_TEACHERS:
        p.error(f"at most {MAX_TEACHERS} teachers")
    try:
        if os.path.exists(args.out) and (not os.path.isdir(args.out) or any(f.endswith(".tar") for f in os.listdir(args.out))):
            raise ValueError(f"{args.out} already holds shards or is a file: give a new folder (nothing is overwritten)")
        module = import_model(args.teacher_model)
        teachers = [module.load(path, args.device)[0] for path in args.teacher]
        if args.data == "synthetic" and args.synthetic_resolution is None:
            args.synthetic_resolution = teachers[0].cfg.image_size
        train = build(args)[0]
        fingerprints = [fingerprint(path) for path in args.teacher]
        lock_folder(args.out, "data.py reinforce")  # a second reinforce on this --out is refused, not mixed in
        if any(f.endswith(".tar") for f in os.listdir(args.out)):  # one that finished as this one started
            raise ValueError(f"{args.out} already holds shards: give a new folder (nothing is overwritten)")
        written, problems = reinforce(teachers, train, args.out, args.augmentations, args.seed, args.per_shard,
                                      args.batch_size, fingerprints)
    except (FileNotFoundError, ValueError, ImportError, OSError) as err:
        raise SystemExit(f"data.py reinforce: {err}") from None
    finally:
        unlock_folder(args.out)
    line = f"data.py reinforce: {written} samples with {len(teachers)} teacher(s) x {args.augmentations} crops in {args.out}"
    if problems:
        line += "; skipped " + ", ".join(f"{problems.count(r)} {r}" for r in dict.fromkeys(problems))
    print(line)


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
            out = apply(transform, sample, np.random.default_rng([seed, epoch, i, AUGMENT]), f"sample {i}")
        except Exception as e:  # whatever one sample holds, the run goes on (sample_reason)
            skips.append(sample_reason(e))
            first_error = first_error or f"sample {i}: {type(e).__name__}: {e}"[:300]
            continue
        if "label" in sample:
            out["label"] = torch.tensor(sample["label"])
        if notes is not None and "rewrites" in sample and not sample["rewrites"]:
            notes.append("no rewrites: original caption used")
        return out
    raise DataError(f"{getattr(data, 'path', 'data')}: {MAX_TRIES} samples in a row could not be read "
                       f"(first: {first_error}); check the image paths and captions")


def collate(items):
    """Each key's tensors stacked. A key with other values stays a list: under --gpu-decode, the JPEGs
    the transform left encoded, among ready pixels, for its finish() to decode on the device."""
    out = {}
    for k in [k for k in items[0] if all(k in it for it in items)]:  # a key some samples lack (a label): left out
        values = [it[k] for it in items]
        out[k] = torch.stack(values) if all(isinstance(v, torch.Tensor) for v in values) else values
    return out


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
        return collate(items), {"skips": skips, "notes": notes}


class EvalBatches(torch.utils.data.Dataset):
    """The data in order, in global batches of batch_size x world; each rank gets its slice of each.

    Every rank has the same number of full global batches first (their info says 'full', and the
    validation loss is taken over them in lockstep); the remainder is spread over the ranks."""

    def __init__(self, data, transform, batch_size, rank=0, world=1, seed=0):
        n, g = len(data), batch_size * world
        self.full = n // g
        rest = n - self.full * g
        lo = self.full * g + rank * rest // world
        self.ranges = [range(k * g + rank * batch_size, k * g + (rank + 1) * batch_size) for k in range(self.full)]
        if rank * rest // world < (rank + 1) * rest // world:
            self.ranges.append(range(lo, self.full * g + (rank + 1) * rest // world))
        self.data, self.transform, self.seed = data, transform, seed

    def __len__(self):
        return len(self.ranges)

    def __getitem__(self, k):
        skips = []
        batch = collate([load_sample(self.data, self.transform, i, 0, self.seed, skips) for i in self.ranges[k]])
        return batch, {"skips": skips, "notes": [], "full": k < self.full}


def _worker_init(_):
    torch.set_num_threads(1)


def loader(batches, start=0, stop=None, workers=0, pin_memory=False):
    """(batch, info) for batches start..stop-1 of a TrainBatches / EvalBatches, each built whole by one
    worker; a ShardBatches streams from where it was set up to start. info: 'skips' and 'notes' (reasons,
    one per sample), and 'position' (shards) or 'full' (evaluation). pin_memory (CUDA): batches land in
    page-locked memory, so the copies to the GPU can overlap the step (non_blocking)."""
    kw = dict(batch_size=None, num_workers=workers, worker_init_fn=_worker_init, pin_memory=pin_memory,
              prefetch_factor=4 if workers else None, persistent_workers=False)
    if isinstance(batches, torch.utils.data.IterableDataset):
        return torch.utils.data.DataLoader(batches, **kw)
    stop = len(batches) if stop is None else stop
    return torch.utils.data.DataLoader(batches, sampler=range(start, stop), **kw)


def build(args):
    """(train, val, zero-shot) data sets from the command line."""
    zeroshot = ImageFolder(args.zeroshot_data, args.zeroshot_templates) if args.zeroshot_data else None
    parallel = getattr(args, "parallel_text", False)  # set by a model that trains on text alone
    if args.data == "synthetic":
        res = getattr(args, "synthetic_resolution", 64)
        return (Synthetic(args.seed, "train", args.synthetic_size, args.synthetic_templates, parallel, res),
                Synthetic(args.seed, "val", args.val_size, resolution=res), zeroshot)
    limit = getattr(args, "max_sample_bytes", MAX_SAMPLE_BYTES)
    kw = dict(img_key=args.csv_img_key, caption_key=args.csv_caption_key, separator=args.csv_separator, max_bytes=limit)
    split = lambda v: [x for x in (v or "").split(",") if x]  # noqa: E731
    if parallel:
        if is_shards(args.data):
            raise ValueError(f"{args.data}: this stage trains on parallel text; pass a TSV of (english, translation) lines")
        train = ParallelText(args.data, args.csv_caption_key, args.csv_separator)
    elif is_shards(args.data):
        train = Shards(args.data, args.data_weights, args.resampled, args.shuffle_buffer, limit)
    else:
        train = CsvData(args.data, rewrite_keys=split(args.rewrite_columns), rewrite_files=split(args.rewrite_files), **kw)
    val = None
    if args.val_data:
        val = ShardIndex(args.val_data, limit) if is_shards(args.val_data) else CsvData(args.val_data, **kw)
    return train, val, zeroshot


def num_samples(data, args):
    """Samples in an epoch of the training data: a table's rows, the synthetic set's size; shards say
    theirs with --train-num-samples (open_clip's flag), since counting them would read every shard."""
    if isinstance(data, Shards):
        if not getattr(args, "train_num_samples", None):
            raise ValueError(f"{args.data}: --epochs over shards needs their size: --train-num-samples N (as in "
                             f"open_clip), or give --steps")
        return args.train_num_samples
    return len(data)


class Position:
    """Where this rank's loader slots stand in a shard stream, (epoch, raw samples consumed) each, after
    the last batch trained on: what a checkpoint stores so a resumed run continues mid-epoch."""

    def __init__(self, batches, rank):
        self.slots = batches.slots if isinstance(batches, ShardBatches) else None
        self.at = {k: v for k, v in getattr(batches, "position", {}).items() if k // getattr(batches, "workers", 1) == rank}

    def update(self, info):
        if "position" in info:
            slot, epoch, consumed = info["position"]
            self.at[int(slot)] = (int(epoch), int(consumed))

    def state(self, world, group=None):
        """Every rank's slots, for the checkpoint (a collective when world > 1); None for other data."""
        if self.slots is None:
            return None
        every = [self.at]
        if world > 1:
            every = [None] * world
            torch.distributed.all_gather_object(every, self.at, group=group)
        return {"slots": self.slots, "at": {str(k): list(v) for p in every for k, v in p.items()}}


def train_batches(data, transform, batch_size, rank, world, seed, workers, position=None, start=0):
    if isinstance(data, Shards):
        return ShardBatches(data, transform, batch_size, rank, world, seed, workers, position, start)
    return TrainBatches(data, transform, batch_size, rank, world, seed)


# The ranges of the data flags a training run takes, as (lowest, highest); a command's own flags add
# theirs. A flag not listed is from 0 to 2^53: past that a float has no whole numbers to count with,
# and 1e300 overflows the arithmetic (a timeout in a C timeval, a seed in numpy) far from the flag.
RANGES = {"max_sample_bytes": (1, None), "synthetic_resolution": (8, MAX_RESOLUTION), "synthetic_size": (1, 1 << 40),
          "shuffle_buffer": (1, 1 << 24), "train_num_samples": (1, None), "val_size": (0, 1 << 40)}


def check_numbers(p, args, ranges, above=(), below=()):
    """Every numeric flag of parser p in its range: finite, from 0 to 2^53, and ranges' (lowest, highest),
    above its lowest if in `above`, below its highest if in `below`; else one argparse line naming it."""
    for action in p._actions:
        value = getattr(args, action.dest, None)
        if action.type not in (int, float) or value is None:
            continue
        low, high = ranges.get(action.dest, (0, None))
        high = 2 ** 53 if high is None else high
        if not (math.isfinite(value) and low <= value <= high) or (action.dest in above and value == low) or (
                action.dest in below and value == high):
            p.error(f"{action.option_strings[0]} {value}: from {low} to {high}" + (
                f", above {low}" if action.dest in above else "") + (f", below {high}" if action.dest in below else ""))


def add_args(parser):
    parser.add_argument("--data", default="synthetic",
                        help="'synthetic' (embedded default), a .csv/.tsv file, or tar shards 'DIR/{00000..00099}.tar' "
                             "(several sources joined with '::')")
    parser.add_argument("--data-weights", default=None, help="sampling weight per '::' source (with --resampled)")
    parser.add_argument("--resampled", action="store_true", help="draw shards with replacement (open_clip's meaning)")
    parser.add_argument("--train-num-samples", type=int, default=None,
                        help="samples in an epoch of the shards (--epochs counts passes with it), as in open_clip")
    parser.add_argument("--shuffle-buffer", type=int, default=2000, help="samples in each loader slot's shuffle buffer")
    parser.add_argument("--val-data", default=None, help="held-out .csv/.tsv or shards: retrieval R@k and val loss")
    parser.add_argument("--zeroshot-data", default=None,
                        help="ImageNet-style folder (one sub-folder per class) for zero-shot top-1/top-5")
    parser.add_argument("--zeroshot-templates", default=None,
                        help="prompt templates, one a line with {} for the class name (default: CLIP's 80)")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default=None, help="default: ',' for .csv, tab otherwise")
    parser.add_argument("--max-sample-bytes", type=int, default=MAX_SAMPLE_BYTES,
                        help="a sample's files larger than this are skipped unread and counted (default 64 MiB)")
    parser.add_argument("--synthetic-size", type=int, default=100_000, help="samples in a synthetic epoch")
    parser.add_argument("--val-size", type=int, default=1000, help="held-out synthetic samples for eval")
    parser.add_argument("--synthetic-resolution", type=int, default=None,
                        help="side of the synthetic images in pixels (a model file may default it to its input size)")
    parser.add_argument("--synthetic-templates", type=int, default=0,
                        help="draw synthetic captions from the first N English templates only (0: all)")
    parser.add_argument("--rewrite-columns", default=None, help="CSV columns holding caption rewrites, comma-separated")
    parser.add_argument("--rewrite-files", default=None,
                        help="text files of rewrites, one per source, aligned by line with --data (LaCLIP's layout)")


# ----------------------------------------------------------------------------------------------
# python data.py shards --csv FILE --out DIR: shards from a CSV of local images


def write_shards(csv_path, out, per_shard=10_000, img_key="filepath", caption_key="title", separator=None,
                 allow_outside=False, max_bytes=MAX_SAMPLE_BYTES):
    """Tar shards in img2dataset's layout (000000123.jpg/.txt/.json) from a CSV; returns the paths.

    Only what opens as an image goes in. A row whose path resolves outside the CSV's folder (../, an
    absolute path, a symlink out) is refused unless allow_outside: a CSV from elsewhere must not pack
    this machine's files into shards that are then shared. Every row left out is said and counted."""
    data = CsvData(csv_path, img_key, caption_key, separator)
    lock_folder(out, "data.py shards")  # a second command on --out is refused, not mixed in
    try:
        return _write_shards(data, csv_path, out, per_shard, allow_outside, max_bytes)
    finally:
        unlock_folder(out)


def _write_shards(data, csv_path, out, per_shard, allow_outside, max_bytes):
    from PIL import Image

    left_out = []

    def leave_out(i, why):
        left_out.append(i)
        print(f"data.py: row {i + 2} of {csv_path}: {why}; left out", file=sys.stderr)

    root = os.path.realpath(data.root)
    shards = ShardWriter(out, per_shard)
    for i in range(len(data)):
        if i in data.bad:
            leave_out(i, data.bad[i])
            continue
        src = os.path.join(data.root, data.images[i])
        ext = os.path.splitext(src)[1].lower().lstrip(".")
        if ext not in IMAGE_EXTS:
            leave_out(i, f"{src} is not a {'/'.join(IMAGE_EXTS)} file")
            continue
        if not allow_outside and os.path.commonpath([root, os.path.realpath(src)]) != root:
            leave_out(i, f"{src} resolves outside {data.root} (pass --allow-outside if that is meant)")
            continue
        try:
            payload = read_file(src, max_bytes)
            with Image.open(io.BytesIO(payload), formats=IMAGE_FORMATS) as img:
                img.verify()  # the file's structure, without a decode
            kind = img.format
        except SampleError as e:
            leave_out(i, str(e))
            continue
        except Exception as e:  # Pillow: OSError, SyntaxError, DecompressionBombError ...
            leave_out(i, f"{src} does not open as an image ({type(e).__name__})")
            continue
        if kind not in ("JPEG", "PNG", "WEBP"):
            leave_out(i, f"{src} is a {kind} image named .{ext}")
            continue
        key = f"{i:09d}"
        shards.write(key, [(ext, payload), ("txt", (data.texts[i] or "").encode()),
                           ("json", json.dumps({"key": key, "caption": data.texts[i], "source": data.images[i]}).encode())])
    shards.close()
    if left_out:
        print(f"data.py: left out {len(left_out)} of {len(data)} rows of {csv_path} (each named above)",
              file=sys.stderr)
    return shards.paths


class ShardWriter:
    """Samples into numbered tar shards OUT/00000.tar, ..., per_shard each, in webdataset's layout (KEY.EXT
    members); a shard is named only once whole (written as .tmp, then renamed). paths: those written."""

    def __init__(self, folder, per_shard, prefix=""):
        self.folder, self.per_shard, self.prefix, self.tar, self.count, self.paths = folder, per_shard, prefix, None, 0, []

    def write(self, key, members):
        """members: [(extension, bytes)] of one sample."""
        if self.tar is None:
            self.path = os.path.join(self.folder, f"{self.prefix}{len(self.paths):05d}.tar")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path + ".tmp")  # what a killed writer left (a link there goes, not its target)
            fd = os.open(self.path + ".tmp", os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
            self.file = os.fdopen(fd, "wb")
            self.tar = tarfile.open(fileobj=self.file, mode="w")
        for ext, payload in members:
            info = tarfile.TarInfo(f"{key}.{ext}")
            info.size = len(payload)
            self.tar.addfile(info, io.BytesIO(payload))
        self.count += 1
        if self.count == self.per_shard:
            self.close()

    def close(self):
        if self.tar is not None:
            self.tar.close()
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            if os.path.lexists(self.path) and not os.path.isfile(self.path) or os.path.islink(self.path):
                raise IsADirectoryError(f"{self.path}: exists and is not a regular file; move it away")
            os.replace(self.path + ".tmp", self.path)
            self.paths.append(self.path)
            self.tar, self.count = None, 0


# ----------------------------------------------------------------------------------------------
# Curation before training: `python data.py filter` keeps the pairs a teacher scores highest (DataComp's
# CLIP-score filter), `python data.py curate` balances the pool over a list of concepts (MetaCLIP). Both
# read any data train.py reads and write shards of what they keep, each sample under its source's key.


def stored_image(img):
    """(bytes, extension) a sample's image is stored as: the file's own bytes, or a PNG of one made in
    memory (the synthetic set)."""
    if getattr(img, "encoded", None) is not None and img.format in ("JPEG", "PNG", "WEBP"):
        return img.encoded, {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}[img.format]
    buf = io.BytesIO()
    to_rgb(img).save(buf, format="PNG")
    return buf.getvalue(), "png"


def claim_folder(out, who, tables):
    """Lock OUT for `data.py who` and clear what a stopped run of the same command left there (its marker
    says one was writing), so that a rerun writes everything once; a folder a finished command, or any
    other, wrote shards or these tables into is refused (nothing is overwritten)."""
    lock_folder(out, f"data.py {who}")
    marker = os.path.join(out, f".{who}-unfinished")
    mine = [f for f in os.listdir(out) if re.fullmatch(r"(part\d{5}-)?\d{5}\.tar(\.tmp\d*)?", f)
            or f in tables or f.startswith(tuple(t + ".tmp" for t in tables))]
    if mine and not os.path.lexists(marker):
        unlock_folder(out)
        raise ValueError(f"{out} already holds {sorted(mine)[0]}: give a new folder (nothing is overwritten)")
    for f in mine:
        os.remove(os.path.join(out, f))
    write_file(marker, f"data.py {who} is writing this folder; run it again to start over\n")


def finish_folder(out, who):
    """Number the shards the parts wrote (OUT/partP-NNNNN.tar) as one sequence OUT/00000.tar, ..., part by
    part, then drop the marker and the lock. Returns the shards' paths."""
    parts = sorted(f for f in os.listdir(out) if re.fullmatch(r"part\d{5}-\d{5}\.tar", f))
    for n, f in enumerate(parts):
        os.replace(os.path.join(out, f), os.path.join(out, f"{n:05d}.tar"))
    os.remove(os.path.join(out, f".{who}-unfinished"))
    unlock_folder(out)
    return [os.path.join(out, f"{n:05d}.tar") for n in range(len(parts))]


class KeptSamples:
    """Samples kept by filter or curate into shards (OUT/partP-NNNNN.tar for part P): image, caption and a
    .json holding the source's key ('key'), its label and rewrites. The member name is the source's key
    where that is one (letters, digits, _ and -: a shard's __key__), else the sample's number."""

    def __init__(self, out, per_shard, part=0):
        self.shards, self.last, self.n = ShardWriter(out, per_shard, f"part{part:05d}-"), None, 0

    def write(self, key, sample):
        payload, ext = sample.get("stored") or stored_image(sample["image"])
        meta = {"key": key, **{k: sample[k] for k in ("label", "rewrites") if sample.get(k)}}
        name = key if re.fullmatch(r"[\w-]{1,200}", key, re.ASCII) and key != self.last else f"{self.n:09d}"
        self.shards.write(name, [(ext, payload), ("txt", sample["text"].encode("utf-8")),
                                 ("json", json.dumps(meta).encode("utf-8"))])
        self.last, self.n = name, self.n + 1

    def close(self):
        self.shards.close()


class Ticker:
    """A progress line on stderr at most every `every` seconds."""

    def __init__(self, who, every=10.0):
        self.who, self.every, self.start = who, every, time.time()
        self.last = self.start

    def __call__(self, n, what):
        if time.time() - self.last >= self.every:
            self.last = time.time()
            print(f"{self.who}: {what} ({n / max(self.last - self.start, 1e-9):.0f} samples/s)", file=sys.stderr,
                  flush=True)


# DataComp's CLIP-score filter (Gadre et al. 2023): the cosine of a CLIP's image and text embeddings of each
# pair, keeping the pool's top fraction (its best at medium scale, the top 30%, lifted ImageNet zero-shot
# from 17.6% to 27.3%) or the pairs scoring at least a threshold.
def clip_scores(teacher, samples, batch_size, problems):
    """(key, sample, score) for each (key, sample) of `samples`, in order: the cosine of the teacher's
    embeddings of the image (its evaluation preprocessing) and of the caption. A sample not read, or whose
    image does not decode (its reason added to problems), is {'skipped': reason} with score None. A scored
    sample keeps its image's stored bytes ('stored'), not the decoded pixels: memory is bounded by the batch."""
    transform, rng, pending = teacher.transform(False), np.random.default_rng(0), []

    @torch.no_grad()
    def scored():
        ready = [p for p in pending if p[2] is not None]
        scores = []
        if ready:
            device = next(teacher.parameters()).device
            image = teacher.encode_image(torch.stack([x for *_, x in ready]).to(device), normalize=True)
            text = teacher.encode_texts([s["text"] for _, s, _ in ready])
            scores = (image.float() * text.float()).sum(1).tolist()
        done = [(k, s, scores.pop(0) if x is not None else None) for k, s, x in pending]
        pending.clear()
        return done

    for key, sample in samples:
        pixels = None
        if "skipped" not in sample:  # else not read (raw_samples said why)
            try:
                stored = stored_image(sample["image"])
                pixels = transform(sample, rng)["image"]
                sample = {**sample, "image": None, "stored": stored}
            except Exception as e:  # whatever one sample holds: skipped and counted, as in training
                problems.append(sample_reason(e))
                sample = {"skipped": problems[-1]}
        pending.append((key, sample, pixels))
        if len(pending) == batch_size:
            yield from scored()
    if pending:
        yield from scored()


def sortable(scores):
    """float32 scores as uint32 keys in the same order: the sign bit set for positives, negatives' bits
    inverted (-0.0 taken as 0.0, as float comparison takes it)."""
    u = np.ascontiguousarray(scores, dtype="<f4").view("<u4")
    u = np.where(u == np.uint32(1 << 31), np.uint32(0), u)
    return np.where(u >> 31, ~u, u | np.uint32(1 << 31))


def kth_largest(path, k, chunk=1 << 20):
    """(key, ties) of the k-th largest float32 score in the file at path (NaN: no score; 1 <= k <= the
    scores): its sortable() key, and how many scores equal to it are among the k largest. Two passes of
    16-bit histograms over the file in chunks: memory bounded by the chunk, not the pool."""
    def histogram(select, digit):
        total = np.zeros(1 << 16, np.int64)
        for start in range(0, os.path.getsize(path) // 4, chunk):
            s = np.fromfile(path, "<f4", count=chunk, offset=start * 4)
            keys = sortable(s[~np.isnan(s)])
            total += np.bincount((digit(keys[select(keys)])).astype(np.int64), minlength=1 << 16)
        return total

    def pick(hist, k):  # the digit holding the k-th largest, and how many lie above that digit
        above = np.cumsum(hist[::-1])
        d = int(np.searchsorted(above, k))
        return (1 << 16) - 1 - d, int(above[d - 1]) if d else 0

    high, over = pick(histogram(lambda x: np.ones(len(x), bool), lambda x: x >> 16), k)
    low, over_low = pick(histogram(lambda x: (x >> 16) == high, lambda x: x & 0xFFFF), k - over)
    return (high << 16) | low, k - over - over_low


def filter_pool(teacher, data, out, fraction=None, threshold=None, batch_size=64, per_shard=10_000, seed=0):
    """python data.py filter: shards in OUT of the samples of `data` a teacher scores highest, and
    OUT/scores.jsonl, one row per sample read (key, score, kept; one that does not decode: its reason).
    threshold keeps scores >= S, in one pass. fraction F keeps the round(F * N) highest of the N samples
    scored, over the whole pool (ties in pool order): a first pass scores every sample to OUT/scores.f32,
    kth_largest finds the cut from it in bounded memory, and a second pass reads the pool again (no model)
    to write what is kept. Returns (kept, scored, problems)."""
    problems, kept, scored, tick = [], 0, 0, Ticker("data.py filter")
    claim_folder(out, "filter", ("scores.jsonl", "scores.f32", "scores.partial"))
    shards = KeptSamples(out, per_shard)
    rows = open_append(os.path.join(out, "scores.jsonl" if fraction is None else "scores.partial"))
    raw = open_append(os.path.join(out, "scores.f32"), binary=True) if fraction is not None else None
    pool = raw_samples(data, seed, problems, by_source=True, skipped=True)
    for key, sample, score in clip_scores(teacher, pool, batch_size, problems):
        row = {"key": key, "score": score} if score is not None else {"key": key, "skipped": sample["skipped"]}
        if fraction is None:
            row["kept"] = score is not None and score >= threshold
            if row["kept"]:
                shards.write(key, sample)
                kept += 1
        else:
            raw.write(np.float32(np.nan if score is None else score).tobytes())
        rows.write(json.dumps(row) + "\n")
        scored += score is not None
        tick(scored, f"{scored} scored, {kept} kept")
    rows.close()
    if fraction is not None:
        raw.close()
        k = round(fraction * scored)
        cut, ties = kth_largest(os.path.join(out, "scores.f32"), k) if k else (None, 0)
        rows = open_append(os.path.join(out, "scores.jsonl"))
        with open(os.path.join(out, "scores.f32"), "rb") as f32, open(os.path.join(out, "scores.partial"), "rb") as partial:
            for i, ((key, sample), line) in enumerate(zip(raw_samples(data, seed, [], by_source=True, skipped=True),
                                                          partial)):
                row, s = json.loads(line), int(sortable(np.frombuffer(f32.read(4), "<f4"))[0])
                if row["key"] != key:
                    raise ValueError(f"{data}: its samples changed while they were filtered ({key} where {row['key']} "
                                     f"was); run the filter again")
                if "score" in row:
                    row["kept"] = cut is not None and (s > cut or (s == cut and ties > 0))
                    ties -= row["kept"] and s == cut
                    if row["kept"]:
                        shards.write(key, sample)
                        kept += 1
                rows.write(json.dumps(row) + "\n")
                tick(i + 1, f"{kept} of {k} written")
        rows.close()
        for f in ("scores.f32", "scores.partial"):
            os.remove(os.path.join(out, f))
    shards.close()
    finish_folder(out, "filter")
    return kept, scored, problems


# MetaCLIP's curation (Xu et al. 2024): a caption matches an entry of the metadata (WordNet synsets,
# Wikipedia titles and frequent n-grams, ~500k) when the entry padded with a space each side is a
# sub-string of the caption spaced as below; each entry then keeps at most about t of its pairs, so the
# head concepts are flattened and the tail kept whole (t = 20k for 400M pairs).
MAX_ENTRY_CHARS, MAX_ENTRIES = 1000, 1 << 24
SPACED = str.maketrans({**{p: f" {p} " for p in ",.;:?!`"}, "\t": " ", "\n": " ", "\r": " "})


def spacing(text):
    """MetaCLIP's spacing of a caption: padded with a space each side, each of , . ; : ? ! ` wrapped in
    spaces, tabs and line breaks made spaces."""
    return f" {text} ".translate(SPACED)


class Matcher:
    """The ids of the entries a caption matches, as MetaCLIP's substr_matching finds them (a loop over
    every entry: `f" {entry} " in spacing(text)`), in time linear in the caption. A padded entry can begin
    and end only at spaces of the spaced caption, so it matches exactly when its words (split at single
    spaces, empty words included) are a run of the caption's: each run is looked up in a table, and grown
    only while it begins some entry."""

    def __init__(self, entries):
        self.ids, self.prefixes = {}, set()
        for i, entry in enumerate(entries):
            if entry is not None and entry not in self.ids:
                self.ids[entry] = i
                words = entry.split(" ")
                self.prefixes.update(" ".join(words[:n]) for n in range(1, len(words)))

    def __call__(self, text):
        words, found = spacing(text).split(" "), set()
        for start in range(1, len(words) - 1):  # words[0] and words[-1] lie outside the padding
            run, end = words[start], start
            while True:
                if run in self.ids:
                    found.add(self.ids[run])
                end += 1
                if end == len(words) - 1 or run not in self.prefixes:
                    break
                run += " " + words[end]
        return sorted(found)


def read_metadata(path):
    """MetaCLIP's metadata: a JSON list of strings (its metadata.json), or a text file of one entry a line;
    at most 1 GiB. Ids are the positions in the file. Entries over MAX_ENTRY_CHARS (matching costs up to
    their length for each word of a caption) and repeats of an earlier one (they match what it matches)
    are left out as None, each kind said with its count."""
    raw = read_text(path, 1 << 30, "metadata file")
    if path.endswith(".json"):
        try:
            entries = json.loads(raw.decode("utf-8"), parse_constant=_no_constant)
        except (ValueError, RecursionError) as e:
            raise ValueError(f"{path}: not JSON ({type(e).__name__}); give a JSON list of strings or one entry a "
                             f"line") from None
        if not isinstance(entries, list) or not all(isinstance(e, str) for e in entries):
            raise ValueError(f"{path}: not a JSON list of strings (MetaCLIP's metadata.json)")
    else:
        entries = raw.decode("utf-8", "replace").split("\n")
        if entries and entries[-1] == "":
            entries.pop()
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"{path}: {len(entries)} entries, over {MAX_ENTRIES}")
    seen, dropped = set(), {}
    for i, e in enumerate(entries):
        why = f"over {MAX_ENTRY_CHARS} characters" if len(e) > MAX_ENTRY_CHARS else "repeating an earlier one" if (
            e in seen) else None
        if why:
            dropped[why] = dropped.get(why, 0) + 1
            entries[i] = None
        else:
            seen.add(e)
    if dropped:
        print(f"data.py curate: {path}: left out " + ", ".join(f"{n} entries {why}" for why, n in dropped.items()),
              file=sys.stderr, flush=True)
    return entries


def balanced(key, ids, counts, t, seed):
    """MetaCLIP's balance_sampling: a pair is kept when, for any entry it matches, a uniform draw falls
    under min(1, t / the entry's count). Each draw comes from (seed, key, entry), not from a running
    generator, so a seed keeps the same pairs on any number of processes."""
    for i in ids:
        h = hashlib.blake2b(f"{seed}\0{key}\0{i}".encode("utf-8", "surrogatepass"), digest_size=8).digest()
        if int.from_bytes(h, "little") / 2.0 ** 64 < t / max(int(counts[i]), t):
            return True
    return False


_curation = {}  # what the worker processes of curate read (set before they fork)


def curate_pass(part, counts=None):
    """One worker's share of curate: with counts None, how many of its pairs match each entry; else its
    pairs that balanced() keeps written to its shards, returned as (kept per entry, samples read, pairs
    kept, problems)."""
    c = _curation
    matcher, problems, n = c["matcher"], [], 0
    if counts is None:
        matched = np.zeros(c["entries"], np.int64)
        for key, sample in raw_samples(c["data"], c["seed"], [], (part, c["parts"]), by_source=True):
            matched[matcher(sample["text"])] += 1
        return matched
    kept, shards, tick = np.zeros(c["entries"], np.int64), KeptSamples(c["out"], c["per_shard"], part), Ticker(
        f"data.py curate (part {part})")
    for key, sample in raw_samples(c["data"], c["seed"], problems, (part, c["parts"]), by_source=True):
        n += 1
        ids = matcher(sample["text"])
        if ids and balanced(key, ids, counts, c["t"], c["seed"]):
            shards.write(key, sample)
            kept[ids] += 1
        tick(n, f"{n} read, {shards.n} kept")
    shards.close()
    return kept, n, shards.n, problems


def curate(metadata, data, out, t, seed=0, per_shard=10_000, workers=1):
    """python data.py curate: MetaCLIP's curation of `data` into shards in OUT, and OUT/counts.tsv (each
    entry with how many pairs matched it and how many of those were kept). Two passes over the pool: the
    entries' counts, then the balanced draw. The pool is split among `workers` processes, and further
    among torchrun's ranks when run under it; the pairs kept are the same for any split. Memory: the
    entry table and one sample per worker. Returns (pairs kept, samples read, problems)."""
    entries = read_metadata(metadata)
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    if rank == 0:
        claim_folder(out, "curate", ("counts.tsv",))
    if world > 1:
        dist.barrier()
    _curation.update(matcher=Matcher(entries), entries=len(entries), data=data, seed=seed, t=t, out=out,
                     per_shard=per_shard, parts=world * workers)
    mine = [rank * workers + w for w in range(workers)]
    if workers > 1:
        import multiprocessing

        with multiprocessing.get_context("fork").Pool(workers) as pool:
            matched = sum(pool.map(curate_pass, mine))
            counts = torch.from_numpy(matched)
            if world > 1:
                dist.all_reduce(counts)
            results = pool.starmap(curate_pass, [(p, counts.numpy()) for p in mine])
    else:
        counts = torch.from_numpy(curate_pass(mine[0]))
        if world > 1:
            dist.all_reduce(counts)
        results = [curate_pass(mine[0], counts.numpy())]
    kept = torch.from_numpy(sum(r[0] for r in results))
    totals = torch.tensor([sum(r[1] for r in results), sum(r[2] for r in results)])
    if world > 1:
        dist.all_reduce(kept)
        dist.all_reduce(totals)
        dist.barrier()  # every part's shards written before rank 0 numbers them
    problems = [p for r in results for p in r[3]]
    if rank == 0:
        escape = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
        write_file(os.path.join(out, "counts.tsv"), "entry\tmatched\tkept\n" + "".join(
            f"{e.translate(escape)}\t{m}\t{k}\n" for e, m, k in zip(entries, counts.tolist(), kept.tolist())
            if e is not None))
        finish_folder(out, "curate")
    return int(totals[1]), int(totals[0]), problems


def curation_main(command, argv=None):
    """python data.py filter ... / python data.py curate ...: the flags, then filter_pool or curate."""
    import argparse

    p = argparse.ArgumentParser(prog=f"data.py {command}", description={
        "filter": "DataComp's CLIP-score filter: the pairs of --data a teacher scores highest, into shards in --out",
        "curate": "MetaCLIP's curation: the pairs of --data matching --metadata, balanced to about --t per entry, "
                  "into shards in --out"}[command])
    if command == "filter":
        p.add_argument("--teacher", required=True, help="weights a model file's load() reads (CLIP's by default)")
        p.add_argument("--teacher-model", default="clip", help="the model file that reads --teacher")
        keep = p.add_mutually_exclusive_group(required=True)
        keep.add_argument("--fraction", type=float, help="keep the top F of the pool (DataComp's best: 0.3)")
        keep.add_argument("--threshold", type=float, help="keep pairs whose cosine is at least S")
        p.add_argument("--batch-size", type=int, default=64, help="pairs the teacher embeds at once")
        p.add_argument("--device", default="cpu")
    else:
        p.add_argument("--metadata", required=True, help="entries: MetaCLIP's metadata.json, or one a line")
        p.add_argument("--t", type=int, required=True, help="pairs kept per entry, about (MetaCLIP: 20000 for 400M)")
        p.add_argument("--workers", type=int, default=1, help="processes (each of torchrun's ranks runs as many)")
    p.add_argument("--out", required=True, help="a new folder for the shards")
    p.add_argument("--per-shard", type=int, default=10_000)
    p.add_argument("--seed", type=int, default=0, help="curate: its draws; both: the caption a sample with "
                   "several is read with")
    add_args(p)
    args = p.parse_args(argv)
    check_numbers(p, args, {**RANGES, "fraction": (0, 1), "threshold": (-1, 1), "batch_size": (1, 1 << 16),
                            "per_shard": (1, 1 << 20), "t": (1, None), "workers": (1, 256)}, above={"fraction"})
    distributed = int(os.environ.get("WORLD_SIZE", 1)) > 1
    if distributed and command == "curate":
        dist.init_process_group("gloo")
    try:
        if os.path.exists(args.out) and not os.path.isdir(args.out):
            raise ValueError(f"{args.out} is a file: give a folder")
        if command == "filter":
            from train import import_model

            teacher = import_model(args.teacher_model).load(args.teacher, args.device)[0]
            if args.data == "synthetic" and args.synthetic_resolution is None:
                args.synthetic_resolution = teacher.cfg.image_size
            kept, seen, problems = filter_pool(teacher, build(args)[0], args.out, args.fraction, args.threshold,
                                               args.batch_size, args.per_shard, args.seed)
            line = f"data.py filter: kept {kept} of {seen} pairs scored in {args.out} (scores.jsonl: every pair's)"
        else:
            kept, seen, problems = curate(args.metadata, build(args)[0], args.out, args.t, args.seed, args.per_shard,
                                          args.workers)
            line = f"data.py curate: kept {kept} of {seen} pairs in {args.out} (counts.tsv: matched and kept per entry)"
    except (FileNotFoundError, ValueError, ImportError, OSError) as err:
        raise SystemExit(f"data.py {command}: {err}") from None
    finally:
        if distributed and dist.is_initialized():
            dist.destroy_process_group()
    if problems:
        line += "; skipped " + ", ".join(f"{problems.count(r)} {r}" for r in dict.fromkeys(problems))
    if not distributed or int(os.environ.get("RANK", 0)) == 0:
        print(line)


# ----------------------------------------------------------------------------------------------
# Rewrite generation: `python data.py rewrite --captions IN.txt --out OUT.txt --endpoint URL`
#
# Drives any OpenAI-compatible completion server (llama.cpp's llama-server, vLLM, ...) with LaCLIP's
# in-context prompt: an instruction, three "source => target" examples drawn from a pool of meta
# pairs, then "caption =>"; the first generated line is the rewrite. Standard-library HTTP only.


PROMPT_HEAD = "write image captions differently,"
# Our own pool of 16 meta pairs (the paper's pairs came from chatbots and humans; any will do).
META_PAIRS = [
    ("a dog running on the beach", "a happy dog sprints along the sandy shore at low tide"),
    ("two people riding bicycles", "a pair of cyclists pedal side by side down a quiet road"),
    ("a plate of pasta with tomato sauce", "spaghetti covered in a rich red sauce served on a white dish"),
    ("a red car parked on the street", "a shiny red sedan sits by the curb of a city street"),
    ("a cat sleeping on a couch", "a tabby cat naps curled up on the soft cushions of a sofa"),
    ("mountains covered in snow", "snowy peaks rise above a valley under a clear blue sky"),
    ("a man playing guitar", "a musician strums an acoustic guitar on a small stage"),
    ("children playing in a park", "kids run and laugh together on the grass of a sunny park"),
    ("a bowl of fresh fruit", "apples, bananas and grapes piled high in a wooden bowl"),
    ("an airplane in the sky", "a passenger jet flies high above the clouds"),
    ("a city skyline at night", "tall buildings glow with lights against the dark evening sky"),
    ("a woman reading a book", "a young woman sits by the window absorbed in a novel"),
    ("a boat on a lake", "a small rowing boat floats on calm water surrounded by trees"),
    ("a bird on a branch", "a little songbird perches on a thin branch of a tree"),
    ("a cup of coffee on a table", "a steaming mug of coffee rests on a wooden cafe table"),
    ("a train at a station", "a long passenger train waits at the platform of a busy station"),
]


class RewriteError(Exception):
    pass


def rewrite_prompt(caption, pairs):
    return "\n".join([PROMPT_HEAD] + [f"{s} => {t}" for s, t in pairs] + [f"{caption} =>"])


def completions_url(endpoint):
    url = endpoint.rstrip("/")
    if url.endswith("/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


MAX_ANSWER_BYTES = 1 << 20  # a completion server's whole answer; more is a failed request
MAX_REWRITE_CHARS = 1000  # a rewrite is a caption: longer ones are cut at a word


def fold(text):
    """One line: every character str.splitlines splits on (\r, \x0b, \x0c, \x1c-\x1e, \x85, \u2028,
    \u2029, \n) becomes a space, so each caption's rewrite is exactly one line of the output."""
    text = " ".join(" ".join(text.splitlines()).split())
    text = text.encode("utf-8", "replace").decode("utf-8")  # an LLM's lone surrogate ("\ud800") becomes "?"
    if len(text) > MAX_REWRITE_CHARS:
        text = text[:MAX_REWRITE_CHARS].rsplit(" ", 1)[0]
    return text


def post_json(url, payload, timeout):
    """POST, then the JSON answer, all within `timeout` seconds: a watchdog shuts the socket at the
    deadline, so a server that drips its answer a byte at a time cannot hold a request past it."""
    import http.client
    import json
    import socket
    import threading
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn_class = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(u.hostname, u.port, timeout=timeout)
    expired, opened = threading.Event(), []

    def cut():
        expired.set()
        for sock in opened:  # the response keeps reading from it after the connection object lets go
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, cut)
    timer.start()
    try:
        conn.connect()
        opened.append(conn.sock)
        if expired.is_set():
            cut()
        conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), body=payload,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_ANSWER_BYTES + 1)
        status = response.status
    except (OSError, http.client.HTTPException) as e:
        raise TimeoutError(f"no whole answer within --timeout {timeout:g} s") if expired.is_set() else e
    finally:
        timer.cancel()
        conn.close()
    if expired.is_set():
        raise TimeoutError(f"no whole answer within --timeout {timeout:g} s")
    if status >= 400:
        return status, body[:300]
    if len(body) > MAX_ANSWER_BYTES:
        raise ValueError(f"an answer over {MAX_ANSWER_BYTES >> 20} MiB")
    try:
        return status, json.loads(body)
    except RecursionError:
        raise ValueError("an answer nested past the JSON parser's depth") from None


def request_rewrite(url, caption, pairs, args):
    """One rewrite, retried with exponential backoff on server errors, time-outs, refused connections and
    answers without text."""
    import http.client
    import json
    import time

    payload = json.dumps({"model": args.model, "prompt": rewrite_prompt(caption, pairs), "max_tokens": args.max_tokens,
                          "temperature": args.temperature, "top_p": args.top_p, "stop": ["\n"]}).encode()
    delay, error = args.backoff, None
    for attempt in range(args.retries + 1):
        if attempt:
            time.sleep(delay)
            delay = min(2 * delay, 60)
        try:
            status, answer = post_json(url, payload, args.timeout)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short, or past the deadline
            error = f"{type(e).__name__}: {e}"
            continue
        except ValueError as e:  # not JSON, or too long
            error = f"not an OpenAI-compatible answer ({str(e)[:100]})"
            continue
        if status >= 400:
            if status < 500 and status != 429:  # the request itself is wrong: retrying will not help
                raise RewriteError(f"{url} refused the request: HTTP {status} {answer!r}")
            error = f"HTTP {status}"
            continue
        try:
            text = answer["choices"][0]["text"]
        except (TypeError, KeyError, IndexError):
            text = None
        if not isinstance(text, str):  # {"text": null}, no choices, or another shape
            error = "an answer without choices[0].text"
            continue
        return fold(text.split("\n")[0])  # the first generated line (a server may ignore stop=["\n"])
    raise RewriteError(f"no usable answer from {url} after {args.retries + 1} tries (last: {error}). Is the completion "
                       f"server running (llama.cpp: llama-server -m MODEL.gguf --port 8080; vLLM: vllm serve MODEL)? "
                       f"Start it or fix --endpoint, then run the same command again: it continues where it stopped")


def read_lines(path):
    """The lines of a regular file (a FIFO would block, /dev/zero never end), split at \n only (a \u2028
    inside a caption is not a line break), each cut to 8192 characters as every caption is."""
    text = read_text(path, 1 << 30, "text file").decode("utf-8", "replace")
    return [(line[:-1] if line.endswith("\r") else line)[:MAX_TEXT_CHARS] for line in text.split("\n")]


def rewrite_main(argv=None):
    import argparse
    import random
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(prog="data.py rewrite", description="Write LaCLIP caption rewrites with a local LLM.")
    p.add_argument("--captions", required=True, help="input: one caption per line")
    p.add_argument("--out", required=True, help="output: one rewrite per input line, in order (.K before the "
                   "extension per rewrite when --rewrites > 1: the official one-file-per-source layout)")
    p.add_argument("--endpoint", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", default="default", help="model name sent to the server")
    p.add_argument("--meta-pairs", default=None, help="file of 'source => target' lines (default: built in)")
    p.add_argument("--rewrites", type=int, default=1, help="rewrites per caption")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="for drawing the 3 example pairs of each prompt")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=77)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request, the whole answer included")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--backoff", type=float, default=1.0, help="first wait between tries, doubled each time")
    args = p.parse_args(argv)
    check_numbers(p, args, {"rewrites": (1, 1 << 10), "concurrency": (1, 1024), "max_tokens": (1, 1 << 20),
                            "temperature": (0, 100), "top_p": (0, 1), "timeout": (0, 1e6), "retries": (0, 1000),
                            "backoff": (0, 1e6)}, above={"timeout", "top_p"})
    for path in (args.captions, args.meta_pairs, *([args.out] if os.path.exists(args.out) else [])):
        if path and os.path.exists(path) and not os.path.isfile(path):
            raise SystemExit(f"data.py rewrite: {path}: not a regular file")
    if not os.path.isfile(args.captions):
        raise SystemExit(f"data.py rewrite: {args.captions}: no such file")
    captions = read_lines(args.captions)
    if captions and captions[-1] == "":
        captions.pop()
    pairs = META_PAIRS
    if args.meta_pairs:
        with open(args.meta_pairs, encoding="utf-8", errors="replace") as f:  # a regular file (checked above)
            pairs = [tuple(x.strip() for x in line.split("=>", 1)) for line in f if "=>" in line]
        if len(pairs) < 3:
            raise SystemExit(f"data.py rewrite: {args.meta_pairs}: needs at least 3 'source => target' lines")
    root, ext = os.path.splitext(args.out)
    outs = [args.out] if args.rewrites == 1 else [f"{root}.{k}{ext}" for k in range(args.rewrites)]
    # one command at a time writes these outputs: a second is refused, not interleaved
    lock_folder(os.path.dirname(os.path.abspath(args.out)), "data.py rewrite", f".{os.path.basename(args.out)}.lock")
    # Resume: each output continues after the lines it has. Nothing is ever cut from a file: one that
    # does not fit these captions is refused, with what to do.
    have = []
    for path in outs:
        lines = read_lines(path) if os.path.exists(path) else [""]
        if lines[-1] != "":
            raise SystemExit(f"data.py rewrite: {path} ends in a partial line (a run stopped while writing it); "
                             f"delete that last line, then run the same command again")
        if len(lines) - 1 > len(captions):
            raise SystemExit(f"data.py rewrite: {path} has {len(lines) - 1} lines for {len(captions)} captions of "
                             f"{args.captions}: not its rewrites; move it away or pick another --out")
        have.append(len(lines) - 1)
    done = min(have)
    url = completions_url(args.endpoint)

    def job(item):
        i, k = item
        rng = random.Random(f"{args.seed}-{i}-{k}")
        text = request_rewrite(url, captions[i], rng.sample(pairs, 3), args)
        return text or fold(captions[i])  # an empty rewrite: keep the original rather than a blank line

    try:
        files = [open_append(path) for path in outs]
    except OSError as e:
        raise SystemExit(f"data.py rewrite: {e}") from None
    pool = ThreadPoolExecutor(args.concurrency)
    try:
        for start in range(done, len(captions), 256):  # in chunks: results are written in input order
            rows = range(start, min(start + 256, len(captions)))
            items = [(i, k) for i in rows for k in range(args.rewrites) if i >= have[k]]
            results = pool.map(job, items)  # in the order of items, which is the order written
            for i in rows:
                for k, f in enumerate(files):
                    if i >= have[k]:
                        f.write(fold(next(results)) + "\n")
                for f in files:
                    f.flush()
    except RewriteError as e:
        raise SystemExit(f"data.py rewrite: {e}") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for f in files:
            f.close()
        unlock_folder(os.path.dirname(os.path.abspath(args.out)))
    print(f"{len(captions) - done} captions rewritten ({done} were already done) -> {', '.join(outs)}")


if __name__ == "__main__":
    import argparse

    if sys.argv[1:2] in (["reinforce"], ["rewrite"]):  # commands with flags of their own
        raise SystemExit({"reinforce": reinforce_main, "rewrite": rewrite_main}[sys.argv[1]](sys.argv[2:]))
    if sys.argv[1:2] in (["filter"], ["curate"]):
        raise SystemExit(curation_main(sys.argv[1], sys.argv[2:]))
    p = argparse.ArgumentParser(description="data.py shards: tar shards from a CSV/TSV of local images; "
                                "data.py sample: held-out synthetic images to try a model on; data.py rewrite: "
                                "LaCLIP's caption rewrites by a local LLM; data.py reinforce: teachers' embeddings "
                                "stored in shards; data.py filter: DataComp's CLIP-score filter; data.py curate: "
                                "MetaCLIP's curation (each: --help)")
    sub = p.add_subparsers(dest="command", required=True)
    ss = sub.add_parser("sample")
    ss.add_argument("--out", required=True)
    ss.add_argument("--n", type=int, default=4)
    ss.add_argument("--seed", type=int, default=0)
    sp = sub.add_parser("shards")
    sp.add_argument("--csv", required=True)
    sp.add_argument("--out", required=True)
    sp.add_argument("--per-shard", type=int, default=10_000)
    sp.add_argument("--csv-img-key", default="filepath")
    sp.add_argument("--csv-caption-key", default="title")
    sp.add_argument("--csv-separator", default=None)
    sp.add_argument("--allow-outside", action="store_true", help="pack rows whose files lie outside the CSV's folder")
    sp.add_argument("--max-sample-bytes", type=int, default=MAX_SAMPLE_BYTES)
    a = p.parse_args()
    check_numbers({"sample": ss, "shards": sp}[a.command], a, {"n": (1, 1 << 20), **RANGES, "per_shard": (1, 1 << 20)})
    if a.command == "sample":
        os.makedirs(a.out, exist_ok=True)
        held_out = Synthetic(a.seed, "val", a.n)
        for i in range(a.n):
            write_file(os.path.join(a.out, f"{i}.png"), lambda f: held_out.image(i).save(f, format="PNG"))
            print(f"{os.path.join(a.out, f'{i}.png')}: {held_out.captions(i)[0][0]}")
        raise SystemExit(0)
    try:
        written = write_shards(a.csv, a.out, a.per_shard, a.csv_img_key, a.csv_caption_key, a.csv_separator,
                               a.allow_outside, a.max_sample_bytes)
    except (OSError, ValueError) as e:
        raise SystemExit(f"data.py shards: {e}") from None
    print(f"wrote {len(written)} shards to {a.out}: {os.path.join(a.out, '{' + f'00000..{len(written) - 1:05d}' + '}.tar')}")
