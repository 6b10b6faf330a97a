"""Decode + RandomResizedCrop to 224 px on one core, per path: the old Pillow path against candidates
for a faster CPU path and the path training now takes.

    .venv/bin/python tests/bench/bench_decode.py [--n 200] [--sizes 256 1024]

Paths, each from the JPEG's bytes to a 3 x 224 x 224 tensor, with the same crop box drawn from the
same rng (torchvision's RandomResizedCrop rule, scale 0.9-1, as data.py's RandomCrop):
- pillow:        the old path: a full decode (Image.open + convert, as data.py did on reading), Pillow's
                 bicubic resize of the box, float normalisation;
- pillow-draft:  Pillow with draft mode (the JPEG decoder scales by 1/2, 1/4 or 1/8 in the DCT domain,
                 never below what the crop needs), bicubic resize, uint8 out;
- tv-io:         torchvision.io.decode_jpeg (libjpeg-turbo) to a uint8 tensor, crop, antialiased
                 bicubic interpolate, uint8 out;
- tv-io+pillow:  torchvision.io.decode_jpeg, then Pillow's bicubic resize of the box, uint8 out;
- now:           the training path since 2026-11-23: data.RandomCrop on data.py's
                 header-only image (draft where the crop allows, torch's antialiased bicubic downscale).
It prints images/s on one thread (the best of three passes) and the ratio to the old path, and the largest pixel difference from
the old path (0-255 scale) so a faster path's error is in view.
"""
import argparse
import io
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clip  # noqa: E402
import data  # noqa: E402


def jpegs(n, side, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    out = []
    for _ in range(n):  # smooth colour fields plus noise: JPEGs of a realistic size
        c = rng.uniform(0, 255, (3, 3))
        img = c[:, 0] + c[:, 1] * np.sin(xx[..., None] / (side / 15) + c[:, 2]) * 0.4 + rng.normal(0, 20, (side, side, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(img + 0 * yy[..., None], 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


crop_box = data.RandomCrop(224).box  # data.py's rule: torchvision's RandomResizedCrop

MEAN, STD = torch.tensor(clip.MEAN).view(3, 1, 1), torch.tensor(clip.STD).view(3, 1, 1)


def old_path(img, rng, size=224):
    """The training path until 2026-11-23: a full decode (data.py did it on reading), Pillow's bicubic
    resize of the crop box, float32 normalised in the worker."""
    img = img.convert("RGB")
    img = img.resize((size, size), Image.BICUBIC, box=crop_box(*img.size, rng))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return (x - MEAN) / STD


def pillow(payload, i, transform):
    x = old_path(Image.open(io.BytesIO(payload)), np.random.default_rng(i))
    return (x * STD + MEAN).mul(255)  # back to 0-255 for the comparison (not timed separately: tiny)


def now(payload, i, transform):
    return transform(data.open_image(payload, "bench"), np.random.default_rng(i))


def pillow_draft(payload, i, size=224):
    img = Image.open(io.BytesIO(payload))
    w, h = img.size
    box = crop_box(w, h, np.random.default_rng(i))
    # the largest DCT scale (1/2, 1/4, 1/8) that keeps the crop at least size x size
    shrink = max((s for s in (1, 2, 4, 8) if min(box[2] - box[0], box[3] - box[1]) / s >= size), default=1)
    if shrink > 1:
        img.draft("RGB", (math.ceil(w / shrink), math.ceil(h / shrink)))
    img = img.convert("RGB")
    fx, fy = img.size[0] / w, img.size[1] / h
    img = img.resize((size, size), Image.BICUBIC, box=(box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy))
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def tv_io(payload, i, size=224):
    from torchvision.io import decode_jpeg

    x = decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    h, w = x.shape[-2:]
    x0, y0, x1, y1 = crop_box(w, h, np.random.default_rng(i))
    x = x[:, y0:y1, x0:x1][None].float()
    x = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return x[0].round().clamp(0, 255).to(torch.uint8)


def tv_io_pillow(payload, i, size=224):
    from torchvision.io import decode_jpeg

    x = decode_jpeg(torch.frombuffer(bytearray(payload), dtype=torch.uint8))
    img = Image.fromarray(x.permute(1, 2, 0).numpy())
    box = crop_box(img.size[0], img.size[1], np.random.default_rng(i))
    img = img.resize((size, size), Image.BICUBIC, box=box)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def rate(fn, payloads, repeats=3):
    fn(payloads[0], 0)  # warm-up
    best = 0.0
    for _ in range(repeats):  # the best of a few passes: the machine's other load only ever slows a pass
        start = time.perf_counter()
        for i, p in enumerate(payloads):
            fn(p, i)
        best = max(best, len(payloads) / (time.perf_counter() - start))
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200, help="images per size")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    args = p.parse_args()
    torch.set_num_threads(1)
    transform = data.RandomCrop(224)
    paths = {"pillow": lambda b, i: pillow(b, i, transform), "pillow-draft": pillow_draft, "tv-io": tv_io,
             "tv-io+pillow": tv_io_pillow, "now": lambda b, i: now(b, i, transform)}
    import PIL
    import torchvision

    print(f"one thread; Pillow {PIL.__version__}, torchvision {torchvision.__version__}, torch {torch.__version__}")
    for side in args.sizes:
        payloads = jpegs(args.n, side)
        print(f"{side}-px JPEGs ({np.mean([len(b) for b in payloads]) / 1024:.0f} KB) -> 224 px:")
        base = None
        for name, fn in paths.items():
            r = rate(fn, payloads)
            base = base or r
            diff = max((fn(b, i).float() - pillow(b, i, transform)).abs().max().item() for i, b in enumerate(payloads[:20]))
            print(f"  {name:13s} {r:8,.0f} images/s  {r / base:5.2f}x  max |diff| vs pillow {diff:5.1f}", flush=True)


if __name__ == "__main__":
    main()
