"""Fused contrastive loss vs the naive B x B one: fwd+bwd time and peak memory, measured in one run.

    python tests/bench/bench_loss.py                      # CPU: B = 1024, 4096, 16384 at D = 512
    python tests/bench/bench_loss.py --loss sigmoid       # SigLIP's sigmoid loss, fused vs naive
    python tests/bench/bench_loss.py --loss distill       # the distillation term vs open_clip's DistillClipLoss
    python tests/bench/bench_loss.py --device cuda        # also TFLOP/s vs a bf16 matmul, GPU time alone
                                                    # (CUDA-graph replay), and the largest B that fits

Each measurement runs in a fresh process, so its peak memory is its own: on CPU the growth of the
peak resident set over what the inputs already hold, on CUDA torch's peak allocation over the inputs.
"""
import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import clip  # noqa: E402
import train  # noqa: E402


def naive_loss(img, txt, scale):
    logits = scale * img @ txt.T
    labels = torch.arange(img.shape[0], device=img.device)
    return (F.cross_entropy(logits.float(), labels) + F.cross_entropy(logits.float().T, labels)) / 2


def naive_sigmoid_loss(img, txt, scale, bias):
    logits = scale * img.float() @ txt.float().T + bias
    labels = 2 * torch.eye(img.shape[0], device=img.device) - 1
    return -F.logsigmoid(labels * logits).sum() / img.shape[0]


def naive_distill(img, txt, scale, t_img, t_txt, t_scale):
    """open_clip 3.3's DistillClipLoss (its distillation term; the teacher frozen, as in training), or
    when open_clip is absent the same form written out (tests/naive.py)."""
    try:
        from open_clip.loss import DistillClipLoss
    except ImportError:
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from naive import distill_loss
        return distill_loss(img, txt, scale, t_img, t_txt, t_scale)
    return DistillClipLoss()(img, txt, scale, t_img, t_txt, t_scale)[1]


def measure(method, b, d, device, dtype, repeats, loss="softmax"):
    """One method at one size, in this process: (seconds per fwd+bwd, peak bytes added)."""
    torch.manual_seed(0)
    img = F.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(1 / 0.07, device=device, requires_grad=True)
    fn = clip.contrastive_loss if method == "fused" else naive_loss
    if loss == "sigmoid":  # the bias rides along in the same calls
        bias = torch.tensor(-10.0, device=device, requires_grad=True)
        base_fn = clip.sigmoid_loss if method == "fused" else naive_sigmoid_loss
        fn = lambda i, t, s: base_fn(i, t, s, bias)  # noqa: E731
    if loss == "distill":  # a frozen teacher's features, no gradient (as train.py --distill runs it)
        t_img = F.normalize(torch.randn(b, d, device=device), dim=-1).to(dtype)
        t_txt = F.normalize(t_img + torch.randn(b, d, device=device).to(dtype), dim=-1)
        t_scale = torch.tensor(100.0, device=device)
        base_fn = train.distill_loss if method == "fused" else naive_distill
        fn = lambda i, t, s: base_fn(i, t, s, t_img[:len(i)], t_txt[:len(t)], t_scale)  # noqa: E731
    cuda = device == "cuda"
    # One tiny call first: loading code and one-time buffers must not count as the loss's memory.
    fn(img[:8].detach().requires_grad_(), txt[:8].detach().requires_grad_(), scale).backward()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(repeats + 1):  # the first run warms up (and sets the peak)
        img.grad = txt.grad = scale.grad = None
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn(img, txt, scale).backward()
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    if cuda:
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    device_s = graph_seconds(fn, img, txt, scale) if cuda and repeats else None
    return min(times[1:] or times), peak, device_s


def graph_seconds(fn, img, txt, scale, replays=20):
    """fwd+bwd time on the GPU alone: captured once as a CUDA graph and replayed, so no Python runs.

    At small B both losses are bound by the host (each op's dispatch and launch), which inside a training
    step overlaps the towers' GPU work; this column shows what the GPU itself spends.
    """
    def run():
        img.grad = txt.grad = scale.grad = None
        fn(img, txt, scale).backward()
    try:
        torch.cuda.empty_cache()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up off the capturing stream, as CUDA graphs require
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            run()
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(replays):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3 / replays
    except (RuntimeError, torch.OutOfMemoryError):
        return None


def matmul_seconds(b, d, repeats=5):
    a = torch.randn(b, d, device="cuda", dtype=torch.bfloat16)
    c = torch.randn(d, b, device="cuda", dtype=torch.bfloat16)
    (a @ c).sum().item()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(repeats):
        a @ c
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / repeats


def child(method, b, d, device, dtype, repeats, loss="softmax"):
    cmd = [sys.executable, __file__, "--child", method, "--sizes", str(b), "--dim", str(d), "--device", device,
           "--dtype", dtype, "--repeats", str(repeats), "--loss", loss]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return None  # out of memory, most likely
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1024,4096,16384")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--loss", default="softmax", choices=["softmax", "sigmoid", "distill"])
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    dtype_name = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")
    dtype = getattr(torch, dtype_name)
    if args.child:
        t, peak, device_s = measure(args.child, int(args.sizes), args.dim, args.device, dtype, args.repeats, args.loss)
        print(json.dumps({"seconds": t, "peak_bytes": peak, "device_seconds": device_s}))
        return
    print(f"# {args.device} {torch.cuda.get_device_name() if args.device == 'cuda' else os.cpu_count()} "
          f"{'' if args.device == 'cuda' else 'cores'}, torch {torch.__version__}, {args.loss} loss, D={args.dim}, {dtype_name}, "
          f"{time.strftime('%Y-%m-%d')}")
    head = f"{'B':>8} {'naive ms':>9} {'fused ms':>9} {'time x':>7} {'naive MB':>9} {'fused MB':>9} {'mem x':>7}"
    if args.device == "cuda":
        head += f" {'fused TF/s':>10} {'mm TF/s':>8} {'of mm':>6} {'naive GPU ms':>12} {'fused GPU ms':>12} {'GPU x':>6}"
    print(head)
    for b in (int(s) for s in args.sizes.split(",")):
        nv = child("naive", b, args.dim, args.device, dtype_name, args.repeats, args.loss)
        fu = child("fused", b, args.dim, args.device, dtype_name, args.repeats, args.loss)
        cell = lambda r, k, f: f"{r[k] / f:9.3f}" if r else f"{'OOM':>9}"  # noqa: E731
        line = f"{b:>8} {cell(nv, 'seconds', 1e-3)} {cell(fu, 'seconds', 1e-3)} "
        line += f"{fu['seconds'] / nv['seconds']:7.2f}" if nv and fu else f"{'-':>7}"
        line += f" {cell(nv, 'peak_bytes', 2 ** 20)} {cell(fu, 'peak_bytes', 2 ** 20)} "
        line += f"{fu['peak_bytes'] / max(nv['peak_bytes'], 1):7.3f}" if nv and fu else f"{'-':>7}"
        if args.device == "cuda" and fu:
            # InfoNCE: fwd 2 + bwd 6 (recompute, dx, dy) B^2 D; sigmoid: 6 (dx and dy made in the forward)
            flops = (6 if args.loss == "sigmoid" else 8) * b * b * args.dim
            mm = 2 * b * b * args.dim / matmul_seconds(b, args.dim)
            line += f" {flops / fu['seconds'] / 1e12:10.1f} {mm / 1e12:8.1f} {flops / fu['seconds'] / mm:6.2f}"
            ng, fg = (nv or {}).get("device_seconds"), fu.get("device_seconds")
            line += f" {ng * 1e3:12.3f}" if ng else f" {'-':>12}"
            line += f" {fg * 1e3:12.3f}" if fg else f" {'-':>12}"
            line += f" {fg / ng:6.2f}" if ng and fg else f" {'-':>6}"
        print(line, flush=True)
    if args.device == "cuda":  # the largest batch the fused loss holds, doubling from the last size
        b, fits = int(args.sizes.split(",")[-1]), None
        while b <= 1 << 20:  # 1M, the size the issue asks for
            r = child("fused", b, args.dim, args.device, dtype_name, 0, args.loss)
            if not r:
                break
            fits = (b, r)
            b *= 2
        if fits:
            print(f"largest B tried that fits: {fits[0]} ({fits[1]['seconds']:.2f} s fwd+bwd, "
                  f"{fits[1]['peak_bytes'] / 2 ** 30:.2f} GiB added)")


if __name__ == "__main__":
    main()
