"""Memory per rank: DDP against FSDP (train.py's --fsdp) at 1, 2 and 4 ranks, with and without activation
checkpointing (--grad-checkpointing), on CPU with gloo and a CLIP of small towers.

    .venv/bin/python tests/bench/bench_memory.py [--ranks 1 2 4] [--batch 16]

Per rank it prints what is measured, not assumed:
- weights, gradients and AdamW state: the bytes of the tensors this rank holds (its shards under FSDP);
- activations per sample: the memory in use (glibc's mallinfo2: heap plus mmapped blocks) once the
  forward and the loss are done, less the memory in use just before the forward, over the batch: what
  the backward needs kept, which activation checkpointing cuts;
- peak RSS: the process's high-water mark (getrusage) over the steps, less its size before the model
  was built (allocator slack included).
The README turns the bytes per parameter and per sample into estimates for ViT-L/14 and ViT-bigG-14.
"""
import argparse
import ctypes
import json
import os
import resource
import sys
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

import clip  # noqa: E402
import train  # noqa: E402

# Small towers, large enough that weights and optimizer state stand well above the noise.
CFG = dict(embed_dim=384, image_size=64, patch_size=8, vision_width=384, vision_layers=8, vision_heads=6,
           context_length=32, vocab_size=4096, text_width=384, text_layers=8, text_heads=6)


class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]


def in_use():
    """Bytes the C allocator has handed out and not taken back (torch's CPU tensors live there)."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = MallInfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def nbytes(t):
    t = t.to_local() if hasattr(t, "to_local") else t  # a DTensor: this rank's shard
    return t.numel() * t.element_size()


def worker(rank, world, port, fsdp, checkpointing, batch, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    base = peak_mb()
    model = clip.CLIP(clip.Config(**CFG))
    if checkpointing:
        train.checkpoint_blocks(model)
    scalars = train.shard(model, torch.device("cpu"), "fp32") if fsdp else []
    fwd = torch.nn.parallel.DistributedDataParallel(model) if world > 1 and not fsdp else model
    opt = torch.optim.AdamW(model.optimizer_groups(0.1), lr=1e-4)
    g = torch.Generator().manual_seed(rank)
    data = {"image": torch.randn(batch, 3, CFG["image_size"], CFG["image_size"], generator=g),
            "text": torch.randint(1, CFG["vocab_size"], (batch, CFG["context_length"]), generator=g)}
    for _ in range(2):  # the second step runs with the optimizer state in place
        before = in_use()
        loss = model.loss(fwd(data))
        held = in_use() - before
        loss.backward()
        train.reduce_scalars(scalars, world)
        opt.step()
        grads = sum(nbytes(p.grad) for p in model.parameters() if p.grad is not None)
        opt.zero_grad(set_to_none=True)
    row = {"params": sum(p.numel() for p in model.parameters()) if not fsdp else None,
           "weights": sum(nbytes(p) for p in model.parameters()), "grads": grads,
           "adam": sum(nbytes(v) for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()),
           "act_per_sample": held / batch, "peak_mb": peak_mb() - base}
    with open(os.path.join(out, f"{rank}.json"), "w") as f:
        json.dump(row, f)
    dist.destroy_process_group()


def measure(world, fsdp, checkpointing, batch):
    with tempfile.TemporaryDirectory() as out:
        from conftest import free_port

        mp.spawn(worker, args=(world, free_port(), fsdp, checkpointing, batch, out), nprocs=world)
        rows = [json.load(open(os.path.join(out, f"{r}.json"))) for r in range(world)]
    return {k: max(r[k] or 0 for r in rows) for k in rows[0]}  # the largest rank's


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--batch", type=int, default=16, help="samples per rank")
    args = p.parse_args()
    n = measure(1, False, False, 2)["params"]
    print(f"clip with {n / 1e6:.1f}M parameters, {args.batch} samples per rank, fp32, CPU/gloo "
          f"({torch.__version__})")
    print(f"{'ranks':>5} {'mode':>4} {'ckpt':>4} | {'weights':>8} {'grads':>8} {'adam':>8} {'B/param':>8} | "
          f"{'act/sample':>10} | {'peak RSS':>9}  (MiB)")
    for world in args.ranks:
        for fsdp in (False, True):
            for checkpointing in (False, True):
                a = measure(world, fsdp, checkpointing, args.batch)
                states = a["weights"] + a["grads"] + a["adam"]
                print(f"{world:>5} {'fsdp' if fsdp else 'ddp':>4} {'on' if checkpointing else 'off':>4} | "
                      f"{a['weights'] / 2**20:8.1f} {a['grads'] / 2**20:8.1f} {a['adam'] / 2**20:8.1f} "
                      f"{states / n:8.2f} | {a['act_per_sample'] / 2**20:10.2f} | {a['peak_mb']:9.0f}", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    main()
