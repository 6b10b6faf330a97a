"""Loader throughput from tar shards vs the model's appetite (clip ViT-B-32, 224 px).

    python tests/bench_data.py [--images 1024] [--workers 0 1 2] [--device cpu|cuda] [--batch 64]

Writes shards of 224-px JPEGs to a temporary folder, then prints: images/s of one loader worker
decoding and augmenting them (ShardBatches + clip's train transform), the loader's images/s with N
worker processes, and the samples/s of one clip ViT-B-32 training step, with the number of workers
that step rate needs.
"""
import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import clip  # noqa: E402
import data  # noqa: E402


def write_shards(root, n, per_shard=256):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:256, 0:256]
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(root, f"{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                # Smooth colour fields plus noise: JPEGs of a realistic size (~20-30 KB).
                c = rng.uniform(0, 255, (3, 3))
                img = (c[:, 0] + c[:, 1] * np.sin(xx[..., None] / 17 + c[:, 2]) * 0.4 + rng.normal(0, 20, (256, 256, 3)))
                buf = io.BytesIO()
                Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=90)
                for ext, payload in (("jpg", buf.getvalue()), ("txt", f"picture number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def loader_rate(shards, transform, batch, workers, images):
    batches = data.ShardBatches(shards, transform, batch, workers=workers)
    it = iter(data.loader(batches, workers=workers))
    next(it)  # start-up (worker processes, first shard) is not throughput
    start, n = time.perf_counter(), 0
    while n < images:
        n += len(next(it)[0]["image"])
    return n / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=1024)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as root:
        write_shards(root, args.images)
        shards = data.Shards(root, buffer=500)
        model = clip.create(SimpleNamespace(size="ViT-B-32", tokenizer=None, quick_gelu=False), ["picture number 1"])
        transform = model.transform(True)
        print(f"{args.images} JPEGs of 256 px -> 224 px RandomResizedCrop, clip's train transform")
        for w in args.workers:
            rate = loader_rate(shards, transform, args.batch, w, args.images)
            label = "in the main process" if w == 0 else f"{w} worker process(es)"
            print(f"loader, {label}: {rate:,.0f} images/s" + (f" ({rate / max(1, w):,.0f} per worker)" if w else ""))
        torch.set_num_threads(os.cpu_count() or 1)
        device = torch.device(args.device)
        model.to(device).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch, _ = next(iter(data.loader(data.ShardBatches(shards, transform, args.batch), workers=0)))
        batch = {k: v.to(device) for k, v in batch.items()}
        autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
        times = []
        for _ in range(4):
            start = time.perf_counter()
            with autocast:
                loss = model.loss(model(batch))
            loss.backward()
            opt.step()
            opt.zero_grad()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        step_rate = args.batch / min(times[1:])
        single = loader_rate(shards, transform, args.batch, 0, args.images // 2)
        print(f"clip ViT-B-32 training step on {device}: {step_rate:,.0f} samples/s; at {single:,.0f} images/s per "
              f"worker it needs {step_rate / single:.1f} loader workers")


if __name__ == "__main__":
    main()
