"""Long captions (train.py --context-length, --long-captions): retrieval of captions whose distinguishing
words lie past the 77th token, by a model fine-tuned at 77 positions and by one stretched to 248.

    python tests/bench/bench_long.py [--train 3000] [--val 500] [--steps 300] [--base CKPT] [--work DIR]

The base: a default run (`python train.py`, the tiny preset) built with 77 text positions, as CLIP's.
The captions: synthetic images (48 px) described by a first sentence naming the shape only ("a photo of
a circle", Long-CLIP's short caption), then neutral words until past token 80, then the colour, size,
place and background. Both arms fine-tune the base for --steps steps with Long-CLIP's objective on
--train such pairs; one keeps 77 positions (the tokenizer cuts each caption there), the other stretches
them to 248. Printed: text-to-image and image-to-text R@1 on --val held-out pairs, for each arm.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import data  # noqa: E402

FILLER = ["there is a picture", "a photo of a picture", "an image showing a photo", "it sits on a picture",
          "there is an image", "a picture of a photo"]


def long_caption(source, i, rng):
    _, c, s, z, b, r, cx, cy = source.attributes(i)
    pos = int(cy * 3 // source.resolution) * 3 + int(cx * 3 // source.resolution)
    shape = data.SHAPES[s][0]
    words = " ".join(FILLER[int(k)] for k in rng.integers(len(FILLER), size=22))  # about 90 tokens
    return (f"a photo of a {shape}. {words}. the {shape} is {data.SIZES[z][0]} and {data.COLORS[c][0]}, "
            f"{data.POSITIONS[pos][0]}, on a {data.BACKGROUNDS[b][0]} background")


def make_table(folder, split, n):
    os.makedirs(folder, exist_ok=True)
    source, rng = data.Synthetic(0, split, n, resolution=48), np.random.default_rng({"train": 1, "val": 2}[split])
    lines = ["filepath\ttitle"]
    for i in range(n):
        source.image(i).save(os.path.join(folder, f"{i:05d}.png"))
        lines.append(f"{i:05d}.png\t{long_caption(source, i, rng)}")
    path = os.path.join(folder, f"{split}.tsv")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path


def run(*argv):
    start = time.time()
    subprocess.run([sys.executable, *argv], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - start


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--train", type=int, default=3000)
    p.add_argument("--val", type=int, default=500)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--base", default=None)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_long_")
    train_tsv, val_tsv = make_table(os.path.join(work, "train"), "train", args.train), make_table(
        os.path.join(work, "val"), "val", args.val)
    base = args.base
    if base is None:
        took = run("train.py", "--context-length", "77", "--out", os.path.join(work, "base"))
        base = os.path.join(work, "base", "checkpoint.pt")
        print(f"base: the default run at 77 positions, {took:.0f} s")
    import clip
    tok = clip.load(base)[0].tokenizer
    row = open(val_tsv).read().split("\n")[1].split("\t")[1]
    far = len(tok.tokenizer.encode(row.split(". the ")[0]).ids) + 1
    print(f"a caption: {len(tok.tokenizer.encode(row).ids)} tokens, its distinguishing words from token {far} on")
    recipe = ["--init", base, "--long-captions", "--data", train_tsv, "--val-data", val_tsv, "--steps", str(args.steps),
              "--batch-size", "64", "--lr", "5e-4", "--warmup", "20", "--eval-every", "0", "--save-every", "0"]
    for name, extra in (("77 positions", []), ("248 positions (stretched)", ["--context-length", "248"])):
        out = os.path.join(work, name.split()[0])
        took = run("train.py", *recipe, *extra, "--out", out)
        last = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl")) if "t2i_r1" in line][-1]
        print(f"{name:26s}: text->image R@1 {last['t2i_r1']:.4f}, image->text R@1 {last['i2t_r1']:.4f} "
              f"({took:.0f} s, {args.steps} steps)", flush=True)
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
