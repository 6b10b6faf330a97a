"""DataComp's CLIP-score filter (python data.py filter) on a pool with known noise, and what it buys.

    python tests/bench/bench_filter.py [--pool 6000] [--swap 0.3] [--fraction 0.7] [--steps 430] [--seeds 0 1 2]
                                       [--teacher CKPT] [--work DIR]

The pool: --pool synthetic images (48 px, the tiny preset's input) with their captions in a TSV, and a
--swap share of the captions exchanged among their images (each moved one place along a random order of
the chosen rows: every chosen image gets another image's caption). The teacher: the default run
(`python train.py`, its checkpoint; or --teacher). The filter keeps the top --fraction by the teacher's
score. Printed: the share of swapped pairs removed and of good pairs kept; then for each seed a run of
--steps steps of the demo's recipe on the raw pool and on the filtered shards, and each run's zero-shot
top-1 on 1,000 held-out images (40 classes, their own folder), with the mean and spread over the seeds.
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


def make_pool(folder, n, swap, seed=0):
    """The pool's TSV and the set of rows whose caption was swapped."""
    os.makedirs(folder, exist_ok=True)
    source = data.Synthetic(seed, "train", n, resolution=48)
    rng = np.random.default_rng(seed + 1000)
    captions = [source.captions(i)[0][int(rng.integers(len(data.EN_TEMPLATES)))] for i in range(n)]
    chosen = rng.choice(n, size=round(swap * n), replace=False)
    moved = list(captions)
    for a, b in zip(chosen, np.roll(chosen, 1)):
        moved[a] = captions[b]
    lines = ["filepath\ttitle"]
    for i in range(n):
        source.image(i).save(os.path.join(folder, f"{i:05d}.png"))
        lines.append(f"{i:05d}.png\t{moved[i]}")
    with open(os.path.join(folder, "pool.tsv"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return os.path.join(folder, "pool.tsv"), {f"{i:05d}.png" for i in chosen}


def make_zeroshot(folder, n=1000):
    """Held-out images in one sub-folder per class, named as the synthetic classes, and their templates."""
    held = data.Synthetic(0, "val", n, resolution=48)
    names = data.classnames("en")
    for i in range(n):
        label = held.captions(i)[3]
        os.makedirs(os.path.join(folder, f"{label:02d}"), exist_ok=True)
        held.image(i).save(os.path.join(folder, f"{label:02d}", f"{i}.png"))
    with open(os.path.join(folder, "classnames.txt"), "w") as f:
        f.write("\n".join(names[c] for c in range(len(names)) if os.path.isdir(os.path.join(folder, f"{c:02d}"))) + "\n")
    with open(os.path.join(folder, "..", "templates.txt"), "w") as f:
        f.write("\n".join(data.ZEROSHOT_TEMPLATES["en"]) + "\n")
    return folder, os.path.join(folder, "..", "templates.txt")


def run(*argv):
    start = time.time()
    subprocess.run([sys.executable, *argv], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return time.time() - start


def zeroshot(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [r["zeroshot_top1"] for r in rows if "zeroshot_top1" in r][-1]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--pool", type=int, default=6000)
    p.add_argument("--swap", type=float, default=0.3)
    p.add_argument("--fraction", type=float, default=0.7)
    p.add_argument("--steps", type=int, default=430)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--teacher", default=None)
    p.add_argument("--work", default=None)
    args = p.parse_args()
    work = args.work or tempfile.mkdtemp(prefix="bench_filter_")
    table, swapped = make_pool(os.path.join(work, "pool"), args.pool, args.swap)
    folder, templates = make_zeroshot(os.path.join(work, "zeroshot", "classes"))
    teacher = args.teacher
    if teacher is None:
        took = run("train.py", "--out", os.path.join(work, "teacher"))
        teacher = os.path.join(work, "teacher", "checkpoint.pt")
        print(f"teacher: the default run, {took:.0f} s")
    took = run("data.py", "filter", "--teacher", teacher, "--data", table, "--out", os.path.join(work, "filtered"),
               "--fraction", str(args.fraction))
    rows = [json.loads(line) for line in open(os.path.join(work, "filtered", "scores.jsonl"))]
    kept = {r["key"] for r in rows if r.get("kept")}
    good = {r["key"] for r in rows} - swapped
    print(f"filter: {len(rows)} pairs scored and {len(kept)} kept in {took:.0f} s; swapped pairs removed "
          f"{len(swapped - kept) / len(swapped):.1%}, good pairs kept {len(good & kept) / len(good):.1%}")
    shards = os.path.join(work, "filtered", "{00000..%05d}.tar" % (len([f for f in os.listdir(os.path.join(
        work, "filtered")) if f.endswith(".tar")]) - 1))
    recipe = ["--model", "clip", "--size", "tiny", "--steps", str(args.steps), "--lr", "1e-3", "--wd", "0.1",
              "--warmup", "20", "--lr-schedule", "const-cooldown", "--cooldown-steps", str(round(args.steps * 0.28)),
              "--batch-size", "128", "--zeroshot-data", folder, "--zeroshot-templates", templates, "--eval-every", "0",
              "--save-every", "0"]
    results = {"raw": [], "filtered": []}
    for seed in args.seeds:
        for name, source in (("raw", table), ("filtered", shards)):
            out = os.path.join(work, f"{name}{seed}")
            took = run("train.py", *recipe, "--data", source, "--seed", str(seed), "--out", out)
            results[name].append(zeroshot(out))
            print(f"seed {seed} {name:8s}: zero-shot top-1 {results[name][-1]:.4f} ({took:.0f} s)", flush=True)
    for name, values in results.items():
        print(f"{name:8s}: zero-shot top-1 mean {np.mean(values):.4f}, spread (max - min) "
              f"{np.max(values) - np.min(values):.4f} over seeds {args.seeds}")
    print(f"work folder: {work}")


if __name__ == "__main__":
    main()
