"""Train any of the five models: `torchrun --standalone --nproc_per_node=N train.py --model clip`.

Plain `python train.py ...` runs one process. gloo on CPU, nccl on CUDA. train.py knows no model's
internals: it uses the interface described at the top of clip.py, which every model file implements.
"""
import argparse
import contextlib
import importlib
import importlib.util
import inspect
import json
import math
import os
import datetime
import html
import re
import shutil
import signal
import sys
import time

import torch
import torch.distributed as dist

import data as datalib

MODELS = ("clip", "brivl", "clippo", "altclip", "laclip")
HERE = os.path.dirname(os.path.abspath(__file__))


def import_model(name):
    available = [m for m in MODELS if os.path.isfile(os.path.join(HERE, f"{m}.py"))]
    if name not in available:
        raise SystemExit(f"train.py: unknown --model {name!r}; choose one of: {', '.join(available)}")
    return importlib.import_module(name)


def build_parser(model):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="clip", help=f"one of {', '.join(MODELS)}")
    p.add_argument("--size", default="tiny", help="a config preset of the model file (tiny, ViT-B-32, ...)")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (or give --epochs)")
    p.add_argument("--epochs", type=float, default=None,
                   help="passes over the training data (shards: with --train-num-samples); sets --steps")
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--accum", type=int, default=1,
                   help="micro-batches per step; the loss stays exact over the whole global batch")
    p.add_argument("--lr", type=float, default=None, help="default: open_clip's 5e-4 (the demo: 1e-3)")
    p.add_argument("--wd", type=float, default=None, help="default: open_clip's 0.2 (the demo: 0.1)")
    p.add_argument("--warmup", type=int, default=None,
                   help="linear warmup steps; default: open_clip's 10000, at most a tenth of the run (the demo: its own)")
    p.add_argument("--lr-schedule", default=None, choices=["cosine", "const", "const-cooldown"],
                   help="after the linear warmup: cosine to 0 (the default), constant, or constant then a linear "
                        "cooldown to 0 over the last --cooldown-steps (open_clip's schedules)")
    p.add_argument("--cooldown-steps", type=int, default=None,
                   help="with --lr-schedule const-cooldown (a run shorter than this cools down all along)")
    p.add_argument("--beta1", type=float, default=0.9, help="AdamW")
    p.add_argument("--beta2", type=float, default=0.98)
    p.add_argument("--eps", type=float, default=1e-6)
    p.add_argument("--grad-clip", type=float, default=1.0, help="max global gradient norm (0: off)")
    p.add_argument("--out", default="out", help="folder for metrics.jsonl and the checkpoints")
    p.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from the newest loadable checkpoint in --out, or start a new run if there is none "
                        "(one command for the first start and every restart); or continue from the file given")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in an --out that holds one, deleting its checkpoints and metrics.jsonl")
    p.add_argument("--allow-flag-changes", action="store_true",
                   help="--resume even where flags that change the run differ from the checkpoint's")
    p.add_argument("--keep", type=int, default=2,
                   help="step-numbered checkpoints kept (checkpoint-STEP.pt; checkpoint.pt is the newest)")
    p.add_argument("--init", default=None,
                   help="weights to start from (fine-tuning): any file or folder the model file's load() reads "
                        "(clip: OpenAI, open_clip, Hugging Face, our checkpoints); the architecture, tokenizer and "
                        "preprocessing come from them. Not read again on --resume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evals (0: only at the end)")
    p.add_argument("--save-every", type=int, default=100, help="steps between checkpoints (0: only at the end)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--report-to", default="",
                   help="also log to tensorboard (OUT/tensorboard) and/or wandb, comma-separated; metrics.jsonl "
                        "stays the record")
    p.add_argument("--workers", type=int, default=None,
                   help="loader worker processes per rank (default: the cores left after 2 per rank, at most 8)")
    p.add_argument("--gpu-decode", action="store_true",
                   help="decode training JPEGs on the training device (nvjpeg on CUDA; on a CPU run, the CPU): "
                        "loader workers only read the files and draw the crop boxes, the main process decodes, "
                        "crops and resizes each batch there")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="auto: bf16 autocast on CUDA, fp32 on CPU; fp16: autocast with a gradient scaler (V100, T4)")
    p.add_argument("--fsdp", action="store_true",
                   help="shard weights, gradients and optimizer state over the ranks (FSDP2: each residual "
                        "block, each tower, the root); the loss stays exact")
    p.add_argument("--sharded-checkpoint", action="store_true",
                   help="with --fsdp: each rank writes its shards (torch.distributed.checkpoint, "
                        "OUT/checkpoint-STEP.dcp) instead of rank 0 gathering the whole model")
    p.add_argument("--grad-checkpointing", action="store_true",
                   help="recompute each residual block's activations in the backward: less memory, same gradients")
    p.add_argument("--patch-dropout", type=float, default=0.0,
                   help="FLIP: each training image keeps a random (1 - P) of its ViT patch tokens, drawn from "
                        "(seed, epoch, sample) (clip, laclip, clippo's images, altclip's stage 2; not brivl's CNN). "
                        "Evaluation, zero-shot and predict see every patch. --force-patch-dropout in open_clip")
    p.add_argument("--patch-dropout-until", type=int, default=0,
                   help="with --patch-dropout: train unmasked from this step on (FLIP's unmasked tuning; 0: never; "
                        "a model's finish_args may set it for its default run)")
    p.add_argument("--dist-timeout", type=float, default=30,
                   help="minutes a rank waits for its peers in a collective before it fails (a dead peer)")
    datalib.add_args(p)
    if model is not None and hasattr(model, "add_args"):
        model.add_args(p)
    return p


# The demo, --size tiny on the synthetic data, is the one run whose recipe is ours to choose: a model file
# may set its own in finish_args (clip's is shorter), and these fill what it leaves. Every other run
# gets open_clip's defaults, and states its own length.
DEMO = dict(steps=800, lr=1e-3, wd=0.1, warmup=50, lr_schedule="cosine", cooldown_steps=0, synthetic_resolution=64)
REAL_DATA = dict(lr=5e-4, wd=0.2, lr_schedule="cosine", cooldown_steps=0, synthetic_resolution=64)
OPEN_CLIP_WARMUP = 10_000


def is_demo(args):
    return args.size == "tiny" and args.data == "synthetic"


def finish_schedule(args):
    """The warmup once the length is known: open_clip's 10,000 steps, at most a tenth of the run."""
    if args.warmup is None:
        args.warmup = max(1, min(OPEN_CLIP_WARMUP, args.steps // 10))


def steps_from_epochs(args, n_samples, world):
    """--epochs N over n_samples: the steps of N passes at this global batch (rounded up)."""
    if args.steps is None:
        args.steps = max(1, math.ceil(args.epochs * n_samples / (args.batch_size * world)))
        finish_schedule(args)


def parse_args(argv=None):
    first = argparse.ArgumentParser(add_help=False)  # --help then lists the chosen model's flags too
    first.add_argument("--model", default="clip")
    module = import_model(first.parse_known_args(argv)[0].model)
    p = build_parser(module)
    args = p.parse_args(argv)
    if args.epochs is not None and (args.steps is not None or args.epochs <= 0):
        p.error("--epochs: a number of passes above 0, and not with --steps")
    if hasattr(module, "finish_args"):  # the model's own demo recipe; flags that follow from others
        module.finish_args(args)
    for key, value in (DEMO if is_demo(args) else REAL_DATA).items():  # what neither the user nor the model set
        if getattr(args, key) is None and not (key == "steps" and args.epochs is not None):
            setattr(args, key, value)
    if args.steps is None and args.epochs is None:
        raise ValueError("state the run's length: --epochs N (passes over the data; shards also need "
                         "--train-num-samples, as in open_clip) or --steps N. Only the demo (--size tiny on the "
                         "synthetic data) has a length of its own")
    if args.steps is not None:
        finish_schedule(args)
    for name, low in (("batch_size", 1), ("steps", 1), ("log_every", 1), ("warmup", 0), ("save_every", 0),
                      ("eval_every", 0), ("train_num_samples", 1), ("max_sample_bytes", 1), ("workers", 0)):
        if getattr(args, name, None) is not None and getattr(args, name) < low:
            p.error(f"--{name.replace('_', '-')} must be at least {low}")
    if args.epochs is not None and not math.isfinite(args.epochs):
        p.error("--epochs must be a finite number of passes")
    if args.accum < 1 or args.batch_size % args.accum:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --accum {args.accum}")
    if args.keep < 1:
        p.error("--keep must be at least 1")
    if not 8 <= args.synthetic_resolution <= datalib.MAX_RESOLUTION:
        p.error(f"--synthetic-resolution must be 8 to {datalib.MAX_RESOLUTION} pixels")
    if args.lr_schedule == "const-cooldown" and args.cooldown_steps < 1:
        p.error("--lr-schedule const-cooldown needs --cooldown-steps of 1 or more")
    if args.sharded_checkpoint and not args.fsdp:
        p.error("--sharded-checkpoint goes with --fsdp")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise NotADirectoryError(f"--out {args.out} is a file; pass a folder (made if missing) for the run's "
                                 f"checkpoints and metrics")
    for name in filter(None, args.report_to.split(",")):
        if name not in REPORTERS:
            p.error(f"--report-to {name!r}: choose among {', '.join(REPORTERS)}")
        if importlib.util.find_spec(REPORTERS[name]) is None:  # every rank stops here, not rank 0 alone later
            raise ImportError(f"--report-to {name} needs the {REPORTERS[name]} package: pip install {REPORTERS[name]}")
    return args, module


# ----------------------------------------------------------------------------------------------
# Processes


def setup(args):
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local_rank, local_world = int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    else:  # share the cores among this machine's ranks instead of oversubscribing them
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if args.workers is None:  # on a small machine a loader process only steals cycles from the model
        args.workers = max(0, min(8, (os.cpu_count() or 1) // local_world - 2))
    control = None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if world > 1:
        timeout = datetime.timedelta(minutes=args.dist_timeout)
        dist.init_process_group(backend, store=rendezvous_store(rank, world, timeout),
                                rank=rank, world_size=world, timeout=timeout)
        # Stop requests and checkpoint decisions travel on a CPU group, so they never wait on the GPU.
        control = dist.new_group(backend="gloo", timeout=timeout) if device.type == "cuda" else dist.group.WORLD
    elif args.fsdp:  # FSDP2 needs a process group, even of one
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    return rank, world, device, control


def rendezvous_store(rank, world, timeout):
    """torchrun's store, with a key prefix per restart round.

    torchrun --max-restarts keeps its store across rounds: without the prefix the restarted workers
    read the previous round's addresses and dial ports that no longer listen.
    """
    host, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    agent_hosts = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    store = dist.TCPStore(host, port, world, is_master=rank == 0 and not agent_hosts, timeout=timeout)
    return dist.PrefixStore(f"train/round{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def rank0_decides(value, control, world):
    """Rank 0's value on every rank (decisions about files only rank 0 reads or writes)."""
    if world == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, group=control)
    return box[0]


class StopRequest:
    """SIGTERM/SIGINT ask for a checkpoint at the end of the current step; a second SIGINT aborts."""

    def __init__(self):
        self.asked = False
        signal.signal(signal.SIGTERM, self._handle)
        signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signum, frame):
        if self.asked and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True

    def agreed(self, control, world):
        # Every rank must stop after the same step, whichever of them got the signal first.
        if world == 1:
            return self.asked
        flag = torch.tensor([int(self.asked)])
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=control)
        return bool(flag.item())


# Models keep their buffers identical on every rank themselves (BriVL fills its queues from keys
# gathered from all ranks): DDP need not broadcast them before every forward. Newer torch renames the flag.
NO_BUFFER_SYNC = ({"forward_sync_buffers": False}
                  if "forward_sync_buffers" in inspect.signature(torch.nn.parallel.DistributedDataParallel).parameters
                  else {"broadcast_buffers": False})

# ----------------------------------------------------------------------------------------------
# Optimisation


def lr_at(step, args):
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    if args.lr_schedule == "const":
        return args.lr
    if args.lr_schedule == "const-cooldown":
        cooldown = min(args.cooldown_steps, args.steps)
        start = args.steps - cooldown
        return args.lr if step < start else args.lr * (1 - (step - start) / cooldown)
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return 0.5 * args.lr * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------------
# Memory: activation checkpointing and FSDP2, over the units the model names (model.shard_units())


def checkpoint_blocks(model):
    """Recompute each residual block's activations in the backward instead of keeping them.

    Non-reentrant torch.utils.checkpoint restores the RNG state and takes keyword arguments, so the
    gradients are the plain forward's; under no_grad (evaluation, GradCache's first pass) it is skipped."""
    from torch.utils.checkpoint import checkpoint

    for block in model.shard_units()[0]:
        def forward(*a, _inner=block.forward, **kw):
            if torch.is_grad_enabled():
                return checkpoint(_inner, *a, use_reentrant=False, **kw)
            return _inner(*a, **kw)

        block.forward = forward


def shard(model, device, precision):
    """FSDP2: each residual block, then each tower, then the root holds its parameters' shards only,
    gathering a unit's whole weights just before its forward (and backward) and freeing them after."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision) if device.type == "cuda" else None
    policy = MixedPrecisionPolicy(param_dtype=half, reduce_dtype=torch.float32) if half else MixedPrecisionPolicy()
    # FSDP2 cannot shard 0-d parameters (the logit scale): every rank keeps them whole, and their
    # gradients are averaged by reduce_scalars() as DDP would.
    scalars = {p for p in model.parameters() if p.dim() == 0}
    blocks, towers = model.shard_units()
    for unit in [*blocks, *towers, model]:
        fully_shard(unit, mp_policy=policy, ignored_params=scalars)
    register_fsdp_forward_method(model, "encode_texts")  # evaluation's text embeddings read the root's weights
    return [p for p in scalars if p.requires_grad]


def reduce_scalars(params, world):
    for p in params:
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world


def distribute(model, args, world, device):
    """(forward, sync): the model's forward under DDP (FSDP already wraps the model itself) and
    torch.compile, and sync(on), a context in which gradients are reduced over the ranks only if on
    (with a step's last micro-batch)."""
    ddp = None
    if world > 1 and not args.fsdp:
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                                        **NO_BUFFER_SYNC)
    forward = torch.compile(ddp or model) if args.compile else (ddp or model)

    def sync(on):
        if args.fsdp:
            model.set_requires_gradient_sync(on)
            return contextlib.nullcontext()
        return ddp.no_sync() if ddp is not None and not on else contextlib.nullcontext()

    return forward, sync


def rng_state(device):
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def set_rng_state(state, device):
    torch.set_rng_state(state[0])
    if state[1] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state[1], device)


def train_step(forward, sync, model, batch, accum, autocast, device, scaler=None):
    """Forward + backward of one global batch; returns the loss (a tensor, not synced)."""
    scale = scaler.scale if scaler is not None else (lambda x: x)  # fp16: gradients scaled up, unscaled at the step
    if accum == 1:
        with autocast:
            loss = model.loss(forward(batch))
        scale(loss).backward()
        return loss.detach()
    # Exact accumulation (the GradCache recipe): embed every micro-batch without a graph, take the loss
    # and its gradient w.r.t. the features over all of them, then re-embed each micro-batch with a graph
    # and push those gradients through. Every micro-batch sees all others as negatives.
    micro = [dict(zip(batch, vs)) for vs in zip(*(v.chunk(accum) for v in batch.values()))]
    states, outs = [], []
    with torch.no_grad(), autocast:
        for mb in micro:
            states.append(rng_state(device))
            outs.append(forward(mb))
    feats = {k: (torch.cat([o[k] for o in outs]) if outs[0][k].dim() else outs[0][k]).detach().float().requires_grad_()
             for k in outs[0]}
    loss = model.loss(feats)
    scale(loss).backward()
    grads = {k: (f.grad.split([o[k].shape[0] for o in outs]) if f.dim() else f.grad) for k, f in feats.items()
             if f.grad is not None}
    for m, mb in enumerate(micro):
        set_rng_state(states[m], device)
        last = m == accum - 1
        with sync(last):
            with autocast:
                out = forward(mb)
            # Per-batch scalars (the logit scale) get their gradient once, with the synced micro-batch.
            surrogate = sum((out[k].float() * (g[m] if out[k].dim() else g)).sum() for k, g in grads.items()
                            if out[k].dim() or last)
            surrogate.backward()
    return loss.detach()


# ----------------------------------------------------------------------------------------------
# Evaluation


@torch.no_grad()
def evaluate(model, module, sets, args, rank, world, device, autocast):
    """Retrieval R@k and validation loss on caption sets, zero-shot top-1/top-5 on labelled ones."""
    was_training = model.training
    model.eval()
    metrics = {}
    for data in sets:
        if data is None:
            continue
        folder = isinstance(data, datalib.ImageFolder)  # labels only: no captions to retrieve
        transform = model.transform(False)
        batches = datalib.EvalBatches(data, transform, args.batch_size, rank, world, args.seed)
        images, texts, labels, loss_sum, n_full = [], [], [], 0.0, 0
        for batch, info in datalib.loader(batches, workers=args.workers):
            full = info["full"]
            label = batch.pop("label", None)
            with autocast:
                out = model(transform.finish(batch, device) if hasattr(transform, "finish") else
                            {k: v.to(device, non_blocking=True) for k, v in batch.items()})
                if full and not folder:  # every rank is here in lockstep: the loss's collectives line up
                    loss_sum += model.loss(out).float().item()
                    n_full += 1
            images.append(out["image"].float().cpu())
            texts.append(out["text"].float().cpu())
            if label is not None:
                labels.append(label)
        local = (torch.cat(images), torch.cat(texts), torch.cat(labels) if labels else None, loss_sum, n_full)
        parts = [local]
        if world > 1:
            parts = [None] * world
            dist.all_gather_object(parts, local)
        classifiers = {}
        if parts[0][2] is not None and hasattr(data, "classnames") and (rank == 0 or args.fsdp):
            for lang, names in data.classnames.items():  # under FSDP every rank: the text tower is sharded
                with autocast:
                    classifiers[lang] = module.zero_shot_classifier(model, names, data.templates[lang]).float().cpu()
        if rank != 0:
            continue
        image, text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        label = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
        if not folder:
            metrics.update(module.retrieval_metrics(image, text))
            if parts[0][4]:
                metrics["val_loss"] = sum(p[3] for p in parts) / sum(p[4] for p in parts)
        if label is not None:
            for lang, clf in classifiers.items():
                names = data.classnames[lang]
                top = (image @ clf.T).topk(min(5, len(names)), dim=1).indices
                suffix = "" if lang == "en" else f"_{lang}"
                metrics[f"zeroshot_top1{suffix}"] = (top[:, 0] == label).float().mean().item()
                if folder:
                    metrics["zeroshot_top5"] = (top == label[:, None]).any(1).float().mean().item()
    model.train(was_training)
    return metrics


# ----------------------------------------------------------------------------------------------
# Logging: OUT/metrics.jsonl is the record; --report-to mirrors each row to TensorBoard and W&B

REPORTERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # --report-to name: the package it needs


class Reporters:
    """Rank 0's mirrors of metrics.jsonl rows, as train/... and val/... scalars."""

    def __init__(self, names, out, step, args):
        self.tensorboard = self.wandb = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: what a stopped run logged after its checkpoint is dropped, as in metrics.jsonl
            self.tensorboard = SummaryWriter(os.path.join(out, "tensorboard"), purge_step=step + 1 if step else None)
        if "wandb" in names:
            import wandb

            id_file = os.path.join(out, "wandb_id")  # a resumed run continues the same W&B run
            run_id = open(id_file).read().strip() if step and os.path.isfile(id_file) else os.urandom(4).hex()
            with open(id_file, "w") as f:
                f.write(run_id)
            self.wandb = wandb.init(id=run_id, resume="allow", dir=out, name=os.path.basename(os.path.abspath(out)),
                                    config={k: v for k, v in vars(args).items() if k != "report_to"})

    def __call__(self, row):
        kind = "train" if "loss" in row else "val"
        scalars = {f"{kind}/{k}": v for k, v in row.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tensorboard:
            for name, value in scalars.items():
                self.tensorboard.add_scalar(name, value, row["step"])
            self.tensorboard.flush()
        if self.wandb:
            self.wandb.log(scalars, step=row["step"])

    def close(self):
        if self.tensorboard:
            self.tensorboard.close()
        if self.wandb:
            self.wandb.finish()


# ----------------------------------------------------------------------------------------------
# Checkpoints: OUT/checkpoint-STEP.pt, the newest also as OUT/checkpoint.pt (a hard link to it)
#
# A checkpoint file appears only once it is whole (written under a temporary name, flushed, renamed)
# and an older one is deleted only after its successor has appeared: a kill at any instant leaves at
# least one good checkpoint, and resume falls back to an older one if the newest will not load.

LATEST = "checkpoint.pt"
NUMBERED = re.compile(r"checkpoint-(\d+)\.pt")
NUMBERED_SHARDS = re.compile(r"checkpoint-\d+\.dcp")  # a sharded checkpoint's folder: a name in --out, no path
# Flags that may differ when a run is resumed: where files go, how often to log, save and evaluate,
# what to evaluate on, and knobs that leave the arithmetic alone (--accum, --fsdp and activation
# checkpointing are exact; a run may move between FSDP and DDP at the same world size). The global batch
# is checked on its own, so ranks x --batch-size may be regrouped. Every other flag changes the run.
# What a checkpoint written before a flag existed ran with, where today's default differs.
BEFORE_THE_FLAG = {"synthetic_resolution": 64}
MAY_CHANGE_ON_RESUME = {"steps", "epochs", "train_num_samples", "out", "resume", "overwrite", "allow_flag_changes", "keep", "workers", "log_every",
                        "save_every", "eval_every", "compile", "device", "dist_timeout", "val_data", "val_size",
                        "zeroshot_data", "zeroshot_templates", "accum", "batch_size", "report_to", "fsdp",
                        "sharded_checkpoint", "grad_checkpointing"}


def reason(e):
    first = (str(e).strip().splitlines() or [""])[0]
    return f"{type(e).__name__}: {first.split('. ')[0][:200]}"


def numbered_checkpoints(out):
    """OUT/checkpoint-STEP.pt files, the most recently written first."""
    if not os.path.isdir(out):
        return []
    found = [os.path.join(out, f) for f in os.listdir(out) if NUMBERED.fullmatch(f)]
    return sorted(found, key=lambda f: (os.path.getmtime(f), int(NUMBERED.fullmatch(os.path.basename(f))[1])),
                  reverse=True)


def checkpoints(out):
    """Every checkpoint file in out, newest first: checkpoint.pt, then the numbered ones."""
    return ([os.path.join(out, LATEST)] if os.path.isfile(os.path.join(out, LATEST)) else []) + numbered_checkpoints(out)


def read_checkpoint(path):
    """A checkpoint to resume from, each part the type it must be: a file in --out may be one a crash,
    another tool or another person left."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(ckpt, dict) or not {"model", "optimizer", "step"} <= ckpt.keys():
        raise ValueError("not a train.py checkpoint (it has no model, optimizer and step)")
    step, data, rng, sharded = ckpt["step"], ckpt.get("data"), ckpt.get("rng"), ckpt.get("sharded")
    problems = [what for what, bad in (
        ("step", not isinstance(step, int) or isinstance(step, bool) or step < 0),
        ("args", not isinstance(ckpt.get("args", {}), dict)),
        ("model", not (isinstance(ckpt["model"], dict) or (ckpt["model"] is None and sharded))),
        ("optimizer", not (isinstance(ckpt["optimizer"], dict) or (ckpt["optimizer"] is None and sharded))),
        ("sharded", sharded is not None and not (isinstance(sharded, str) and NUMBERED_SHARDS.fullmatch(sharded))),
        ("rng", not (isinstance(rng, dict) and isinstance(rng.get("torch"), torch.Tensor)
                     and rng["torch"].dtype == torch.uint8)),
        ("data", data is not None and not (isinstance(data, dict) and isinstance(data.get("slots"), int)
                                           and isinstance(data.get("at"), dict) and all(
            isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(x, int) and x >= 0 for x in v)
            for v in data["at"].values())))) if bad]
    if problems:
        raise ValueError(f"a checkpoint whose {', '.join(problems)} {'is' if len(problems) == 1 else 'are'} not "
                         f"what train.py writes")
    ckpt["folder"] = os.path.dirname(os.path.abspath(path))  # where a sharded checkpoint's shards lie
    return ckpt


def step_reached(path):
    try:  # mmap: reads the step without reading the weights
        return f"step {torch.load(path, map_location='cpu', weights_only=True, mmap=True)['step']}"
    except Exception:
        return "an unknown step (the checkpoint does not load)"


def start_or_resume(args):
    """(path, checkpoint) to continue from, or (None, None) to start a new run. Rank 0 only."""
    found = checkpoints(args.out)
    if args.resume is None:
        if found and not args.overwrite:
            raise SystemExit(f"train.py: {args.out} already holds a run, at {step_reached(found[0])} ({found[0]}); "
                             f"add --resume to continue it, or --overwrite to delete it and start again")
        return None, None
    if args.resume != "auto":  # the file the user named, or nothing
        if not os.path.isfile(args.resume):
            raise SystemExit(f"train.py: --resume: no checkpoint at {args.resume}; pass an existing file, or --resume "
                             f"alone to continue from --out")
        try:
            return args.resume, read_checkpoint(args.resume)
        except Exception as e:
            raise SystemExit(f"train.py: --resume: {args.resume} does not load ({reason(e)})") from None
    bad = []
    for path in found:
        if any(os.path.samefile(path, f) for f in bad):  # checkpoint.pt and its numbered name: one file
            bad.append(path)
            continue
        try:
            ckpt = read_checkpoint(path)
        except Exception as e:
            print(f"train.py: {path} does not load ({reason(e)}); trying the one before it", flush=True)
            bad.append(path)
            continue
        for f in bad:  # set aside, so that it is neither tried again nor counted among the --keep newest
            os.replace(f, f + ".unreadable")
            print(f"train.py: kept the unreadable file as {f}.unreadable", flush=True)
        return path, ckpt
    if found:
        raise SystemExit(f"train.py: no checkpoint in {args.out} loads (tried {', '.join(found)}); pass --resume FILE, "
                         f"or --overwrite to start again")
    return None, None


def changed_flags(saved, args, defaults, world):
    """The flags that would make a resumed run a different run, as 'flag: before -> now' lines."""
    diffs = []
    for key, now in sorted(vars(args).items()):
        before = saved["args"].get(key, BEFORE_THE_FLAG.get(key, defaults.get(key))) if isinstance(saved.get("args"), dict) else now
        unset = (None, False)  # a store_true flag that became tri-state (--quick-gelu) compares equal unset
        if key not in MAY_CHANGE_ON_RESUME and before != now and not (before in unset and now in unset):
            diffs.append(f"--{key.replace('_', '-')}: {before} -> {now}")
    old_steps = saved.get("args", {}).get("steps", args.steps)
    if args.steps < old_steps:
        diffs.append(f"--steps: {old_steps} -> {args.steps} (a run may be extended, not shortened)")
    step, seen = saved["step"], saved.get("samples_seen")
    if step and seen is not None and seen != step * args.batch_size * world:
        diffs.append(f"global batch (ranks x --batch-size): {seen // step} -> {args.batch_size * world}")
    return diffs


def clear_run(out):
    """--overwrite: the old run's checkpoints and metrics go before the new run writes its own."""
    for f in checkpoints(out) + [os.path.join(out, "metrics.jsonl")]:
        if os.path.exists(f):
            os.remove(f)
    for f in os.listdir(out):
        if f.endswith((".dcp", ".dcp.tmp", ".dcp.old")):
            shutil.rmtree(os.path.join(out, f))


def save_checkpoint(out, state, keep):
    """Write OUT/checkpoint-STEP.pt whole, make it OUT/checkpoint.pt, then keep only the newest `keep`.

    Returns None, or why the save failed (disk full, permissions); the files already there are untouched.
    """
    path = os.path.join(out, f"checkpoint-{state['step']:07d}.pt")
    tmp, link = f"{path}.tmp{os.getpid()}", os.path.join(out, f"{LATEST}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            shutil.copyfile(path, link)
        os.replace(link, os.path.join(out, LATEST))
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames themselves survive a power cut
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        for f in (tmp, link):
            with contextlib.suppress(OSError):
                os.remove(f)
        return f"could not write {path} ({reason(e)})"
    for old in numbered_checkpoints(out)[keep:]:
        if not os.path.samefile(old, path):
            os.remove(old)
            shards = old[:-len(".pt")] + ".dcp"  # a sharded checkpoint's folder goes with the file naming it
            if os.path.isdir(shards):
                shutil.rmtree(shards)
    return None


LOCK = "train.lock"
_held = {}  # out -> the open lock file of this process's run there


def lock_out(out):
    """Rank 0 holds OUT/train.lock (its pid and host inside) for the run's life: a second run on the same
    --out is refused in one line instead of interleaving its checkpoints and metrics with the first's.

    The lock is the kernel's (flock), so a run that dies in any way, SIGKILL included, releases it: a
    stale file is taken over without asking. The file is removed on exit; a run that opened it just
    before checks that it locked the file still at that path, else tries again."""
    import fcntl
    import socket

    path = os.path.join(out, LOCK)
    for _ in range(10):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.read(fd, 200).decode("utf-8", "replace").strip() or "a process"
            os.close(fd)
            raise SystemExit(f"train.py: {out} is in use by another run ({holder}, holding {path}); wait for it to "
                             f"end, or pass another --out") from None
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            _held[out] = fd
            return
        os.close(fd)  # the holder removed it as we opened it: lock the new one
    raise SystemExit(f"train.py: could not lock {path}; is another run starting on {out}?")


def unlock_out(out):
    fd = _held.pop(out, None)
    if fd is not None:
        with contextlib.suppress(OSError):
            os.remove(os.path.join(out, LOCK))  # removed while still held: no one can lock the old file after
        os.close(fd)


def decide_start(args, module, world):
    """Rank 0: (path, checkpoint) to resume from, or (None, None) for a new run; SystemExit to refuse."""
    if args.resume and args.overwrite:
        raise SystemExit("train.py: --resume continues the run in --out and --overwrite deletes it: pass one")
    lock_out(args.out)
    path, ckpt = start_or_resume(args)
    if ckpt:
        defaults = {a.dest: a.default for a in build_parser(module)._actions}
        diffs = changed_flags(ckpt, args, defaults, world)
        if diffs and not args.allow_flag_changes:
            raise SystemExit(f"train.py: {path} was written by a different run; these flags differ:\n  "
                             + "\n  ".join(diffs) + "\nresume with the checkpoint's flags (--steps may grow), "
                             "pass --allow-flag-changes to continue anyway, or start a new --out")
    if args.overwrite:
        clear_run(args.out)
    for f in os.listdir(args.out):  # what a kill during a save left behind
        if re.fullmatch(r"checkpoint.*\.tmp\d+", f):
            os.remove(os.path.join(args.out, f))
        elif f.endswith((".dcp.tmp", ".dcp.old")):
            shutil.rmtree(os.path.join(args.out, f))
    if args.resume:
        print(f"resuming from {path} (step {ckpt['step']})" if path else
              f"no checkpoint in {args.out}: starting a new run", flush=True)
    return path, ckpt


def checkpoint_state(model, opt, step, args, world, device, data_position=None, scaler=None):
    """What a checkpoint holds. Under --fsdp every rank calls it: the whole weights are gathered to rank 0
    (others get None), or with --sharded-checkpoint every rank writes its shards to OUT/checkpoint-STEP.dcp."""
    weights = optimizer = sharded = None
    if args.sharded_checkpoint:
        sharded = write_shards(model, opt, args.out, step)
    elif args.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optimizer = get_model_state_dict(model, options=whole), get_optimizer_state_dict(model, opt, options=whole)
        if dist.get_rank() == 0:
            optimizer = optimizer_by_index(optimizer, model, opt)  # the same file as a DDP run's
    else:
        weights, optimizer = model.state_dict(), opt.state_dict()
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return {"model": weights, "optimizer": optimizer, "sharded": sharded, "step": step, "data": data_position,
            "samples_seen": step * args.batch_size * world, "extra": model.extra_state(), "args": vars(args),
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": {"torch": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}}


def param_names(model, opt):
    """The optimizer's parameters by name, in its order (the order of opt.state_dict()'s indices)."""
    name = {id(p): n for n, p in model.named_parameters()}
    return [name[id(p)] for g in opt.param_groups for p in g["params"]]


def optimizer_by_index(osd, model, opt):
    """An optimizer state keyed by parameter name (torch.distributed.checkpoint's) as opt.state_dict() keys it."""
    index = {n: i for i, n in enumerate(param_names(model, opt))}
    return {"state": {index[n]: v for n, v in osd["state"].items()},
            "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in osd["param_groups"]]}


def optimizer_by_name(osd, model, opt):
    names = param_names(model, opt)
    return {"state": {names[i]: v for i, v in osd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in osd["param_groups"]]}


def write_shards(model, opt, out, step):
    """Every rank writes its shards of weights and optimizer state; returns the folder's name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"checkpoint-{step:07d}.dcp"
    tmp = os.path.join(out, name + ".tmp")
    if dist.get_rank() == 0 and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    weights, optimizer = get_state_dict(model, opt)
    dcp.save({"model": weights, "optimizer": optimizer}, checkpoint_id=tmp)
    dist.barrier()
    if dist.get_rank() == 0:  # whole once renamed; the .pt that names it is written after
        final = os.path.join(out, name)
        old = final + ".old"  # a folder of that step from an earlier attempt goes only once the new one is in place
        if os.path.isdir(final):
            os.replace(final, old)
        os.replace(tmp, final)
        if os.path.isdir(old):
            shutil.rmtree(old)
    return name


def restore(model, opt, ckpt, args, scaler):
    """Weights (unless already loaded whole before sharding) and optimizer state into this run's layout."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_optimizer_state_dict,
                                                         set_state_dict)

    if ckpt.get("sharded"):
        import torch.distributed.checkpoint as dcp

        weights, optimizer = get_state_dict(model, opt)
        state = {"model": weights, "optimizer": optimizer}
        dcp.load(state, checkpoint_id=os.path.join(ckpt.get("folder", args.out), ckpt["sharded"]))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    elif args.fsdp:  # a whole checkpoint (FSDP's or DDP's): every rank keeps its shards of it
        set_optimizer_state_dict(model, opt, optimizer_by_name(ckpt["optimizer"], model, opt),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])


def agree_on_start(args, module, rank, world, control):
    """The checkpoint to resume from (or None): rank 0 reads the folder and decides, every rank follows."""
    path = ckpt = refusal = error = None
    if rank == 0:
        try:
            path, ckpt = decide_start(args, module, world)
        except SystemExit as e:
            refusal = str(e.code)
        except Exception as e:  # the other ranks must not wait for a decision that never comes
            refusal, error = f"train.py: rank 0 failed: {reason(e)}", e
    path, refusal = rank0_decides((path, refusal), control, world)
    if error is not None:
        raise error
    if refusal:
        raise SystemExit(refusal if rank == 0 else 1)
    if path and rank != 0:
        ckpt = read_checkpoint(path)
    return ckpt


def build_model(args, module, ckpt, captions, rank, world, device):
    """The model on its device (resumed, checkpointed, sharded as asked), its optimizer and precision."""
    extra = ckpt["extra"] if ckpt else None
    # rank 0 builds (e.g. trains the tokenizer), the others copy it; --init weights every rank reads itself
    if extra is None and world > 1 and not args.init:
        box = [module.create(args, captions()).extra_state() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        extra = box[0]
    torch.manual_seed(args.seed)  # the same initial weights however many times create() ran before
    model = module.create(args, captions(), extra=extra).to(device)
    if ckpt and ckpt["model"] is not None:  # whole weights load before sharding; shards after
        model.load_state_dict(ckpt["model"])
    if args.grad_checkpointing:
        checkpoint_blocks(model)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    scalars = shard(model, device, precision) if args.fsdp else []
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # fp16's range needs loss scaling
    # fused: one kernel for all parameters (on the CPU too: a third of the foreach version's time here)
    opt = torch.optim.AdamW(model.optimizer_groups(args.wd), lr=args.lr, betas=(args.beta1, args.beta2), eps=args.eps,
                            fused=not args.fsdp)
    if ckpt:
        restore(model, opt, ckpt, args, scaler)
        set_rng_state((ckpt["rng"]["torch"], ckpt["rng"].get("cuda")), device)
    return model, opt, scaler, scalars, autocast


def read_metrics(path, numbers_only=True):
    """(rows, numbers of the lines that are not whole rows) of a metrics.jsonl: a crash while a row was
    written leaves a torn last line, which resume cuts and report skips. numbers_only (report): each row
    keeps its finite numbers and skip counts, what a page can draw; resume keeps the rows as they were."""
    rows, torn = [], []
    with open(path, "rb") as f:
        lines = f.read().decode("utf-8", "replace").split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict) or not isinstance(row.get("step"), int) or not 0 <= row["step"] < 2 ** 53:
                raise ValueError("not a row")
        except (ValueError, RecursionError):
            torn.append(i)
            continue
        if not numbers_only:
            rows.append(row)
            continue
        rows.append({k: v for k, v in row.items() if len(k) <= 100 and (
            (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)) or
            (k in ("skips", "notes") and isinstance(v, dict) and all(isinstance(c, int) for c in v.values())))})
    return rows, torn


class Progress:
    """Loss, throughput and skipped samples since the last log line; rows go to metrics.jsonl (and the
    reporters) from rank 0."""

    def __init__(self, args, rank, world, device, control, step, resumed):
        self.args, self.rank, self.world, self.device, self.control = args, rank, world, device, control
        self.path = os.path.join(args.out, "metrics.jsonl")
        if rank == 0 and os.path.exists(self.path):
            if resumed:  # a resumed run drops the rows it will write again
                rows, torn = read_metrics(self.path, numbers_only=False)
                if torn:
                    print(f"train.py: {self.path}: cut {len(torn)} line(s) that are not whole rows (line "
                          f"{', '.join(map(str, torn[:5]))}; a crash mid-write leaves one)", flush=True)
                with open(self.path, "w") as f:
                    f.writelines(json.dumps(r) + "\n" for r in rows if r["step"] <= step)
            else:
                os.remove(self.path)
        self.reporters = Reporters(args.report_to.split(","), args.out, step, args) if rank == 0 and args.report_to else None
        self.skips, self.notes = {}, {}
        self.t_start = self.t_last = time.time()
        self.step_start = self.step_last = step
        self.reset()

    def reset(self):
        self.loss_sum, self.loss_n = torch.zeros((), device=self.device), 0

    def count(self, info):
        for why in info["skips"]:
            self.skips[why] = self.skips.get(why, 0) + 1
        for note in info["notes"]:
            self.notes[note] = self.notes.get(note, 0) + 1

    def add(self, loss):
        self.loss_sum += loss
        self.loss_n += 1

    def write(self, row):
        if self.rank == 0:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if self.reporters:
                self.reporters(row)

    def log(self, step, lr, ckpt_path):
        args, world = self.args, self.world
        mean_loss = self.loss_sum / self.loss_n
        if world > 1:
            dist.all_reduce(mean_loss)
            mean_loss /= world
        mean_loss = mean_loss.item()
        if not math.isfinite(mean_loss):
            raise SystemExit(f"train.py: the loss became {mean_loss} by step {step}; stopping. The last good "
                             f"checkpoint is kept at {ckpt_path}; lower --lr or raise --warmup and --resume")
        now = time.time()
        sps = args.batch_size * world * (step - self.step_last) / (now - self.t_last)
        n_skipped = sum(self.skips.values())
        if world > 1:
            t = torch.tensor([n_skipped])
            dist.all_reduce(t, group=self.control)
            n_skipped = int(t.item())
        row = {"step": step, "loss": mean_loss, "lr": lr, "samples_per_s": sps, "skipped_samples": n_skipped}
        if self.skips:
            row["skips"] = dict(self.skips)  # by reason: this rank's counts (rank 0's, in the file)
        if self.notes:
            row["notes"] = dict(self.notes)
        self.write(row)
        if self.rank == 0:
            eta = (args.steps - step) * (now - self.t_start) / max(1, step - self.step_start)
            print(f"step {step}/{args.steps} | loss {mean_loss:.4f} | lr {lr:.2e} | {sps:.0f} samples/s | "
                  f"eta {int(eta // 60)}m{int(eta % 60):02d}s" + (f" | skipped {self.skips}" if self.skips else "")
                  + (f" | {self.notes}" if self.notes else ""), flush=True)
        self.reset()
        self.t_last, self.step_last = now, step

    def check_finite(self, step, ckpt_path, model):
        """Before a save: the losses since the last log line and the weights the update made must all be
        finite, or nothing is saved. A step can diverge with a finite loss (the update itself overflows),
        so the weights are checked too: each tensor's sum (NaN or inf in, NaN or inf out), one isfinite
        over the stack, one flag with the loss's, one all-reduce (under FSDP each rank checks its own
        shards). Its cost is a read of the weights once a save: 36 ms for ViT-B-32 on the 2-core CPU machine
        (an isfinite().all() a tensor took 444-684 ms), against 1.3 s for the save's torch.save."""
        tensors = [t.to_local() if hasattr(t, "to_local") else t for t in (*model.parameters(), *model.buffers())]
        sums = [t.sum() for t in tensors if t.is_floating_point() and t.numel()]
        loss_ok = torch.isfinite(self.loss_sum) if self.loss_n else torch.ones((), dtype=torch.bool, device=self.device)
        weights_ok = torch.isfinite(torch.stack(sums)).all() if sums else torch.ones((), dtype=torch.bool, device=self.device)
        bad = torch.stack([~loss_ok, ~weights_ok.to(loss_ok.device)]).float()
        if self.world > 1:
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
        bad_loss, bad_weights = bad.tolist()
        if bad_loss or bad_weights:
            what = "the loss" if bad_loss else "the weights (the loss was still finite)"
            kept = (f"the last good checkpoint, {step_reached(ckpt_path)}, is kept at {ckpt_path}"
                    if os.path.exists(ckpt_path) else "no checkpoint was saved before it")
            raise SystemExit(f"train.py: {what} became non-finite by step {step}; stopping without saving it: "
                             f"{kept}. Lower --lr or raise --warmup, then --resume")

    def close(self):
        if self.reporters:
            self.reporters.close()


def save(model, opt, step, args, rank, world, device, control, data_position, scaler, ckpt_path):
    """A checkpoint from rank 0 (every rank under --fsdp takes part); a failed write stops every rank."""
    failed = None
    state = (checkpoint_state(model, opt, step, args, world, device, data_position, scaler)
             if rank == 0 or args.fsdp else None)  # FSDP: every rank takes part in gathering or writing
    if rank == 0:
        failed = save_checkpoint(args.out, state, args.keep)
    failed = rank0_decides(failed, control, world)
    if failed:  # every rank stops; the checkpoints already written are untouched
        before = (f"the last good checkpoint, {ckpt_path}, is intact" if os.path.exists(ckpt_path)
                  else "no earlier checkpoint exists")
        raise SystemExit(f"train.py: {failed}; stopping at step {step}: {before}. Free space or fix the "
                         f"folder's permissions, then run again with --resume" if rank == 0 else 1)


def main(argv=None):
    args, module = parse_args(argv)
    try:
        return run(args, module)
    finally:
        unlock_out(args.out)  # rank 0's hold on --out ends with the run, whatever ended it


def run(args, module):
    # Set-up: processes, the start-or-resume decision, data, model and optimizer.
    rank, world, device, control = setup(args)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, LATEST)
    train_data, val_data, zeroshot_data = datalib.build(args)
    if args.steps is None:  # --epochs: passes over the data, whose size is known now
        steps_from_epochs(args, datalib.num_samples(train_data, args), world)
    ckpt = agree_on_start(args, module, rank, world, control)
    torch.manual_seed(args.seed)
    model, opt, scaler, scalars, autocast = build_model(args, module, ckpt, train_data.caption_corpus, rank, world,
                                                        device)
    step = ckpt["step"] if ckpt else 0
    forward, sync = distribute(model, args, world, device)
    params = [p for p in model.parameters() if p.requires_grad]
    progress, stop, metrics = Progress(args, rank, world, device, control, step, ckpt is not None), StopRequest(), {}
    transform = model.transform(True, gpu_decode=args.gpu_decode)
    batches = datalib.train_batches(train_data, transform, args.batch_size, rank, world, args.seed,
                                    args.workers, ckpt.get("data") if ckpt else None, step)
    position = datalib.Position(batches, rank)
    data_iter = iter(datalib.loader(batches, start=step, stop=args.steps, workers=args.workers,
                                    pin_memory=device.type == "cuda"))
    if rank == 0:
        nparams = sum(p.numel() for p in model.parameters())
        held = sum((p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters())  # FSDP: shards
        print(f"{args.model} {args.size}: {nparams / 1e6:.2f}M parameters"
              + (f" ({held / 1e6:.2f}M held by each rank, FSDP)" if args.fsdp else "")
              + f", {world} rank(s) on {device}, global batch {args.batch_size * world}, steps {step}->{args.steps}",
              flush=True)

    model.train()
    while step < args.steps:
        # the next batch (and what the loader skipped to make it)
        batch, info = next(data_iter)
        batch.pop("label", None)
        if args.patch_dropout_until and step >= args.patch_dropout_until:  # FLIP's unmasked tuning
            batch.pop("patch_keep", None)
        if hasattr(transform, "finish"):  # the model's own hand-over (--gpu-decode: the JPEGs decoded there)
            batch = transform.finish(batch, device, info["notes"])
        else:
            batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        progress.count(info)
        position.update(info)
        # forward, backward over the global batch, optimizer step
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        loss = train_step(forward, sync, model, batch, args.accum, autocast, device, scaler)
        reduce_scalars(scalars, world)
        if scaler is not None:
            scaler.unscale_(opt)  # clip the true gradients; a step with inf/nan ones is skipped
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        if scaler is not None:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        model.after_step()  # the model's own bookkeeping: logit-scale clamp, momentum encoders, queues
        step += 1
        progress.add(loss)
        last = step == args.steps
        # log, evaluate, checkpoint
        if step % args.log_every == 0 or last:
            progress.log(step, lr, ckpt_path)
        if (val_data or zeroshot_data) is not None and ((args.eval_every and step % args.eval_every == 0) or last):
            metrics = evaluate(model, module, (val_data, zeroshot_data), args, rank, world, device, autocast)
            progress.write({"step": step, **metrics})
            if rank == 0:
                print("eval " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        stopping = stop.agreed(control, world)  # SIGTERM / Ctrl-C on any rank: save, then stop
        if (args.save_every and step % args.save_every == 0) or last or stopping:
            progress.check_finite(step, ckpt_path, model)
            save(model, opt, step, args, rank, world, device, control, position.state(world, control), scaler,
                 ckpt_path)
        if stopping:
            if rank == 0:
                print(f"stopped at step {step}; checkpoint saved to {ckpt_path}; continue with --resume", flush=True)
            break
    progress.close()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return metrics


# ----------------------------------------------------------------------------------------------
# `python train.py report OUT`: OUT/report.html, one self-contained page (no server, no network)


def svg_plot(xs, ys, title):
    """A line plot as inline SVG, drawn here (matplotlib draws it where it is installed)."""
    w, h, pad = 440, 230, 58
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    sx = lambda x: pad + (x - x0) / ((x1 - x0) or 1) * (w - 2 * pad)  # noqa: E731
    sy = lambda y: h - pad + 10 - (y - y0) / ((y1 - y0) or 1) * (h - 2 * pad)  # noqa: E731
    points = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))
    marks = "".join(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5"/>' for x, y in zip(xs, ys)) if len(xs) < 30 else ""
    label = lambda v: f"{v:.4g}"  # noqa: E731
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}" role="img">'
            f"<title>{html.escape(title)}</title>"
            f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13">{html.escape(title)}</text>'
            f'<line x1="{pad}" y1="{h - pad + 10}" x2="{w - pad}" y2="{h - pad + 10}" stroke="#999"/>'
            f'<line x1="{pad}" y1="{pad - 10}" x2="{pad}" y2="{h - pad + 10}" stroke="#999"/>'
            f'<text x="{pad - 4}" y="{h - pad + 10}" text-anchor="end" font-size="10">{label(y0)}</text>'
            f'<text x="{pad - 4}" y="{pad - 6}" text-anchor="end" font-size="10">{label(y1)}</text>'
            f'<text x="{pad}" y="{h - pad + 24}" font-size="10">{label(x0)}</text>'
            f'<text x="{w - pad}" y="{h - pad + 24}" text-anchor="end" font-size="10">step {label(x1)}</text>'
            f'<polyline fill="none" stroke="#1f77b4" stroke-width="1.6" points="{points}"/>'
            f'<g fill="#1f77b4">{marks}</g></svg>')


def plot(xs, ys, title):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return svg_plot(xs, ys, title)
    import io

    with matplotlib.rc_context({"svg.fonttype": "none"}):  # text stays text: searchable, selectable
        fig, ax = plt.subplots(figsize=(4.6, 2.4))
        ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step", fontsize=9)
        ax.tick_params(labelsize=8)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
        plt.close(fig)
    svg = buf.getvalue()
    return svg[svg.index("<svg"):]


def table(rows):
    return "<table>" + "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>"
                               for k, v in rows) + "</table>"


@torch.no_grad()
def zero_shot_grid(ckpt, path, n=16):
    """Held-out synthetic images with the model's top-3 zero-shot labels, the right one marked."""
    import base64
    import io

    if ckpt["model"] is None:
        raise ValueError(f"a sharded checkpoint: the weights are in {ckpt.get('sharded')}")
    args = argparse.Namespace(**ckpt["args"])
    module = import_model(args.model)
    model = module.load(path)[0].eval()  # the model file's checked reader: a crafted config builds nothing
    val = datalib.Synthetic(args.seed, "val", max(n, args.val_size), resolution=getattr(args, "synthetic_resolution", 64))
    transform, skips = model.transform(False), []
    batch = datalib.collate([datalib.load_sample(val, transform, i, 0, args.seed, skips) for i in range(n)])
    labels = batch.pop("label")
    image = model(batch)["image"].float()
    names = val.classnames["en"]
    top = (image @ module.zero_shot_classifier(model, names, val.templates["en"]).float().T).topk(3, dim=1)
    cells = []
    for i in range(n):
        buf = io.BytesIO()
        val.image(i).save(buf, format="PNG")
        guesses = "".join(f'<li class="{"right" if int(c) == int(labels[i]) else ""}">{html.escape(names[int(c)])}</li>'
                          for c in top.indices[i])
        cells.append(f'<figure><img alt="{html.escape(names[int(labels[i])])}" src="data:image/png;base64,'
                     f'{base64.b64encode(buf.getvalue()).decode()}"><figcaption>true: {html.escape(names[int(labels[i])])}'
                     f"<ol>{guesses}</ol></figcaption></figure>")
    right = sum(int(top.indices[i, 0]) == int(labels[i]) for i in range(n))
    return f"<p>top-1 right on {right} of {n} (right labels in green)</p><div class=grid>{''.join(cells)}</div>"


def report(out):
    """Write OUT/report.html from OUT/metrics.jsonl and the checkpoint; returns its path."""
    metrics = os.path.join(out, "metrics.jsonl")
    if not os.path.isfile(metrics):
        raise FileNotFoundError(f"{metrics}: no such file; pass the --out folder of a train.py run")
    rows, _ = read_metrics(metrics)  # a torn last line (a crash mid-write) is left out
    train_rows, eval_rows = [r for r in rows if "loss" in r], [r for r in rows if "loss" not in r]
    ckpt = None
    if os.path.isfile(os.path.join(out, LATEST)):
        try:
            ckpt = torch.load(os.path.join(out, LATEST), map_location="cpu", weights_only=True)
        except Exception as e:  # a damaged checkpoint: the report is drawn from the metrics alone
            print(f"train.py report: {os.path.join(out, LATEST)} does not load ({reason(e)}); left out", file=sys.stderr)
        if not isinstance(ckpt, dict) or not isinstance(ckpt.get("args", {}), dict):
            ckpt = None
    args = (ckpt or {}).get("args", {})
    parts = [f"<h1>{html.escape(str(args.get('model', 'run')))} {html.escape(str(args.get('size', '')))}: "
             f"{html.escape(os.path.abspath(out))}</h1>"]
    plots = [plot([r["step"] for r in train_rows if k in r], [r[k] for r in train_rows if k in r], k)
             for k in ("loss", "lr", "samples_per_s", "skipped_samples") if any(k in r for r in train_rows)]
    keys = sorted({k for r in eval_rows for k in r if k != "step"})[:64]  # a crafted file may name thousands
    if len(eval_rows) >= 3:  # fewer points make charts of a dot or two: a table says it better
        for key in keys:
            points = [(r["step"], r[key]) for r in eval_rows if isinstance(r.get(key), (int, float))]
            if points:
                plots.append(plot([p[0] for p in points], [p[1] for p in points], key))
    parts.append("<h2>Curves</h2><div class=plots>" + "".join(f"<div>{p}</div>" for p in plots) + "</div>")
    if 1 < len(eval_rows) < 3:
        parts.append("<h2>Evaluations</h2>" + table([("step", " / ".join(str(r["step"]) for r in eval_rows))] + [
            (k, " / ".join(f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for r in eval_rows))
            for k in keys]))
    if eval_rows:
        last = eval_rows[-1]
        parts.append(f"<h2>Final evaluation (step {last['step']})</h2>"
                     + table((k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in last.items() if k != "step"))
    if train_rows:
        last = train_rows[-1]
        reasons = last.get("skips", {})
        parts.append("<h2>Skipped samples</h2>" + table([("skipped_samples (all ranks, since the last start)", last.get("skipped_samples", 0))]
                                                       + [(f"{r} (rank 0)", c) for r, c in sorted(reasons.items())]))
    if ckpt is not None and args.get("data") == "synthetic":
        try:
            parts.append("<h2>Held-out images: top-3 zero-shot labels</h2>" + zero_shot_grid(ckpt, os.path.join(out, LATEST)))
        except Exception as e:  # a model whose checkpoint cannot embed images alone (altclip stage 1)
            parts.append(f"<p>no image grid: {html.escape(reason(e))}</p>")
    if args:
        parts.append(f"<h2>Flags (step {ckpt.get('step')})</h2>" + table(sorted(args.items())))
    style = ("body{font-family:sans-serif;margin:2em;max-width:1400px}.plots{display:flex;flex-wrap:wrap;gap:1em}"
             "table{border-collapse:collapse}th,td{border:1px solid #ccc;padding:2px 8px;text-align:left;font-size:13px}"
             ".grid{display:flex;flex-wrap:wrap;gap:10px}figure{margin:0;width:150px;font-size:12px}"
             "figure img{width:96px;height:96px;image-rendering:pixelated}ol{margin:2px;padding-left:18px}"
             ".right{color:#080;font-weight:bold}")
    page = (f"<!DOCTYPE html><html lang=en><head><meta charset=utf-8><title>{html.escape(out)} report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>")
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(page)
    return path


# Errors in what the user gave (a missing file, a bad flag value, data that cannot be read, an optional
# package not installed) are told in one line; anything else keeps its traceback. TRAIN_TRACEBACK=1
# shows the traceback of those too.
INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, ImportError,
                datalib.DataError)

if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["report"]:
            if len(sys.argv) != 3:
                raise SystemExit("usage: python train.py report OUT  (writes OUT/report.html)")
            print(f"wrote {report(sys.argv[2])}")
        else:
            main()
            if "WORLD_SIZE" in os.environ:
                # A torchrun rank whose work is saved and closed leaves without the interpreter's teardown:
                # torch's C++ distributed state can abort there (SIGABRT with no Python frame), and
                # torchrun then reports a finished run as failed (docs/robustness.md).
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(0)
    except INPUT_ERRORS as e:
        if os.environ.get("TRAIN_TRACEBACK"):
            raise
        # an error raised in a loader worker arrives with the worker's traceback in its message
        lines = [line for line in str(e).strip().splitlines() if line.strip()]
        message = re.sub(r"^[\w.]+: ", "", lines[-1].strip()) if "Traceback" in str(e) else " ".join(lines)
        sys.exit(f"train.py: error: {message or type(e).__name__}")
