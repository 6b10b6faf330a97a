"""MetaCLIP's matching (python data.py curate): data.Matcher against MetaCLIP's loop, side by side.

    python tests/bench/bench_curate.py [--entries 500000] [--captions 20000] [--naive 40]

The metadata: --entries distinct entries of 1 to 3 words over a 60,000-word vocabulary (MetaCLIP's table
of WordNet synsets, Wikipedia titles and n-grams holds about 500,000, mostly of one or two words); the
captions: the synthetic set's with five vocabulary words added, so that each matches several entries.
Printed: captions/s of the loop (tests/naive.py's substr_matching, one `in` per entry: MetaCLIP's
first release) on --naive captions, of data.Matcher on --captions, the ratio, and the two's agreement
on the captions both matched; then the time to build the Matcher and its peak memory.
"""
import argparse
import os
import sys
import time
import tracemalloc

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
import data  # noqa: E402
import naive  # noqa: E402


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--entries", type=int, default=500_000)
    p.add_argument("--captions", type=int, default=20_000)
    p.add_argument("--naive", type=int, default=40)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = list(dict.fromkeys("".join(rng.choice(letters, rng.integers(3, 9))) for _ in range(70_000)))[:60_000]
    entries = set()
    while len(entries) < args.entries:
        entries.add(" ".join(vocab[i] for i in rng.integers(len(vocab), size=int(rng.choice([1, 2, 3], p=[.5, .4, .1])))))
    entries = sorted(entries)
    source = data.Synthetic(0, "train", args.captions)
    captions = []
    for i in range(args.captions):
        words = source.captions(i)[0][0].split(" ")
        for w in rng.integers(len(vocab), size=5):
            words.insert(int(rng.integers(len(words) + 1)), vocab[w])
        captions.append(" ".join(words) + ".")
    tracemalloc.start()
    start = time.perf_counter()
    matcher = data.Matcher(entries)
    built, peak = time.perf_counter() - start, tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    start = time.perf_counter()
    ours = [matcher(c) for c in captions]
    fast = len(captions) / (time.perf_counter() - start)
    start = time.perf_counter()
    theirs = [naive.substr_matching(c, entries) for c in captions[:args.naive]]
    slow = args.naive / (time.perf_counter() - start)
    assert ours[:args.naive] == theirs, "the two disagree"
    print(f"{len(entries)} entries, {len(captions)} captions ({np.mean([len(m) for m in ours]):.1f} entries matched "
          f"per caption); the same matches on the {args.naive} captions both ran")
    print(f"MetaCLIP's loop (naive.substr_matching): {slow:,.1f} captions/s")
    print(f"data.Matcher:                            {fast:,.0f} captions/s  ({fast / slow:,.0f}x)")
    print(f"building the Matcher: {built:.1f} s, peak {peak / 2 ** 20:.0f} MiB (tracemalloc)")


if __name__ == "__main__":
    main()
