"""LoRA against full fine-tuning: peak memory above the loaded model's, and step time, measured in one run.

    .venv/bin/python tests/bench/bench_lora.py                       # ViT-B-16, batch 8, CPU
    .venv/bin/python tests/bench/bench_lora.py --size ViT-L-14 --device cuda

Each way runs in a fresh process: the model is built (random weights; ViT-B-16's shapes, OpenAI's vocabulary
size), then train.py's step (AdamW over optimizer_groups, the gradients' norm clipped at 1) runs --steps
times on a batch of random pixels and token ids. Printed: the resident set (CPU; on CUDA torch's peak
allocation) once the model is loaded, the peak over the steps less that, the trainable parameters, the
seconds per step (the first step, which allocates, left out).
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clip  # noqa: E402
import train  # noqa: E402


def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(size, lora, batch, steps, device):
    torch.manual_seed(0)
    tok = clip.train_bpe(["a photo of a dog", "a photo of a cat"] * 20, vocab_size=300)
    cfg = clip.Config(**{**clip.asdict(clip.CONFIGS[size])})
    model = clip.CLIP(cfg, tok).to(device)
    if lora:
        train.add_lora(model, train.lora_spec(lora))
    model.train()
    cuda = device == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        loaded = torch.cuda.memory_allocated()
    else:
        loaded = rss()
    opt = torch.optim.AdamW(model.optimizer_groups(0.2), lr=1e-5, betas=(0.9, 0.98), eps=1e-6)
    images = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8, device=device)
    texts = torch.randint(1, 300, (batch, cfg.context_length), device=device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        loss = model.loss(model({"image": images, "text": texts}))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"loaded": loaded, "added": peak - loaded, "trainable": trainable, "step_s": min(times[1:] or times)}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="ViT-B-16")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--lora", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child is not None:
        print(json.dumps(child(a.size, a.child, a.batch, a.steps, a.device)))
        return
    print(f"# {a.size}, batch {a.batch}, {a.device} ({os.cpu_count()} cores), torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")
    print(f"{'way':>10} {'trainable':>12} {'loaded MB':>10} {'added MB':>9} {'s/step':>7}")
    rows = {}
    for name, rank in (("full", 0), (f"lora {a.lora}", a.lora)):
        cmd = [sys.executable, __file__, "--child", str(rank), "--size", a.size, "--batch", str(a.batch),
               "--steps", str(a.steps), "--device", a.device]
        rows[name] = r = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        print(f"{name:>10} {r['trainable']:>12,} {r['loaded'] / 2 ** 20:10.0f} {r['added'] / 2 ** 20:9.0f} "
              f"{r['step_s']:7.2f}", flush=True)
    full, lora = rows["full"], rows[f"lora {a.lora}"]
    print(f"lora / full: memory added {lora['added'] / full['added']:.2f}x, step time {lora['step_s'] / full['step_s']:.2f}x")


if __name__ == "__main__":
    main()
