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
import hashlib
import html
import re
import shutil
import signal
import stat
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as datalib
from clip import (_AllReduceSum, _acc_dtype, _distributed, _use_triton, all_gather_with_grad,  # noqa: F401
                  contrastive_loss, gather_texts, global_logsumexp, sigmoid_loss, triton)
if triton is not None:
    import triton.language as tl

    from clip import WORKSPACE, _mm_f32, _offset, _tile, _tiles

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
    p.add_argument("--allow-changed-inputs", default=None, metavar="FLAG,...",
                   help="--resume even where these flags' files (a teacher, --init, the data) changed since the "
                        "checkpoint was written, e.g. distill,data")
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
    p.add_argument("--ema", type=float, default=0.0, metavar="DECAY",
                   help="keep an exponential moving average of the trained weights (e.g. 0.999; 0: off): evaluated "
                        "beside them and saved as the checkpoint's weights (the raw ones too)")
    p.add_argument("--ema-warmup", action="store_true", help="with --ema: decay min(DECAY, (1 + t) / (10 + t)) at update t")
    p.add_argument("--layer-decay", type=float, default=1.0,
                   help="layer-wise learning-rate decay: a tower's block i of n from the bottom at lr x D^(n - i), "
                        "its embeddings at lr x D^(n + 1), its head and the temperature at lr (1: off)")
    p.add_argument("--context-length", type=int, default=0, metavar="N",
                   help="the text tower's positions: --init weights stretched to N Long-CLIP's way (the first 20 kept, "
                        "the rest interpolated; Long-CLIP: 248), a new model built with N (0: the weights' or preset's own)")
    p.add_argument("--long-captions", action="store_true",
                   help="Long-CLIP's objective: the caption against the image features, its first sentence against "
                        "their top-32 principal components over the global batch")
    p.add_argument("--lora", type=int, default=0, metavar="RANK",
                   help="LoRA: freeze the weights, train low-rank adapters of this rank (0: off); any model")
    p.add_argument("--lora-alpha", type=float, default=None, help="adapters scaled by alpha / rank (default: rank)")
    p.add_argument("--lora-dropout", type=float, default=0.0,
                   help="share of the adapters' input features dropped (one draw a batch)")
    p.add_argument("--lora-targets", default="q,v",
                   help="projections adapted, comma-separated among q,k,v,out,mlp (default q,v, as peft users do)")
    p.add_argument("--lora-towers", default=None,
                   help="towers adapted, comma-separated (default: every tower LiT leaves unlocked)")
    p.add_argument("--lora-train-scale", action="store_true", help="with --lora: the logit scale (and bias) train too")
    p.add_argument("--distill", action="append", default=None, metavar="TEACHER",
                   help="distil from a teacher (any weights --distill-model's load() reads; again for an ensemble), "
                        "or 'stored': the teachers' embeddings in the shards (python data.py reinforce)")
    p.add_argument("--distill-model", default="clip", choices=MODELS, help="the model file that reads the teachers")
    p.add_argument("--distill-weight", type=float, default=1.0,
                   help="loss = the model's + this x distillation (default 1, open_clip's sum)")
    p.add_argument("--distill-icl", type=float, default=1.0,
                   help="plus this x CLIP-KD's interactive contrastive term, for teachers of the student's width "
                        "(0: open_clip's --distill-model loss exactly)")
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
    check_numbers(p, args, module)
    if args.epochs is not None and args.steps is not None:
        p.error("--epochs: a number of passes, not with --steps")
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
    check_numbers(p, args, module)  # again: the recipe's values too
    names = (args.allow_changed_inputs or "").split(",")
    args.allow_changed_inputs = [n.lstrip("-").replace("-", "_") for n in names if n]
    unknown = [n for n in args.allow_changed_inputs if n not in vars(args)]
    if unknown:
        p.error(f"--allow-changed-inputs {unknown[0]}: not a flag of this run (name flags, e.g. distill,data)")
    if args.batch_size % args.accum:
        p.error(f"--batch-size {args.batch_size} must be a multiple of --accum {args.accum}")
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


# The ranges of train.py's numeric flags, as data.check_numbers takes them (data.py holds its own flags'):
# (lowest, highest); a flag in ABOVE must be above its lowest, one in BELOW below its highest.
RANGES = {"batch_size": (1, 1 << 20), "steps": (1, 1 << 40), "epochs": (0, 1e6), "accum": (1, 1 << 20),
          "log_every": (1, None), "keep": (1, None), "workers": (0, 256), "beta1": (0, 1), "beta2": (0, 1),
          "eps": (0, 1), "dist_timeout": (0, 1e6), "patch_dropout": (0, 1), "lora": (0, 4096),
          "lora_alpha": (0, 1 << 16), "lora_dropout": (0, 1), "ema": (0, 1), "layer_decay": (0, 1),
          "context_length": (0, 4096)}
ABOVE = {"epochs", "eps", "dist_timeout", "lora_alpha", "layer_decay"}
BELOW = {"beta1", "beta2", "patch_dropout", "lora_dropout", "ema"}


def check_numbers(p, args, module):
    datalib.check_numbers(p, args, {**datalib.RANGES, **RANGES, **getattr(module, "RANGES", {})}, ABOVE, BELOW)


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


def layer_scales(model, decay):
    """{trained parameter's name: learning-rate scale} for layer-wise decay (BEiT's, as open_clip and timm
    fine-tune ViTs): in each tower of n residual blocks (model.towers(), model.shard_units()), block i
    (0 at the bottom) trains at decay^(n - i), what the tower runs before its first block (embeddings) at
    decay^(n + 1), what it runs after its last (final norm, projection) and what lies outside every
    tower (the temperature) at 1. Where each parameter falls is read off one forward of two blank
    samples through the model's own transform, in the order the parameters are first used: a tower's
    own parameters fall around its blocks; one outside every tower (a text tower's token embedding
    kept by the root) used before a tower's first block is that tower's embedding, unless the tower's
    own module already embeds its input (then it is the head of a tower that ran before: altclip's
    text projection, used between its text and image towers)."""
    from PIL import Image
    from torch.overrides import TorchFunctionMode
    from torch.utils._pytree import tree_leaves

    trained = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    first = {}  # id -> the order of its first use

    class Uses(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.nn.Parameter) and id(t) in trained and id(t) not in first:
                    first[id(t)] = len(first)
            return func(*args, **(kwargs or {}))

    transform = model.transform(True, images=datalib.RandomCrop(model.cfg.image_size))
    rng = np.random.default_rng(0)
    batch = datalib.collate([transform({"image": Image.new("RGB", (model.cfg.image_size,) * 2), "text": "a photo"}, rng)
                             for _ in range(2)])
    batch = transform.finish(batch) if hasattr(transform, "finish") else batch
    device, mode = next(model.parameters()).device, model.training
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), Uses():
        model.eval()
        model({k: v.to(device) for k, v in batch.items() if isinstance(v, torch.Tensor)})
    model.train(mode)
    blocks = model.shard_units()[0]
    towers = [t if isinstance(t, list) else [t] for t in model.towers().values()]
    in_tower = [{id(p) for m in t for p in m.parameters()} for t in towers]
    tower_blocks = [[b for b in blocks if any(p in ids for p in map(id, b.parameters()))] for ids in in_tower]
    block_of = {id(p): (t, i) for t, bs in enumerate(tower_blocks) for i, b in enumerate(bs) for p in b.parameters()}
    start = [min((first[id(p)] for p in bs[0].parameters() if id(p) in first), default=None) if bs else None
             for bs in tower_blocks]
    # a tower whose own module holds what runs before its first block (a ViT's patch embedding)
    front = [s is not None and any(first.get(p, s) < s for p in ids) for s, ids in zip(start, in_tower)]
    scales = {}
    for pid, name in trained.items():
        used, n = first.get(pid), None
        if pid in block_of:
            t, i = block_of[pid]
            n = len(tower_blocks[t])
            scales[name] = decay ** (n - i)
            continue
        tower = next((t for t, ids in enumerate(in_tower) if pid in ids), None)
        if tower is None and used is not None:  # outside every tower: the tower whose blocks come next, if none ran yet
            after = [(s, t) for t, s in enumerate(start) if s is not None and s > used]
            tower = min(after)[1] if after else None
            if tower is not None and front[tower]:  # that tower embeds its own input: this is another's head
                tower = None
        before = tower is not None and used is not None and start[tower] is not None and used < start[tower]
        scales[name] = decay ** (len(tower_blocks[tower]) + 1) if before else 1.0
    return scales


def decayed_groups(groups, model, scales):
    """The optimizer groups split by learning-rate scale ('lr_scale' in each), weight decay as they were."""
    name = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        by_scale = {}
        for p in g["params"]:
            by_scale.setdefault(scales.get(name[id(p)], 1.0), []).append(p)
        out += [{**g, "params": ps, "lr_scale": scale} for scale, ps in sorted(by_scale.items(), reverse=True)]
    return out


class EMA:
    """The exponential moving average of every trained parameter, e <- d e + (1 - d) p after each optimizer
    step: d = --ema, or with --ema-warmup min(d, (1 + t) / (10 + t)) at update t (TensorFlow's
    ExponentialMovingAverage with num_updates), so the first averages are not held near the initial
    weights. Each average lives beside its parameter, in its dtype and layout (a DTensor shard under
    FSDP). swapped() puts the averages in the model for a while (evaluation, saving)."""

    def __init__(self, model, decay, warmup=False, updates=0):
        self.decay, self.warmup, self.updates = decay, warmup, updates
        self.params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        self.shadow = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self):
        d = min(self.decay, (1 + self.updates) / (10 + self.updates)) if self.warmup else self.decay
        for n, p in self.params.items():
            self.shadow[n].lerp_(p.detach(), 1 - d)
        self.updates += 1

    @torch.no_grad()
    def swap(self):
        # values exchanged in place, a tensor at a time: FSDP2 gathers from the parameters' own storage
        for n, p in self.params.items():
            held = p.detach().clone()
            p.copy_(self.shadow[n])
            self.shadow[n].copy_(held)

    @contextlib.contextmanager
    def swapped(self):
        self.swap()
        try:
            yield
        finally:
            self.swap()

    def load(self, weights):
        """The averages from whole tensors by name (a checkpoint's), into each one's layout."""
        with torch.no_grad():
            for n, e in self.shadow.items():
                if n not in weights:
                    raise ValueError(f"the checkpoint's EMA weights lack {n}")
                whole = weights[n].to(e.device, e.dtype)
                if hasattr(e, "device_mesh"):  # an FSDP shard: this rank's part of the whole
                    from torch.distributed.tensor import distribute_tensor

                    whole = distribute_tensor(whole, e.device_mesh, e.placements)
                e.copy_(whole)


# ----------------------------------------------------------------------------------------------
# Long captions (Long-CLIP, Zhang et al. 2024). CLIP's text tower reads 77 tokens and uses about 20 of
# them well; Long-CLIP keeps those 20 positions, stretches the rest (77 -> 248) and fine-tunes with the
# long caption against the image and the short one (its first sentence) against the image's coarse
# features: their projection on the batch's top-32 principal components.
KEEP_POSITIONS, PCA_COMPONENTS = 20, 32


def stretch_positions(table, n, keep=KEEP_POSITIONS):
    """A [L, W] position table with n rows: rows below keep as they are, the others a linear interpolation
    of rows keep..L-1 spread over keep..n-1 (for n = keep + 4 (L - keep), row keep + 4i is row keep + i),
    extrapolated along the last step past the old last row. n <= L: the first n rows."""
    L = table.shape[0]
    if n <= L:
        return table[:n].clone()
    x = keep + torch.arange(n - keep, dtype=torch.float64) * (L - keep) / (n - keep)  # where each new row reads
    j = x.floor().long()
    i = j.clamp(max=L - 2)
    old = table.double()
    mixed = old[i] + (x - i)[:, None] * (old[i + 1] - old[i])
    mixed = torch.where(((x == j) & (j < L))[:, None], old[j.clamp(max=L - 1)], mixed)  # on a row: that row, bit for bit
    return torch.cat([table[:keep], mixed.to(table.dtype)])


def with_context_length(module, args, model, captions, fresh):
    """The model at --context-length N: built again from its own extra_state with N positions; the tables
    whose rows are positions (the tensors that changed length) stretched from the weights it had, or, for
    a fresh model (no --init), left as the new one drew them."""
    n, extra = args.context_length, model.extra_state()
    cfg = extra.get("config") if isinstance(extra, dict) else None
    if n and not (isinstance(cfg, dict) and "context_length" in cfg):
        raise ValueError(f"--context-length: {args.model} has no text positions to set")
    if not n or cfg["context_length"] == n:
        return model
    longer = module.create(args, captions, extra={**extra, "config": {**cfg, "context_length": n}})
    if fresh:
        return longer
    old, new = model.state_dict(), longer.state_dict()
    changed = [k for k in new if new[k].shape != old[k].shape]
    if not changed or any(old[k].dim() != 2 or new[k].shape[1:] != old[k].shape[1:] for k in changed):
        raise ValueError(f"--context-length: {args.model}'s weights have no position table to stretch")
    short = next((old[k].shape[0] for k in changed if n > old[k].shape[0] < KEEP_POSITIONS + 2), None)
    if short is not None:
        raise ValueError(f"--context-length {n}: the weights hold {short} positions; Long-CLIP's stretch keeps the "
                         f"first {KEEP_POSITIONS} and spreads at least 2 more")
    longer.load_state_dict({k: stretch_positions(v, n) if k in changed else v for k, v in old.items()})
    return longer


def long_caption_forward(forward):
    """The model's forward over the long and the short captions at once (one pass, under DDP and FSDP):
    out['text'] the long captions' features, out['short'] the short ones'."""
    def run(batch):
        batch = dict(batch)
        long, short = batch["text"], batch.pop("short_text")
        if long.dim() != 2:
            raise ValueError("--long-captions trains one caption per image: leave out --multi-text (LaCLIP-MT)")
        out = forward({**batch, "text": torch.cat([long, short])}) if short.shape[1:] == long.shape[1:] else {}
        if "image" not in out or set(out) - {"image", "text", "scale", "bias"}:  # a text-only stage; momentum keys
            raise ValueError(f"--long-captions pairs image and text features alone, from token ids; this model's "
                             f"forward gives {', '.join(sorted(out)) or 'texts of another form'}: leave it out")
        return {**out, "text": out["text"][: len(long)], "short": out["text"][len(long):]}
    return run


@torch.no_grad()
def principal_basis(x, k):
    """(mean, [D, k] orthonormal basis) of the top-k principal components of x's rows over the global batch
    (every rank's x gathered in rank order: the same on each rank, as one process holding the whole batch
    would find). float64 eigh of the covariance: its eigenvalues come sorted, no complex parts."""
    x = x.float()
    if dist.is_initialized() and dist.get_world_size() > 1:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        x = torch.cat(parts)
    x = x.double()
    mean = x.mean(0)
    _, vectors = torch.linalg.eigh((x - mean).T @ (x - mean))
    return mean, vectors[:, -min(k, x.shape[1]):]


def long_caption_loss(loss, out, components=PCA_COMPONENTS):
    """Long-CLIP's objective with the model's own loss: the long captions against the image features, the
    short ones against the image features' projection on the global batch's top-k principal components
    (mean + (x - mean) P P^T, renormalised). The basis is a constant of the step: eigenvector gradients are
    undefined where eigenvalues repeat, as they do whenever the batch is narrower than the features
    (Long-CLIP's eig gave infinities; its forks moved to an SVD)."""
    image = out["image"]
    mean, basis = principal_basis(image.detach(), components)
    mean, basis = mean.to(image.dtype), basis.to(image.dtype)
    coarse = F.normalize(mean + (image - mean) @ basis @ basis.T, dim=-1)
    return loss({k: v for k, v in out.items() if k != "short"}) + loss({**out, "image": coarse, "text": out["short"]})


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


def train_step(forward, sync, loss_fn, batch, accum, autocast, device, scaler=None):
    """Forward + backward of one global batch, loss_fn(out) its loss; returns the loss (a tensor, not synced)."""
    scale = scaler.scale if scaler is not None else (lambda x: x)  # fp16: gradients scaled up, unscaled at the step
    if accum == 1:
        with autocast:
            loss = loss_fn(forward(batch))
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
    loss = loss_fn(feats)
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
# LoRA (Hu et al. 2021): low-rank adapters on a frozen model, for every model file (train.py --lora R).
# Each adapter is a parametrization of one weight (torch.nn.utils.parametrize), so the models' forward
# carries no adapter code; a checkpoint holds the merged weights (the model file's load() reads a plain
# model) and, under "lora", the base weights and adapters a resumed run continues from.


class LoRA(torch.nn.Module):
    """W -> W + (alpha / rank) B A on rows [start, stop) of W: one of the q, k, v thirds of a fused
    in-projection, or the whole weight. A [rank, in] starts as peft's (Kaiming-uniform), B at zero: step
    0 is the base model. Dropout: peft drops the adapter's inputs sample by sample; a parametrization
    sees the weight, not the inputs, so here a batch shares one draw of the input features dropped."""

    def __init__(self, rows, d_in, start, stop, rank, alpha, dropout=0.0):
        super().__init__()
        self.A = torch.nn.Parameter(torch.empty(rank, d_in))
        self.B = torch.nn.Parameter(torch.zeros(stop - start, rank))
        torch.nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.pad, self.scaling, self.dropout = (0, 0, start, rows - stop), alpha / rank, dropout

    def forward(self, weight):
        a = self.A
        if self.training and self.dropout:
            a = a * torch.nn.functional.dropout(torch.ones_like(a[:1]), self.dropout)
        return weight + torch.nn.functional.pad(self.B @ a * self.scaling, self.pad).to(weight.dtype)


LORA_TARGETS = ("q", "k", "v", "out", "mlp")  # attention's projections; mlp: both of the MLP's layers
# The weights a target names, by the parameter names of the layouts the model files hold (OpenAI's
# attention, torch's nn.MultiheadAttention and TransformerEncoderLayer, Hugging Face's BERT); a fused
# in-projection stacks q, k and v in that order.
LORA_WEIGHTS = ((r"in_proj_weight", "qkv"), (r"out_proj\.weight", "out"), (r"attention\.output\.dense\.weight", "out"),
                (r"attention\.self\.query\.weight", "q"), (r"attention\.self\.key\.weight", "k"),
                (r"attention\.self\.value\.weight", "v"), (r"(mlp\.c_fc|mlp\.c_proj|linear1|linear2|intermediate\.dense"
                                                          r"|(?<!attention\.)output\.dense)\.weight", "mlp"))


def lora_spec(rank, alpha=None, targets=("q", "v"), dropout=0.0, towers=None, train_scale=False):
    """The adapters' settings, checked: they come from flags, or from a checkpoint that may come from anywhere."""
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    names = lambda v: isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)  # noqa: E731
    if not (isinstance(rank, int) and not isinstance(rank, bool) and 1 <= rank <= 4096):
        raise ValueError(f"LoRA rank {rank!r}: an integer from 1 to 4096")
    alpha = rank if alpha is None else alpha
    if not (number(alpha) and 0 < alpha <= 1 << 16 and number(dropout) and 0 <= dropout < 1):
        raise ValueError(f"LoRA alpha {alpha!r} must be above 0 and at most 65536, dropout {dropout!r} from 0 to below 1")
    if not (names(targets) and targets and set(targets) <= set(LORA_TARGETS) and len(set(targets)) == len(targets)):
        raise ValueError(f"LoRA targets {targets!r}: a list among {','.join(LORA_TARGETS)}")
    if not (towers is None or names(towers)) or not isinstance(train_scale, bool):
        raise ValueError(f"LoRA towers {towers!r} must be a list of names and train_scale {train_scale!r} a bool")
    return {"rank": rank, "alpha": float(alpha), "targets": [t for t in LORA_TARGETS if t in targets],
            "dropout": float(dropout), "towers": None if towers is None else list(towers), "train_scale": train_scale}


def saved_lora_spec(value, where):
    if not isinstance(value, dict):
        raise ValueError(f"{where}: its LoRA settings are not a table")
    return lora_spec(**value)


def add_lora(model, spec):
    """Freeze every weight, then adapters on the targeted weights of the chosen towers (model.towers(): by
    default those LiT leaves unlocked); an adapter trains where its weight did (not on BriVL's momentum
    copies, which follow theirs by the momentum update), and with train_scale the logit scale and bias
    train too. Returns the spec (towers filled in) and the layout {parameter: [(start, stop) of each
    adapter]} that merged_weights uses."""
    import torch.nn.utils.parametrize as parametrize

    towers = {k: v if isinstance(v, (list, tuple)) else [v] for k, v in model.towers().items()}
    unlocked = [t for t, mods in towers.items() if any(p.requires_grad for m in mods for p in m.parameters())]
    chosen = spec["towers"] or unlocked
    if not chosen or set(chosen) - set(towers):
        raise ValueError(f"LoRA towers {','.join(map(str, chosen))}: choose among {','.join(towers)}")
    if set(chosen) - set(unlocked):
        raise ValueError(f"the {','.join(sorted(set(chosen) - set(unlocked)))} tower is locked (LiT): leave it out "
                         f"of the LoRA towers")
    spec = {**spec, "towers": [t for t in towers if t in chosen]}
    names = {id(m): n for n, m in model.named_modules()}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}  # a momentum copy's adapters follow it: frozen
    model.requires_grad_(False)
    layout = {}
    for tower in spec["towers"]:
        for top in towers[tower]:
            for module in list(top.modules()):
                for pname, p in list(module.named_parameters(recurse=False)):
                    full = f"{names[id(module)]}.{pname}".lstrip(".")
                    kind = next((k for pattern, k in LORA_WEIGHTS if re.search(rf"(^|\.){pattern}$", full)), None)
                    parts = [t for t in kind or "" if t in spec["targets"]] if kind == "qkv" else \
                        [None] if kind in spec["targets"] else []
                    rows = p.shape[0] // (3 if kind == "qkv" else 1)
                    for part in parts:
                        start = "qkv".index(part) * rows if part else 0
                        adapter = LoRA(p.shape[0], p.shape[1], start, start + rows, spec["rank"], spec["alpha"],
                                       spec["dropout"]).to(p.device).requires_grad_(id(p) in trainable)
                        parametrize.register_parametrization(module, pname, adapter)
                        layout.setdefault(full, []).append((start, start + rows))
    if not layout:
        raise ValueError(f"no weight of the {','.join(spec['towers'])} tower(s) is a LoRA target {','.join(spec['targets'])}")
    for name, p in model.named_parameters():
        if spec["train_scale"] and name in ("logit_scale", "logit_bias"):
            p.requires_grad_(True)
    return spec, layout


def merged_weights(sd, spec, layout):
    """A LoRA model's state dict (names with .parametrizations.) split into the plain model's, its weights
    W + (alpha / rank) B A merged, and the base weights and adapters apart: (merged, lora state)."""
    merged, lora = {}, {}
    for key, value in sd.items():
        (lora if ".parametrizations." in key else merged)[key] = value
    scaling = spec["alpha"] / spec["rank"]
    for name, spans in layout.items():
        module, _, pname = name.rpartition(".")
        stem = f"{module}.parametrizations.{pname}".lstrip(".")
        w = lora[f"{stem}.original"].float().clone()
        for i, (start, stop) in enumerate(spans):
            w[start:stop] += (lora[f"{stem}.{i}.B"].float() @ lora[f"{stem}.{i}.A"].float()) * scaling
        merged[name] = w.to(lora[f"{stem}.original"].dtype)
    return merged, lora


def lora_layout_of(value, where):
    """A checkpoint's LoRA layout, checked: {parameter name: [[start, stop], ...]}."""
    if not (isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, list) and all(
            isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(i, int) and i >= 0 for i in s) for s in v)
            for k, v in value.items())):
        raise ValueError(f"{where}: its LoRA layout is not a table of parameter names to row spans")
    return {k: [tuple(s) for s in v] for k, v in value.items()}


# ----------------------------------------------------------------------------------------------
# Distillation (train.py --distill TEACHER), for every model whose forward gives normalised 'image' and
# 'text' features and a 'scale': open_clip's DistillClipLoss term over the global batch, MobileCLIP's
# ensembles (averaged after the softmax) and stored teachers (python data.py reinforce), CLIP-KD's
# interactive contrastive term. The loss: the model's own + weight x distillation + icl x interactive.
# The fused terms build on clip.py's loss parts (the gather with gradient, the log-sum-exp across
# ranks, the Triton tile): the same maths as the contrastive loss, written out in the docstrings below.


class Distiller:
    """The teachers of a run: frozen, in eval mode, on the run's device, outside the student's module tree
    (not trained, saved or sharded); each sees the student's crop at its own input size and the caption
    the student drew (data.WithTeachers). stored: no teacher runs, the data brings the embeddings of this
    many teachers (data.read_manifests says how many, before any sample is read)."""

    def __init__(self, teachers=(), weight=1.0, icl=1.0, stored=0):
        self.teachers, self.weight, self.icl, self.stored = list(teachers), float(weight), float(icl), stored
        for t in self.teachers:
            t.requires_grad_(False).eval()

    @classmethod
    def from_args(cls, args, device, train_data):
        paths = args.distill or []
        if not paths:
            return None
        if not all(math.isfinite(v) and v >= 0 for v in (args.distill_weight, args.distill_icl)):
            raise ValueError(f"--distill-weight {args.distill_weight}, --distill-icl {args.distill_icl}: finite weights "
                             f"of at least 0")
        if "stored" in paths and len(paths) > 1:
            raise ValueError("--distill stored reads every teacher's embeddings from the shards: give it alone")
        if len(paths) > datalib.MAX_TEACHERS:
            raise ValueError(f"--distill: at most {datalib.MAX_TEACHERS} teachers")
        if paths != ["stored"]:
            return cls([import_model(args.distill_model).load(p, device)[0] for p in paths], args.distill_weight,
                       args.distill_icl)
        if not isinstance(train_data, datalib.Shards):
            raise ValueError(f"--distill stored trains on reinforced shards (python data.py reinforce --teacher T --data "
                             f"D --out O), not on {args.data}")
        train_data.teachers = datalib.read_manifests(train_data.paths)  # every sample checked against them
        return cls([], args.distill_weight, args.distill_icl, len(train_data.teachers))

    def wrap(self, transform):
        return datalib.WithTeachers(transform, [t.cfg.image_size for t in self.teachers], bool(self.stored))

    @torch.no_grad()
    def features(self, batch):
        """[(image, text, scale, bias)] per teacher for a batch on the device: made by the teachers (their
        inputs popped from the batch) or read from it (stored: one scale and bias a teacher, in every sample)."""
        if self.stored:
            return [(batch.pop(f"teacher{i}_image"), batch.pop(f"teacher{i}_text"), batch.pop(f"teacher{i}_scale")[0],
                     batch.pop(f"teacher{i}_bias")[0]) for i in range(self.stored)]
        texts = batch.pop("teacher_text")
        return [(t.encode_image(batch.pop(f"teacher{i}_pixels"), normalize=True), t.encode_texts(texts),
                 t.logit_scale.exp(), getattr(t, "logit_bias", None)) for i, t in enumerate(self.teachers)]

    def loss(self, out, teachers):
        if "image" not in out:  # a stage of a model that trains on text alone (altclip's first)
            raise ValueError("--distill distils image and text features: this model trains without images here "
                             "(a text-only stage); leave --distill out")
        if out["text"].dim() != 2:
            raise ValueError("--distill distils one text per image: leave out --multi-text (LaCLIP-MT)")
        u, w, t, b = (list(x) for x in zip(*teachers))
        if "bias" in out:
            d = distill_sigmoid_loss(out["image"], out["text"], out["scale"], out["bias"], u, w, t, b)
        else:
            d = distill_loss(out["image"], out["text"], out["scale"], u, w, t)
        loss = self.weight * d
        # CLIP-KD's interactive contrastive term (Yang et al. 2024): each student tower against the other
        # tower's teacher features, with the student's own pairing; teachers of another width have none.
        same = [(ut, wt) for ut, wt in zip(u, w) if ut.shape[1] == out["image"].shape[1]]
        if self.icl and len(same) < len(u) and not getattr(self, "told", False):
            self.told = print(f"--distill: {len(u) - len(same)} teacher(s) embed in another width than the student: "
                              f"their distillation term only, no interactive term", flush=True) or True
        if self.icl and same:
            pair = ((lambda a, c: sigmoid_loss(a, c, out["scale"], out["bias"])) if "bias" in out
                    else (lambda a, c: contrastive_loss(a, c, out["scale"])))
            loss = loss + self.icl * sum(pair(out["image"], wt) + pair(ut, out["text"]) for ut, wt in same) / (2 * len(same))
        return loss


BLOCK = 1024  # tile edge of the PyTorch path (clip.py's): a 1024 x 1024 fp32 tile is 4 MB
_NS = __name__.replace(".", "_")  # the ops' namespace: train, or __main__ when run as a script


def distill_loss(image_features, text_features, logit_scale, teacher_image_features, teacher_text_features,
                 teacher_logit_scale, group=None):
    """Distillation from a teacher CLIP over the global batch: open_clip's DistillClipLoss term (its
    contrastive term is contrastive_loss), the soft cross-entropy of the student's softmax against the
    teacher's over the rows (image -> text) and over the columns (text -> image), averaged.

    On one process it equals the naive form, which holds four B x B matrices:
        s = logit_scale * image_features @ text_features.T
        t = teacher_logit_scale * teacher_image_features @ teacher_text_features.T
        soft = lambda t, s: -(t.softmax(1) * s.log_softmax(1)).sum(1).mean()
        (soft(t, s) + soft(t.T, s.T)) / 2
    An ensemble (MobileCLIP's two teachers) passes lists of teacher features and scales: the targets are
    averaged after the softmax, p = mean over the teachers of t_m.softmax(1).

    The targets of a row sum to 1, so its term is logsumexp(s_i) - sum_j p_ij s_ij: distill_tiles makes
    the student's log-sum-exps and the target-weighted sums of s in one pass over tiles of s and t, rows
    and columns from each tile, keeping nothing B x B. A teacher may be of another width than the
    student. Column statistics are combined across ranks, as in contrastive_loss; every rank passes
    the same number of rows. Gradients reach the teacher's features too when they ask for them.
    """
    teachers = _teacher_list(teacher_image_features, teacher_text_features, teacher_logit_scale, None)
    logit_scale = torch.as_tensor(logit_scale, device=image_features.device)  # a float as well as a tensor
    text_features, pos = gather_texts(image_features, text_features, group)
    row_target = col_target = 0
    for u, w, t, _ in teachers:
        w = all_gather_with_grad(w, group)
        row_s, col_s, _, col_t, row_c, col_c = distill_tiles(image_features, text_features, logit_scale, u, w, t)
        if _distributed(group):  # each rank holds its rows' share of a column's softmax: rescale, then sum
            total = global_logsumexp(col_t, group)
            col_c = _AllReduceSum.apply(torch.exp(col_t - total) * col_c, group)
        row_target = row_target + row_c / len(teachers)
        col_target = col_target + col_c / len(teachers)
    rows = row_s - row_target
    cols = (global_logsumexp(col_s, group) - col_target).index_select(0, pos)
    return (rows.mean() + cols.mean()) / 2


def distill_sigmoid_loss(image_features, text_features, logit_scale, logit_bias, teacher_image_features,
                         teacher_text_features, teacher_logit_scale, teacher_logit_bias=None, group=None):
    """Distillation for a SigLIP student: the sigmoid loss with the teacher's soft labels in place of +-1
    (2 x mean sigmoid(teacher logits) - 1), normalised as sigmoid_loss is. Naive form:
        s = logit_scale * image_features @ text_features.T + logit_bias
        p = mean over teachers of torch.sigmoid(t_m)      # t_m: the teacher's logits, its bias added
        -F.logsigmoid((2 * p - 1) * s).sum() / len(s)
    A softmax teacher has no bias (0). Each pair stands alone, so the sum is made tile by tile
    (sigmoid_distill_rows), every rank its own images against every rank's texts; no gradient reaches
    the teachers.
    """
    teachers = _teacher_list(teacher_image_features, teacher_text_features, teacher_logit_scale, teacher_logit_bias)
    logit_scale, logit_bias = (torch.as_tensor(v, device=image_features.device) for v in (logit_scale, logit_bias))
    text_features, _ = gather_texts(image_features, text_features, group)
    us = [u.detach() for u, _, _, _ in teachers]
    ws = [all_gather_with_grad(w.detach(), group) for _, w, _, _ in teachers]
    ts = torch.stack([torch.as_tensor(t).detach().float().reshape(()) for _, _, t, _ in teachers])
    bs = torch.stack([torch.as_tensor(0.0 if b is None else b).detach().float().reshape(()) for *_, b in teachers])
    return sigmoid_distill_rows(image_features, text_features, logit_scale, logit_bias, us, ws, ts, bs).mean()


def _teacher_list(image, text, scale, bias):
    """[(image, text, scale, bias)] per teacher, from tensors (one teacher) or lists (an ensemble)."""
    if isinstance(image, torch.Tensor):
        image, text, scale, bias = [image], [text], [scale], [bias]
    bias = [None] * len(image) if bias is None else bias
    if not len(image) == len(text) == len(scale) == len(bias) > 0:
        raise ValueError("one image feature set, text feature set and logit scale per teacher")
    for u, w in zip(image, text):
        if u.shape[1] != w.shape[1]:
            raise ValueError(f"a teacher's image features are {u.shape[1]} wide and its text features {w.shape[1]}")
    return [(u, w, torch.as_tensor(t, device=u.device), b) for u, w, t, b in zip(image, text, scale, bias)]



def _distill_torch(x, y, scale, u, w, tscale):
    """distill_tiles' forward: the student's row and column log-sum-exps, the teacher's, and the teacher's
    softmax-weighted sums of the student's logits, rows and columns, from one pass over the tiles."""
    n, k = x.shape[0], y.shape[0]
    acc = torch.promote_types(_acc_dtype(x), _acc_dtype(u))
    s, ts = scale.to(acc), tscale.to(acc)
    row_s, row_t = (torch.full((n,), -math.inf, device=x.device, dtype=acc) for _ in range(2))
    col_s, col_t = (torch.full((k,), -math.inf, device=x.device, dtype=acc) for _ in range(2))
    row_c, col_c = torch.zeros(n, device=x.device, dtype=acc), torch.zeros(k, device=x.device, dtype=acc)
    for i in range(0, n, BLOCK):
        r = slice(i, i + BLOCK)
        for j in range(0, k, BLOCK):
            c = slice(j, j + BLOCK)
            S = (x[r] @ y[c].T).to(acc) * s
            T = (u[r] @ w[c].T).to(acc) * ts
            row_s[r] = torch.logaddexp(row_s[r], S.logsumexp(1))
            col_s[c] = torch.logaddexp(col_s[c], S.logsumexp(0))
            for dim, lse, cross, sl in ((1, row_t, row_c, r), (0, col_t, col_c, c)):
                # The teacher's weights exp(t - lse) as the running lse grows: the sums so far rescaled.
                top = T.amax(dim, keepdim=True)
                e = torch.exp(T - top)
                new = torch.logaddexp(lse[sl], e.sum(dim).log() + top.squeeze(dim))
                cross[sl] = cross[sl] * torch.exp(lse[sl] - new) + (e * S).sum(dim) * torch.exp(top.squeeze(dim) - new)
                lse[sl] = new
    return row_s, col_s, row_t, col_t, row_c, col_c


def _distill_backward_torch(x, y, scale, u, w, tscale, stats, grads, teacher):
    """Gradients of distill_tiles' six outputs, the tiles made again. With s, t one tile of the student's
    and the teacher's logits, P = exp(t - row_t), Q = exp(t - col_t) the teacher's softmax both ways:
        G = g_rs exp(s - row_s) + g_cs exp(s - col_s) + g_rc P + g_cc Q          (d / ds)
        H = g_rt P + g_ct Q + g_rc P (s - row_c) + g_cc Q (s - col_c)             (d / dt, teacher only)"""
    row_s, col_s, row_t, col_t, row_c, col_c = stats
    g_rs, g_cs, g_rt, g_ct, g_rc, g_cc = grads
    n, k = x.shape[0], y.shape[0]
    acc = row_s.dtype
    s, ts = scale.to(acc), tscale.to(acc)
    dx, dy = torch.zeros(x.shape, dtype=acc, device=x.device), torch.zeros(y.shape, dtype=acc, device=x.device)
    du, dw = torch.zeros(u.shape, dtype=acc, device=x.device), torch.zeros(w.shape, dtype=acc, device=x.device)
    ds, dts = torch.zeros((), dtype=acc, device=x.device), torch.zeros((), dtype=acc, device=x.device)
    for i in range(0, n, BLOCK):
        r = slice(i, i + BLOCK)
        for j in range(0, k, BLOCK):
            c = slice(j, j + BLOCK)
            raw, raw_t = (x[r] @ y[c].T).to(acc), (u[r] @ w[c].T).to(acc)
            S, T = raw * s, raw_t * ts
            P = torch.exp(T - row_t[r, None])
            Q = torch.exp(T - col_t[None, c])
            gP, gQ = P * g_rc[r, None], Q * g_cc[None, c]
            G = torch.exp(S - row_s[r, None]) * g_rs[r, None] + torch.exp(S - col_s[None, c]) * g_cs[None, c] + gP + gQ
            ds += (G * raw).sum()
            G = G.to(x.dtype)
            dx[r] += (G @ y[c]).to(acc) * s
            dy[c] += (G.T @ x[r]).to(acc) * s
            if teacher:
                H = P * g_rt[r, None] + Q * g_ct[None, c] + gP * (S - row_c[r, None]) + gQ * (S - col_c[None, c])
                dts += (H * raw_t).sum()
                H = H.to(u.dtype)
                du[r] += (H @ w[c]).to(acc) * ts
                dw[c] += (H.T @ u[r]).to(acc) * ts
    return (dx.to(x.dtype), dy.to(y.dtype), ds.to(scale.dtype), du.to(u.dtype), dw.to(w.dtype), dts.to(tscale.dtype))


def _sig_distill_torch(x, y, scale, bias, us, ws, ts, bs, g):
    """Row sums of softplus(-z s) with z = 2 mean_m sigmoid(t_m) - 1 (g None); with row weights g, the
    gradients d/ds = -g z sigmoid(-z s) in x, y, scale and bias."""
    n, k = x.shape[0], y.shape[0]
    acc = _acc_dtype(x)
    s, b = scale.to(acc), bias.to(acc)
    rows = torch.zeros(n, device=x.device, dtype=acc)
    dx, dy = torch.zeros(x.shape, dtype=acc, device=x.device), torch.zeros(y.shape, dtype=acc, device=x.device)
    dsb = torch.zeros(2, dtype=acc, device=x.device)
    for i in range(0, n, BLOCK):
        r = slice(i, i + BLOCK)
        for j in range(0, k, BLOCK):
            c = slice(j, j + BLOCK)
            raw = (x[r] @ y[c].T).to(acc)
            z = sum(torch.sigmoid((u[r] @ w[c].T).to(acc) * t.to(acc) + tb.to(acc))
                    for u, w, t, tb in zip(us, ws, ts, bs)) * (2 / len(us)) - 1
            zs = z * (raw * s + b)
            if g is None:
                rows[r] += F.softplus(-zs).sum(1)
                continue
            p = -z * torch.sigmoid(-zs) * g[r, None].to(acc)
            dsb[0] += (p * raw).sum()
            dsb[1] += p.sum()
            p = p.to(x.dtype)
            dx[r] += (p @ y[c]).to(acc) * s
            dy[c] += (p.T @ x[r]).to(acc) * s
    return rows, dx.to(x.dtype), dy.to(y.dtype), dsb



@torch.library.custom_op(f"{_NS}::distill_tiles", mutates_args=())
def distill_tiles(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                  tscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                                 torch.Tensor, torch.Tensor]:
    """(row_s, col_s, row_t, col_t, row_c, col_c) of s = scale * x @ y.T and t = tscale * u @ w.T: the
    log-sum-exps of s and of t along rows and columns, and sum_j exp(t_ij - row_t_i) s_ij (row_c), the
    same down the columns (col_c); neither s nor t is ever whole."""
    if _use_triton(x) and _use_triton(u):
        return _distill_triton(x.contiguous(), y.contiguous(), scale, u.contiguous(), w.contiguous(), tscale)
    return _distill_torch(x, y, scale, u, w, tscale)


@distill_tiles.register_fake
def _distill_tiles_fake(x, y, scale, u, w, tscale):
    acc = torch.promote_types(_acc_dtype(x), _acc_dtype(u))
    n, k = x.shape[0], y.shape[0]
    return tuple(x.new_empty(m, dtype=acc) for m in (n, k, n, k, n, k))


@torch.library.custom_op(f"{_NS}::distill_tiles_backward", mutates_args=())
def distill_tiles_backward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, u: torch.Tensor, w: torch.Tensor,
                           tscale: torch.Tensor, stats: list[torch.Tensor], grads: list[torch.Tensor], teacher: bool
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x) and _use_triton(u) and not teacher:
        return _distill_backward_triton(x.contiguous(), y.contiguous(), scale, u.contiguous(), w.contiguous(), tscale,
                                        stats, grads)
    return _distill_backward_torch(x, y, scale, u, w, tscale, stats, grads, teacher)


@distill_tiles_backward.register_fake
def _distill_tiles_backward_fake(x, y, scale, u, w, tscale, stats, grads, teacher):
    return tuple(torch.empty_like(v) for v in (x, y, scale, u, w, tscale))


def _distill_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs, *output)


def _distill_backward(ctx, *grads):
    x, y, scale, u, w, tscale, *stats = ctx.saved_tensors
    grads = [torch.zeros_like(v) if g is None else g for g, v in zip(grads, stats)]
    need = ctx.needs_input_grad
    out = distill_tiles_backward(x, y, scale, u, w, tscale, stats, grads, any(need[3:]))
    return tuple(d.reshape(v.shape) if n else None for d, v, n in zip(out, (x, y, scale, u, w, tscale), need))


distill_tiles.register_autograd(_distill_backward, setup_context=_distill_setup)


@torch.library.custom_op(f"{_NS}::sigmoid_distill_tiles", mutates_args=())
def sigmoid_distill_tiles(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                          us: list[torch.Tensor], ws: list[torch.Tensor], ts: torch.Tensor, bs: torch.Tensor
                          ) -> torch.Tensor:
    """Row sums of softplus(-z * (scale * x @ y.T + bias)), z = 2 mean_m sigmoid(ts_m * us_m @ ws_m.T + bs_m) - 1."""
    return _sig_distill_torch(x, y, scale, bias, us, ws, ts, bs, None)[0]


@sigmoid_distill_tiles.register_fake
def _sigmoid_distill_tiles_fake(x, y, scale, bias, us, ws, ts, bs):
    return x.new_empty(x.shape[0], dtype=_acc_dtype(x))


@torch.library.custom_op(f"{_NS}::sigmoid_distill_tiles_backward", mutates_args=())
def sigmoid_distill_tiles_backward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                                   us: list[torch.Tensor], ws: list[torch.Tensor], ts: torch.Tensor, bs: torch.Tensor,
                                   g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _sig_distill_torch(x, y, scale, bias, us, ws, ts, bs, g)[1:]


@sigmoid_distill_tiles_backward.register_fake
def _sigmoid_distill_tiles_backward_fake(x, y, scale, bias, us, ws, ts, bs, g):
    return torch.empty_like(x), torch.empty_like(y), x.new_empty(2, dtype=_acc_dtype(x))


def _sig_distill_setup(ctx, inputs, output):
    x, y, scale, bias, us, ws, ts, bs = inputs
    ctx.save_for_backward(x, y, scale, bias, ts, bs, *us, *ws)
    ctx.teachers = len(us)


def _sig_distill_backward(ctx, g):
    x, y, scale, bias, ts, bs, *uw = ctx.saved_tensors
    m = ctx.teachers
    dx, dy, dsb = sigmoid_distill_tiles_backward(x, y, scale, bias, uw[:m], uw[m:], ts, bs, g)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dy if need[1] else None, dsb[0].to(scale.dtype).reshape(scale.shape) if need[2]
            else None, dsb[1].to(bias.dtype).reshape(bias.shape) if need[3] else None, [None] * m, [None] * m, None, None)


sigmoid_distill_tiles.register_autograd(_sig_distill_backward, setup_context=_sig_distill_setup)


def sigmoid_distill_rows(x, y, scale, bias, us, ws, ts, bs):
    """Per row i: sum_j softplus(-z_ij s_ij), the teachers' soft labels z fixed (no gradient to them)."""
    return sigmoid_distill_tiles(x, y, scale, bias, list(us), list(ws), ts, bs)



if triton is not None:
    @triton.jit
    def _distill_fwd_kernel(X, Y, U, W, SCALE, TSCALE, OFFSET, SUMS, n, k, d, e, sxn, sxd, syn, syd, sun, sud, swn,
                            swd, SPLIT: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                            BD: tl.constexpr):
        # Program (row block, column split): for its tiles of s and t, the sums of exp(s - offset_s),
        # exp(t - offset_t) and exp(t - offset_t) * s along rows and columns, added atomically into
        # SUMS = [rows of the three | columns of the three].
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        s = tl.load(SCALE).to(tl.float32)
        ts = tl.load(TSCALE).to(tl.float32)
        cs = tl.load(OFFSET)
        ct = tl.load(OFFSET + 1)
        r_s = tl.zeros([BM], dtype=tl.float32)
        r_t = tl.zeros([BM], dtype=tl.float32)
        r_c = tl.zeros([BM], dtype=tl.float32)
        for jb in range(tl.program_id(1), tl.cdiv(k, BN), SPLIT):
            rn = jb * BN + tl.arange(0, BN)
            S = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD) * s
            T = _tile(U, W, rm, rn, n, k, e, sun, sud, swn, swd, PREC, BM, BN, BD) * ts
            inside = (rm[:, None] < n) & (rn[None, :] < k)
            es = tl.where(inside, tl.exp(S - cs), 0.0)
            et = tl.where(inside, tl.exp(T - ct), 0.0)
            ec = et * S
            r_s += tl.sum(es, 1)
            r_t += tl.sum(et, 1)
            r_c += tl.sum(ec, 1)
            tl.atomic_add(SUMS + 3 * n + rn, tl.sum(es, 0), mask=rn < k)
            tl.atomic_add(SUMS + 3 * n + k + rn, tl.sum(et, 0), mask=rn < k)
            tl.atomic_add(SUMS + 3 * n + 2 * k + rn, tl.sum(ec, 0), mask=rn < k)
        tl.atomic_add(SUMS + rm, r_s, mask=rm < n)
        tl.atomic_add(SUMS + n + rm, r_t, mask=rm < n)
        tl.atomic_add(SUMS + 2 * n + rm, r_c, mask=rm < n)

    @triton.jit
    def _distill_grad_kernel(X, Y, U, W, SCALE, TSCALE, RS, CS, RT, CT, GRS, GCS, GRC, GCC, G, DSP, n, k, d, e,
                             sxn, sxd, syn, syd, sun, sud, swn, swd, sgn, PREC: tl.constexpr, BM: tl.constexpr,
                             BN: tl.constexpr, BD: tl.constexpr):
        # One tile of scale * G (the student's logit gradient, _distill_backward_torch's G) for a chunk
        # of rows, written out, and the tile's share of d(scale).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        s = tl.load(SCALE).to(tl.float32)
        ts = tl.load(TSCALE).to(tl.float32)
        raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
        S = raw * s
        T = _tile(U, W, rm, rn, n, k, e, sun, sud, swn, swd, PREC, BM, BN, BD) * ts
        rows, cols = rm < n, rn < k
        g = (tl.exp(S - tl.load(RS + rm, mask=rows, other=0.0)[:, None]) * tl.load(GRS + rm, mask=rows, other=0.0)[:, None]
             + tl.exp(S - tl.load(CS + rn, mask=cols, other=0.0)[None, :]) * tl.load(GCS + rn, mask=cols, other=0.0)[None, :]
             + tl.exp(T - tl.load(RT + rm, mask=rows, other=0.0)[:, None]) * tl.load(GRC + rm, mask=rows, other=0.0)[:, None]
             + tl.exp(T - tl.load(CT + rn, mask=cols, other=0.0)[None, :]) * tl.load(GCC + rn, mask=cols, other=0.0)[None, :])
        inside = rows[:, None] & cols[None, :]
        g = tl.where(inside, g, 0.0)
        tl.store(DSP + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(g * raw, 1), 0))
        tl.store(G + rm[:, None] * sgn + rn[None, :], (g * s).to(G.dtype.element_ty), mask=inside)



def _distill_triton(x, y, scale, u, w, tscale):
    n, k = x.shape[0], y.shape[0]
    u, w = u.to(x.dtype), w.to(x.dtype)  # one dot precision for both products: the student's
    offset = torch.cat([_offset(x, y, scale), _offset(u, w, tscale)])
    sums = torch.zeros(3 * (n + k), device=x.device, dtype=torch.float32)
    meta = _tiles(x if x.shape[1] <= u.shape[1] else u)
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    blocks = triton.cdiv(n, meta["BM"])
    split = max(1, min(triton.cdiv(k, meta["BN"]), triton.cdiv(4 * sms, blocks)))
    _distill_fwd_kernel[(blocks, split)](x, y, u, w, scale.reshape(1), tscale.reshape(1), offset, sums, n, k,
                                         x.shape[1], u.shape[1], x.stride(0), x.stride(1), y.stride(0), y.stride(1),
                                         u.stride(0), u.stride(1), w.stride(0), w.stride(1), SPLIT=split, **meta)
    rs, rt, rc, cs, ct, cc = sums.split([n, n, n, k, k, k])
    return rs.log() + offset[0], cs.log() + offset[0], rt.log() + offset[1], ct.log() + offset[1], rc / rt, cc / ct


def _distill_backward_triton(x, y, scale, u, w, tscale, stats, grads):
    # The student's gradients only (a teacher that wants gradients takes the PyTorch tiles): as in
    # _lse_backward_triton, scale * G for a chunk of rows lands in a workspace, dx and dy are products of it.
    n, k, d = x.shape[0], y.shape[0], x.shape[1]
    uu, ww = u.to(x.dtype), w.to(x.dtype)
    row_s, col_s, row_t, col_t = (v.float() for v in stats[:4])
    g_rs, g_cs, _, _, g_rc, g_cc = (v.float() for v in grads)
    meta = _tiles(x if d <= u.shape[1] else u)
    bm, bn = meta["BM"], meta["BN"]
    rows = min(n, max(bm, max(WORKSPACE, 4 * k * d) // max(k, 1) // bm * bm))
    work = torch.empty(rows, k, device=x.device, dtype=x.dtype)
    dsp = torch.empty(triton.cdiv(rows, bm) * triton.cdiv(k, bn), device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dy = torch.zeros(y.shape, device=x.device, dtype=torch.float32)
    ds = torch.zeros((), device=x.device, dtype=torch.float32)
    for i in range(0, n, rows):
        m = min(rows, n - i)
        g, xi, ui = work[:m], x[i:i + m], uu[i:i + m]
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bn))
        _distill_grad_kernel[grid](xi, y, ui, ww, scale.reshape(1), tscale.reshape(1), row_s[i:i + m], col_s,
                                   row_t[i:i + m], col_t, g_rs[i:i + m], g_cs, g_rc[i:i + m], g_cc, g, dsp, m, k, d,
                                   u.shape[1], xi.stride(0), xi.stride(1), y.stride(0), y.stride(1), ui.stride(0),
                                   ui.stride(1), ww.stride(0), ww.stride(1), g.stride(0), **meta)
        ds += dsp[:grid[0] * grid[1]].sum()
        torch.mm(g, y, out=dx[i:i + m])
        dy += _mm_f32(g.T, xi)
    return (dx, dy.to(y.dtype), ds.to(scale.dtype), torch.zeros_like(u), torch.zeros_like(w), torch.zeros_like(tscale))


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
        transform = model.transform(False)  # the model's own evaluation preprocessing
        batches = datalib.EvalBatches(data, transform, args.batch_size, rank, world, args.seed)
        images, texts, labels, loss_sum, n_full = [], [], [], 0.0, 0
        for batch, info in datalib.loader(batches, workers=args.workers):
            full = info["full"]
            label = batch.pop("label", None)
            with autocast:
                out = model(datalib.to_device(transform.finish(batch) if hasattr(transform, "finish") else batch, device))
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
                    classifiers[lang] = zero_shot_classifier(model, names, data.templates[lang]).float().cpu()
        if rank != 0:
            continue
        image, text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
        label = torch.cat([p[2] for p in parts]) if parts[0][2] is not None else None
        if not folder:
            metrics.update(retrieval_metrics(image, text))
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


@torch.no_grad()
def zero_shot_classifier(model, classnames, templates):
    """[C, D]: per class, the mean of its normalised prompt embeddings (model.encode_texts), re-normalised."""
    weights = []
    for name in classnames:
        e = model.encode_texts([t.format(name) for t in templates]).float()
        weights.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def retrieval_metrics(image_features, text_features, chunk=4096, ks=(1, 5, 10)):
    """R@k both ways for paired rows, chunked so N x N similarities are never held at once (a tie counts
    against the pair)."""
    out = {}
    for name, q, k in (("i2t", image_features, text_features), ("t2i", text_features, image_features)):
        ranks = []
        for i in range(0, q.shape[0], chunk):
            sims = q[i:i + chunk] @ k.T
            target = sims[torch.arange(sims.shape[0]), torch.arange(i, i + sims.shape[0])]
            ranks.append((sims > target[:, None]).sum(1))
        ranks = torch.cat(ranks)
        for kk in ks:
            out[f"{name}_r{kk}"] = (ranks < kk).float().mean().item()
    return out


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
            run_id = (datalib.read_text(id_file, 64, "wandb run id").decode("ascii", "replace").strip()
                      if step and os.path.isfile(id_file) else os.urandom(4).hex())
            datalib.write_file(id_file, run_id)
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
MAY_CHANGE_ON_RESUME = {"steps", "epochs", "train_num_samples", "out", "resume", "overwrite", "allow_flag_changes",
                        "allow_changed_inputs", "keep", "workers", "log_every",
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


def read_checkpoint(path, module):
    """A checkpoint to resume from, each part the type it must be and every tensor checked by the model
    file's reader (check_tensors: within its storage, the claims bounded by the file's size): a file in
    --out may be one a crash, another tool or another person left."""
    ckpt = module.check_tensors(torch.load(path, map_location="cpu", weights_only=True), path)
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
        ("inputs", not isinstance(ckpt.get("inputs") or {}, dict) or not all(
            isinstance(v, list) and all(isinstance(x, str) for x in v) for v in (ckpt.get("inputs") or {}).values())),
        ("lora", ckpt.get("lora") is not None and not isinstance(ckpt["lora"], dict)),
        ("raw", ckpt.get("raw") is not None and not isinstance(ckpt["raw"], dict)),
        ("ema", ckpt.get("ema") is not None and not (
            isinstance(ckpt["ema"], dict) and isinstance(ckpt["ema"].get("updates"), int) and ckpt["ema"]["updates"] >= 0
            and isinstance(ckpt["ema"].get("weights") or {}, dict))),
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


def start_or_resume(args, module):
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
            return args.resume, read_checkpoint(args.resume, module)
        except Exception as e:
            raise SystemExit(f"train.py: --resume: {args.resume} does not load ({reason(e)})") from None
    bad = []
    for path in found:
        if any(os.path.samefile(path, f) for f in bad):  # checkpoint.pt and its numbered name: one file
            bad.append(path)
            continue
        try:
            ckpt = read_checkpoint(path, module)
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
    link = os.path.join(out, f"{LATEST}.tmp{os.getpid()}")
    try:
        datalib.write_file(path, lambda f: torch.save(state, f))  # whole or absent, never through a link
        with contextlib.suppress(FileNotFoundError):
            os.unlink(link)
        try:
            os.link(path, link)
        except OSError:  # a file system without hard links
            datalib.write_file(link, lambda f: shutil.copyfileobj(open(path, "rb"), f))
        if os.path.lexists(os.path.join(out, LATEST)) and not os.path.isfile(os.path.join(out, LATEST)):
            raise IsADirectoryError(f"{os.path.join(out, LATEST)} is not a regular file")
        os.replace(link, os.path.join(out, LATEST))  # replaces a link there, never its target
        fd = os.open(out, os.O_RDONLY)
        try:
            os.fsync(fd)  # the renames themselves survive a power cut
        finally:
            os.close(fd)
    except (OSError, RuntimeError) as e:  # torch.save reports a failed write as RuntimeError
        with contextlib.suppress(OSError):
            os.remove(link)
        return f"could not write {path} ({reason(e)})"
    for old in numbered_checkpoints(out)[keep:]:
        if not os.path.samefile(old, path):
            os.remove(old)
            shards = old[:-len(".pt")] + ".dcp"  # a sharded checkpoint's folder goes with the file naming it
            if os.path.isdir(shards):
                shutil.rmtree(shards)
    return None


def decide_start(args, module, world):
    """Rank 0: (path, checkpoint) to resume from, or (None, None) for a new run; SystemExit to refuse."""
    if args.resume and args.overwrite:
        raise SystemExit("train.py: --resume continues the run in --out and --overwrite deletes it: pass one")
    datalib.lock_folder(args.out, "train.py", "train.lock")
    path, ckpt = start_or_resume(args, module)
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
    metrics = os.path.join(args.out, "metrics.jsonl")
    if os.path.lexists(metrics) and not stat.S_ISREG(os.lstat(metrics).st_mode):
        raise SystemExit(f"train.py: {metrics} is not a regular file (a link, FIFO or folder); move it away")
    inputs = input_fingerprints(args)
    changed = sorted(k for k, v in ((ckpt or {}).get("inputs") or {}).items() if k in inputs and inputs[k] != v
                     and k not in args.allow_changed_inputs)
    if changed:
        raise SystemExit(f"train.py: {path} was trained on other contents of --{changed[0].replace('_', '-')} "
                         f"({getattr(args, changed[0])!s:.120}); restore those files, start a new --out, or pass "
                         f"--allow-changed-inputs {','.join(changed)}")
    if args.resume:
        print(f"resuming from {path} (step {ckpt['step']})" if path else
              f"no checkpoint in {args.out}: starting a new run", flush=True)
    return path, ckpt, inputs


def input_fingerprints(args):
    """{flag: [sha256, ...]} of what the run reads beside its flags, by content: every flag naming files or
    folders (the teachers, --tokenizer, --init, a model's own files), the training data (a table by its
    bytes; shards by their names and sizes, as reading terabytes to start a run is not an option). A
    resume compares them (decide_start). Flags that may change on resume (evaluation data) are left out."""
    out = {}
    for key, value in sorted(vars(args).items()):
        if key in MAY_CHANGE_ON_RESUME:
            continue
        values = [v for v in (value if isinstance(value, list) else [value]) if isinstance(v, str) and v]
        if key == "data" and datalib.is_shards(value):
            listing = "".join(f"{p}\0{os.path.getsize(p)}\n" for p in datalib.shard_list(value)[0])
            out[key] = [hashlib.sha256(listing.encode("utf-8", "replace")).hexdigest()]
        elif values and all(os.path.exists(v) for v in values):
            out[key] = [datalib.fingerprint(v) for v in values]
    return out


def checkpoint_state(model, opt, step, args, world, device, data_position=None, scaler=None, lora=None, inputs=None,
                     ema=None):
    """What a checkpoint holds. Under --fsdp every rank calls it: the whole weights are gathered to rank 0
    (others get None), or with --sharded-checkpoint every rank writes its shards to OUT/checkpoint-STEP.dcp.
    'model' holds the weights a user takes, which the model file's load() reads as a plain model: with
    --ema the averaged ones ('raw': the trained ones, which a resume continues from); with LoRA merged
    ('lora': the base weights and adapters a resume continues from, and the averaged adapters)."""
    weights = averaged = optimizer = sharded = None
    if args.sharded_checkpoint:
        sharded = write_shards(model, opt, args.out, step, ema)
    elif args.fsdp:
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        whole = StateDictOptions(full_state_dict=True, cpu_offload=True)
        weights, optimizer = get_model_state_dict(model, options=whole), get_optimizer_state_dict(model, opt, options=whole)
        if ema is not None:
            with ema.swapped():  # copies: on the CPU, "offloading" a whole scalar hands back the parameter itself
                averaged = {k: v.detach().clone() for k, v in get_model_state_dict(model, options=whole).items()}
        if dist.get_rank() == 0:
            optimizer = optimizer_by_index(optimizer, model, opt)  # the same file as a DDP run's
    else:
        weights, optimizer = model.state_dict(), opt.state_dict()
        if ema is not None and (not dist.is_initialized() or dist.get_rank() == 0):  # only rank 0 writes
            with ema.swapped():  # copies: the state dict's tensors are the parameters themselves
                averaged = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    lora_state = adapters = None
    if lora and weights is not None:
        weights, lora_state = merged_weights(weights, *lora)
        if averaged is not None:
            adapters = {n: averaged[n] for n in ema.shadow}
            averaged = merged_weights(averaged, *lora)[0]
    return {"model": averaged if averaged is not None else weights, "raw": weights if averaged is not None else None,
            "optimizer": optimizer, "sharded": sharded, "step": step, "data": data_position, "inputs": inputs,
            "lora": {"spec": lora[0], "layout": {k: [list(s) for s in v] for k, v in lora[1].items()}, "state": lora_state}
            if lora else None,
            "ema": {"decay": ema.decay, "warmup": ema.warmup, "updates": ema.updates, "weights": adapters}
            if ema is not None else None,
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


def write_shards(model, opt, out, step, ema=None):
    """Every rank writes its shards of weights and optimizer state; returns the folder's name."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    name = f"checkpoint-{step:07d}.dcp"
    tmp = os.path.join(out, name + ".tmp")
    if dist.get_rank() == 0 and os.path.isdir(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    weights, optimizer = get_state_dict(model, opt)
    dcp.save({"model": weights, "optimizer": optimizer, **({"ema": ema.shadow} if ema else {})}, checkpoint_id=tmp)
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


def restore(model, opt, ckpt, args, scaler, ema=None):
    """Weights (unless already loaded whole before sharding), optimizer state and EMA weights into this
    run's layout."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_state_dict, set_optimizer_state_dict,
                                                         set_state_dict)

    if ckpt.get("sharded"):
        import torch.distributed.checkpoint as dcp

        weights, optimizer = get_state_dict(model, opt)
        state = {"model": weights, "optimizer": optimizer, **({"ema": ema.shadow} if ema else {})}
        dcp.load(state, checkpoint_id=os.path.join(ckpt.get("folder", args.out), ckpt["sharded"]))
        set_state_dict(model, opt, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    elif args.fsdp:  # a whole checkpoint (FSDP's or DDP's): every rank keeps its shards of it
        set_optimizer_state_dict(model, opt, optimizer_by_name(ckpt["optimizer"], model, opt),
                                 options=StateDictOptions(full_state_dict=True))
    else:
        opt.load_state_dict(ckpt["optimizer"])
    if scaler is not None and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    if ema is not None and not ckpt.get("sharded"):  # the averages: the checkpoint's weights (LoRA: its adapters')
        saved = ckpt.get("ema")
        if not isinstance(saved, dict):
            raise ValueError("the checkpoint has no EMA weights: --ema cannot join a run on resume")
        ema.load(saved["weights"] if saved.get("weights") is not None else ckpt["model"])


def agree_on_start(args, module, rank, world, control):
    """(checkpoint to resume from or None, the run's input fingerprints on rank 0): rank 0 reads the folder
    and decides, every rank follows."""
    path = ckpt = refusal = error = inputs = None
    if rank == 0:
        try:
            path, ckpt, inputs = decide_start(args, module, world)
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
        ckpt = read_checkpoint(path, module)
    return ckpt, inputs


def build_model(args, module, ckpt, captions, rank, world, device):
    """The model on its device (resumed, checkpointed, sharded as asked), its optimizer and precision."""
    extra = ckpt["extra"] if ckpt else None
    # rank 0 builds (e.g. trains the tokenizer), the others copy it; --init weights every rank reads itself
    if extra is None and world > 1 and not args.init:
        box = [module.create(args, captions()).extra_state() if rank == 0 else None]
        dist.broadcast_object_list(box, src=0)
        extra = box[0]
    if ckpt and ckpt["model"] is not None:  # a checkpoint's config may claim any size: checked on the meta device
        with module.reading("the checkpoint"):
            module.check_fits(lambda: module.create(args, captions(), extra=extra), ckpt["model"], "the checkpoint")
    torch.manual_seed(args.seed)  # the same initial weights however many times create() ran before
    model = module.create(args, captions(), extra=extra)
    if not ckpt:  # a resumed run's config holds its length already
        model = with_context_length(module, args, model, (), fresh=not args.init)
    model = model.to(device)
    if ckpt and ckpt["model"] is not None:  # whole weights load before sharding; shards after (with --ema: the raw ones)
        model.load_state_dict(ckpt["raw"] if ckpt.get("raw") is not None else ckpt["model"])
    lora = with_lora(model, args, ckpt)
    scales = layer_scales(model, args.layer_decay) if args.layer_decay != 1 else None  # before FSDP: whole modules
    if args.grad_checkpointing:
        checkpoint_blocks(model)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    scalars = shard(model, device, precision) if args.fsdp else []
    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    autocast = torch.autocast(device.type, dtype=half or torch.bfloat16, enabled=half is not None)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None  # fp16's range needs loss scaling
    # fused: one kernel for all parameters (on the CPU too: a third of the foreach version's time here)
    groups = model.optimizer_groups(args.wd)
    opt = torch.optim.AdamW(decayed_groups(groups, model, scales) if scales else groups, lr=args.lr,
                            betas=(args.beta1, args.beta2), eps=args.eps, fused=not args.fsdp)
    saved = (ckpt or {}).get("ema") or {}
    ema = EMA(model, args.ema, args.ema_warmup, saved.get("updates", 0)) if args.ema else None
    if ckpt:
        restore(model, opt, ckpt, args, scaler, ema)
        set_rng_state((ckpt["rng"]["torch"], ckpt["rng"].get("cuda")), device)
    return model, opt, scaler, scalars, autocast, lora, ema


def with_lora(model, args, ckpt):
    """--lora's adapters on the model (after --init's weights and the LiT locks): (spec, layout), or None.
    A resumed run keeps the adapters its checkpoint records, base weights and adapters as they were."""
    saved = (ckpt or {}).get("lora")
    if ckpt and not saved and args.lora:
        raise ValueError("--lora cannot join a run on resume (its optimizer holds every weight): start a new --out "
                         "with --init OUT/checkpoint.pt --lora R")
    if saved:
        spec = saved_lora_spec(saved.get("spec"), "the checkpoint")
    elif args.lora:
        if getattr(args, "lock_image_unlocked_layers", 0) or getattr(args, "lock_text_unlocked_layers", 0):
            raise ValueError("--lora freezes every weight: --lock-*-unlocked-layers has nothing to unlock; drop it")
        split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
        spec = lora_spec(args.lora, args.lora_alpha, split(args.lora_targets), args.lora_dropout, split(args.lora_towers),
                         args.lora_train_scale)
    else:
        return None
    spec, layout = add_lora(model, spec)
    if saved and saved.get("state") is not None:
        own = {k: v.shape for k, v in model.state_dict().items() if ".parametrizations." in k}
        state = saved["state"]
        if not isinstance(state, dict) or set(state) != set(own) or any(
                not isinstance(state[k], torch.Tensor) or state[k].shape != own[k] for k in own):
            raise ValueError("the checkpoint's LoRA weights do not fit its LoRA settings")
        model.load_state_dict(state, strict=False)
    return spec, layout


def read_metrics(path, numbers_only=True):
    """(rows, numbers of the lines that are not whole rows) of a metrics.jsonl: a crash while a row was
    written leaves a torn last line, which resume cuts and report skips. numbers_only (report): each row
    keeps its finite numbers and skip counts, what a page can draw; resume keeps the rows as they were."""
    rows, torn = [], []
    lines = datalib.read_text(path, None, "metrics file").decode("utf-8", "replace").split("\n")  # a FIFO: refused
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
        if rank == 0 and os.path.lexists(self.path):
            if resumed:  # a resumed run drops the rows it will write again: a new file, renamed over the old
                rows, torn = read_metrics(self.path, numbers_only=False)
                if torn:
                    print(f"train.py: {self.path}: cut {len(torn)} line(s) that are not whole rows (line "
                          f"{', '.join(map(str, torn[:5]))}; a crash mid-write leaves one)", flush=True)
                try:
                    datalib.write_file(self.path, "".join(json.dumps(r) + "\n" for r in rows if r["step"] <= step))
                except OSError as e:  # disk full, permissions: the old file stands whole
                    raise SystemExit(f"train.py: could not rewrite {self.path} ({reason(e)}); it is as it was: free "
                                     f"space or fix the permissions, then --resume again") from None
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
            with datalib.open_append(self.path) as f:
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


def save(model, opt, step, args, rank, world, device, control, data_position, scaler, ckpt_path, lora=None, inputs=None,
         ema=None):
    """A checkpoint from rank 0 (every rank under --fsdp takes part); a failed write stops every rank."""
    failed = None
    state = (checkpoint_state(model, opt, step, args, world, device, data_position, scaler, lora, inputs, ema)
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
        datalib.unlock_folder(args.out)  # rank 0's hold on --out ends with the run, whatever ended it


def run(args, module):
    # Set-up: processes, the start-or-resume decision, data, model and optimizer.
    rank, world, device, control = setup(args)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, LATEST)
    train_data, val_data, zeroshot_data = datalib.build(args)
    if args.steps is None:  # --epochs: passes over the data, whose size is known now
        steps_from_epochs(args, datalib.num_samples(train_data, args), world)
    ckpt, inputs = agree_on_start(args, module, rank, world, control)
    torch.manual_seed(args.seed)
    model, opt, scaler, scalars, autocast, lora, ema = build_model(args, module, ckpt, train_data.caption_corpus, rank,
                                                                   world, device)
    step = ckpt["step"] if ckpt else 0
    forward, sync = distribute(model, args, world, device)
    params = [p for p in model.parameters() if p.requires_grad]
    progress, stop, metrics = Progress(args, rank, world, device, control, step, ckpt is not None), StopRequest(), {}
    # the samples' inputs, made in the loader workers: the model's transform, its images cropped by data.py
    # (decoded on the device under --gpu-decode), with what the teachers need beside them
    images = datalib.RandomCrop(model.cfg.image_size, defer=args.gpu_decode)
    transform = model.transform(True, images=images)
    if args.patch_dropout:  # FLIP: the ViT's patches kept, drawn with the rest of the sample
        if not hasattr(model.cfg, "patch_size"):
            raise ValueError(f"--patch-dropout drops a ViT's patch tokens; {args.model}'s image tower has none")
        transform = datalib.PatchDropout(transform, (model.cfg.image_size // model.cfg.patch_size) ** 2, args.patch_dropout)
    if args.long_captions:  # Long-CLIP: each caption's first sentence tokenized beside it
        if getattr(model, "tokenizer", None) is None:
            raise ValueError(f"--long-captions tokenizes short captions: {args.model} has no tokenizer")
        transform = datalib.LongCaptions(transform, model.tokenizer)
        forward = long_caption_forward(forward)
    distiller = Distiller.from_args(args, device, train_data)
    if distiller:
        transform = distiller.wrap(transform)
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
        if hasattr(transform, "finish"):  # the model's own hand-over on the CPU (its texts trimmed)
            batch = transform.finish(batch)
        batch = datalib.to_device(batch, device, images, info["notes"])  # --gpu-decode: the JPEGs decoded there
        with autocast:  # the teachers' features (online ones run here, stored ones come with the batch)
            teachers = distiller.features(batch) if distiller else None
        batch = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}  # what a transform said in words
        objective = (lambda out: long_caption_loss(model.loss, out)) if args.long_captions else model.loss
        loss_fn = (lambda out: objective(out) + distiller.loss(out, teachers)) if distiller else objective
        progress.count(info)
        position.update(info)
        # forward, backward over the global batch, optimizer step
        lr = lr_at(step, args)
        for g in opt.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)  # --layer-decay's groups
        loss = train_step(forward, sync, loss_fn, batch, args.accum, autocast, device, scaler)
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
        if ema is not None:
            ema.update()
        step += 1
        progress.add(loss)
        last = step == args.steps
        # log, evaluate, checkpoint
        if step % args.log_every == 0 or last:
            progress.log(step, lr, ckpt_path)
        if (val_data or zeroshot_data) is not None and ((args.eval_every and step % args.eval_every == 0) or last):
            metrics = evaluate(model, module, (val_data, zeroshot_data), args, rank, world, device, autocast)
            if ema is not None:  # the averaged weights' metrics beside the trained ones'
                with ema.swapped():
                    metrics.update({f"ema_{k}": v for k, v in evaluate(model, module, (val_data, zeroshot_data), args,
                                                                         rank, world, device, autocast).items()})
            progress.write({"step": step, **metrics})
            if rank == 0:
                print("eval " + " | ".join(f"{k} {v:.4f}" for k, v in metrics.items()), flush=True)
        stopping = stop.agreed(control, world)  # SIGTERM / Ctrl-C on any rank: save, then stop
        if (args.save_every and step % args.save_every == 0) or last or stopping:
            progress.check_finite(step, ckpt_path, model)
            save(model, opt, step, args, rank, world, device, control, position.state(world, control), scaler,
                 ckpt_path, lora, inputs, ema)
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
# python train.py export CKPT OUT --format open_clip|hf|peft: weights any model file's load() reads, in
# the layouts of open_clip and transformers (peft: a LoRA checkpoint's adapters). Each model file keeps
# the names its own readers map (hf_names); the files are written here, through data.write_file.

OPENAI_VOCAB = "7cccc44d334555d1ff3c0ac5f0246b428fab2918383e77ee745cf30d41010b78"  # sha256 of its tokens, in id order
EXPORTS = {"clip": ("open_clip", "hf", "peft"), "laclip": ("open_clip", "hf", "peft"), "altclip": ("hf",)}


def write_json(path, value):
    datalib.write_file(path, json.dumps(value, indent=2, ensure_ascii=False))


def save_weights(sd, folder, stem="model"):
    """transformers' (stem adapter_model: peft's) weight file: STEM.safetensors where safetensors is
    installed, else pytorch_model.bin (adapter_model.bin); returns its name."""
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    try:
        from safetensors.torch import save
    except ImportError:
        name = "pytorch_model.bin" if stem == "model" else f"{stem}.bin"
        datalib.write_file(os.path.join(folder, name), lambda f: torch.save(sd, f))
        return name
    datalib.write_file(os.path.join(folder, f"{stem}.safetensors"), save(sd, metadata={"format": "pt"}))
    return f"{stem}.safetensors"


def write_clip_tokenizer(module, tok, out):
    """tokenizer.json (with the lower-casing and SOT/EOT the model file adds in Python), vocab.json,
    merges.txt and tokenizer_config.json: transformers' CLIPTokenizer and AutoTokenizer read them."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, normalizers, processors

    sot, eot = module.SOT, module.EOT
    hf = HFTokenizer.from_str(tok.to_str())
    hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()])
    hf.post_processor = processors.TemplateProcessing(single=f"{sot} $A {eot}", pair=f"{sot} $A {eot} $B {eot}",
                                                      special_tokens=[(sot, tok.sot), (eot, tok.eot)])
    datalib.write_file(os.path.join(out, "tokenizer.json"), hf.to_str())
    bpe = json.loads(hf.to_str())["model"]
    datalib.write_file(os.path.join(out, "vocab.json"), json.dumps(bpe["vocab"], ensure_ascii=False))
    datalib.write_file(os.path.join(out, "merges.txt"), "#version: 0.2\n" + "".join(
        (m if isinstance(m, str) else " ".join(m)) + "\n" for m in bpe["merges"]))
    special = {"bos_token": sot, "eos_token": eot, "unk_token": eot, "pad_token": eot}
    write_json(os.path.join(out, "tokenizer_config.json"), {
        "tokenizer_class": "CLIPTokenizer", "model_max_length": tok.context_length, "do_lower_case": True,
        "clean_up_tokenization_spaces": False, **special})
    write_json(os.path.join(out, "special_tokens_map.json"), special)


def preprocessor_config(size, mean, std):
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor", "do_resize": True,
            "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True, "crop_size": {"height": size, "width": size},
            "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
            "image_mean": list(mean), "image_std": list(std)}


def hf_weights(module, cfg, sd):
    """Our weights under transformers' CLIPModel names (module.hf_names, the reader's map, the other way);
    names sd lacks are passed over."""
    out = {}
    for ours, theirs, how in module.hf_names(cfg):
        if ours in sd and how == "qkv":
            out.update({theirs.format(p): part for p, part in zip("qkv", sd[ours].chunk(3))})
        elif ours in sd:
            out[theirs] = sd[ours].T if how == "T" else sd[ours]
    return out


def export_hf(module, model, out):
    """A transformers CLIPModel folder: config.json, weights, tokenizer files, preprocessor_config.json."""
    cfg, tok = model.cfg, model.tokenizer
    if cfg.loss == "sigmoid":
        raise ValueError("transformers' CLIPModel has no logit_bias for this sigmoid-loss model (and its SiglipModel "
                         "is another architecture); export --format open_clip, which keeps the bias")
    # transformers pools at the first eos_token_id, or at the highest id for a config that says 2
    eos = cfg.eos_id if cfg.eos_id is not None else tok.eot if tok.eot == tok.vocab_size - 1 else 2
    tower = dict(hidden_act="quick_gelu" if cfg.quick_gelu else "gelu", layer_norm_eps=cfg.ln_eps, projection_dim=cfg.embed_dim)
    write_json(os.path.join(out, "config.json"), {
        "architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592, "torch_dtype": "float32",
        "text_config": {"model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.text_width,
                        "intermediate_size": cfg.text_mlp, "num_hidden_layers": cfg.text_layers,
                        "num_attention_heads": cfg.text_heads, "max_position_embeddings": cfg.context_length,
                        "bos_token_id": tok.sot, "eos_token_id": eos, "pad_token_id": tok.eot, **tower},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": cfg.vision_width,
                          "intermediate_size": cfg.vision_mlp, "num_hidden_layers": cfg.vision_layers,
                          "num_attention_heads": cfg.vision_heads, "image_size": cfg.image_size,
                          "patch_size": cfg.patch_size, "num_channels": 3, **tower}})
    weights = save_weights(hf_weights(module, cfg, model.state_dict()), out)
    write_clip_tokenizer(module, tok, out)
    write_json(os.path.join(out, "preprocessor_config.json"), preprocessor_config(cfg.image_size, cfg.image_mean, cfg.image_std))
    return [f"wrote {out}: config.json, {weights}, tokenizer files, preprocessor_config.json",
            f"transformers: CLIPModel.from_pretrained({out!r}), CLIPProcessor.from_pretrained({out!r})"]


def open_clip_name(module, cfg):
    """open_clip's built-in model name for these shapes (ViT-B-32, ViT-B-16-quickgelu, ...), or None. Its text
    pooling is argmax: the same token as ours where nothing follows EOT in the vocabulary."""
    if cfg.loss != "softmax":  # the named models have no logit_bias
        return None
    skip = ("quick_gelu", "eos_id", "init_logit_scale")
    shapes = {k: v for k, v in vars(cfg).items() if k not in skip}
    for name, preset in module.CONFIGS.items():
        if name != "tiny" and {k: v for k, v in vars(preset).items() if k not in skip} == shapes:
            return name + ("-quickgelu" if cfg.quick_gelu else "")  # QuickGELU is part of open_clip's name
    return None


def export_open_clip(module, model, out):
    """open_clip's local-dir layout; for a preset's shapes with OpenAI's vocabulary the weights file also
    loads as pretrained=FILE under the open_clip name of that preset."""
    import hashlib

    cfg, tok = model.cfg, model.tokenizer
    if cfg.vision_width % cfg.vision_heads or cfg.ln_eps != 1e-5:
        raise ValueError("open_clip cannot express this model (vision heads of unequal width, or layer-norm eps "
                         f"{cfg.ln_eps} instead of 1e-5); export --format hf instead")
    ratio = {}
    for name, width, mlp in (("vision", cfg.vision_width, cfg.vision_mlp), ("text", cfg.text_width, cfg.text_mlp)):
        ratio[name] = mlp / width
        if int(width * ratio[name]) != mlp:  # how open_clip turns mlp_ratio back into a width
            raise ValueError(f"open_clip cannot express the {name} MLP width {mlp}; export --format hf instead")
    text_cfg = {"context_length": cfg.context_length, "vocab_size": cfg.vocab_size, "width": cfg.text_width,
                "heads": cfg.text_heads, "layers": cfg.text_layers, "mlp_ratio": ratio["text"]}
    if cfg.eos_id is not None:
        text_cfg.update(pool_type="eos", eos_id=cfg.eos_id)
    vocab = tok.tokenizer.get_vocab()
    openai_vocab = hashlib.sha256("\n".join(sorted(vocab, key=vocab.get)).encode()).hexdigest() == OPENAI_VOCAB
    lines = [f"wrote {out}: open_clip_config.json, open_clip_pytorch_model.bin"]
    if not openai_vocab:  # open_clip then reads the folder's tokenizer files through transformers
        write_clip_tokenizer(module, tok, out)
        text_cfg["hf_tokenizer_name"] = "."
        lines.append("open_clip: this model's tokenizer is not OpenAI's; open_clip reads the folder's tokenizer.json "
                     "through transformers (pip install transformers)")
    bias = {"init_logit_bias": model.logit_bias.item()} if cfg.loss == "sigmoid" else {}  # open_clip's SigLIP switch
    write_json(os.path.join(out, "open_clip_config.json"), {
        "model_cfg": {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, **bias,
                      "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.vision_layers, "width": cfg.vision_width,
                                     "head_width": cfg.vision_width // cfg.vision_heads, "mlp_ratio": ratio["vision"],
                                     "patch_size": cfg.patch_size},
                      "text_cfg": text_cfg},
        "preprocess_cfg": {"mean": list(cfg.image_mean), "std": list(cfg.image_std), "interpolation": "bicubic",
                           "resize_mode": "shortest", "size": cfg.image_size}})
    weights = os.path.join(out, "open_clip_pytorch_model.bin")
    sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    datalib.write_file(weights, lambda f: torch.save(sd, f))
    lines.append(f"open_clip: create_model_and_transforms('local-dir:{out}')")
    name = open_clip_name(module, cfg)
    if name and openai_vocab:
        lines.append(f"open_clip: also create_model_and_transforms({name!r}, pretrained={weights!r})")
    elif name:
        lines.append(f"open_clip: not loadable as {name!r} with pretrained=FILE: that name's tokenizer is OpenAI's "
                     f"and this model's is not; use local-dir")
    return lines


def read_peft(module, path, tokenizer=None):
    """(merged model, base state dict, adapters under peft's names, LoRA settings) of a LoRA checkpoint: the
    merged model through the model file's checked load(), the rest through its checked tensor reader."""
    with module.reading(path):
        model, _ = module.load(path, tokenizer=tokenizer)
        ckpt = module.load_tensors(path)
        lora = ckpt.get("lora")
        if not isinstance(lora, dict):
            raise ValueError(f"{path} holds no LoRA adapters (train.py --lora R makes them): export it --format hf")
        spec, layout, state = saved_lora_spec(lora.get("spec"), path), lora_layout_of(lora.get("layout"), path), lora.get("state")
        base, adapters = model.state_dict(), {}
        theirs = {ours: hf for ours, hf, _ in module.hf_names(model.cfg)}
        for name, spans in layout.items():  # the base weights where adapters sit, and the adapters
            module_name, _, pname = name.rpartition(".")
            stem = f"{module_name}.parametrizations.{pname}".lstrip(".")
            base[name] = state[f"{stem}.original"].float()
            for i, (start, _) in enumerate(spans):
                target = theirs[name].format("qkv"[start * 3 // base[name].shape[0]]) if "{}" in theirs[name] else theirs[name]
                for ab in "AB":
                    adapters[f"base_model.model.{target.rsplit('.', 1)[0]}.lora_{ab}.weight"] = state[f"{stem}.{i}.{ab}"]
        check = model.load_state_dict(base, strict=False)  # shapes checked by the load: a lying file is one line
        if check.missing_keys or check.unexpected_keys:
            raise ValueError(f"{path}: its LoRA layout names weights the model does not have")
    return model, base, adapters, spec


def write_peft(module, model, base, adapters, spec, out):
    """A LoRA checkpoint as peft reads it: OUT/base, a transformers CLIPModel folder of the base weights (the
    logit scale as trained), and OUT/adapter, peft's adapter_config.json and weights, so that
        PeftModel.from_pretrained(CLIPModel.from_pretrained(OUT/base), OUT/adapter)
    computes this checkpoint's features. A part of our fused q, k, v projection is transformers' q_proj,
    k_proj or v_proj, so each adapter is that module's as it stands."""
    os.makedirs(os.path.join(out, "base"), exist_ok=True)
    lines = export_hf(module, model, os.path.join(out, "base"))
    # a pattern peft matches whole against each module's name: exactly the adapted modules, any layer
    used = {re.sub(r"\\\.\d+\\\.", lambda _: r"\.\d+\.", re.escape(k[len("base_model.model."):].rsplit(".lora_", 1)[0]), count=1)
            for k in adapters}
    config = {"peft_type": "LORA", "task_type": None, "r": spec["rank"], "lora_alpha": spec["alpha"],
              "lora_dropout": spec["dropout"], "target_modules": "(" + "|".join(sorted(used)) + ")", "bias": "none",
              "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "init_lora_weights": True,
              "inference_mode": True, "modules_to_save": None, "base_model_name_or_path": None}
    folder = os.path.join(out, "adapter")
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "adapter_config.json"), config)
    weights = save_weights(adapters, folder, "adapter_model")
    return lines[:1] + [f"wrote {folder}: adapter_config.json, {weights}",
                        f"peft: PeftModel.from_pretrained(CLIPModel.from_pretrained({os.path.join(out, 'base')!r}), {folder!r})"]


def export_altclip_hf(module, model, out):
    """A transformers AltCLIPModel folder from an altclip model: its XLM-R student as the text tower (a stage 1
    checkpoint's teacher is left out), CLIP's image tower, config.json, tokenizer files."""
    cfg, tok = model.cfg, model.tokenizer
    sd = {f"text_model.roberta.{k}": v for k, v in model.text_model.roberta.state_dict().items()}
    for name in ("pre_LN", "transformation"):
        sd.update({f"text_model.{name}.{k}": v for k, v in getattr(model.text_model, name).state_dict().items()})
    visual = {f"visual.{k}": v for k, v in model.visual.state_dict().items()}
    sd.update(hf_weights(module, argparse.Namespace(text_layers=0, vision_layers=cfg.vision_layers), visual))
    sd["text_projection.weight"], sd["logit_scale"] = model.text_projection.weight, model.logit_scale
    weights = save_weights(sd, out)
    write_json(os.path.join(out, "config.json"), {
        "architectures": ["AltCLIPModel"], "model_type": "altclip", "projection_dim": cfg.embed_dim,
        "logit_scale_init_value": 2.6592, "torch_dtype": "float32",
        "text_config": {"model_type": "altclip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.text_width,
                        "num_hidden_layers": cfg.text_layers, "num_attention_heads": cfg.text_heads,
                        "intermediate_size": cfg.text_mlp, "hidden_act": "gelu",
                        "max_position_embeddings": cfg.text_max_positions, "type_vocab_size": cfg.text_type_vocab,
                        "layer_norm_eps": cfg.text_eps, "pad_token_id": cfg.pad_id, "project_dim": cfg.teacher_width,
                        "position_embedding_type": "absolute"},
        "vision_config": {"model_type": "altclip_vision_model", "hidden_size": cfg.vision_width,
                          "intermediate_size": cfg.vision_mlp or 4 * cfg.vision_width,
                          "num_hidden_layers": cfg.vision_layers, "num_attention_heads": cfg.vision_heads,
                          "image_size": cfg.image_size, "patch_size": cfg.patch_size, "num_channels": 3,
                          "hidden_act": "quick_gelu" if cfg.quick_gelu else "gelu", "layer_norm_eps": 1e-5,
                          "projection_dim": cfg.embed_dim}})
    datalib.write_file(os.path.join(out, "tokenizer.json"), tok.to_str())
    vocab = tok.tokenizer.get_vocab()
    special = {role: name for role, names in (("pad_token", ("<pad>", "[PAD]")), ("unk_token", ("<unk>", "[UNK]")),
                                              ("bos_token", ("<s>", "[CLS]")), ("eos_token", ("</s>", "[SEP]")),
                                              ("cls_token", ("<s>", "[CLS]")), ("sep_token", ("</s>", "[SEP]")),
                                              ("mask_token", ("<mask>", "[MASK]"))) for name in names if name in vocab}
    write_json(os.path.join(out, "tokenizer_config.json"), {"tokenizer_class": "PreTrainedTokenizerFast",
                                                            "model_max_length": cfg.context_length, **special})
    write_json(os.path.join(out, "preprocessor_config.json"), preprocessor_config(cfg.image_size, module.MEAN, module.STD))
    return [f"wrote {out}: config.json, {weights}, tokenizer.json, preprocessor_config.json",
            f"transformers: AltCLIPModel.from_pretrained({out!r}); its tokenizer: AutoTokenizer.from_pretrained({out!r}) "
            f"(this model's own, not necessarily XLM-R's: AltCLIPProcessor expects XLM-R's)"]


def export(path, out, fmt, model_name=None, tokenizer=None, raw=False):
    """Convert weights a model file's load() reads (model_name's; default: the one a train.py checkpoint
    names, else clip) to open_clip's, transformers' or (a LoRA checkpoint) peft's layout; returns what to
    tell the user. A LoRA checkpoint's open_clip and hf exports hold the merged weights; an --ema run's,
    the averaged ones, unless raw (the trained ones)."""
    name = model_name or checkpoint_model(path) or "clip"
    if fmt not in (*EXPORTS.get(name, ()), "weights"):
        offered = EXPORTS.get(name)
        raise ValueError(f"{name} exports {' or '.join(offered)}, not {fmt}" if offered else
                         f"{name} has no export format: its checkpoints load with {name}.load()")
    module = import_model(name)
    if fmt == "peft":
        model, base, adapters, spec = read_peft(module, path, tokenizer)
    else:
        model, _ = module.load(path, **({"tokenizer": tokenizer} if tokenizer else {}))  # clippo's takes none
    if raw and fmt != "peft":  # the trained weights beside the averaged ones, read as the model file reads these
        ckpt = read_checkpoint(path, module) if checkpoint_model(path) else {}
        if ckpt.get("raw") is None:
            raise ValueError(f"{path} holds no --ema run's raw weights: leave out --raw")
        with module.reading(path):
            module.check_fits(lambda: model, ckpt["raw"], path)
        model.load_state_dict(ckpt["raw"])
    if getattr(model, "tokenizer", "") is None:  # clippo renders its texts: it has none
        raise ValueError(f"{path} carries no tokenizer: pass --tokenizer (bpe_simple_vocab_16e6.txt.gz or a "
                         f"tokenizer.json) so that it travels with the export")
    datalib.lock_folder(out, "train.py export")  # only now: a file that does not read leaves no folder behind
    try:
        if fmt == "weights":  # the model file's own layout: its load() and predict read it (with --raw: the raw weights)
            state = {"model": {k: v.detach().cpu() for k, v in model.state_dict().items()}, "extra": model.extra_state()}
            datalib.write_file(os.path.join(out, "model.pt"), lambda f: torch.save(state, f))
            return [f"wrote {os.path.join(out, 'model.pt')}: python {name}.py predict --ckpt {os.path.join(out, 'model.pt')} ..."]
        if fmt == "peft":
            return write_peft(module, model, base, adapters, spec, out)
        if name == "altclip":
            return export_altclip_hf(module, model, out)
        return (export_hf if fmt == "hf" else export_open_clip)(module, model, out)
    finally:
        datalib.unlock_folder(out)


def checkpoint_model(path):
    """The model a train.py checkpoint names, or None (another tool's weights, a folder, a file that does not
    load: the model file's checked reader says what is wrong with it later). A TorchScript archive is
    never handed to torch.load, which would pass it on to torch.jit.load and run it."""
    import warnings
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            if any(n.endswith("/constants.pkl") for n in z.namelist()):
                return None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            name = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["args"]["model"]  # mmap: no weights read
        return name if name in MODELS else None
    except Exception:
        return None


def export_main(argv):
    p = argparse.ArgumentParser(prog="train.py export", description="weights in open_clip's, transformers' or peft's layout")
    p.add_argument("checkpoint", help="OUT/checkpoint.pt of train.py, or any weights the model file's load() reads")
    p.add_argument("out", help="folder to write")
    p.add_argument("--format", required=True, choices=("open_clip", "hf", "peft", "weights"),
                   help="weights: the model file's own layout (OUT/model.pt), any model; with --raw, predict's way to "
                        "an --ema run's trained weights")
    p.add_argument("--model", default=None, choices=MODELS, help="the model file that reads CHECKPOINT (default: "
                   "the one a train.py checkpoint names, else clip)")
    p.add_argument("--tokenizer", default=None, help="for weights that carry no tokenizer")
    p.add_argument("--raw", action="store_true", help="an --ema run's trained weights, not the averaged ones")
    args = p.parse_args(argv)
    for line in export(args.checkpoint, args.out, args.format, args.model, args.tokenizer, args.raw):
        print(line)


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
    top = (image @ zero_shot_classifier(model, names, val.templates["en"]).float().T).topk(3, dim=1)
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
    datalib.write_file(path, page)
    return path


# Errors in what the user gave (a missing file, a bad flag value, data that cannot be read, an optional
# package not installed) are told in one line; anything else keeps its traceback. TRAIN_TRACEBACK=1
# shows the traceback of those too.
INPUT_ERRORS = (FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError, ValueError, ImportError,
                datalib.DataError)

if __name__ == "__main__":
    try:
        if sys.argv[1:2] == ["export"]:
            export_main(sys.argv[2:])
        elif sys.argv[1:2] == ["report"]:
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
