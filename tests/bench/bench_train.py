"""Training throughput of a model file: samples/s, TFLOP/s, MFU and peak memory, measured in one run.

    python tests/bench/bench_train.py --model clip --size ViT-B-32 --batch-size 256            # on a GPU
    python tests/bench/bench_train.py --model clip --size ViT-B-16 --compile --loader 8 --open-clip
    python tests/bench/bench_train.py --model clip --size tiny --device cpu --steps 5           # smoke test
    python tests/bench/bench_train.py --size ViT-B-16 --batch-size 8 --device cpu --steps 6 --patch-dropout 0,0.5,0.75
    python tests/bench/bench_train.py --default-run --steps 20      # the default clip run's step, then and now

Data in device memory isolates the model (one real batch, reused); --loader N also times the real
loader with N workers alone, to show whether it keeps up. --open-clip times open_clip's model of the
same name and its ClipLoss back to back, when the open_clip package is installed (never a dependency).
FLOPs are counted by torch's FlopCounterMode on one step (matmuls and attention, forward + backward).
--patch-dropout R1,R2,... times the train step at each share of image patches dropped (FLIP), the
shares taking turns step by step, and the activations each keeps for its backward.
"""
import argparse
import importlib
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data as datalib  # noqa: E402


def step_fn(model, loss_fn, opt, device):
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    def step(batch):
        with autocast:
            loss = loss_fn(model(batch))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss
    return step


def timed(step, batch, steps, device, eager_step=None):
    from torch.utils.flop_counter import FlopCounterMode

    # FLOPs from an eager step: under the counter's dispatch mode a compiled model would not compile.
    with FlopCounterMode(display=False) as counter:
        (eager_step or step)(batch)
    for _ in range(3):  # warm-up (and compilation)
        step(batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    for _ in range(steps):
        loss = step(batch)
    loss.item()
    seconds = (time.perf_counter() - t) / steps
    peak = torch.cuda.max_memory_allocated() / 2 ** 30 if device.type == "cuda" else float("nan")
    return seconds, counter.get_total_flops(), peak


def saved_bytes(model, loss_fn, batch):
    """Bytes of the tensors autograd keeps from one forward for the backward (each storage once)."""
    seen = {}

    def pack(x):
        seen[x.untyped_storage().data_ptr()] = x.untyped_storage().nbytes()
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = loss_fn(model(batch))
    loss.backward()
    model.zero_grad(set_to_none=True)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    return sum(n for ptr, n in seen.items() if ptr not in params)


def patch_dropout_turns(model, step, batch, ratios, steps, device):
    """The train step at each patch-dropout share, taking turns: samples/s (median), saved activations."""
    import statistics

    b = batch["image"].shape[0]
    grid = (model.cfg.image_size // model.cfg.patch_size) ** 2
    g = torch.Generator().manual_seed(0)
    inputs = {}
    for r in ratios:
        inputs[r] = dict(batch)
        if r:
            keep = max(1, round((1 - r) * grid))
            inputs[r]["patch_keep"] = torch.stack([torch.randperm(grid, generator=g)[:keep].sort().values
                                                   for _ in range(b)]).to(device)
    times = {r: [] for r in ratios}
    for r in ratios:
        step(inputs[r])  # warm-up
    for _ in range(steps):
        for r in ratios:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step(inputs[r]).item()
            times[r].append(time.perf_counter() - t)
    base = b / statistics.median(times[ratios[0]])
    saved0 = None
    for r in ratios:
        rate, saved = b / statistics.median(times[r]), saved_bytes(model, model.loss, inputs[r])
        saved0 = saved0 or saved
        print(f"patch dropout {r:<5} {rate:8.2f} samples/s ({rate / base:.2f}x)  activations kept for the backward "
              f"{saved / 2 ** 20:8.1f} MiB ({saved / saved0:.2f}x)", flush=True)


class Ce8bbb2Synthetic(datalib.Synthetic):
    """The synthetic data as commit ce8bbb2 drew it: 64 px, fresh normal noise per image (12,288 draws),
    the scene drawn twice (for the captions, then for the image)."""

    def sample(self, index, rng):
        en, zh, de, label = self.captions(index)
        k = int(rng.integers(self.n_templates))
        return {"text": en[k], "captions": en, "label": label, "rewrites": en[:k] + en[k + 1:],
                "texts": {"en": en[k], "zh": zh[k % len(zh)], "de": de[k % len(de)]}, "image": self.image(index)}

    def image(self, index, scene=None):
        import numpy as np
        from PIL import Image

        rng, c, s, z, b, r, cx, cy = self.attributes(index)
        n = self.resolution
        bg = np.array(datalib.BACKGROUNDS[b][3]) + rng.integers(-15, 16, size=3)
        fg = np.array(datalib.COLORS[c][3]) + rng.integers(-25, 26, size=3)
        yy, xx = self._grid
        mask = datalib._shape_mask(datalib.SHAPES[s][0], (xx - cx) / r, (yy - cy) / r)
        img = np.where(mask[..., None], fg, bg) + rng.normal(0, 10, size=(n, n, 3)).astype(np.float32)
        return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def ce8bbb2_encode_text(self, tokens, normalize=False):
    """clip.CLIP.encode_text as ce8bbb2 ran it: every position of the context, padding included."""
    import torch.nn.functional as F

    x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
    x = self.ln_final(self.transformer(x, causal=True))
    end = tokens.argmax(-1) if self.cfg.eos_id is None else (tokens == self.cfg.eos_id).int().argmax(-1)
    x = x[torch.arange(x.shape[0], device=x.device), end] @ self.text_projection
    return F.normalize(x, dim=-1) if normalize else x


def default_run_turns(steps, batch_size=128):
    """The default clip run's train step on the CPU, ce8bbb2's path and today's taking turns step by
    step: seconds per phase (median) and samples/s. Today's tiny preset has 16 patches of 12 px where
    ce8bbb2's had 36 of 8."""
    import statistics
    import types
    from dataclasses import replace

    import clip

    new_data = datalib.Synthetic(0, "train", 100_000, resolution=48)  # clip.py's default --synthetic-resolution
    model = clip.build("tiny", captions=new_data.caption_corpus())
    torch.manual_seed(0)
    old = clip.CLIP(replace(model.cfg, patch_size=8), model.tokenizer)  # ce8bbb2's tiny: 36 patches of 8 px
    old.encode_text = types.MethodType(ce8bbb2_encode_text, old)
    # ce8bbb2: images drawn at 64 px with fresh noise, the text tower over all 24 positions, foreach AdamW
    paths = {"ce8bbb2": (old, Ce8bbb2Synthetic(0, "train", 100_000), False), "today": (model, new_data, True)}
    state = {}
    for name, (m, ds, fused) in paths.items():
        opt = torch.optim.AdamW(m.optimizer_groups(0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6, fused=fused)
        state[name] = (m, opt, datalib.TrainBatches(ds, m.transform(True, datalib.RandomCrop(m.cfg.image_size)), batch_size), {})
    phases = ("data", "forward", "loss", "backward", "optimizer")
    for k in range(steps + 2):  # two warm-up steps each
        for name, (m, opt, batches, times) in state.items():
            t0 = time.perf_counter()
            batch, _ = batches[k]
            batch.pop("label", None)
            t1 = time.perf_counter()
            out = m(batch)
            t2 = time.perf_counter()
            loss = m.loss(out)
            t3 = time.perf_counter()
            loss.backward()
            t4 = time.perf_counter()
            torch.nn.utils.clip_grad_norm_([p for p in m.parameters() if p.requires_grad], 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            m.after_step()
            t5 = time.perf_counter()
            if k >= 2:
                for phase, dt in zip(phases, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)):
                    times.setdefault(phase, []).append(dt)
    print(f"# default clip run's step (tiny, batch {batch_size}), {torch.get_num_threads()} threads, "
          f"{steps} steps each, taking turns, medians in ms")
    print("| path | " + " | ".join(phases) + " | step | samples/s |")
    print("| --- " * (len(phases) + 3) + "|")
    rates = {}
    for name, (*_, times) in state.items():
        med = {ph: statistics.median(times[ph]) for ph in phases}
        total = statistics.median([sum(times[ph][i] for ph in phases) for i in range(steps)])
        rates[name] = batch_size / total
        print(f"| {name} | " + " | ".join(f"{med[ph] * 1e3:.0f}" for ph in phases) + f" | {total * 1e3:.0f} | "
              f"{rates[name]:.0f} |")
    print(f"today / ce8bbb2 samples/s: {rates['today'] / rates['ce8bbb2']:.2f}x")


def report(name, b, seconds, flops, peak, peak_tflops):
    tflops = flops / seconds / 1e12
    print(f"{name:<28} {b / seconds:10.1f} samples/s {tflops:8.1f} TFLOP/s  MFU {tflops / peak_tflops:6.1%}  "
          f"peak {peak:6.2f} GiB", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="clip")
    p.add_argument("--size", default="ViT-B-32")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--loader", type=int, default=0, help="also time the real loader with this many workers")
    p.add_argument("--open-clip", action="store_true")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak (H100/H200 SXM: 989)")
    p.add_argument("--patch-dropout", default=None, help="shares of patches dropped to compare, e.g. 0,0.5,0.75")
    p.add_argument("--default-run", action="store_true",
                   help="the default clip run's step on the CPU: ce8bbb2's path and today's, taking turns")
    args = p.parse_args()
    if args.default_run:
        default_run_turns(args.steps)
        return
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = True
    module = importlib.import_module(args.model)
    margs = argparse.Namespace(size=args.size, tokenizer=None, quick_gelu=False, multi_text=False, max_rewrites=4)
    ds = datalib.Synthetic(0, "train", 10_000)
    model = module.create(margs, ds.caption_corpus()).to(device)
    batches = datalib.TrainBatches(ds, model.transform(True, datalib.RandomCrop(model.cfg.image_size)), args.batch_size)
    batch, _ = batches[0]
    batch.pop("label", None)
    batch = {k: v.to(device) for k, v in batch.items()}
    print(f"# {args.model} {args.size}, batch {args.batch_size}, {device} "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else ''}, torch {torch.__version__}, "
          f"{time.strftime('%Y-%m-%d')}")

    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    fwd = torch.compile(model) if args.compile else model
    if args.patch_dropout:
        ratios = [float(r) for r in args.patch_dropout.split(",")]
        patch_dropout_turns(model, step_fn(fwd, model.loss, opt, device), batch, ratios, args.steps, device)
        return
    seconds, flops, peak = timed(step_fn(fwd, model.loss, opt, device), batch, args.steps, device,
                                 step_fn(model, model.loss, opt, device))
    report(f"ours{' +compile' if args.compile else ''}", args.batch_size, seconds, flops, peak, args.peak_tflops)

    if args.open_clip:
        try:
            import open_clip
        except ImportError:
            print("open_clip is not installed: pip install open_clip_torch (on the benchmark machine only)")
        else:
            oc = open_clip.create_model(args.size, precision="fp32", device=device)
            oc_loss = open_clip.ClipLoss()
            oc_opt = torch.optim.AdamW(oc.parameters(), lr=1e-4, fused=device.type == "cuda")
            ofwd = torch.compile(oc) if args.compile else oc
            images = batch["image"]
            text = torch.randint(0, 49407, (args.batch_size, 77), device=device)

            def oc_step(module):
                def step(_):
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                        out = module(images, text)
                        if isinstance(out, dict):  # output_dict=True models; the default is a tuple
                            out = (out["image_features"], out["text_features"], out["logit_scale"])
                        loss = oc_loss(*out[:3])
                    loss.backward()
                    oc_opt.step()
                    oc_opt.zero_grad(set_to_none=True)
                    return loss
                return step

            s2, f2, p2 = timed(oc_step(ofwd), None, args.steps, device, oc_step(oc))
            report(f"open_clip{' +compile' if args.compile else ''}", args.batch_size, s2, f2, p2, args.peak_tflops)
            print(f"ours / open_clip samples/s: {s2 / seconds:.2f}x")

    if args.loader:
        it = iter(datalib.loader(batches, start=1, stop=1 + 4 * args.loader + args.steps, workers=args.loader))
        for _ in range(2 * args.loader):  # let every worker start
            next(it)
        t = time.perf_counter()
        n = 0
        for b, _ in it:
            n += b["image"].shape[0]
        rate = n / (time.perf_counter() - t)
        print(f"loader, {args.loader} workers:      {rate:10.1f} samples/s "
              f"({rate / (args.batch_size / seconds):.2f}x the model's step rate)")


if __name__ == "__main__":
    main()
