"""Input pipeline throughput per core: today's path against the fast one, side by side in one run.

    python tests/bench/bench_data.py [--images 512] [--sizes 256 1024] [--workers 1] [--repeats 3] [--step] [--device cuda]

For tar shards of 256-px and 1024-px JPEGs (224-px RandomResizedCrop, clip's train transform) and
for the embedded synthetic set, the loader's samples/s with N worker processes, divided by N:
- before:  the pipeline as it was until 2026-11-23: data.py decoded every image in full on reading it,
           the transform resized the crop with Pillow and normalised to float32 in the worker, and
           float32 batches crossed to the main process;
- now:     data.py reads only the header; the transform asks the JPEG decoder for the smallest
           version the crop allows (Pillow's draft mode: 1/2, 1/4 or 1/8 scale, in the DCT domain),
           downscales whole-pixel boxes with torch's antialiased bicubic on uint8, and ships uint8
           pixels that the model normalises on its device.
- --gpu-decode: the workers read the files and draw the crop boxes only (samples/s per core), and the
           main process decodes, crops and resizes each batch on --device (data.RandomCrop.finish,
           nvjpeg on CUDA; samples/s of that one process, batches already in memory).
The crop boxes are the same on every path. --step adds the samples/s of one clip ViT-B-32 training
step on --device and the number of loader workers that rate needs.
"""
import argparse
import io
import os
import sys
import tarfile
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import clip  # noqa: E402
import data  # noqa: E402
from bench_decode import jpegs, old_path  # noqa: E402


class Before:
    """The old path (bench_decode.old_path), then float32 batches out of the worker."""

    def __init__(self, transform):
        self.size, self.tokenizer = transform.image.size, transform.tokenizer

    def __call__(self, sample, rng):
        return {"image": old_path(sample["image"], rng, self.size), "text": self.tokenizer([sample["text"]])[0]}


def write_shards(root, n, side, per_shard=256):
    payloads = jpegs(n, side, seed=side)
    for s in range(0, n, per_shard):
        with tarfile.open(os.path.join(root, f"{s // per_shard:05d}.tar"), "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                for ext, payload in (("jpg", payloads[i]), ("txt", f"picture number {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))


def loader_rate(make_batches, workers, images):
    it = iter(data.loader(make_batches(), workers=workers))
    next(it)  # start-up (worker processes, first shard) is not throughput
    start, n = time.perf_counter(), 0
    while n < images:
        n += len(next(it)[0]["image"])
    return n / (time.perf_counter() - start)


def side_by_side(make_batches, transforms, workers, images, repeats):
    """{name: the best of `repeats` passes per core}; the paths take turns, so a slow spell of the
    machine does not fall on one path only."""
    best = dict.fromkeys(transforms, 0.0)
    for _ in range(repeats):
        for name, transform in transforms.items():
            best[name] = max(best[name], loader_rate(lambda: make_batches(transform), workers, images) / max(1, workers))
    return best


def finish_rate(shards, transform, batch_size, images, device):
    """Samples/s of transform.finish (decode, crop, resize on the device) over deferred batches."""
    it = iter(data.loader(data.ShardBatches(shards, transform, batch_size)))
    batches = [next(it)[0] for _ in range(max(2, images // batch_size + 1))]
    transform.image.finish(batches[0]["image"], device, [])  # start-up (nvjpeg handles, kernels) is not throughput
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    for batch in batches[1:]:
        transform.image.finish(batch["image"], device, [])
    sync()
    return sum(len(b["image"]) for b in batches[1:]) / (time.perf_counter() - start)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=512, help="images timed per path and size")
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--workers", type=int, default=1, help="loader worker processes (one core each)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3, help="passes per path, taking turns; the best counts")
    p.add_argument("--step", action="store_true", help="also time a clip ViT-B-32 training step")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(1)
    model = clip.build("ViT-B-32", captions=["picture number 1"])
    now = model.transform(True, images=data.RandomCrop(model.cfg.image_size))
    transforms = {"before": Before(now), "now": now}
    device = torch.device(args.device)
    deferred = model.transform(True, images=data.RandomCrop(model.cfg.image_size, defer=True))
    print(f"{args.workers} loader worker(s); samples/s per core (a worker process is one core)")
    rates = {}
    for side in args.sizes:
        with tempfile.TemporaryDirectory() as root:
            write_shards(root, args.images + 2 * args.batch, side)
            shards = data.Shards(root, buffer=500)
            best = side_by_side(lambda t: data.ShardBatches(shards, t, args.batch, workers=args.workers),
                                {**transforms, "gpu-decode": deferred}, args.workers, args.images, args.repeats)
            rates.update({(side, name): r for name, r in best.items()})
            rates[side, "finish"] = finish_rate(shards, deferred, args.batch, args.images, device)
            print(f"{side:5d}-px JPEG shards: before {rates[side, 'before']:7,.0f}/s   now {rates[side, 'now']:7,.0f}/s"
                  f"   {rates[side, 'now'] / rates[side, 'before']:4.2f}x   |   --gpu-decode: workers "
                  f"{rates[side, 'gpu-decode']:7,.0f}/s, decode on {device} {rates[side, 'finish']:7,.0f}/s "
                  f"(one process)", flush=True)
    synthetic = data.Synthetic()
    best = side_by_side(lambda t: data.TrainBatches(synthetic, t, args.batch), transforms, args.workers, args.images,
                        args.repeats)
    rates.update({("synthetic", name): r for name, r in best.items()})
    print(f"synthetic (64 px -> 224): before {rates['synthetic', 'before']:7,.0f}/s   now "
          f"{rates['synthetic', 'now']:7,.0f}/s   {rates['synthetic', 'now'] / rates['synthetic', 'before']:4.2f}x")
    if not args.step:
        return
    torch.set_num_threads(os.cpu_count() or 1)
    model.to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch, _ = next(iter(data.loader(data.TrainBatches(synthetic, model.transform(True), args.batch), workers=0)))
    batch = {k: v.to(device) for k, v in batch.items() if k != "label"}
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
    print(f"clip ViT-B-32 training step on {device}: {step_rate:,.0f} samples/s; cores it needs, now: "
          + ", ".join(f"{k if isinstance(k, str) else f'{k}-px'} {step_rate / rates[k, 'now']:.1f}"
                      for k in [*args.sizes, "synthetic"])
          + "; with --gpu-decode: " + ", ".join(f"{k}-px {step_rate / rates[k, 'gpu-decode']:.1f} (the device decodes "
                                                  f"{rates[k, 'finish'] / step_rate:.2f}x the step rate)"
                                                  for k in args.sizes))


if __name__ == "__main__":
    main()
