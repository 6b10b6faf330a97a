"""Text rendering speed: clippo.TextRenderer (array work over a glyph atlas) vs Pillow's ImageDraw.text.

    python tests/bench/bench_render.py [--font unifont.hex] [--size 224] [--seconds 3]

One thread, as in a loader worker. Prints captions/s for batches and for one caption per call
(how the loader's per-sample transform calls it), and the ratio to drawing each caption with
ImageDraw.text (wrapped to the image width) on the same font.
"""
import argparse
import os
import sys
import textwrap
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clippo  # noqa: E402
import data  # noqa: E402


def rate(fn, items, seconds):
    fn(items[:8])  # warm up (rasterises a Pillow font's glyphs once)
    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        fn(items)
        done += len(items)
    return done / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--font", default=None, help=".hex/.ttf/.otf; default Pillow's built-in font")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--seconds", type=float, default=3.0)
    args = p.parse_args()
    torch.set_num_threads(1)
    synthetic = data.Synthetic()
    short = [c for i in range(2000) for c in synthetic.captions(i)[0]][:4096]
    # Web captions run longer: two or three synthetic sentences joined, about 100-150 characters.
    rng = np.random.default_rng(0)
    long = [". ".join(rng.choice(short, size=int(rng.integers(2, 4)))) for _ in range(4096)]
    renderer = clippo.TextRenderer(args.font, args.size)
    font = None if renderer.hex else clippo._pillow_font(args.font)

    def pillow(texts):
        from PIL import Image, ImageDraw

        chars = max(1, args.size // 7)
        for t in texts:
            img = Image.new("L", (args.size, args.size), 127)
            ImageDraw.Draw(img).multiline_text((0, 0), "\n".join(textwrap.wrap(t.lower(), chars)), fill=0, font=font,
                                               spacing=0)
            np.asarray(img)

    def one_by_one(texts):
        for t in texts:
            renderer(t)

    print(f"font: {args.font or 'Pillow built-in'}, {args.size} px, 1 thread")
    for name, texts in (("synthetic captions", short), ("web-length captions", long)):
        mean_len = np.mean([len(t) for t in texts])
        batched = rate(renderer, texts[:1024], args.seconds)
        single = rate(one_by_one, texts[:256], args.seconds)
        naive = rate(pillow, texts[:256], args.seconds) if font is not None else float("nan")
        print(f"{name} ({mean_len:.0f} chars): batch of 1024 {batched:,.0f} captions/s | one per call "
              f"{single:,.0f}/s | Pillow ImageDraw.text {naive:,.0f}/s | batch / Pillow {batched / naive:.1f}x")


if __name__ == "__main__":
    main()
