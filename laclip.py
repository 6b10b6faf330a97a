"""LaCLIP (Fan et al. 2023) in one file: CLIP trained on LLM rewrites of its captions.

Each training step draws every sample's text uniformly from {original caption, its rewrites} (a
draw of fewer than 2 words falls back to the original); --multi-text (LaCLIP-MT) instead makes each
image a positive for all of its texts and averages the contrastive loss over the text sets.
`python laclip.py rewrite ...` writes the rewrites with a local OpenAI-compatible LLM server.

Use it alone (it imports nothing from this repository):
    model, preprocess = load("checkpoint.pt")          # LaCLIP checkpoints are CLIP checkpoints
    model = build("ViT-B-32", tokenizer="bpe_simple_vocab_16e6.txt.gz", text_sets=5)   # LaCLIP-MT
    python laclip.py rewrite --captions IN.txt --out OUT.txt --endpoint URL

Your own loop (runs as written with this file alone; four plain images stand in for data):
    import numpy as np, torch
    from PIL import Image
    import laclip
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "yellow")]
    captions = ["a red picture", "a green picture", "a blue picture", "a yellow picture"]
    model = laclip.build("tiny", captions=captions)   # rewrites: LLM rewrites of each caption
    opt = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    transform, rng = model.transform(train=True), np.random.default_rng(0)
    for step in range(20):
        samples = [transform({"image": i, "text": t, "rewrites": [t.replace("picture", "image")]}, rng) for i, t in zip(images, captions)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        loss = model.loss(model(batch))                  # exact over every rank under torch.distributed
        loss.backward(); opt.step(); opt.zero_grad(); model.after_step()
    print(model.classify(images, ["red", "green", "blue", "yellow"]))   # [4, 4] probabilities

The interface (train.py and data.py use nothing else; every model file implements it):
    build(size, ...) -> model                   from keywords; create(args, captions, extra) is train.py's
                                                thin layer over it, add_args(parser) its flags
    model.transform(train) -> f(sample, rng)    sample {'image': PIL image, 'text': str, 'rewrites': [str]} ->
                                                {'image': uint8 [3, H, W], 'text': token ids of one of its texts}
    model(batch) -> out                         batch: those dicts stacked; out: normalised 'image' and
                                                'text' features, 'scale' (the exp'd logit scale)
    model.loss(out) -> scalar                   InfoNCE (LaCLIP-MT: averaged over the text sets), exact over the
                                                global batch
    model.after_step()                          after each optimizer step: clamps the logit scale at 100
    model.optimizer_groups(weight_decay)        AdamW groups: decay on weight matrices only, none on biases,
                                                norms, embeddings and the logit scale; frozen parameters left out
    model.encode_texts(list_of_str) -> [N, D]   L2-normalised text features
    model.classify(images, labels) -> [N, C]    label probabilities for PIL images (softmax; SigLIP: sigmoid)
    model.extra_state() -> dict                 config, tokenizer and text sets, saved beside the weights
    model.shard_units() -> (blocks, towers)     residual blocks and towers: --fsdp shards each one,
                                                --grad-checkpointing recomputes each block in the backward
    zero_shot_classifier(model, classnames, templates), retrieval_metrics(image, text)
train.py's recipe around it (open_clip's): AdamW(optimizer_groups(0.2), lr 5e-4, betas (0.9, 0.98), eps 1e-6),
a linear warmup (10,000 steps, at most a tenth of the run) then cosine decay, the gradients' global norm
clipped at 1, after_step() after each step. The demo (--size tiny on the synthetic data) trains at lr 1e-3
with weight decay 0.1, as the loop above does.

Layout: the method (rewrite sampling, the multi-text loss, what LaCLIP changes in CLIP), building,
rewrite generation; then, behind banners, CLIP itself (model, loss, weights, export, predict,
tokenizer, the fused kernel) copied from clip.py, and the LaCLIP class that mixes the two.
"""

import argparse
import contextlib
import copy
import gzip
import html
import inspect
import io
import json
import math
import os
import re
import unicodedata
import sys
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


# ----------------------------------------------------------------------------------------------
# LaCLIP: CLIP whose text side sees LLM rewrites of each caption


class RewriteTransform:
    """Training sample -> inputs, the caption drawn uniformly among the original and its rewrites.

    The draw uses the sample's own rng (seed, epoch, index), so it does not depend on ranks or loader
    workers. A draw of fewer than 2 words falls back to the original, as the official code does. With
    sets (LaCLIP-MT) every text is kept: [original, rewrites...], padded with the original to `sets`.
    """

    def __init__(self, image_size, tokenizer, sets, mean, std, gpu_decode=False):
        self.image = ImageTransform(image_size, train=True, mean=mean, std=std, uint8=True, defer=gpu_decode)
        self.tokenizer, self.sets = tokenizer, sets

    def __call__(self, sample, rng):
        image = self.image(sample["image"], rng)  # the crop box first: every transform's first draw (distillation)
        original = sample["text"]
        texts = [original] + [r for r in sample.get("rewrites", ()) if r and r.strip()]
        if self.sets:
            texts = texts[: self.sets] + [original] * (self.sets - len(texts))
            tokens = self.tokenizer(texts)  # [sets, context]
        else:
            text = texts[int(rng.integers(len(texts)))]
            tokens = self.tokenizer([text if len(text.split()) >= 2 else original])[0]
        return {"image": image, "text": tokens}

    def finish(self, batch, device, notes=None):
        """The loader's batch on the device (under --gpu-decode its JPEGs are decoded there), its token
        ids cut after the batch's longest text on the CPU (trim_padding)."""
        if "text" in batch:
            batch = {**batch, "text": trim_padding(batch["text"])}
        return to_device(batch, device, self.image, notes)


def multi_text_loss(image_features, text_features, logit_scale, group=None):
    """LaCLIP-MT: each image is a positive for each of its M texts, text_features [B, M, D].

    The mean over the M text sets of CLIP's loss, each set against the images:
        sum(contrastive_loss(image_features, text_features[:, m], logit_scale) for m in range(M)) / M
    """
    sets = text_features.shape[1]
    return sum(contrastive_loss(image_features, text_features[:, m], logit_scale, group) for m in range(sets)) / sets


class LaCLIPMethod:
    """What LaCLIP changes in CLIP: its training texts come from RewriteTransform, and with text sets
    (LaCLIP-MT) the text features are [B, sets, D] and the loss is multi_text_loss. Evaluation uses the
    original captions. Mixed into the CLIP model (copied from clip.py below) as `class LaCLIP` at the
    end of this file, because CLIP is defined further down."""

    def __init__(self, cfg, tokenizer=None, text_sets=0):
        super().__init__(cfg, tokenizer)
        self.text_sets = text_sets

    def transform(self, train, gpu_decode=False):
        if not train:
            return super().transform(train, gpu_decode)
        t = RewriteTransform(self.cfg.image_size, self.tokenizer, self.text_sets, self.cfg.image_mean, self.cfg.image_std,
                             gpu_decode)
        if self.patch_dropout:
            t = PatchDropout(t, (self.cfg.image_size // self.cfg.patch_size) ** 2, self.patch_dropout)
        if self.teachers or self.distill_stored:
            t = DistillTransform(t, self.tokenizer, self.teachers, self.distill_stored)
        return t

    def forward(self, batch):
        if batch["text"].dim() == 2:
            return super().forward(batch)
        b, m, c = batch["text"].shape  # LaCLIP-MT: [B, sets, context] -> text features [B, sets, D]
        text = self.encode_text(batch["text"].reshape(b * m, c), normalize=True).view(b, m, -1)
        return {"image": self.encode_image(batch["image"], normalize=True, keep=batch.get("patch_keep")), "text": text,
                "scale": self.logit_scale.exp()}

    def loss(self, out):
        if out["text"].dim() == 3:
            return multi_text_loss(out["image"], out["text"], out["scale"])
        return super().loss(out)  # CLIP's: InfoNCE, or the sigmoid loss

    def extra_state(self):
        return {**super().extra_state(), "text_sets": self.text_sets}


# ----------------------------------------------------------------------------------------------
# Building a model for train.py


def add_args(parser):
    add_clip_args(parser)
    parser.add_argument("--multi-text", action="store_true",
                        help="LaCLIP-MT: each image is a positive for all its texts; the loss averages over them")
    parser.add_argument("--max-rewrites", type=int, default=4, help="with --multi-text: rewrites used per caption")


def build(size="ViT-B-32", tokenizer=None, captions=(), init=None, quick_gelu=None, lock_image=False,
          lock_image_unlocked_layers=0, lock_text=False, lock_text_unlocked_layers=0, text_sets=0, patch_dropout=0.0,
          loss=None, extra=None):
    """A LaCLIP from keywords, as clip.build; text_sets > 0 is LaCLIP-MT with that many texts per image."""
    if extra is not None:
        text_sets = extra.get("text_sets", 0)
    cfg, tok, weights = config_and_tokenizer(size, tokenizer, captions, init, quick_gelu, extra, loss)
    if text_sets and cfg.loss == "sigmoid":
        raise ValueError("--multi-text is LaCLIP-MT's softmax loss over text sets; with --loss sigmoid leave it out")
    return start(LaCLIP(cfg, tok, text_sets), weights, lock_image, lock_image_unlocked_layers, lock_text,
                 lock_text_unlocked_layers, patch_dropout)


def create(args, captions=(), extra=None):
    sets = args.max_rewrites + 1 if getattr(args, "multi_text", False) else 0
    model = build(**build_kwargs(args), captions=captions, text_sets=sets, extra=extra)
    return add_teachers(add_adapters(model, args, extra), args)


# ----------------------------------------------------------------------------------------------
# Rewrite generation: `python laclip.py rewrite --captions IN.txt --out OUT.txt --endpoint URL`
#
# Drives any OpenAI-compatible completion server (llama.cpp's llama-server, vLLM, ...) with LaCLIP's
# in-context prompt: an instruction, three "source => target" examples drawn from a pool of meta
# pairs, then "caption =>"; the first generated line is the rewrite. Standard-library HTTP only.


PROMPT_HEAD = "write image captions differently,"
# Our own pool of 16 meta pairs (the paper's pairs came from chatbots and humans; any will do).
META_PAIRS = [
    ("a dog running on the beach", "a happy dog sprints along the sandy shore at low tide"),
    ("two people riding bicycles", "a pair of cyclists pedal side by side down a quiet road"),
    ("a plate of pasta with tomato sauce", "spaghetti covered in a rich red sauce served on a white dish"),
    ("a red car parked on the street", "a shiny red sedan sits by the curb of a city street"),
    ("a cat sleeping on a couch", "a tabby cat naps curled up on the soft cushions of a sofa"),
    ("mountains covered in snow", "snowy peaks rise above a valley under a clear blue sky"),
    ("a man playing guitar", "a musician strums an acoustic guitar on a small stage"),
    ("children playing in a park", "kids run and laugh together on the grass of a sunny park"),
    ("a bowl of fresh fruit", "apples, bananas and grapes piled high in a wooden bowl"),
    ("an airplane in the sky", "a passenger jet flies high above the clouds"),
    ("a city skyline at night", "tall buildings glow with lights against the dark evening sky"),
    ("a woman reading a book", "a young woman sits by the window absorbed in a novel"),
    ("a boat on a lake", "a small rowing boat floats on calm water surrounded by trees"),
    ("a bird on a branch", "a little songbird perches on a thin branch of a tree"),
    ("a cup of coffee on a table", "a steaming mug of coffee rests on a wooden cafe table"),
    ("a train at a station", "a long passenger train waits at the platform of a busy station"),
]


class RewriteError(Exception):
    pass


def rewrite_prompt(caption, pairs):
    return "\n".join([PROMPT_HEAD] + [f"{s} => {t}" for s, t in pairs] + [f"{caption} =>"])


def completions_url(endpoint):
    url = endpoint.rstrip("/")
    if url.endswith("/completions"):
        return url
    return url + ("/completions" if url.endswith("/v1") else "/v1/completions")


MAX_ANSWER_BYTES = 1 << 20  # a completion server's whole answer; more is a failed request
MAX_REWRITE_CHARS = 1000  # a rewrite is a caption: longer ones are cut at a word


def fold(text):
    """One line: every character str.splitlines splits on (\r, \x0b, \x0c, \x1c-\x1e, \x85, \u2028,
    \u2029, \n) becomes a space, so each caption's rewrite is exactly one line of the output."""
    text = " ".join(" ".join(text.splitlines()).split())
    text = text.encode("utf-8", "replace").decode("utf-8")  # an LLM's lone surrogate ("\ud800") becomes "?"
    if len(text) > MAX_REWRITE_CHARS:
        text = text[:MAX_REWRITE_CHARS].rsplit(" ", 1)[0]
    return text


def post_json(url, payload, timeout):
    """POST, then the JSON answer, all within `timeout` seconds: a watchdog shuts the socket at the
    deadline, so a server that drips its answer a byte at a time cannot hold a request past it."""
    import http.client
    import json
    import socket
    import threading
    import urllib.parse

    u = urllib.parse.urlsplit(url)
    conn_class = http.client.HTTPSConnection if u.scheme == "https" else http.client.HTTPConnection
    conn = conn_class(u.hostname, u.port, timeout=timeout)
    expired, opened = threading.Event(), []

    def cut():
        expired.set()
        for sock in opened:  # the response keeps reading from it after the connection object lets go
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    timer = threading.Timer(timeout, cut)
    timer.start()
    try:
        conn.connect()
        opened.append(conn.sock)
        if expired.is_set():
            cut()
        conn.request("POST", u.path + (f"?{u.query}" if u.query else ""), body=payload,
                     headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        body = response.read(MAX_ANSWER_BYTES + 1)
        status = response.status
    except (OSError, http.client.HTTPException) as e:
        raise TimeoutError(f"no whole answer within --timeout {timeout:g} s") if expired.is_set() else e
    finally:
        timer.cancel()
        conn.close()
    if expired.is_set():
        raise TimeoutError(f"no whole answer within --timeout {timeout:g} s")
    if status >= 400:
        return status, body[:300]
    if len(body) > MAX_ANSWER_BYTES:
        raise ValueError(f"an answer over {MAX_ANSWER_BYTES >> 20} MiB")
    try:
        return status, json.loads(body)
    except RecursionError:
        raise ValueError("an answer nested past the JSON parser's depth") from None


def request_rewrite(url, caption, pairs, args):
    """One rewrite, retried with exponential backoff on server errors, time-outs, refused connections and
    answers without text."""
    import http.client
    import json
    import time

    payload = json.dumps({"model": args.model, "prompt": rewrite_prompt(caption, pairs), "max_tokens": args.max_tokens,
                          "temperature": args.temperature, "top_p": args.top_p, "stop": ["\n"]}).encode()
    delay, error = args.backoff, None
    for attempt in range(args.retries + 1):
        if attempt:
            time.sleep(delay)
            delay = min(2 * delay, 60)
        try:
            status, answer = post_json(url, payload, args.timeout)
        except (OSError, http.client.HTTPException) as e:  # refused, reset, cut short, or past the deadline
            error = f"{type(e).__name__}: {e}"
            continue
        except ValueError as e:  # not JSON, or too long
            error = f"not an OpenAI-compatible answer ({str(e)[:100]})"
            continue
        if status >= 400:
            if status < 500 and status != 429:  # the request itself is wrong: retrying will not help
                raise RewriteError(f"{url} refused the request: HTTP {status} {answer!r}")
            error = f"HTTP {status}"
            continue
        try:
            text = answer["choices"][0]["text"]
        except (TypeError, KeyError, IndexError):
            text = None
        if not isinstance(text, str):  # {"text": null}, no choices, or another shape
            error = "an answer without choices[0].text"
            continue
        return fold(text.split("\n")[0])  # the first generated line (a server may ignore stop=["\n"])
    raise RewriteError(f"no usable answer from {url} after {args.retries + 1} tries (last: {error}). Is the completion "
                       f"server running (llama.cpp: llama-server -m MODEL.gguf --port 8080; vLLM: vllm serve MODEL)? "
                       f"Start it or fix --endpoint, then run the same command again: it continues where it stopped")


def read_lines(path):
    """The lines of a regular file (a FIFO would block, /dev/zero never end), split at \n only (a \u2028
    inside a caption is not a line break), each cut to 8192 characters as every caption is."""
    text = read_small_file(path, "text file", 1 << 30).decode("utf-8", "replace")
    return [(line[:-1] if line.endswith("\r") else line)[:MAX_TEXT_CHARS] for line in text.split("\n")]


def rewrite_main(argv=None):
    import argparse
    import random
    from concurrent.futures import ThreadPoolExecutor

    p = argparse.ArgumentParser(prog="laclip.py rewrite", description="Write LaCLIP caption rewrites with a local LLM.")
    p.add_argument("--captions", required=True, help="input: one caption per line")
    p.add_argument("--out", required=True, help="output: one rewrite per input line, in order (.K before the "
                   "extension per rewrite when --rewrites > 1: the official one-file-per-source layout)")
    p.add_argument("--endpoint", required=True, help="server URL, e.g. http://127.0.0.1:8080")
    p.add_argument("--model", default="default", help="model name sent to the server")
    p.add_argument("--meta-pairs", default=None, help="file of 'source => target' lines (default: built in)")
    p.add_argument("--rewrites", type=int, default=1, help="rewrites per caption")
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--seed", type=int, default=0, help="for drawing the 3 example pairs of each prompt")
    p.add_argument("--temperature", type=float, default=0.9)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-tokens", type=int, default=77)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request, the whole answer included")
    p.add_argument("--retries", type=int, default=5)
    p.add_argument("--backoff", type=float, default=1.0, help="first wait between tries, doubled each time")
    args = p.parse_args(argv)
    for name in ("rewrites", "concurrency", "max_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.retries < 0 or not args.timeout > 0 or args.backoff < 0:
        p.error("--retries and --backoff must be at least 0, --timeout above 0")
    for path in (args.captions, args.meta_pairs, *([args.out] if os.path.exists(args.out) else [])):
        if path and os.path.exists(path) and not os.path.isfile(path):
            raise SystemExit(f"laclip.py rewrite: {path}: not a regular file")
    if not os.path.isfile(args.captions):
        raise SystemExit(f"laclip.py rewrite: {args.captions}: no such file")
    captions = read_lines(args.captions)
    if captions and captions[-1] == "":
        captions.pop()
    pairs = META_PAIRS
    if args.meta_pairs:
        with open(args.meta_pairs, encoding="utf-8", errors="replace") as f:  # a regular file (checked above)
            pairs = [tuple(x.strip() for x in line.split("=>", 1)) for line in f if "=>" in line]
        if len(pairs) < 3:
            raise SystemExit(f"laclip.py rewrite: {args.meta_pairs}: needs at least 3 'source => target' lines")
    root, ext = os.path.splitext(args.out)
    outs = [args.out] if args.rewrites == 1 else [f"{root}.{k}{ext}" for k in range(args.rewrites)]
    # Resume: each output continues after the lines it has. Nothing is ever cut from a file: one that
    # does not fit these captions is refused, with what to do.
    have = []
    for path in outs:
        lines = read_lines(path) if os.path.exists(path) else [""]
        if lines[-1] != "":
            raise SystemExit(f"laclip.py rewrite: {path} ends in a partial line (a run stopped while writing it); "
                             f"delete that last line, then run the same command again")
        if len(lines) - 1 > len(captions):
            raise SystemExit(f"laclip.py rewrite: {path} has {len(lines) - 1} lines for {len(captions)} captions of "
                             f"{args.captions}: not its rewrites; move it away or pick another --out")
        have.append(len(lines) - 1)
    done = min(have)
    url = completions_url(args.endpoint)

    def job(item):
        i, k = item
        rng = random.Random(f"{args.seed}-{i}-{k}")
        text = request_rewrite(url, captions[i], rng.sample(pairs, 3), args)
        return text or fold(captions[i])  # an empty rewrite: keep the original rather than a blank line

    files = [open(path, "a", encoding="utf-8", newline="\n") for path in outs]
    pool = ThreadPoolExecutor(args.concurrency)
    try:
        for start in range(done, len(captions), 256):  # in chunks: results are written in input order
            rows = range(start, min(start + 256, len(captions)))
            items = [(i, k) for i in rows for k in range(args.rewrites) if i >= have[k]]
            results = pool.map(job, items)  # in the order of items, which is the order written
            for i in rows:
                for k, f in enumerate(files):
                    if i >= have[k]:
                        f.write(fold(next(results)) + "\n")
                for f in files:
                    f.flush()
    except RewriteError as e:
        raise SystemExit(f"laclip.py rewrite: {e}") from None
    finally:
        pool.shutdown(wait=False, cancel_futures=True)
        for f in files:
            f.close()
    print(f"{len(captions) - done} captions rewritten ({done} were already done) -> {', '.join(outs)}")


# ==== copied from clip.py: config (shared code, kept identical to clip.py's region) ====
MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI's normalisation, used by every CLIP checkpoint
STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class Config:
    embed_dim: int = 512
    image_size: int = 224
    patch_size: int = 32
    vision_width: int = 768
    vision_layers: int = 12
    vision_heads: int = 12
    context_length: int = 77
    vocab_size: int = 49408
    text_width: int = 512
    text_layers: int = 12
    text_heads: int = 8
    # OpenAI's released weights were trained with QuickGELU; new training uses exact GELU.
    quick_gelu: bool = False
    vision_mlp: int = 0  # MLP hidden width; 0: 4 x the tower's width
    text_mlp: int = 0
    ln_eps: float = 1e-5
    # The text's features are read at its end-of-text token: the first eos_id in the ids (transformers'
    # rule; tokens added to a vocabulary take ids above it), or with None the highest id (OpenAI's rule).
    eos_id: int = None
    # softmax: CLIP's InfoNCE; sigmoid: SigLIP's pairwise loss, which adds a learnt logit bias
    loss: str = "softmax"
    # The softmax loss's learnt logit scale at the start (exp'd); None: OpenAI's 1 / 0.07. SigLIP always
    # starts at 10, the scale its bias of -10 was chosen with.
    init_logit_scale: float = None
    image_mean: tuple = MEAN  # the preprocessing the weights expect
    image_std: tuple = STD

    def __post_init__(self):
        self.vision_mlp = self.vision_mlp or 4 * self.vision_width
        self.text_mlp = self.text_mlp or 4 * self.text_width
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)


CONFIGS = {
    # Small enough to train on two CPU cores in minutes on the synthetic data (vocab from the tokenizer).
    # 16 patches of 12 px, and a sharper starting temperature than OpenAI's: on the synthetic data the
    # image tower learns shape (beyond colour) sooner with both (docs/measurements.md, the default runs).
    "tiny": Config(embed_dim=128, image_size=48, patch_size=12, vision_width=128, vision_layers=4,
                   vision_heads=4, context_length=24, vocab_size=1024, text_width=128, text_layers=4,
                   text_heads=4, init_logit_scale=60.0),
    "ViT-B-32": Config(),
    "ViT-B-16": Config(patch_size=16),
    "ViT-L-14": Config(embed_dim=768, patch_size=14, vision_width=1024, vision_layers=24, vision_heads=16,
                       text_width=768, text_layers=12, text_heads=12),
    # LAION's large models, with open_clip's shapes (its model_configs/*.json of the same names).
    "ViT-H-14": Config(embed_dim=1024, patch_size=14, vision_width=1280, vision_layers=32, vision_heads=16,
                       text_width=1024, text_layers=24, text_heads=16),
    "ViT-g-14": Config(embed_dim=1024, patch_size=14, vision_width=1408, vision_layers=40, vision_heads=16,
                       vision_mlp=6144, text_width=1024, text_layers=24, text_heads=16),
    "ViT-bigG-14": Config(embed_dim=1280, patch_size=14, vision_width=1664, vision_layers=48, vision_heads=16,
                          vision_mlp=8192, text_width=1280, text_layers=32, text_heads=20),
}
# ==== end of copy: config ====


# ==== copied from clip.py: transformer (shared code, kept identical to clip.py's region) ====
class QuickGELU(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(1.702 * x)


class Attention(nn.Module):
    """Multi-head self-attention holding nn.MultiheadAttention's parameter names, run through SDPA."""

    def __init__(self, width, heads):
        super().__init__()
        if heads < 1 or width % heads:
            raise ValueError(f"{heads} attention heads do not divide the width {width}")
        self.heads = heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * width, width))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * width))
        self.out_proj = nn.Linear(width, width)
        self.lora = nn.ModuleDict()  # LoRA adapters of q, k, v, out (add_lora); none by default

    def forward(self, x, causal=False):
        b, n, w = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias)
        if len(self.lora):  # the fused projection's q, k and v rows each take their own adapter
            qkv = torch.cat([part + self.lora[p](x) if p in self.lora else part for p, part in zip("qkv", qkv.chunk(3, -1))], -1)
        q, k, v = qkv.view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, w)
        return self.out_proj(x) + self.lora["out"](x) if "out" in self.lora else self.out_proj(x)


class ResidualAttentionBlock(nn.Module):
    def __init__(self, width, heads, quick_gelu=False, mlp_width=None):
        super().__init__()
        mlp_width = mlp_width or 4 * width
        self.ln_1 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.ln_2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, mlp_width)),
            ("gelu", QuickGELU() if quick_gelu else nn.GELU()),
            ("c_proj", nn.Linear(mlp_width, width))]))
        self.lora = nn.ModuleDict()  # LoRA adapters of the MLP's c_fc and c_proj (add_lora); none by default

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        if not len(self.lora):
            return x + self.mlp(self.ln_2(x))
        h = self.ln_2(x)
        h = self.mlp.gelu(self.mlp.c_fc(h) + self.lora["c_fc"](h))
        return x + self.mlp.c_proj(h) + self.lora["c_proj"](h)


class Transformer(nn.Module):
    def __init__(self, width, layers, heads, quick_gelu=False, mlp_width=None):
        super().__init__()
        self.resblocks = nn.ModuleList([ResidualAttentionBlock(width, heads, quick_gelu, mlp_width) for _ in range(layers)])

    def forward(self, x, causal=False):
        for block in self.resblocks:
            x = block(x, causal)
        return x

    def init_weights(self, width, layers):
        # OpenAI's initialisation: residual projections shrink with depth so the stream's variance stays put.
        attn_std, proj_std, fc_std = width ** -0.5, width ** -0.5 * (2 * layers) ** -0.5, (2 * width) ** -0.5
        for block in self.resblocks:
            nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            nn.init.zeros_(block.attn.out_proj.bias)
            nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
# ==== end of copy: transformer ====


# ==== copied from clip.py: lora (shared code, kept identical to clip.py's region) ====
class LoRA(nn.Module):
    """A low-rank update beside a frozen linear map W (Hu et al. 2021): the layer computes W x + (alpha / rank)
    B A x. A [rank, in] starts as peft's (Kaiming-uniform), B [out, rank] at zero: fresh adapters change
    nothing, so step 0 is the base model."""

    def __init__(self, d_in, d_out, rank, alpha, dropout=0.0):
        super().__init__()
        self.A = nn.Parameter(torch.empty(rank, d_in))
        self.B = nn.Parameter(torch.zeros(d_out, rank))
        nn.init.kaiming_uniform_(self.A, a=math.sqrt(5))
        self.scaling, self.dropout = alpha / rank, dropout

    def forward(self, x):
        return F.linear(F.linear(F.dropout(x, self.dropout, self.training), self.A), self.B) * self.scaling


LORA_TARGETS = ("q", "k", "v", "out", "mlp")  # attention's projections; mlp: both of the MLP's layers


def lora_spec(rank, alpha=None, targets=("q", "v"), dropout=0.0, towers=None, train_scale=False):
    """The adapters' settings, checked (they come from flags, or from a checkpoint that may come from anywhere)."""
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


def add_lora(blocks, spec, linears=None):
    """Adapters on the targeted projections of each residual block, on the block's device. A tower of
    other blocks (altclip's XLM-R) names its nn.Linear layers per target, linears(block) -> {target: [...]},
    and each takes an adapter through a forward hook (add_linear_lora)."""
    for block in blocks:
        if linears is not None:
            for t in spec["targets"]:
                for linear in linears(block)[t]:
                    add_linear_lora(linear, spec)
            continue
        w, hidden = block.attn.out_proj.in_features, block.mlp.c_fc.out_features
        new = lambda d_in, d_out: LoRA(d_in, d_out, spec["rank"], spec["alpha"], spec["dropout"]).to(  # noqa: E731
            block.attn.in_proj_weight.device)
        for t in spec["targets"]:
            if t == "mlp":
                block.lora["c_fc"], block.lora["c_proj"] = new(w, hidden), new(hidden, w)
            else:
                block.attn.lora[t] = new(w, w)


def add_linear_lora(linear, spec):
    """An adapter on a plain nn.Linear: its child `lora`, added to the layer's output by a forward hook."""
    linear.lora = LoRA(linear.in_features, linear.out_features, spec["rank"], spec["alpha"], spec["dropout"]).to(
        linear.weight.device)
    linear.lora_hook = linear.register_forward_hook(_linear_lora_hook)


def _linear_lora_hook(linear, inputs, output):
    return output + linear.lora(inputs[0])


def saved_lora_spec(extra, where):
    """The LoRA settings a checkpoint's extra state records, checked; None for a checkpoint without adapters."""
    if extra.get("lora") is None:
        return None
    if not isinstance(extra["lora"], dict):
        raise ValueError(f"{where}: its LoRA settings are not a dict")
    return lora_spec(**extra["lora"])


def attach_lora(model, towers, spec, scalars=(), linears=None):
    """model.add_lora's work, for any model whose towers ({name: residual blocks}) are these blocks: freeze
    every weight, add the adapters, unfreeze the scalars (with spec's train_scale); the spec, its towers
    filled in, is returned for model.lora_spec. linears: {tower: f(block) -> {target: [nn.Linear]}} for
    towers of other blocks (add_lora)."""
    unlocked = [t for t, blocks in towers.items() if any(p.requires_grad for p in blocks.parameters())]
    chosen = spec["towers"] or unlocked
    if not chosen or set(chosen) - set(towers):
        raise ValueError(f"LoRA towers {','.join(map(str, chosen))}: choose among {','.join(towers)}")
    spec = {**spec, "towers": [t for t in towers if t in chosen]}
    if set(spec["towers"]) - set(unlocked):
        raise ValueError(f"the {','.join(sorted(set(spec['towers']) - set(unlocked)))} tower is locked (LiT): "
                         f"leave it out of the LoRA towers")
    if getattr(model, "lora_spec", None) is not None:
        raise ValueError("this model has adapters already: merge_lora() first")
    model.lora_trainable = {n for n, p in model.named_parameters() if p.requires_grad}  # merge_lora gives them back
    model.requires_grad_(False)
    for t in spec["towers"]:
        add_lora(towers[t], spec, (linears or {}).get(t))
    for scalar in scalars if spec["train_scale"] else ():
        if scalar is not None:
            scalar.requires_grad_(True)
    return spec


@torch.no_grad()
def merge_lora(model):
    """The adapters folded into the weights (W + (alpha / rank) B A) and removed: a plain model again, each
    weight as trainable as it was before attach_lora (LiT-locked ones stay frozen)."""
    if getattr(model, "lora_spec", None) is None:
        return model
    sd = merge_lora_weights(model.state_dict(), model.lora_spec)
    for m in model.modules():
        if isinstance(getattr(m, "lora", None), nn.ModuleDict):
            m.lora = nn.ModuleDict()
        elif isinstance(getattr(m, "lora", None), LoRA):  # on a plain nn.Linear (add_linear_lora)
            m.lora_hook.remove()
            del m.lora, m.lora_hook
    model.load_state_dict(sd)
    trainable = getattr(model, "lora_trainable", None)
    for name, p in model.named_parameters():
        p.requires_grad_(trainable is None or name in trainable)
    model.lora_spec = None
    return model


def add_lora_args(parser):
    """train.py's LoRA flags (every model file whose towers are these blocks)."""
    parser.add_argument("--lora", type=int, default=0, metavar="RANK",
                        help="LoRA: freeze the weights, train low-rank adapters of this rank (0: off)")
    parser.add_argument("--lora-alpha", type=float, default=None, help="adapters scaled by alpha / rank (default: rank)")
    parser.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the adapters' inputs")
    parser.add_argument("--lora-targets", default="q,v",
                        help="projections adapted, comma-separated among q,k,v,out,mlp (default q,v, as peft users do)")
    parser.add_argument("--lora-towers", default=None,
                        help="towers adapted, comma-separated (default: every tower LiT leaves unlocked)")
    parser.add_argument("--lora-train-scale", action="store_true", help="with --lora: the logit scale trains too")


def add_adapters(model, args, extra=None):
    """--lora: model.add_lora with the flags' settings (after --init's weights and the LiT locks). A resumed
    run's adapters are the ones its checkpoint records, whatever the flags say."""
    spec = saved_lora_spec(extra, "the checkpoint") if extra is not None else None
    if spec:
        return model.add_lora(**spec)
    rank = getattr(args, "lora", 0)
    if not rank:
        return model
    if getattr(args, "lock_image_unlocked_layers", 0) or getattr(args, "lock_text_unlocked_layers", 0):
        raise ValueError("--lora freezes every weight: --lock-*-unlocked-layers has nothing to unlock; drop it")
    split = lambda v: [x.strip() for x in v.split(",") if x.strip()] if v else None  # noqa: E731
    return model.add_lora(rank, args.lora_alpha, split(args.lora_targets), split(args.lora_towers), args.lora_dropout,
                          args.lora_train_scale)


def merge_lora_weights(sd, spec):
    """A state dict with adapters as the plain one of the merged weights, W + (alpha / rank) B A each."""
    sd, scaling = dict(sd), spec["alpha"] / spec["rank"]
    for key in [k for k in sd if re.search(r"\.lora(\.\w+)?\.A$", k)]:
        stem, part = re.match(r"(.*)\.lora(?:\.(\w+))?\.A$", key).groups()
        delta = (sd.pop(key[:-1] + "B").float() @ sd.pop(key).float()) * scaling
        if part is None:  # an adapter on a plain nn.Linear
            sd[f"{stem}.weight"] = sd[f"{stem}.weight"] + delta.to(sd[f"{stem}.weight"].dtype)
        elif part in ("q", "k", "v"):
            w = sd[f"{stem}.in_proj_weight"].clone()
            i = "qkv".index(part) * (w.shape[0] // 3)
            w[i:i + w.shape[0] // 3] += delta.to(w.dtype)
            sd[f"{stem}.in_proj_weight"] = w
        else:
            name = {"out": "out_proj", "c_fc": "mlp.c_fc", "c_proj": "mlp.c_proj"}[part]
            sd[f"{stem}.{name}.weight"] = sd[f"{stem}.{name}.weight"] + delta.to(sd[f"{stem}.{name}.weight"].dtype)
    return sd
# ==== end of copy: lora ====


# ==== copied from clip.py: vision (shared code, kept identical to clip.py's region) ====
def freeze(head, blocks, tail, unlocked_layers=0):
    """Freeze a tower's parts (LiT) but its last `unlocked_layers` blocks and, if any block stays
    trainable, the tail after them. Returns the frozen modules, which the model keeps in eval mode."""
    if not 0 <= unlocked_layers <= len(blocks):
        raise ValueError(f"unlocked layers must be from 0 to {len(blocks)} (the tower's blocks), not {unlocked_layers}")
    parts = list(head) + list(blocks)[:len(blocks) - unlocked_layers] + (list(tail) if unlocked_layers == 0 else [])
    for part in parts:
        part.requires_grad_(False)
    return [part for part in parts if isinstance(part, nn.Module)]


class VisionTransformer(nn.Module):
    def __init__(self, image_size, patch_size, width, layers, heads, embed_dim, quick_gelu=False, mlp_width=None):
        super().__init__()
        scale = width ** -0.5
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn((image_size // patch_size) ** 2 + 1, width))
        self.ln_pre = nn.LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, quick_gelu, mlp_width)
        self.ln_post = nn.LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, embed_dim))
        self.transformer.init_weights(width, layers)

    def forward(self, x, keep=None):
        x = self.conv1(x).flatten(2).transpose(1, 2)  # [B, grid*grid, width]
        pos = self.positional_embedding.to(x.dtype)
        x = x + pos[1:]
        if keep is not None:  # patch dropout: the kept patches, their positions already added
            x = keep_patches(x, keep)
        cls = (self.class_embedding.to(x.dtype) + pos[0]).expand(x.shape[0], 1, -1)
        x = self.transformer(self.ln_pre(torch.cat([cls, x], dim=1)))
        return self.ln_post(x[:, 0]) @ self.proj
# ==== end of copy: vision ====


# ==== copied from clip.py: patch-dropout (shared code, kept identical to clip.py's region) ====
class PatchDropout:
    """FLIP's patch dropout (Li et al. 2023): in training each image keeps a random round((1 - ratio) * N)
    of its N patch tokens, and the image tower runs on those alone (cheaper in proportion). The transform
    draws them from the sample's own rng, after every other draw, so the kept patches depend only on
    (seed, epoch, sample) as every other choice does: ranks, loader workers, --accum replays and resumes
    all see the same ones. Wraps a model's training transform; the batch carries them as 'patch_keep'."""

    def __init__(self, transform, patches, ratio):  # ratio checked where the model was built
        self.transform, self.patches, self.keep = transform, patches, max(1, round((1 - ratio) * patches))

    def __call__(self, sample, rng):
        out = self.transform(sample, rng)
        out["patch_keep"] = torch.from_numpy(np.sort(rng.permutation(self.patches)[:self.keep]))
        return out

    def finish(self, batch, device, notes=None):
        return self.transform.finish(batch, device, notes)


def keep_patches(x, keep):
    """x [B, N, W] -> [B, K, W]: the patches that keep [B, K] names."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
# ==== end of copy: patch-dropout ====


# ==== copied from clip.py: model (shared code, kept identical to clip.py's region) ====
class CLIP(nn.Module):
    def __init__(self, cfg: Config, tokenizer=None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.visual = VisionTransformer(cfg.image_size, cfg.patch_size, cfg.vision_width, cfg.vision_layers,
                                        cfg.vision_heads, cfg.embed_dim, cfg.quick_gelu, cfg.vision_mlp)
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.text_width)
        self.positional_embedding = nn.Parameter(torch.empty(cfg.context_length, cfg.text_width))
        self.transformer = Transformer(cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.quick_gelu, cfg.text_mlp)
        self.ln_final = nn.LayerNorm(cfg.text_width)
        self.text_projection = nn.Parameter(torch.empty(cfg.text_width, cfg.embed_dim))
        if cfg.loss not in ("softmax", "sigmoid"):
            raise ValueError(f"loss {cfg.loss!r}: choose softmax (CLIP) or sigmoid (SigLIP)")
        # SigLIP starts its temperature at 10 and its bias at -10: nearly every pair is a negative, and
        # sigmoid(-10) starts them all near their target (Zhai et al. 2023).
        sigmoid = cfg.loss == "sigmoid"
        self.logit_scale = nn.Parameter(torch.tensor(math.log(10.0 if sigmoid else cfg.init_logit_scale or 1 / 0.07)))
        self.logit_bias = nn.Parameter(torch.tensor(-10.0)) if sigmoid else None
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.positional_embedding, std=0.01)
        nn.init.normal_(self.text_projection, std=cfg.text_width ** -0.5)
        self.transformer.init_weights(cfg.text_width, cfg.text_layers)
        for m in self.modules():
            if isinstance(m, nn.LayerNorm):
                m.eps = cfg.ln_eps
        self.locked = []  # modules frozen by lock(): they stay in eval mode
        self.patch_dropout = 0.0  # training's share of image patches dropped (FLIP); build() sets it
        self.teachers, self.distill_weight, self.distill_stored, self.distill_icl = [], 1.0, False, 1.0  # distill() sets them
        self.lora_spec = None  # add_lora() sets it

    def lock(self, image=False, text=False, image_unlocked_layers=0, text_unlocked_layers=0):
        """LiT (open_clip's --lock-image / --lock-text): a locked tower gets no gradient and no optimizer
        state and runs in eval mode, except its last N residual blocks and the layers after them."""
        v = self.visual
        if image:
            self.locked += freeze([v.conv1, v.class_embedding, v.positional_embedding, v.ln_pre],
                                  v.transformer.resblocks, [v.ln_post, v.proj], image_unlocked_layers)
        if text:
            self.locked += freeze([self.token_embedding, self.positional_embedding],
                                  self.transformer.resblocks, [self.ln_final, self.text_projection], text_unlocked_layers)
        return self.train(self.training)

    def train(self, mode=True):
        super().train(mode)
        for m in self.locked:
            m.eval()
        return self

    def towers(self):
        return {"image": self.visual.transformer.resblocks, "text": self.transformer.resblocks}

    def add_lora(self, rank, alpha=None, targets=("q", "v"), towers=None, dropout=0.0, train_scale=False):
        """LoRA fine-tuning (attach_lora): every weight frozen, adapters on the targeted projections (q, k,
        v, out, mlp) of each block of the towers (default: those LiT leaves unlocked); optimizer_groups
        then holds the adapters alone (and the logit scale and bias with train_scale). extra_state()
        records the settings: load() of the checkpoint merges the adapters in; merge_lora() does it here."""
        spec = lora_spec(rank, alpha, targets, dropout, towers, train_scale)
        self.lora_spec = attach_lora(self, self.towers(), spec, (self.logit_scale, self.logit_bias))
        return self

    def merge_lora(self):
        return merge_lora(self)

    def encode_image(self, images, normalize=False, keep=None):
        x = self.visual(normalize_pixels(images, self.cfg.image_mean, self.cfg.image_std), keep)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, tokens, normalize=False):
        # tokens may stop short of the context (trim_padding cuts the padding after a batch's longest
        # text on the CPU, before the batch reaches the device): the positions are those of the start.
        end = tokens.argmax(-1) if self.cfg.eos_id is None else (tokens == self.cfg.eos_id).int().argmax(-1)
        x = self.token_embedding(tokens) + self.positional_embedding[: tokens.shape[1]]
        x = self.ln_final(self.transformer(x, causal=True))
        x = x[torch.arange(x.shape[0], device=x.device), end] @ self.text_projection
        return F.normalize(x, dim=-1) if normalize else x

    def forward(self, batch):
        out = {"image": self.encode_image(batch["image"], normalize=True, keep=batch.get("patch_keep")),
               "text": self.encode_text(batch["text"], normalize=True),
               "scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["bias"] = self.logit_bias
        if "teacher0_pixels" in batch or "teacher0_image" in batch:  # a training batch of a distilled run
            out.update(self.teacher_features(batch))
        return out

    def loss(self, out):
        if "bias" in out:
            loss = sigmoid_loss(out["image"], out["text"], out["scale"], out["bias"])
        else:
            loss = contrastive_loss(out["image"], out["text"], out["scale"])
        if "teacher0_image" in out:  # open_clip's sum: contrastive + weight x distillation (teachers frozen)
            m = range(sum(1 for k in out if k.endswith("_image") and k.startswith("teacher")))
            u, w, t = ([out[f"teacher{i}_{k}"].detach() for i in m] for k in ("image", "text", "scale"))
            b = [out[f"teacher{i}_bias"].detach() if f"teacher{i}_bias" in out else None for i in m]
            if "bias" in out:
                d = distill_sigmoid_loss(out["image"], out["text"], out["scale"], out["bias"], u, w, t, b)
            else:
                d = distill_loss(out["image"], out["text"], out["scale"], u, w, t)
            loss = loss + self.distill_weight * d
            # CLIP-KD's interactive contrastive term (Yang et al. 2024): each student tower against the other
            # tower's teacher features, with the student's own loss; teachers of another width have none.
            same = [(ut, wt) for ut, wt in zip(u, w) if ut.shape[1] == out["image"].shape[1]]
            if self.distill_icl and same:
                pair = ((lambda a, b: sigmoid_loss(a, b, out["scale"], out["bias"])) if "bias" in out
                        else (lambda a, b: contrastive_loss(a, b, out["scale"])))
                icl = sum(pair(out["image"], wt) + pair(ut, out["text"]) for ut, wt in same) / (2 * len(same))
                loss = loss + self.distill_icl * icl
        return loss

    def distill(self, teachers=(), weight=1.0, stored=False, icl=1.0):
        """Train against teachers (open_clip's --distill-model; MobileCLIP's ensemble and stored teachers):
        the loss adds weight x distill_loss (distill_sigmoid_loss for a SigLIP student) against their
        features, and icl x CLIP-KD's interactive contrastive term (the student's images against a
        teacher's texts and its texts against the teacher's images; for teachers of the student's width).
        icl=0 is open_clip's sum. teachers: CLIP models (load() reads any weights), frozen, in eval mode,
        kept out of this module's parameters (not trained, saved or sharded); each sees the student's crop
        at its own input size and normalisation and the caption through its own tokenizer. stored: no
        teacher runs; the features come with the data (clip.py reinforce writes them, data.py reads them)."""
        for t in teachers:
            if t.tokenizer is None:
                raise ValueError("a teacher without its tokenizer cannot read the captions: load it with tokenizer=")
            t.requires_grad_(False).eval()
        self.teachers, self.distill_weight, self.distill_stored = list(teachers), float(weight), bool(stored)
        self.distill_icl = float(icl)
        return self

    @torch.no_grad()
    def teacher_features(self, batch):
        """teacher{m}_image, _text (features), _scale and, for a SigLIP teacher, _bias, per teacher m: stored
        in the batch, or made by the teachers from their own inputs on this model's device, in the run's
        precision. Flat keys: train.py's --accum gathers an out's tensors key by key."""
        out, device = {}, self.logit_scale.device
        for m in range(len(self.teachers) or 16):  # stored: data.py reads at most 16 teachers
            if f"teacher{m}_image" in batch:  # stored: one scale and bias a teacher, repeated in each sample
                features = (batch[f"teacher{m}_image"], batch[f"teacher{m}_text"], batch[f"teacher{m}_scale"][0],
                            batch[f"teacher{m}_bias"][0])
            elif f"teacher{m}_pixels" in batch:
                t = self.teachers[m]
                if t.logit_scale.device != device:
                    t.to(device)
                features = (t.encode_image(batch[f"teacher{m}_pixels"], normalize=True),
                            t.encode_text(batch[f"teacher{m}_tokens"], normalize=True), t.logit_scale.exp(), t.logit_bias)
            else:
                break
            for key, value in zip(("image", "text", "scale", "bias"), features):
                if value is not None:
                    out[f"teacher{m}_{key}"] = value
        return out

    @torch.no_grad()
    def after_step(self):
        self.logit_scale.clamp_(0, math.log(100))

    def transform(self, train, gpu_decode=False):
        t = Transform(self.cfg.image_size, self.tokenizer, train, self.cfg.image_mean, self.cfg.image_std, gpu_decode)
        if train and self.patch_dropout:
            t = PatchDropout(t, (self.cfg.image_size // self.cfg.patch_size) ** 2, self.patch_dropout)
        if train and (self.teachers or self.distill_stored):
            t = DistillTransform(t, self.tokenizer, self.teachers, self.distill_stored)
        return t

    def preprocess(self):
        """PIL image -> normalised tensor, as the weights expect it (resize the short side, centre crop)."""
        return ImageTransform(self.cfg.image_size, train=False, mean=self.cfg.image_mean, std=self.cfg.image_std)

    def classify(self, images, labels):
        """[N, C] probabilities of C label texts for N PIL images (label_probs: softmax, or sigmoid)."""
        return label_probs(self, images, labels)

    def encode_texts(self, texts):
        device = self.logit_scale.device
        return self.encode_text(trim_padding(self.tokenizer(texts)).to(device), normalize=True)

    def extra_state(self):
        extra = {"config": asdict(self.cfg), "tokenizer": self.tokenizer.to_str() if self.tokenizer else None}
        return {**extra, "lora": self.lora_spec} if self.lora_spec else extra

    def optimizer_groups(self, weight_decay):
        return adamw_groups(self, weight_decay)

    def shard_units(self):
        # The text tower's embeddings, final norm and projection stay with the root, as the logit scale.
        return [*self.visual.transformer.resblocks, *self.transformer.resblocks], [self.visual, self.transformer]


class Transform:
    """One sample (image, caption) -> model inputs (uint8 pixels, token ids); runs in the loader workers,
    so it is picklable."""

    def __init__(self, image_size, tokenizer, train, mean=MEAN, std=STD, gpu_decode=False):
        self.image = ImageTransform(image_size, train, mean=mean, std=std, uint8=True, defer=gpu_decode)
        self.tokenizer = tokenizer

    def __call__(self, sample, rng):
        return {"image": self.image(sample["image"], rng), "text": self.tokenizer([sample["text"]])[0]}

    def finish(self, batch, device, notes=None):
        """The loader's batch on the device (under --gpu-decode its JPEGs are decoded there), its token
        ids first cut after the batch's longest text while they are on the CPU (trim_padding)."""
        if "text" in batch:
            batch = {**batch, "text": trim_padding(batch["text"])}
        return to_device(batch, device, self.image, notes)


class DistillTransform:
    """A training sample's inputs for distillation: the student's (from `inner`), and for teacher m either
    teacher{m}_pixels and teacher{m}_tokens (online: the crop the student draws, cut from the image at
    the teacher's input size; the student's caption through the teacher's tokenizer) or, stored,
    teacher{m}_image / _text / _scale / _bias (the embeddings clip.py reinforce wrote for this crop and
    this caption). A transform's crop box is the first draw from the sample's rng, so a copy of the rng
    draws the student's box; every later draw (the text, the patches) is the student's alone."""

    def __init__(self, inner, tokenizer, teachers=(), stored=False):
        self.inner, self.tokenizer, self.stored = inner, tokenizer, stored
        self.views = [(ImageTransform(t.cfg.image_size, train=True, mean=t.cfg.image_mean, std=t.cfg.image_std,
                                      uint8=True, draft=False), t.tokenizer) for t in teachers]

    def __call__(self, sample, rng):
        pixels = [view(teacher_image(sample["image"]), copy.deepcopy(rng)) for view, _ in self.views]
        out = self.inner(sample, rng)
        texts = [sample["text"], *(r for r in sample.get("rewrites", ()) if r and r.strip())]
        # the caption the student got (LaCLIP draws one of the rewrites): the first text it tokenizes as
        pick = next((i for i, text in enumerate(texts) if torch.equal(self.tokenizer([text])[0], out["text"])), 0)
        if self.stored:
            out.update(stored_teacher(sample, pick))
            # every batch the same teachers: the first sample's count, widths, scales and biases
            spec = [(tuple(v.shape), float(v)) if v.dim() == 0 else tuple(v.shape) for k, v in sorted(out.items())
                    if k.startswith("teacher")]
            self.spec = getattr(self, "spec", None) or spec
            if spec != self.spec:
                raise StoredTeacherMismatch("--distill stored: a sample's teachers (their number, width, scale or "
                                            "bias) differ from the first sample's")
        for m, ((_, tokenizer), x) in enumerate(zip(self.views, pixels)):
            out[f"teacher{m}_pixels"], out[f"teacher{m}_tokens"] = x, tokenizer([texts[pick]])[0]
        return out

    def finish(self, batch, device, notes=None):
        batch = {k: trim_padding(v) if k.endswith("_tokens") else v for k, v in batch.items()}
        return self.inner.finish(batch, device, notes)


class StoredTeacherMismatch(ValueError):
    reason = "bad teacher data"  # what data.py counts the skipped sample under


def teacher_image(img):
    """The sample's image as the teachers read it: a file's bytes opened afresh (the student's transform
    may decode its own copy at a reduced JPEG draft size), an image in memory as it is."""
    if getattr(img, "encoded", None) is None:
        return img
    from PIL import Image

    fresh = Image.open(io.BytesIO(img.encoded))
    fresh.source, fresh.encoded = getattr(img, "source", "image"), img.encoded
    return fresh


def stored_teacher(sample, pick):
    """The stored teachers' features of this sample's crop (data.py says which of the K) and caption."""
    stored = sample.get("teacher")
    if not stored:
        raise ValueError("--distill stored: the sample carries no teacher embeddings (write them with python "
                         "clip.py reinforce --teacher T --data D --out O, and train on O)")
    out, k = {}, stored["augmentation"]
    for m, (e, scale, bias) in enumerate(zip(stored["embeddings"], stored["scales"], stored["biases"])):
        out[f"teacher{m}_image"] = torch.from_numpy(e[k].copy())
        out[f"teacher{m}_text"] = torch.from_numpy(e[stored["augmentations"] + pick].copy())
        out[f"teacher{m}_scale"] = torch.tensor(scale, dtype=torch.float32)
        out[f"teacher{m}_bias"] = torch.tensor(bias, dtype=torch.float32)
    return out


def trim_padding(tokens):
    """Token ids [..., context] cut after the last column that is not padding (pad id 0) in any row.
    The attention is causal, so what follows a text changes none of its features; cut on the CPU, as
    the loader hands the batch over, a step never waits on the device to learn the length (under
    torch.compile the length then varies by batch: a dynamic dimension)."""
    kept = tokens.reshape(-1, tokens.shape[-1]).ne(0).any(0).nonzero()
    return tokens[..., : int(kept[-1]) + 1] if len(kept) else tokens[..., :1]
# ==== end of copy: model ====


# ==== copied from clip.py: loss (shared code, kept identical to clip.py's region) ====
def contrastive_loss(image_features, text_features, logit_scale, group=None):
    """Symmetric InfoNCE over the global batch (open_clip's meaning: logit_scale is already exp'd).

    On one process it equals the naive form, which holds the whole B x B logit matrix:
        logits = logit_scale * image_features @ text_features.T
        labels = torch.arange(len(logits))
        (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    Here each rank computes its own image rows against the texts of all ranks (gathered with
    gradient); the text -> image direction reuses the same tiles, its column statistics combined
    across ranks. Every rank must pass the same number of rows.
    """
    text_features, pos = gather_texts(image_features, text_features, group)
    return infonce(image_features, text_features, logit_scale, pos, True, group)


def sigmoid_loss(image_features, text_features, logit_scale, logit_bias, group=None):
    """SigLIP's pairwise sigmoid loss over the global batch (Zhai et al. 2023; open_clip's SigLipLoss
    normalisation: the sum over every image-text pair, divided by the images of the batch).

    On one process it equals the naive form, which holds the whole B x B logit matrix:
        logits = logit_scale * image_features @ text_features.T + logit_bias
        labels = 2 * torch.eye(len(logits)) - 1          # +1 for the pair, -1 otherwise
        -F.logsigmoid(labels * logits).sum() / len(logits)
    Every pair's term stands alone, so the sum splits into softplus(logit) over all pairs, as if every
    pair were negative, less each positive's logit (-log sigmoid(u) = softplus(u) - u): the first part
    is sigmoid_tiles' row sums, the second a dot product per row. Each rank takes its own images
    against the texts of every rank (gathered with gradient); under DDP's gradient averaging the result
    is the exact gradient of the global mean. Every rank must pass the same number of rows.
    """
    text_features, pos = gather_texts(image_features, text_features, group)
    # rows averaged below: every row's gradient is the same, so the op may make the gradients in its forward
    eager = torch.is_grad_enabled() and any(t.requires_grad for t in (image_features, text_features, logit_scale, logit_bias))
    rows = sigmoid_tiles(image_features, text_features, logit_scale, logit_bias, eager)[0]
    pos_logit = ((image_features * text_features.index_select(0, pos)).sum(1).to(rows.dtype) * logit_scale.to(rows.dtype)
                 + logit_bias.to(rows.dtype))
    return (rows - pos_logit).mean()


def infonce(x, y, logit_scale, pos, two_way=False, group=None):
    """Mean over the rows of x of InfoNCE against the keys y; row i's positive is column pos[i].

    Rows only (two_way=False): y is any key set (pass it detached for no gradient to the keys).
    two_way also takes the column direction: y must then be the gather of every rank's equal-sized
    shard and pos this rank's columns; column statistics are combined across ranks. Under DDP's
    gradient averaging the result is the exact gradient of the global mean.
    """
    row, col = lse_tiles(x, y, logit_scale, two_way)
    # index_select, not y[pos]: its backward adds rows in place where indexing's sorts the indices
    pos_logit = (x * y.index_select(0, pos)).sum(1).to(row.dtype) * logit_scale.to(row.dtype)
    loss = row - pos_logit
    if two_way:
        loss = (loss + global_logsumexp(col, group).index_select(0, pos) - pos_logit) / 2
    return loss.mean()


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


def gather_texts(image_features, text_features, group=None):
    """(every rank's texts, gathered with gradient; the columns of this rank's positives among them)."""
    n, offset = image_features.shape[0], 0
    if _distributed(group):
        text_features = all_gather_with_grad(text_features, group)
        if text_features.shape[0] != n * dist.get_world_size(group):
            raise ValueError("the loss needs the same batch size on every rank")
        offset = dist.get_rank(group) * n
    return text_features, torch.arange(offset, offset + n, device=image_features.device)


def _distributed(group):
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def all_gather_with_grad(x, group=None):
    return _AllGather.apply(x, group) if _distributed(group) else x


def global_logsumexp(lse, group=None):
    """Combine per-rank log-sum-exp vectors into the global one: O(len) traffic, differentiable."""
    if not _distributed(group):
        return lse
    top = lse.detach().clone()
    dist.all_reduce(top, op=dist.ReduceOp.MAX, group=group)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    return _AllReduceSum.apply(torch.exp(lse - top), group).log() + top


class _AllGather(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient into the rows this rank owns."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        rank, world = dist.get_rank(ctx.group), dist.get_world_size(ctx.group)
        n = grad.shape[0] // world
        if dist.get_backend(ctx.group) == "nccl":
            out = grad.new_empty(n, *grad.shape[1:])
            dist.reduce_scatter_tensor(out, grad.contiguous(), group=ctx.group)
            return out, None
        grad = grad.contiguous().clone()  # gloo has no reduce_scatter
        dist.all_reduce(grad, group=ctx.group)
        return grad[rank * n:(rank + 1) * n], None


class _AllReduceSum(torch.autograd.Function):
    """Sum over ranks; every rank's loss depends on the sum, so the backward sums the gradients too."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None
# ==== end of copy: loss ====


# ==== copied from clip.py: optimizer (shared code, kept identical to clip.py's region) ====
def adamw_groups(model, weight_decay):
    """The AdamW parameter groups of the recipe (open_clip's rule): weight decay on weight matrices only,
    none on biases, norms, embeddings and 0-d scalars (the logit scale and bias); parameters that do not
    train (LiT locks, a frozen tower) left out. train.py then runs
        torch.optim.AdamW(groups, lr=5e-4, betas=(0.9, 0.98), eps=1e-6)   # weight_decay 0.2
    with a linear warm-up and a cosine decay, clips the gradients' global norm at 1, and calls
    model.after_step() after each step (the logit scale's clamp)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
# ==== end of copy: optimizer ====


# ==== copied from clip.py: image-transform (shared code, kept identical to clip.py's region) ====
class ImageTransform:
    """PIL image -> 3 x size x size tensor. train: RandomResizedCrop (scale 0.9-1), its box drawn from the
    sample's rng; otherwise the short side resized to size and the centre cut out (OpenAI's preprocess).

    uint8=True gives uint8 pixels for the model to normalise on its device (normalize_pixels): train.py's
    loader ships them, 4x less than float32 between processes, and the float work leaves the loader
    workers. A JPEG that data.py opened but did not decode yet, much larger than the crop needs, is
    decoded at 1/2, 1/4 or 1/8 scale by the JPEG decoder itself (Pillow's draft mode, draft=False to
    turn it off), never below the output's resolution; the crop box is drawn on the full-size image all
    the same, so the crops do not change, only the pixels, slightly. Images decoded from a file are
    downscaled by torch (resize_box), the rest by Pillow.

    defer=True (train.py --gpu-decode) leaves an RGB or grayscale JPEG file undecoded: the transform
    draws its box as above and returns {"jpeg": the file's bytes, "box", "out"}, and finish() decodes
    the batch's JPEGs on the training device (nvjpeg on CUDA) at full size, crops and resizes them
    there. Other images, and JPEGs without their end marker (truncated: decoding them here fails, so
    the loader skips them as on the CPU path), are decoded here as usual.
    """

    def __init__(self, size, train, mean, std, scale=(0.9, 1.0), uint8=False, draft=True, defer=False,
                 max_pixels=None):
        self.size, self.train, self.scale, self.uint8, self.draft = size, train, scale, uint8, draft
        self.mean, self.std, self.defer, self.max_pixels = mean, std, defer, max_pixels or MAX_PIXELS

    def crop_box(self, w, h, rng):
        for _ in range(10):  # torchvision's RandomResizedCrop rule, with our own rng
            area = w * h * rng.uniform(*self.scale)
            ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
            cw, ch = round(math.sqrt(area * ratio)), round(math.sqrt(area / ratio))
            if 0 < cw <= w and 0 < ch <= h:
                x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
                return x0, y0, x0 + cw, y0 + ch
        side = min(w, h)
        return (w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side

    def __call__(self, img, rng=None):
        w, h = img.size
        if self.train:
            box, out = self.crop_box(w, h, rng), (self.size, self.size)
            need = (w * self.size / (box[2] - box[0]), h * self.size / (box[3] - box[1]))
        else:
            r = self.size / min(w, h)
            box, out = (0, 0, w, h), (max(self.size, round(w * r)), max(self.size, round(h * r)))
            if out[0] * out[1] > 4 * self.size * self.size:
                # A long strip (a 1 x 100000 PNG is 467 bytes) resized whole would hold billions of
                # pixels: past 4:1 the centre square is cut first, then resized; the pixels the crop
                # keeps are the same up to the resampling at its edges.
                side = min(w, h)
                box, out = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side), (self.size,) * 2
            need = out
        if self.defer and deferrable(img) and w * h <= self.max_pixels:
            # Plain Python values: a worker pickles them into its pipe in one go, where every small
            # tensor would cost a shared-memory segment of its own.
            return {"jpeg": img.encoded, "box": box, "out": out}
        if self.draft and img.format == "JPEG":  # a no-op once decoded, or when the full size is needed
            img.draft("RGB", (math.ceil(need[0]), math.ceil(need[1])))
        if img.size[0] * img.size[1] > self.max_pixels:  # checked before the decode, which would hold it all
            raise ImageTooLarge(f"{getattr(img, 'source', 'image')}: {img.size[0]} x {img.size[1]} pixels, over "
                                f"the cap of {self.max_pixels} (a decompression bomb, or a scan to shrink first)")
        from_file = img.format is not None
        img = to_rgb(img)
        if img.size != (w, h):  # drafted: the box to the nearest whole pixels of the smaller image
            fx, fy = img.size[0] / w, img.size[1] / h
            box = (round(box[0] * fx), round(box[1] * fy), round(box[2] * fx), round(box[3] * fy))
        x = resize_box(img, box, out, fast=from_file)
        if not self.train:
            left, top = (out[0] - self.size) // 2, (out[1] - self.size) // 2
            x = x[:, top:top + self.size, left:left + self.size]
        return x if self.uint8 else normalize_pixels(x, self.mean, self.std)

    def finish(self, images, device, notes=None):
        """uint8 [B, 3, size, size] on the device from a batch's list of ready pixels and deferred JPEGs.

        The JPEGs decode together on the device (torchvision.io.decode_jpeg: nvjpeg on CUDA,
        libjpeg-turbo on the CPU); each crop is then resized there with the antialiased bicubic of
        resize_box. A JPEG the device decoder refuses is decoded by Pillow instead; one that Pillow
        cannot read either (damaged inside, its end marker intact) becomes a black image, counted in
        notes: the batch keeps its size, as every rank's must."""
        out = torch.empty(len(images), 3, self.size, self.size, dtype=torch.uint8, device=device)
        deferred = [i for i, x in enumerate(images) if isinstance(x, dict)]
        for i, x in enumerate(images):
            if not isinstance(x, dict):
                out[i] = x.to(device, non_blocking=True)
        jpegs = [torch.frombuffer(bytearray(images[i]["jpeg"]), dtype=torch.uint8) for i in deferred]
        for i, pixels in zip(deferred, decode_jpegs(jpegs, device)):
            box, size = images[i]["box"], images[i]["out"]
            if pixels is None:
                pixels = decode_with_pillow(images[i]["jpeg"], device)
            if pixels is None:
                pixels = torch.zeros(3, box[3], box[2], dtype=torch.uint8, device=device)
                if notes is not None:
                    notes.append("unreadable image on the device: a black image in its place")
            x = resize_pixels(pixels[:, box[1]:box[3], box[0]:box[2]], size)
            left, top = (size[0] - self.size) // 2, (size[1] - self.size) // 2
            out[i] = x[:, top:top + self.size, left:left + self.size]
        return out


def deferrable(img):
    """A JPEG file opened but not decoded yet (tile set), in a mode every decoder reads, with its end marker."""
    data = getattr(img, "encoded", None)
    return (img.format == "JPEG" and img.mode in ("RGB", "L") and bool(getattr(img, "tile", None))
            and data is not None and data.rstrip(b"\0")[-2:] == b"\xff\xd9")


def decode_with_pillow(jpeg, device):
    """RGB uint8 [3, H, W] on the device from a JPEG file's bytes, or None."""
    import io

    from PIL import Image

    try:
        img = Image.open(io.BytesIO(jpeg)).convert("RGB")
    except (OSError, SyntaxError):
        return None
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).to(device)


def decode_jpegs(jpegs, device):
    """RGB uint8 [3, H, W] on the device per JPEG (1-D uint8 CPU tensors), None where one fails."""
    if not jpegs:
        return []
    import warnings

    from torchvision.io import ImageReadMode, decode_jpeg

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torchvision 0.29 points to torchcodec
        try:
            return decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
        except RuntimeError:  # one bad file fails the batch: decode them one by one
            decoded = []
            for jpeg in jpegs:
                try:
                    decoded.append(decode_jpeg(jpeg, mode=ImageReadMode.RGB, device=device))
                except RuntimeError:
                    decoded.append(None)
            return decoded


def resize_pixels(x, out):
    """uint8 [3, h, w] -> uint8 [3, H, W] for out = (W, H), antialiased bicubic (Pillow's kernel) on x's
    device: on uint8 channels-last on the CPU, as resize_box; in float32, then rounded, elsewhere."""
    x = x[None].contiguous(memory_format=torch.channels_last)
    if x.device.type == "cpu":
        return F.interpolate(x, size=(out[1], out[0]), mode="bicubic", antialias=True)[0]
    y = F.interpolate(x.float(), size=(out[1], out[0]), mode="bicubic", antialias=True)
    return y.round_().clamp_(0, 255).to(torch.uint8)[0]


def to_device(batch, device, image, notes=None):
    """A loader batch on the device; a list under 'image' (deferred JPEGs) is finished by the image
    transform there."""
    out = {k: v.to(device, non_blocking=True) for k, v in batch.items() if k != "image" or isinstance(v, torch.Tensor)}
    if "image" in batch and not isinstance(batch["image"], torch.Tensor):
        out["image"] = image.finish(batch["image"], device, notes)
    return out


def resize_box(img, box, out, fast=True):
    """uint8 [3, H, W]: the box (x0, y0, x1, y1) of an RGB PIL image, bicubic-resized to out = (W, H).
    fast: a downscale from a whole-pixel box runs through torch's antialiased bicubic on channels-last
    uint8, about 4x faster than Pillow's and within a few levels of it (0.01 on average). Upscales,
    fractional boxes and fast=False (images made in memory, such as the synthetic set's: their runs
    keep their pixels) go through Pillow's."""
    from PIL import Image

    whole = all(float(c).is_integer() for c in box)
    if fast and whole and box[2] - box[0] >= out[0] and box[3] - box[1] >= out[1]:
        x0, y0, x1, y1 = (int(c) for c in box)
        return resize_pixels(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)[:, y0:y1, x0:x1], out)
    img = img.resize(out, Image.BICUBIC, box=box)
    return torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)
# ==== end of copy: image-transform ====


# ==== copied from clip.py: normalize-pixels (shared code, kept identical to clip.py's region) ====
def normalize_pixels(images, mean, std):
    """uint8 pixels [..., 3, H, W] -> floats normalised by mean and std, on the pixels' device. Images
    already in floats are taken as normalised and pass through."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(std, device=images.device).view(3, 1, 1)
    return (images.float().div_(255) - mean) / std
# ==== end of copy: normalize-pixels ====


# ==== copied from clip.py: image-files (shared code, kept identical to clip.py's region) ====
# Decoding holds the whole image (4 bytes a pixel in Pillow, then a copy): larger non-JPEG images are
# refused before their decode; JPEGs are first drafted down to what the crop needs.
MAX_PIXELS = 40_000_000


class ImageTooLarge(OSError):
    reason = "image too large"


def to_rgb(img):
    """RGB, with 16-bit and 32-bit integer images scaled to 8 bits (Pillow's convert clips them: white)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        x = np.asarray(img).astype(np.float32)
        x = np.clip(x / 257.0 + 0.5, 0, 255).astype(np.uint8)  # 0..65535 -> 0..255
        from PIL import Image

        return Image.fromarray(x, "L").convert("RGB")
    return img.convert("RGB")


MAX_IMAGE_BYTES = 64 << 20


def read_image(path):
    """A PIL image of a regular file (a FIFO or device would block or never end), decoded here so a
    damaged or oversized file is one ValueError naming it."""
    import io
    import stat

    from PIL import Image

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_IMAGE_BYTES:
            os.close(fd)
            if not stat.S_ISREG(st.st_mode):
                raise ValueError("not a regular file")
            raise ValueError(f"{st.st_size} bytes, over the {MAX_IMAGE_BYTES >> 20} MiB an image may have")
        with os.fdopen(fd, "rb") as f:
            img = Image.open(io.BytesIO(f.read(MAX_IMAGE_BYTES)))
            img.source = path
            if img.size[0] * img.size[1] > MAX_PIXELS and img.format != "JPEG":
                raise ImageTooLarge(f"{img.size[0]} x {img.size[1]} pixels, over the cap of {MAX_PIXELS}")
            if img.format != "JPEG":  # a JPEG's decode waits for the preprocess, which may draft it smaller
                img.load()
            return img
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such image file") from None
    except Exception as e:  # Pillow: OSError, SyntaxError, DecompressionBombError, ValueError
        lines = str(e).strip().splitlines() or [""]
        reason = lines[0][:200] if type(e) is ValueError else f"{type(e).__name__}: {lines[0][:200]}"
        raise ValueError(f"{path}: not a readable image ({reason}); check the file or leave it out") from None
# ==== end of copy: image-files ====


# ==== copied from clip.py: create (shared code, kept identical to clip.py's region) ====
def add_clip_args(parser):
    """CLIP's flags for train.py (laclip's are these and its own)."""
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer.json or bpe_simple_vocab_16e6.txt.gz; default: the --init weights' own, "
                             "else a BPE trained on the captions")
    parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, default=None,
                        help="QuickGELU (OpenAI's released weights) or, with --no-quick-gelu, exact GELU; default: "
                             "exact for new models, QuickGELU for --init files that carry no config (OpenAI layout)")
    parser.add_argument("--lock-image", action="store_true", help="LiT: freeze the image tower")
    parser.add_argument("--lock-image-unlocked-layers", type=int, default=0,
                        help="with --lock-image: the last N residual blocks (and the layers after them) still train")
    parser.add_argument("--lock-text", action="store_true", help="freeze the text tower")
    parser.add_argument("--lock-text-unlocked-layers", type=int, default=0,
                        help="with --lock-text: the last N residual blocks (and the layers after them) still train")
    parser.add_argument("--loss", choices=["softmax", "sigmoid"], default=None,
                        help="softmax: CLIP's InfoNCE; sigmoid: SigLIP's pairwise loss with a learnt bias (default: "
                             "the --init weights' own, else softmax)")
    parser.add_argument("--siglip", dest="loss", action="store_const", const="sigmoid", help="--loss sigmoid")
    parser.add_argument("--distill", action="append", default=None, metavar="TEACHER",
                        help="distil from a teacher CLIP (any weights --init reads; again for an ensemble), or "
                             "'stored': the teacher embeddings in the shards (python clip.py reinforce)")
    parser.add_argument("--distill-weight", type=float, default=1.0,
                        help="loss = contrastive + this x distillation (default 1, open_clip's sum)")
    parser.add_argument("--distill-icl", type=float, default=1.0,
                        help="plus this x CLIP-KD's interactive contrastive term, for teachers of the student's "
                             "width (0: open_clip's --distill-model loss exactly)")
    add_lora_args(parser)


def add_teachers(model, args):
    """--distill: the teachers loaded (any weights load() reads; each failure one line naming the file)
    and the model told (model.distill)."""
    paths = getattr(args, "distill", None) or []
    if not paths:
        return model
    weight, icl = getattr(args, "distill_weight", 1.0), getattr(args, "distill_icl", 1.0)
    if not all(math.isfinite(v) and v >= 0 for v in (weight, icl)):
        raise ValueError(f"--distill-weight {weight}, --distill-icl {icl}: finite weights of at least 0")
    if "stored" in paths and len(paths) > 1:
        raise ValueError("--distill stored reads every teacher's embeddings from the shards: give it alone")
    if getattr(model, "text_sets", 0):
        raise ValueError("--distill with --text-sets (LaCLIP-MT) is not supported: distil one text per image")
    teachers = [] if paths == ["stored"] else [load(path)[0] for path in paths]
    other = [p for p, t in zip(paths, teachers) if t.cfg.embed_dim != model.cfg.embed_dim]
    if icl and other:
        print(f"--distill: {', '.join(other)} embed(s) in another width than the student's {model.cfg.embed_dim}: "
              f"the distillation term only, no interactive term")
    return model.distill(teachers, weight, paths == ["stored"], icl)


def build_kwargs(args):
    """train.py's flags as build()'s keywords (a flag a caller's namespace lacks takes build()'s default)."""
    names = ("size", "tokenizer", "init", "quick_gelu", "lock_image", "lock_image_unlocked_layers", "lock_text",
             "lock_text_unlocked_layers", "patch_dropout", "loss")
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def config_and_tokenizer(size, tokenizer=None, captions=(), init=None, quick_gelu=None, extra=None, loss=None):
    """(config, tokenizer, weights or None): from a checkpoint's extra, from init weights, or a preset."""
    if extra is not None:
        cfg = check_config(Config, extra.get("config"), "the checkpoint")
        return cfg, Tokenizer.from_str(extra["tokenizer"], cfg.context_length) if extra.get("tokenizer") else None, None
    if init:  # fine-tuning: shapes, tokenizer and preprocessing come from the weights
        with reading(init):
            cfg, tok, sd = read_weights(init, quick_gelu, tokenizer)
        if tok is None:
            raise ValueError(f"{init} carries no tokenizer: pass the one it was trained with, --tokenizer "
                             f"bpe_simple_vocab_16e6.txt.gz (OpenAI's) or a tokenizer.json")
        if loss and loss != cfg.loss:  # a softmax model fine-tuned with the sigmoid loss starts a bias; not back
            if cfg.loss == "sigmoid":
                raise ValueError(f"{init} was trained with the sigmoid loss (it has a logit_bias): drop --loss softmax")
            cfg.loss, sd = loss, {**sd, "logit_bias": torch.tensor(-10.0)}
        return cfg, tok, sd
    if size not in CONFIGS:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(CONFIGS)}")
    cfg = Config(**asdict(CONFIGS[size]))
    cfg.quick_gelu, cfg.loss = bool(quick_gelu), loss or "softmax"
    if tokenizer:
        tok = Tokenizer.from_file(tokenizer, cfg.context_length)
    else:
        tok = Tokenizer.train(captions, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    cfg.vocab_size, cfg.eos_id = tok.vocab_size, tok.eot
    return cfg, tok, None


def start(model, weights=None, lock_image=False, lock_image_unlocked_layers=0, lock_text=False, lock_text_unlocked_layers=0,
          patch_dropout=0.0):
    """Initial weights, the LiT locks and training's patch dropout applied to a new model."""
    if not 0 <= patch_dropout < 1:
        raise ValueError(f"--patch-dropout {patch_dropout}: the share of patches dropped, from 0 to below 1")
    model.patch_dropout = patch_dropout
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    if lock_image or lock_text:
        model.lock(lock_image, lock_text, lock_image_unlocked_layers, lock_text_unlocked_layers)
    return model
# ==== end of copy: create ====


# ==== copied from clip.py: evaluation (shared code, kept identical to clip.py's region) ====
@torch.no_grad()
def zero_shot_classifier(model, classnames, templates):
    """[C, D]: per class, the mean of its normalised prompt embeddings, re-normalised."""
    weights = []
    for name in classnames:
        e = model.encode_texts([t.format(name) for t in templates]).float()
        weights.append(F.normalize(e.mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def retrieval_metrics(image_features, text_features, chunk=4096, ks=(1, 5, 10)):
    """R@k both ways for paired rows, chunked so N x N similarities are never held at once."""
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
# ==== end of copy: evaluation ====


# ==== copied from clip.py: tensor-files (shared code, kept identical to clip.py's region) ====
# The boundary for weights files, which come from anywhere: nothing in them runs (tensors and plain
# containers only), nothing they claim is allocated before it is checked against the file's own size,
# and whatever goes wrong while one is read is one line naming it (reading()).
class UnsafeWeights(ValueError):
    """A weights file that would run code if loaded the usual way: refused."""


class BadInput(ValueError):
    """A file or folder the user gave that cannot be used; the message names it and says what is wrong."""


def one_line(err):
    """An exception as one short line (a pickle or zip error can run to many)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    first = lines[0].split(". ")[0][:160] if lines else ""  # torch's messages run to paragraphs
    return f"{type(err).__name__}: {first}".rstrip(": ")


class reading:
    """with reading(path): ... -- whatever the block raises while it reads and checks `path` (a file or
    folder the user gave) becomes one BadInput line naming it. What an input holds is the input's fault,
    whichever line of ours it trips; code outside such a block is ours, and keeps its traceback.
    TRAIN_TRACEBACK=1 keeps the traceback here too."""

    def __init__(self, what):
        self.what = what

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not isinstance(err, Exception) or os.environ.get("TRAIN_TRACEBACK"):
            return False
        if isinstance(err, (BadInput, ImportError, FileNotFoundError)):  # one line already, or a package to install
            return False
        message = str(err) if isinstance(err, ValueError) and str(self.what) in str(err) else f"{self.what}: {one_line(err)}"
        raise BadInput(" ".join(message.split("\n"))[:600]) from None


def tensor_bytes(t, where):
    """The bytes a tensor claims, once it is checked to lie within its storage, not expanded past it."""
    n = t.numel()
    if t.is_complex() or t.is_quantized or t.layout != torch.strided:
        raise ValueError(f"{where}: a {t.dtype} {str(t.layout).replace('torch.', '')} tensor; weights are real and dense")
    if n == 0:
        return 0
    if any(s < 0 for s in t.stride()):
        raise ValueError(f"{where}: a tensor with a negative stride")
    elements = t.untyped_storage().nbytes() // t.element_size() - t.storage_offset()
    extent = 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride()))
    if extent > elements or n > elements:  # stride 0 or overlapping rows: more elements than stored
        raise ValueError(f"{where}: a tensor of {tuple(t.shape)} expanded over {max(elements, 0)} stored elements")
    return n * t.element_size()


def check_tensors(obj, path):
    """obj (what a weights file held) with every tensor checked (tensor_bytes), walked as a graph (each
    object once, so shared containers cost nothing twice), and the bytes all tensors claim at most twice
    the file's size: a few KB of views cannot become gigabytes of weights."""
    limit = 2 * os.path.getsize(path) + (1 << 20)
    seen, stack, claimed = set(), [obj], 0
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            claimed += tensor_bytes(x, path)
            if claimed > limit:
                raise ValueError(f"{path}: its tensors claim over {limit} bytes from a file of {os.path.getsize(path)}")
        elif isinstance(x, dict):
            stack.extend(x.values())
        elif isinstance(x, (list, tuple)):
            stack.extend(x)
    return obj


def load_tensors(path):
    """torch.load of a file that may come from anywhere: tensors and plain containers only (weights_only:
    nothing in it runs), a .safetensors file through safetensors, every tensor checked (check_tensors);
    a damaged or foreign file is one ValueError naming it."""
    import stat

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise ValueError(f"{path}: not a regular file; pass a weights file")
    try:
        if path.endswith(".safetensors"):
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise ImportError(f"{path} is a .safetensors file: pip install safetensors to read it") from None
            return check_tensors(load_file(path), path)
        return check_tensors(torch.load(path, map_location="cpu", weights_only=True), path)
    except ImportError:
        raise
    except Exception as e:  # truncated, empty, garbage, a TorchScript archive, a pickle of more than tensors
        if str(e).startswith(path):
            raise ValueError(str(e)) from None
        raise ValueError(f"{path}: not a weights file this reads ({one_line(e)}); check that the download is "
                         f"complete and that it holds weights only") from None


def read_small_file(path, what, max_bytes=1 << 24):
    """The bytes of a file a command reads beside the weights (a config, a tokenizer, --texts): a
    regular file (a FIFO would block, /dev/zero never end) of at most max_bytes."""
    import stat

    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such {what}")
    with open(path, "rb", opener=lambda p, flags: os.open(p, flags | os.O_NONBLOCK)) as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"{path}: not a regular file; pass a {what}")
        if st.st_size > max_bytes:
            raise ValueError(f"{path}: {st.st_size} bytes, more than a {what} may have ({max_bytes})")
        return f.read(max_bytes)


def read_json(path, what="config"):
    """A JSON object from a file a folder of weights holds: a regular file of at most 16 MiB, an object."""
    value = json.loads(read_small_file(path, f"{what} file").decode("utf-8"), parse_constant=lambda c: float("nan"))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


# What a config field may hold is read off its default: ints (not bools) and floats in sane ranges,
# finite; sizes, widths, heads and layers at least 1; None only where the default is None. Layers at
# most MAX_LAYERS: each costs the (meta-device) build time whatever the file holds.
POSITIVE = ("width", "heads", "layers", "dim", "image_size", "patch_size", "context_length", "vocab_size",
            "temperature", "pool_size")
MAX_LAYERS = 256
# Sizes a config may claim, by field name: past these a crafted file would cost time or memory that its
# own size does not bound (a 16M x 16M box grid, a 1M-pixel side). A model file adds its own in LIMITS.
LIMITS = {"image_size": 4096, "context_length": 4096, "patch_size": 1024}


def check_config(cls, values, where):
    """A dataclass config built from a file's dict field by field: unknown fields, wrong types and values
    out of range are one ValueError naming the field, before any model is built."""
    from dataclasses import MISSING, fields

    if not isinstance(values, dict):
        raise ValueError(f"{where}: the config is a {type(values).__name__}, not a table of fields")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(str(k) for k in values if k not in known)
    if unknown:
        raise ValueError(f"{where}: unknown config fields {unknown[:5]}; weights of another model or version?")
    for name, value in values.items():
        f = known[name]
        default = f.default if f.default is not MISSING else None
        kind = f.type if isinstance(f.type, type) else type(default)
        if isinstance(default, tuple) and default and (not isinstance(value, (tuple, list)) or len(value) != len(default)):
            raise ValueError(f"{where}: config field {name} = {value!r:.60} needs {len(default)} values")
        if name.endswith(("std", "eps")) and value is not None and not (
                all(v > 0 for v in value) if isinstance(value, (tuple, list)) else isinstance(value, (int, float)) and value > 0):
            raise ValueError(f"{where}: config field {name} = {value!r:.60} must be above 0")
        ok = (value is None and default is None) or (
            kind is bool and isinstance(value, bool)) or (
            kind is int and isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= 1 << 24
            and (value >= 1 or not name.endswith(POSITIVE)) and (value <= MAX_LAYERS or not name.endswith("layers"))) or (
            kind is float and isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and (value > 0 or not name.endswith(POSITIVE))) or (
            kind is str and isinstance(value, str) and len(value) < 1 << 26) or (
            kind in (tuple, list) and isinstance(value, (tuple, list)) and len(value) <= 64 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value))
        if not ok:
            raise ValueError(f"{where}: config field {name} = {value!r:.60} is not a valid {kind.__name__}")
        limit = {**LIMITS, **getattr(cls, "LIMITS", {})}.get(name)
        if limit is not None and isinstance(value, (int, float)) and value > limit:
            raise ValueError(f"{where}: config field {name} = {value} is over {limit}")
    return cls(**values)


def check_fits(make, sd, where, strict=True):
    """sd checked against the model make() builds, before that model is built: make() runs on the meta
    device (no memory), and missing, unexpected or misshapen tensors are one ValueError naming the
    file. A config that claims a huge model over a few tensors is refused here, not after allocating."""
    with torch.device("meta"):
        shell = make()
    own = shell.state_dict()
    missing = [k for k in own if k not in sd] if strict else []
    unexpected = [k for k in sd if k not in own]
    wrong = [f"{k} {tuple(sd[k].shape)} where the config has {tuple(own[k].shape)}"
             for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        said = [f"{len(x)} {kind} (first: {x[0]})" for kind, x in (("missing", missing), ("unexpected", unexpected),
                                                                    ("of the wrong shape", wrong)) if x]
        raise ValueError(f"{where}: weights that do not fit their config: {'; '.join(said)}")
# ==== end of copy: tensor-files ====


# ==== copied from clip.py: weight-files (shared code, kept identical to clip.py's region) ====
def read_state_dict(path):
    """(state dict, our checkpoint's extra or None) of a TorchScript archive (OpenAI's releases), a plain
    state dict (.pt/.bin/.pth) or .safetensors: str keys, tensor values, every one checked."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    import zipfile

    scripted = False
    if os.path.isfile(path) and zipfile.is_zipfile(path) and not path.endswith(".safetensors"):
        try:
            with zipfile.ZipFile(path) as archive:
                scripted = any(n.endswith("/constants.pkl") for n in archive.namelist())
        except Exception as e:
            raise ValueError(f"{path}: a damaged zip ({one_line(e)})") from None
    if scripted:  # OpenAI's releases are TorchScript archives: read, never run
        try:
            sd = read_torchscript(path)
        except UnsafeWeights as e:
            raise UnsafeWeights(f"{path}: {e}") from None
        except Exception as e:
            raise ValueError(f"{path}: not a TorchScript archive this reads ({one_line(e)})") from None
    else:
        sd = load_tensors(path)
    extra = None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):  # our train.py checkpoint
        extra = sd.get("extra")
        sd = sd["model"]
        if extra is not None and not isinstance(extra, dict):
            raise ValueError(f"{path}: its 'extra' is a {type(extra).__name__}, not a table")
    elif isinstance(sd, dict) and "state_dict" in sd:  # open_clip training checkpoint
        sd = sd["state_dict"]
    if not isinstance(sd, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in sd.items()):
        raise ValueError(f"{path}: holds a {type(sd).__name__} that is not a state dict (names to tensors)")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    for key in ("input_resolution", "context_length", "vocab_size"):  # metadata in OpenAI's archives
        sd.pop(key, None)
    return sd, extra


STORAGES = {"FloatStorage": torch.float32, "DoubleStorage": torch.float64, "HalfStorage": torch.float16,
            "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
            "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
            "BoolStorage": torch.bool}


def read_torchscript(path):
    """The state dict of a TorchScript archive, as torch.jit.load(path).state_dict() gives it, without
    running the archive.

    torch.jit.load compiles the archive's code and calls its classes' __setstate__, so a crafted file
    runs what it likes while loading. Here nothing is compiled or called: data.pkl (the module tree) goes
    through an unpickler that rebuilds tensors from the archive's data/ records and records every
    object's attributes, and refuses any other global; which attributes are parameters and buffers is
    read off the class declarations in code/ as text. A class that declares its own __setstate__ or
    __getstate__ (nothing a weights file needs) refuses the file."""
    import io
    import pickle
    import zipfile

    with zipfile.ZipFile(path) as z:
        members = {i.filename: i for i in z.infolist()}
        roots = [n[:-len("data.pkl")] for n in members if n.endswith("/data.pkl") and n.count("/") == 1]
        if not roots:
            raise ValueError("a zip without <name>/data.pkl")
        root = roots[0]
        limit = 1 << 26  # what code/ and data.pkl may unpack to (OpenAI's: tens of KiB)

        def read(info):
            with z.open(info) as f:
                data = f.read(limit + 1)
            if len(data) > limit:
                raise ValueError(f"{info.filename} unpacks to over {limit >> 20} MiB")
            return data
        declared = {}  # class qualname -> (parameters, buffers)
        for name in members:
            if name.startswith(root + "code/") and name.endswith(".py"):
                package = name[len(root + "code/"):-3].replace("/", ".")
                for cls, (params, buffers, runs_code) in class_declarations(read(members[name]).decode("utf-8", "replace")).items():
                    if runs_code:
                        raise UnsafeWeights(f"a TorchScript archive whose class {package}.{cls} runs code of its "
                                            f"own on load (__setstate__); refused: weights need none")
                    declared[f"{package}.{cls}"] = (params, buffers)
        storages, budget = {}, [2 * os.path.getsize(path) + (1 << 20)]

        def storage(pid):
            kind, dtype, key, _, numel = pid
            if kind != "storage" or not isinstance(dtype, torch.dtype) or not isinstance(key, str):
                raise ValueError(f"an unexpected record {pid!r:.80}")
            if key not in storages:
                info = members.get(f"{root}data/{key}")
                size = torch.empty(0, dtype=dtype).element_size() * int(numel)
                if info is None or info.compress_type != zipfile.ZIP_STORED or info.file_size < size:
                    raise ValueError(f"record data/{key} is missing, packed, or shorter than its {numel} elements")
                with z.open(info) as f:
                    raw = bytearray(f.read(size))
                storages[key] = torch.frombuffer(raw, dtype=dtype) if size else torch.empty(0, dtype=dtype)
            return storages[key]

        def rebuild_tensor(flat, offset, size, stride, requires_grad=False, *_):
            if not (isinstance(flat, torch.Tensor) and all(isinstance(v, int) and v >= 0 for v in (offset, *size, *stride))
                    and len(size) == len(stride)):
                raise ValueError("a tensor record with malformed sizes or strides")
            n = math.prod(size)  # checked before the copy below allocates it: no stride-0 expansion
            if n and (offset + 1 + sum((d - 1) * st for d, st in zip(size, stride)) > flat.numel()
                      or n > flat.numel() - offset):
                raise ValueError(f"a tensor of {tuple(size)} expanded over {flat.numel()} stored elements")
            budget[0] -= n * flat.element_size()
            if budget[0] < 0:
                raise ValueError(f"its tensors claim more than twice the file's {os.path.getsize(path)} bytes")
            return torch.as_strided(flat, tuple(size), tuple(stride), offset).clone()

        class Object:  # an object of the archive: its class name and attributes, nothing more
            qualname = None

            def __setstate__(self, state):
                self.state = state

        allowed = {("torch._utils", "_rebuild_tensor_v2"): rebuild_tensor, ("collections", "OrderedDict"): OrderedDict,
                   ("torch.jit._pickle", "restore_type_tag"): lambda value, _tag: value}
        for kind in ("intlist", "tensorlist", "doublelist", "boollist"):
            allowed[("torch.jit._pickle", f"build_{kind}")] = list

        class Reader(pickle.Unpickler):
            def find_class(self, module, name):
                if module == "torch" and name in STORAGES:
                    return STORAGES[name]
                if (module, name) in allowed:
                    return allowed[(module, name)]
                if module.startswith("__torch__.") or module == "__torch__":
                    return type(name, (Object,), {"qualname": f"{module}.{name}"})
                raise UnsafeWeights(f"a TorchScript archive whose data.pkl asks for {module}.{name}; refused: "
                                    f"only tensors and modules are read")

            def persistent_load(self, pid):
                return storage(pid)

        tree = Reader(io.BytesIO(read(members[root + "data.pkl"]))).load()

    if not isinstance(tree, Object):
        raise ValueError("data.pkl holds no module")
    sd, seen, stack = OrderedDict(), set(), [(tree, "")]
    while stack:  # the module tree as a graph: a module reached twice (shared subtrees) is walked once
        obj, prefix = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            raise ValueError(f"{obj.qualname} holds no attribute table")
        params, buffers = declared.get(obj.qualname, ([], []))
        for n in (*params, *buffers):
            if isinstance(state.get(n), torch.Tensor):
                sd[prefix + n] = state[n]
        stack += [(v, f"{prefix}{n}.") for n, v in reversed(list(state.items())) if isinstance(v, Object)]
    return sd


def class_declarations(text):
    """{class: (parameters, buffers, declares __setstate__ or __getstate__)} of TorchScript's code/ text,
    read line by line: linear in the text, however it is crafted."""
    found, current = {}, None
    for line in text.split("\n"):
        if line.startswith("class "):
            name = line[len("class "):].split("(", 1)[0].split(":", 1)[0].strip()
            current = found.setdefault(name, ([], [], [False]))
        elif current is not None and line[:1] in (" ", "\t"):
            body = line.strip()
            for i, kind in enumerate(("__parameters__ = [", "__buffers__ = [")):
                if body.startswith(kind) and body.endswith("]"):
                    current[i].extend(part.strip().strip('"') for part in body[len(kind):-1].split(",") if part.strip())
            if body.startswith(("def __setstate__", "def __getstate__")):
                current[2][0] = True
        elif line.strip():
            current = None
    return {k: (p, b, flag[0]) for k, (p, b, flag) in found.items()}


def hf_names(cfg):
    """[(our key, transformers' CLIPModel key, how)]: how is '' (same tensor), 'T' (transposed) or 'qkv'
    (our in_proj is HF's q, k and v projections concatenated in that order)."""
    names = [("token_embedding.weight", "text_model.embeddings.token_embedding.weight", ""),
             ("positional_embedding", "text_model.embeddings.position_embedding.weight", ""),
             ("text_projection", "text_projection.weight", "T"),
             ("visual.class_embedding", "vision_model.embeddings.class_embedding", ""),
             ("visual.conv1.weight", "vision_model.embeddings.patch_embedding.weight", ""),
             ("visual.positional_embedding", "vision_model.embeddings.position_embedding.weight", ""),
             ("visual.proj", "visual_projection.weight", "T"),
             ("logit_scale", "logit_scale", "")]
    for kind in ("weight", "bias"):
        names += [(f"ln_final.{kind}", f"text_model.final_layer_norm.{kind}", ""),
                  (f"visual.ln_pre.{kind}", f"vision_model.pre_layrnorm.{kind}", ""),  # sic: transformers' spelling
                  (f"visual.ln_post.{kind}", f"vision_model.post_layernorm.{kind}", "")]
    block = [("ln_1", "layer_norm1"), ("ln_2", "layer_norm2"), ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"),
             ("attn.out_proj", "self_attn.out_proj")]
    for ours, theirs, layers in (("transformer.resblocks", "text_model.encoder.layers", cfg.text_layers),
                                 ("visual.transformer.resblocks", "vision_model.encoder.layers", cfg.vision_layers)):
        for i in range(layers):
            for kind in ("weight", "bias"):
                names.append((f"{ours}.{i}.attn.in_proj_{kind}", f"{theirs}.{i}.self_attn.{{}}_proj.{kind}", "qkv"))
                names += [(f"{ours}.{i}.{a}.{kind}", f"{theirs}.{i}.{b}.{kind}", "") for a, b in block]
    return names


def save_weights(sd, folder, stem="model"):
    """transformers' (stem adapter_model: peft's) weight file: STEM.safetensors where safetensors is
    installed, else pytorch_model.bin (adapter_model.bin)."""
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        path = os.path.join(folder, "pytorch_model.bin" if stem == "model" else f"{stem}.bin")
        torch.save(sd, path)
        return path
    save_file(sd, os.path.join(folder, f"{stem}.safetensors"), metadata={"format": "pt"})
    return os.path.join(folder, f"{stem}.safetensors")
# ==== end of copy: weight-files ====


# ==== copied from clip.py: weights (shared code, kept identical to clip.py's region) ====
def _count(sd, prefix):
    return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})


def config_from_state_dict(sd, quick_gelu=True, **known):
    """Infer the shapes from an OpenAI-layout state dict, as OpenAI's build_model does; `known` overrides."""
    if "visual.conv1.weight" not in sd:
        if "visual.layer1.0.conv1.weight" in sd:
            raise ValueError("ResNet CLIP checkpoints are not supported: clip.py implements the ViT models")
        raise ValueError("not an OpenAI-layout CLIP state dict (no visual.conv1.weight)")
    width, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    text_width = sd["ln_final.weight"].shape[0]
    shapes = dict(embed_dim=sd["text_projection"].shape[1], image_size=patch * grid, patch_size=patch,
                  vision_width=width, vision_layers=_count(sd, "visual.transformer.resblocks."), vision_heads=width // 64,
                  vision_mlp=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  context_length=sd["positional_embedding"].shape[0], vocab_size=sd["token_embedding.weight"].shape[0],
                  text_width=text_width, text_layers=_count(sd, "transformer.resblocks."), text_heads=text_width // 64,
                  text_mlp=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0], quick_gelu=quick_gelu,
                  loss="sigmoid" if "logit_bias" in sd else "softmax")  # open_clip's SigLIP-loss checkpoints
    return Config(**{**shapes, **known})


def from_hf(sd, cfg):
    out = {}
    for ours, theirs, how in hf_names(cfg):
        if how == "qkv":
            out[ours] = torch.cat([sd[theirs.format(p)] for p in "qkv"])
        else:
            out[ours] = sd[theirs].T if how == "T" else sd[theirs]
    return out


def read_hf_weights(folder):
    """The state dict of a transformers folder: model.safetensors or pytorch_model.bin, sharded or not."""
    for name in ("model.safetensors", "pytorch_model.bin"):
        index = os.path.join(folder, name + ".index.json")
        files = index_shards(index, folder) if os.path.isfile(index) else [name]
        if all(os.path.isfile(os.path.join(folder, f)) for f in files):
            sd = {}
            for f in files:
                sd.update(read_state_dict(os.path.join(folder, f))[0])
            return {k: v for k, v in sd.items() if not k.endswith("position_ids")}  # buffers older versions saved
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (sharded or not)")


def index_shards(index, folder):
    """The weight files a sharded folder's *.index.json names: plain file names inside the folder only (an
    absolute or ../ name would read, and export republish, a file from elsewhere)."""
    weight_map = read_json(index, "index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise ValueError(f"{index}: no weight_map of tensor names to file names")
    files = sorted(set(weight_map.values()))
    for f in files:
        inside = os.path.realpath(os.path.join(folder, f))
        if os.path.basename(f) != f or os.path.dirname(inside) != os.path.realpath(folder):
            raise ValueError(f"{index}: names {f!r}, outside the folder; a shard must be a file beside the index")
    return files


def tokenizer_in(folder, context_length):
    """The folder's tokenizer.json, or vocab.json + merges.txt; None if it has neither."""
    if os.path.isfile(os.path.join(folder, "tokenizer.json")):
        return Tokenizer.from_file(os.path.join(folder, "tokenizer.json"), context_length)
    if os.path.isfile(os.path.join(folder, "vocab.json")) and os.path.isfile(os.path.join(folder, "merges.txt")):
        from tokenizers.models import BPE

        bpe = BPE.from_file(os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt"), end_of_word_suffix="</w>")
        tok = Tokenizer._skeleton(bpe)
        tok.add_special_tokens([SOT, EOT])
        return Tokenizer(tok, context_length)
    return None


def read_hf_folder(folder):
    """(config, tokenizer, state dict) of a transformers CLIPModel folder."""
    config = read_json(os.path.join(folder, "config.json"))
    if config.get("model_type", "clip") != "clip":
        raise ValueError(f"{folder}: a {config['model_type']!r} model, not a CLIPModel (AltCLIP folders: altclip.load)")
    sd = read_hf_weights(folder)
    text = config.get("text_config") or config.get("text_config_dict") or {}
    vision = config.get("vision_config") or config.get("vision_config_dict") or {}
    if not isinstance(text, dict) or not isinstance(vision, dict):
        raise ValueError(f"{folder}/config.json: text_config and vision_config must be objects")
    acts = {text.get("hidden_act", "quick_gelu"), vision.get("hidden_act", "quick_gelu")}
    if len(acts) > 1 or not acts <= {"quick_gelu", "gelu"}:
        raise ValueError(f"{folder}: hidden_act {sorted(acts)}; clip.py runs quick_gelu or gelu, the same in both towers")
    eps = {text.get("layer_norm_eps", 1e-5), vision.get("layer_norm_eps", 1e-5)}
    if len(eps) > 1:
        raise ValueError(f"{folder}: layer_norm_eps differs between the towers ({sorted(eps)}); clip.py takes one")
    sd = {k[len("model."):] if k.startswith("model.") else k: v for k, v in sd.items()}
    layers = dict(text_layers=_count(sd, "text_model.encoder.layers."), vision_layers=_count(sd, "vision_model.encoder.layers."))
    sd = from_hf(sd, Config(**layers))
    pre = {}
    if os.path.isfile(os.path.join(folder, "preprocessor_config.json")):
        pre = read_json(os.path.join(folder, "preprocessor_config.json"))
    cfg = config_from_state_dict(sd, acts == {"quick_gelu"}, ln_eps=eps.pop(),
                                 vision_heads=vision.get("num_attention_heads", sd["visual.conv1.weight"].shape[0] // 64),
                                 text_heads=text.get("num_attention_heads", sd["ln_final.weight"].shape[0] // 64),
                                 image_mean=tuple(pre.get("image_mean", MEAN)), image_std=tuple(pre.get("image_std", STD)))
    # transformers' pooling: the first eos_token_id (49407 when the config names none), argmax for the
    # legacy configs that say 2
    eos = text.get("eos_token_id", 49407)
    cfg.eos_id = None if eos == 2 else eos
    return cfg, tokenizer_in(folder, cfg.context_length), sd


def read_open_clip_folder(folder):
    """(config, tokenizer or None, state dict) of an open_clip local-dir folder (open_clip_config.json + weights)."""
    config = read_json(os.path.join(folder, "open_clip_config.json"))
    model_cfg, pre = config.get("model_cfg", {}), config.get("preprocess_cfg", {})
    if not isinstance(model_cfg, dict) or not isinstance(pre, dict) or not all(
            isinstance(model_cfg.get(k, {}), dict) for k in ("text_cfg", "vision_cfg")):
        raise ValueError(f"{folder}/open_clip_config.json: model_cfg, its text_cfg and vision_cfg, and preprocess_cfg "
                         f"must be objects")
    text_cfg, vision_cfg = model_cfg.get("text_cfg", {}), model_cfg.get("vision_cfg", {})
    custom = [k for k in ("hf_model_name", "attentional_pool", "timm_model_name") if text_cfg.get(k) or vision_cfg.get(k)]
    if text_cfg.get("pool_type", "argmax") not in ("argmax", "eos"):
        custom.append(f"text pool_type {text_cfg['pool_type']!r}")
    if custom:
        raise ValueError(f"{folder}: open_clip model with {', '.join(custom)}; clip.py implements the plain ViT CLIP")
    names = ("open_clip_model.safetensors", "open_clip_pytorch_model.safetensors", "open_clip_pytorch_model.bin",
             "open_clip_pytorch_model.pth")
    path = next((os.path.join(folder, n) for n in names if os.path.isfile(os.path.join(folder, n))), None)
    if path is None:
        raise FileNotFoundError(f"{folder}: no open_clip weights ({', '.join(names)})")
    sd = read_state_dict(path)[0]
    width = sd["visual.conv1.weight"].shape[0]
    if not isinstance(model_cfg.get("quick_gelu", False), bool):
        raise ValueError(f"{folder}/open_clip_config.json: quick_gelu = {model_cfg['quick_gelu']!r:.40}, not true or false")
    cfg = config_from_state_dict(sd, model_cfg.get("quick_gelu", False),
                                 vision_heads=width // vision_cfg.get("head_width", 64),
                                 text_heads=text_cfg.get("heads", sd["ln_final.weight"].shape[0] // 64),
                                 image_mean=tuple(pre.get("mean", MEAN)), image_std=tuple(pre.get("std", STD)))
    if text_cfg.get("pool_type") == "eos":
        cfg.eos_id = text_cfg.get("eos_id", 2)  # open_clip's default
    tok = tokenizer_in(folder, cfg.context_length) if text_cfg.get("hf_tokenizer_name") else None
    return cfg, tok, sd


def read_weights(path, quick_gelu=None, tokenizer=None, keep_lora=False):
    """(config, tokenizer or None, OpenAI-layout state dict) from any CLIP weights on disk: a checkpoint of
    this repository, OpenAI's TorchScript or state-dict files, open_clip's .bin / .safetensors files or
    local-dir folders, transformers' CLIPModel folders.

    Files with no config are taken as OpenAI's: QuickGELU unless quick_gelu=False (open_clip models
    trained with exact GELU). tokenizer: a tokenizer file, for weights that carry none. A LoRA checkpoint
    (base weights and adapters, the settings in its extra state) gives the merged weights; keep_lora
    gives them apart, with the settings: (config, tokenizer, state dict, settings or None).
    """
    spec = None
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, "open_clip_config.json")):
            cfg, tok, sd = read_open_clip_folder(path)
        elif os.path.isfile(os.path.join(path, "config.json")):
            cfg, tok, sd = read_hf_folder(path)
        else:
            raise FileNotFoundError(f"{path}: a folder with neither config.json (transformers) nor "
                                    f"open_clip_config.json (open_clip)")
    else:
        sd, extra = read_state_dict(path)
        if extra is not None:
            cfg = check_config(Config, extra.get("config"), path)
            tok = extra.get("tokenizer")
            tok = Tokenizer.from_str(tok, cfg.context_length) if isinstance(tok, str) and tok else None
            spec = saved_lora_spec(extra, path)
        else:
            cfg, tok = config_from_state_dict(sd, True if quick_gelu is None else quick_gelu), None
    cfg = check_config(Config, asdict(cfg), path)  # inferred or read: every field in range before a build
    if tokenizer:
        tok = Tokenizer.from_file(tokenizer, cfg.context_length)
        if cfg.eos_id is None:  # the same token as argmax, unless the tokenizer has ids above its EOT
            cfg.eos_id = tok.eot
    check_fits(lambda: CLIP(cfg, tok).add_lora(**spec) if spec else CLIP(cfg, tok), sd, path)
    if cfg.eos_id is not None and cfg.eos_id >= cfg.vocab_size:
        raise ValueError(f"{path}: eos_id {cfg.eos_id} is past the vocabulary of {cfg.vocab_size}")
    if tok is not None and tok.vocab_size > cfg.vocab_size:
        raise ValueError(f"{tokenizer or path}: a tokenizer of {tok.vocab_size} ids for an embedding table of "
                         f"{cfg.vocab_size}; pass the tokenizer these weights were trained with")
    if tok is not None and cfg.eos_id not in (None, 2, tok.eot):  # 2: transformers' legacy argmax configs
        raise ValueError(f"{tokenizer or path}: the tokenizer's {EOT} is id {tok.eot}, the weights pool the text at "
                         f"id {cfg.eos_id}; pass the tokenizer these weights were trained with")
    sd = {k: v.float() for k, v in sd.items()}
    bad = [k for k, v in sd.items() if not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path}: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]})")
    if keep_lora:
        return cfg, tok, sd, spec
    if spec:
        sd = merge_lora_weights(sd, spec)
        if not all(torch.isfinite(v).all() for v in sd.values()):
            raise ValueError(f"{path}: its adapters merged give weights that are not finite (LoRA alpha {spec['alpha']})")
    return cfg, tok, sd


def load(path, device="cpu", quick_gelu=None, tokenizer=None):
    """(model, preprocess) from any weights read_weights reads, like OpenAI's clip.load but from local
    files only. The model is in eval mode; preprocess maps a PIL image to the tensor it expects. Any
    failure to read or fit the weights is one BadInput line naming the file."""
    with reading(path):
        cfg, tok, sd = read_weights(path, quick_gelu, tokenizer)
        model = start(CLIP(cfg, tok), sd).to(device).eval()
    return model, model.preprocess()


# sha256 of OpenAI's vocabulary (its tokens in id order, one a line): open_clip's built-in tokenizer
OPENAI_VOCAB = "7cccc44d334555d1ff3c0ac5f0246b428fab2918383e77ee745cf30d41010b78"


def vocab_sha256(tok):
    import hashlib

    vocab = tok.tokenizer.get_vocab()
    return hashlib.sha256("\n".join(sorted(vocab, key=vocab.get)).encode()).hexdigest()


def write_hf_tokenizer(tok, out):
    """tokenizer.json (with the lower-casing and SOT/EOT that __call__ adds in Python), vocab.json, merges.txt
    and tokenizer_config.json: transformers' CLIPTokenizer and AutoTokenizer read them."""
    from tokenizers import Regex, Tokenizer as HFTokenizer, normalizers, processors

    hf = HFTokenizer.from_str(tok.to_str())
    hf.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                          normalizers.Lowercase()])
    hf.post_processor = processors.TemplateProcessing(single=f"{SOT} $A {EOT}", pair=f"{SOT} $A {EOT} $B {EOT}",
                                                      special_tokens=[(SOT, tok.sot), (EOT, tok.eot)])
    hf.save(os.path.join(out, "tokenizer.json"))
    model = json.loads(hf.to_str())["model"]
    with open(os.path.join(out, "vocab.json"), "w", encoding="utf-8") as f:
        json.dump(model["vocab"], f, ensure_ascii=False)
    with open(os.path.join(out, "merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\n" + "".join((m if isinstance(m, str) else " ".join(m)) + "\n" for m in model["merges"]))
    special = {"bos_token": SOT, "eos_token": EOT, "unk_token": EOT, "pad_token": EOT}
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump({"tokenizer_class": "CLIPTokenizer", "model_max_length": tok.context_length, "do_lower_case": True,
                   "clean_up_tokenization_spaces": False, **special}, f, indent=2)
    with open(os.path.join(out, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


def hf_eos_id(cfg, tok):
    """transformers pools at the first eos_token_id, or at the highest id for a config that says 2."""
    if cfg.eos_id is not None:
        return cfg.eos_id
    return tok.eot if tok.eot == tok.vocab_size - 1 else 2


def export_hf(model, out):
    """A transformers CLIPModel folder: config.json, weights, tokenizer files, preprocessor_config.json."""
    cfg, tok = model.cfg, model.tokenizer
    if cfg.loss == "sigmoid":
        raise ValueError("transformers' CLIPModel has no logit_bias for this sigmoid-loss model (and its SiglipModel "
                         "is another architecture); export --format open_clip, which keeps the bias")
    act = "quick_gelu" if cfg.quick_gelu else "gelu"
    tower = dict(hidden_act=act, layer_norm_eps=cfg.ln_eps, projection_dim=cfg.embed_dim)
    config = {"architectures": ["CLIPModel"], "model_type": "clip", "projection_dim": cfg.embed_dim,
              "logit_scale_init_value": 2.6592, "torch_dtype": "float32",
              "text_config": {"model_type": "clip_text_model", "vocab_size": cfg.vocab_size, "hidden_size": cfg.text_width,
                              "intermediate_size": cfg.text_mlp, "num_hidden_layers": cfg.text_layers,
                              "num_attention_heads": cfg.text_heads, "max_position_embeddings": cfg.context_length,
                              "bos_token_id": tok.sot, "eos_token_id": hf_eos_id(cfg, tok), "pad_token_id": tok.eot,
                              **tower},
              "vision_config": {"model_type": "clip_vision_model", "hidden_size": cfg.vision_width,
                                "intermediate_size": cfg.vision_mlp, "num_hidden_layers": cfg.vision_layers,
                                "num_attention_heads": cfg.vision_heads, "image_size": cfg.image_size,
                                "patch_size": cfg.patch_size, "num_channels": 3, **tower}}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    sd = model.state_dict()
    hf = {}
    for ours, theirs, how in hf_names(cfg):
        if how == "qkv":
            hf.update({theirs.format(p): part for p, part in zip("qkv", sd[ours].chunk(3))})
        else:
            hf[theirs] = sd[ours].T if how == "T" else sd[ours]
    weights = save_weights(hf, out)
    write_hf_tokenizer(tok, out)
    size = {"height": cfg.image_size, "width": cfg.image_size}
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "processor_class": "CLIPProcessor", "do_resize": True,
                   "size": {"shortest_edge": cfg.image_size}, "resample": 3, "do_center_crop": True, "crop_size": size,
                   "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
                   "image_mean": list(cfg.image_mean), "image_std": list(cfg.image_std)}, f, indent=2)
    return [f"wrote {out}: config.json, {os.path.basename(weights)}, tokenizer files, preprocessor_config.json",
            f"transformers: CLIPModel.from_pretrained({out!r}), CLIPProcessor.from_pretrained({out!r})"]


def open_clip_name(cfg):
    """open_clip's built-in model name for these shapes (ViT-B-32, ViT-B-16-quickgelu, ...), or None."""
    # its text pooling is argmax: the same token as ours where nothing follows EOT in the vocabulary
    if cfg.loss != "softmax":  # the named models have no logit_bias
        return None
    shapes = {k: v for k, v in asdict(cfg).items() if k not in ("quick_gelu", "eos_id", "init_logit_scale")}
    for name, preset in CONFIGS.items():
        if name != "tiny" and {k: v for k, v in asdict(preset).items() if k not in ("quick_gelu", "eos_id", "init_logit_scale")} == shapes:
            return name + ("-quickgelu" if cfg.quick_gelu else "")  # QuickGELU is part of open_clip's name
    return None


def export_open_clip(model, out):
    """open_clip's local-dir layout; for a preset's shapes with OpenAI's vocabulary the weights file also
    loads as pretrained=FILE under the open_clip name of that preset."""
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
    openai_vocab = vocab_sha256(tok) == OPENAI_VOCAB
    lines = []
    if not openai_vocab:  # open_clip then reads the folder's tokenizer files through transformers
        write_hf_tokenizer(tok, out)
        text_cfg["hf_tokenizer_name"] = "."
        lines.append("open_clip: this model's tokenizer is not OpenAI's; open_clip reads the folder's tokenizer.json "
                     "through transformers (pip install transformers)")
    bias = {"init_logit_bias": model.logit_bias.item()} if cfg.loss == "sigmoid" else {}  # open_clip's SigLIP switch
    config = {"model_cfg": {"embed_dim": cfg.embed_dim, "quick_gelu": cfg.quick_gelu, **bias,
                            "vision_cfg": {"image_size": cfg.image_size, "layers": cfg.vision_layers,
                                           "width": cfg.vision_width, "head_width": cfg.vision_width // cfg.vision_heads,
                                           "mlp_ratio": ratio["vision"], "patch_size": cfg.patch_size},
                            "text_cfg": text_cfg},
              "preprocess_cfg": {"mean": list(cfg.image_mean), "std": list(cfg.image_std), "interpolation": "bicubic",
                                 "resize_mode": "shortest", "size": cfg.image_size}}
    with open(os.path.join(out, "open_clip_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    weights = os.path.join(out, "open_clip_pytorch_model.bin")
    torch.save({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, weights)
    lines.insert(0, f"wrote {out}: open_clip_config.json, open_clip_pytorch_model.bin")
    lines.append(f"open_clip: create_model_and_transforms('local-dir:{out}')")
    name = open_clip_name(cfg)
    if name:
        if openai_vocab:
            lines.append(f"open_clip: also create_model_and_transforms({name!r}, pretrained={weights!r})")
        else:
            lines.append(f"open_clip: not loadable as {name!r} with pretrained=FILE: that name's tokenizer is "
                         f"OpenAI's and this model's is not; use local-dir")
    return lines


EXPORT_FORMATS = ("open_clip", "hf", "peft")


def export_peft(path, out, tokenizer=None):
    """A LoRA checkpoint as peft reads it: OUT/base, a transformers CLIPModel folder of the base weights
    (the logit scale as trained), and OUT/adapter, peft's adapter_config.json and adapter weights, so that
        PeftModel.from_pretrained(CLIPModel.from_pretrained(OUT/base), OUT/adapter)
    computes this checkpoint's features. Our fused q, k, v projection is transformers' q_proj, k_proj and
    v_proj stacked, so each adapter of a part is that module's adapter as it stands."""
    with reading(path):
        cfg, tok, sd, spec = read_weights(path, tokenizer=tokenizer, keep_lora=True)
    if spec is None:
        raise ValueError(f"{path} holds no LoRA adapters (train.py --lora R makes them): export it --format hf")
    if tok is None:
        raise ValueError(f"{path} carries no tokenizer: pass --tokenizer so that it travels with the export")
    base = start(CLIP(cfg, tok), {k: v for k, v in sd.items() if ".lora." not in k})
    os.makedirs(os.path.join(out, "base"), exist_ok=True)
    lines = export_hf(base, os.path.join(out, "base"))
    towers = {"visual.transformer.resblocks": "vision_model", "transformer.resblocks": "text_model"}
    parts = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "out": "self_attn.out_proj",
             "c_fc": "mlp.fc1", "c_proj": "mlp.fc2"}
    adapters, used = {}, set()
    for key, value in sd.items():
        m = re.fullmatch(r"(visual\.transformer\.resblocks|transformer\.resblocks)\.(\d+)\.(?:attn\.)?lora\.(\w+)\.([AB])", key)
        if m:
            adapters[f"base_model.model.{towers[m[1]]}.encoder.layers.{m[2]}.{parts[m[3]]}.lora_{m[4]}.weight"] = value
            used |= {(towers[m[1]], parts[m[3]])}
    # a pattern peft matches whole against each module's name: exactly the adapted towers and projections
    target = "|".join(sorted(rf"{t}\.encoder\.layers\.\d+\.{p.replace('.', chr(92) + '.')}" for t, p in used))
    config = {"peft_type": "LORA", "task_type": None, "r": spec["rank"], "lora_alpha": spec["alpha"],
              "lora_dropout": spec["dropout"], "target_modules": f"({target})", "bias": "none", "fan_in_fan_out": False,
              "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
              "modules_to_save": None, "base_model_name_or_path": None}
    folder = os.path.join(out, "adapter")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    weights = save_weights(adapters, folder, "adapter_model")
    return lines[:1] + [f"wrote {folder}: adapter_config.json, {os.path.basename(weights)}",
                        f"peft: PeftModel.from_pretrained(CLIPModel.from_pretrained({os.path.join(out, 'base')!r}), {folder!r})"]


def export(path, out, fmt, tokenizer=None):
    """Convert any weights load() reads to open_clip's, transformers' or (a LoRA checkpoint) peft's layout;
    returns what to tell the user. A LoRA checkpoint's open_clip and hf exports hold the merged weights."""
    if fmt == "peft":
        return export_peft(path, out, tokenizer)
    model, _ = load(path, tokenizer=tokenizer)
    if model.tokenizer is None:
        raise ValueError(f"{path} carries no tokenizer: pass --tokenizer (bpe_simple_vocab_16e6.txt.gz or a "
                         f"tokenizer.json) so that it travels with the export")
    os.makedirs(out, exist_ok=True)
    return export_hf(model, out) if fmt == "hf" else export_open_clip(model, out)
# ==== end of copy: weights ====


# ==== copied from clip.py: export-cli (shared code, kept identical to clip.py's region) ====
def export_main(argv=None):
    p = argparse.ArgumentParser(prog=f"{os.path.basename(__file__)} export",
                                description="write weights in open_clip's or transformers' layout")
    p.add_argument("checkpoint", help="OUT/checkpoint.pt of train.py, or any weights load() reads")
    p.add_argument("out", help="folder to write")
    p.add_argument("--format", required=True, choices=EXPORT_FORMATS)
    p.add_argument("--tokenizer", default=None, help="for weights that carry no tokenizer")
    args = p.parse_args(argv)
    try:
        for line in export(args.checkpoint, args.out, args.format, args.tokenizer):
            print(line)
    except (FileNotFoundError, ValueError, ImportError) as err:
        raise SystemExit(f"{p.prog}: {err}") from None
# ==== end of copy: export-cli ====


# ==== copied from clip.py: embed-images (shared code, kept identical to clip.py's region) ====
@torch.no_grad()
def embed_images(model, preprocess, images, chunk=64):
    """[N, D] normalised image features for PIL images or image files, `chunk` images decoded and encoded
    at a time: memory does not grow with N."""
    device, images, out = next(model.parameters()).device, list(images), []
    for i in range(0, len(images), chunk):
        pixels = torch.stack([preprocess(read_image(x) if isinstance(x, (str, os.PathLike)) else to_rgb(x))
                              for x in images[i:i + chunk]])
        out.append(model.encode_image(pixels.to(device), normalize=True).float())
    return torch.cat(out) if out else torch.empty(0)
# ==== end of copy: embed-images ====


# ==== copied from clip.py: classify (shared code, kept identical to clip.py's region) ====
def link(model, sims):
    """Probabilities from cosine similarities [N, C] with the model's own link: a softmax over the last
    dimension at the logit scale (learnt, or BriVL's fixed 1 / temperature), rows summing to 1; for a
    sigmoid-loss model (it has a logit_bias) each pair's sigmoid on its own, as SigLIP's demos show."""
    scale = model.logit_scale.exp().item()
    if getattr(model, "logit_bias", None) is not None:
        return torch.sigmoid(scale * sims + model.logit_bias.item())
    return (scale * sims).softmax(-1)


@torch.no_grad()
def label_probs(model, images, labels):
    """[N, C]: for N PIL images (or image files) and C label texts, each image's label probabilities
    from the model's eval preprocessing, features and link(); the model runs in eval mode meanwhile."""
    was_training = model.training
    model.eval()
    try:
        labels = list(labels)  # encoded 256 at a time: 20,000 texts cost what 256 do, but their features
        text = torch.cat([model.encode_texts(labels[i:i + 256]).float() for i in range(0, len(labels), 256)])
        return link(model, embed_images(model, model.preprocess(), images) @ text.T)
    finally:
        model.train(was_training)
# ==== end of copy: classify ====


# ==== copied from clip.py: predict (shared code, kept identical to clip.py's region) ====
IMAGE_FILES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def predict_main(argv=None):
    me = os.path.basename(__file__)
    p = argparse.ArgumentParser(prog=f"{me} predict", description="zero-shot labels for images, captions ranked for "
                                "images, or images ranked for a text")
    p.add_argument("--ckpt", required=True, help="OUT/checkpoint.pt, or any weights load() reads")
    p.add_argument("--image", nargs="+", default=[], help="image files")
    p.add_argument("--labels", default=None, help="comma-separated labels, e.g. 'a dog,a cat'")
    p.add_argument("--texts", default=None, help="a file of captions, one a line, to rank for each image")
    p.add_argument("--images", default=None, help="a folder of images to rank for --query")
    p.add_argument("--query", action="append", default=[], help="with --images: the text to rank them for")
    p.add_argument("--top", type=int, default=5, help="rows shown per image or query")
    p.add_argument("--json", action="store_true", help="one JSON object per image (or query), most probable first")
    # Only the keywords this file's load() takes become flags: each model offers what means something for it.
    options = inspect.signature(load).parameters
    if "tokenizer" in options:
        p.add_argument("--tokenizer", default=None, help="for weights that carry no tokenizer, or to replace theirs")
    if "font" in options:
        p.add_argument("--font", default=None, help="a Unifont .hex file instead of the glyphs the weights carry")
    if "image_size" in options:
        p.add_argument("--image-size", type=int, default=None, help="the input size of official weights")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    if args.device.split(":")[0] not in ("cpu", "cuda", "mps") or (args.device.startswith("cuda") and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: cpu, or cuda where a GPU is present")
    given = {k: getattr(args, k) for k in ("tokenizer", "font", "image_size") if getattr(args, k, None) is not None}
    try:
        if args.images:
            if not os.path.isdir(args.images):
                raise FileNotFoundError(f"{args.images}: no such folder (--images takes a folder of images)")
            images = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.lower().endswith(IMAGE_FILES))
            special = [f for f in images if not os.path.isfile(f)]  # FIFOs, devices, sockets, folders
            if special:
                print(f"{me} predict: left out {len(special)} entries of {args.images} that are not regular files "
                      f"(first: {special[0]})", file=sys.stderr)
            images = [f for f in images if f not in special]
            if not images or not args.query:
                raise ValueError(f"--images needs image files in {args.images} and at least one --query")
            queries, candidates = args.query, images
        else:
            if args.texts:  # a regular file of at most 64 MiB: a FIFO or /dev/zero is refused, not read
                lines = read_small_file(args.texts, "--texts file", 1 << 26).decode("utf-8", "replace").splitlines()
                texts = [line.strip() for line in lines if line.strip()]
            else:
                texts = [t.strip() for t in (args.labels or "").split(",") if t.strip()]
            if not args.image or not texts:
                raise ValueError("pass --image FILE... with --labels 'a,b,...' or --texts FILE (or --images DIR --query TEXT)")
            for path in args.image:
                if not os.path.exists(path):
                    raise FileNotFoundError(f"{path}: no such image file")
                if not os.path.isfile(path):
                    raise ValueError(f"{path}: not a regular file; pass image files")
            queries, candidates = args.image, texts
        model, preprocess = load(args.ckpt, **given)
        model.to(args.device)
        if getattr(model, "tokenizer", True) is None:
            raise ValueError(f"{args.ckpt} carries no tokenizer: pass --tokenizer")
        if args.images:  # images ranked for each query: the link over the images
            with torch.no_grad():
                text = model.encode_texts(queries).float()
            probs = link(model, text @ embed_images(model, preprocess, candidates).T)
        else:
            probs = model.classify(queries, candidates)  # [images, labels]
    except (FileNotFoundError, ValueError, ImportError, OSError) as err:
        raise SystemExit(f"{me} predict: {err}") from None
    except Exception as err:  # a model built from the user's file, run on the user's inputs: theirs, in one line
        if os.environ.get("TRAIN_TRACEBACK"):
            raise
        raise SystemExit(f"{me} predict: {args.ckpt}: {one_line(err)} (TRAIN_TRACEBACK=1 shows where)") from None
    key, kind = ("query", "images") if args.images else ("image", "labels")
    for q, row in zip(queries, probs):
        order = row.argsort(descending=True).tolist()
        if args.json:
            print(json.dumps({key: q, kind: [candidates[i] for i in order], "probs": [round(row[i].item(), 6) for i in order]},
                             ensure_ascii=False))
            continue
        print(q)
        for i in order[:args.top]:
            print(f"  {row[i].item():6.1%}  {candidates[i]}")
# ==== end of copy: predict ====


# ==== copied from clip.py: tokenizer (shared code, kept identical to clip.py's region) ====
def bytes_to_unicode():
    # GPT-2's reversible map from bytes to printable characters: BPE then never sees whitespace or
    # control bytes, and every byte has a symbol, so no text is ever unknown.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


# OpenAI's pre-tokenizer pattern (simple_tokenizer.py): contractions, letter runs, single digits, punctuation.
CLIP_PATTERN = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
SOT = "<|startoftext|>"
EOT = "<|endoftext|>"


# A text is cut to this many characters before anything else: 77 tokens never need more, and the
# normalisation, the pre-tokenizer and BPE all cost time in the text's length.
MAX_TEXT_CHARS = 8192
# The BPE trainer learns from pre-tokenized pieces up to this long: a longer "word" (a URL, a hash, a
# run of one letter) teaches no merge worth a vocabulary slot, and would cost the trainer its square.
MAX_PIECE_CHARS = 64


def clean_text(text):
    # OpenAI runs ftfy.fix_text (which ends in NFC), unescapes HTML twice, collapses whitespace and
    # lower-cases. ftfy is not a dependency: its mojibake repair is the one step left out. A lone
    # surrogate (a JSON "\ud800") has no UTF-8 form for the tokenizer: it becomes "?".
    text = str(text)[:MAX_TEXT_CHARS].encode("utf-8", "replace").decode("utf-8")
    text = html.unescape(html.unescape(unicodedata.normalize("NFC", text)))
    return re.sub(r"\s+", " ", text).strip().lower()


class Tokenizer:
    """CLIP's byte-level BPE on the tokenizers library; __call__(list of str) -> LongTensor [N, context]."""

    def __init__(self, tokenizer, context_length=77):
        self.tokenizer = tokenizer
        self.context_length = context_length
        self.sot = tokenizer.token_to_id(SOT)
        self.eot = tokenizer.token_to_id(EOT)
        if self.sot is None or self.eot is None:
            raise ValueError(f"tokenizer has no {SOT} / {EOT} tokens: it is not a CLIP tokenizer")

    @property
    def vocab_size(self):
        return self.tokenizer.get_vocab_size()

    @staticmethod
    def _skeleton(model):
        from tokenizers import Regex, Tokenizer as HFTokenizer, pre_tokenizers

        tok = HFTokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(CLIP_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
        return tok

    @classmethod
    def from_merges(cls, merges, context_length=77):
        """OpenAI's vocabulary layout: 256 byte symbols, the same with </w>, one per merge, SOT, EOT."""
        from tokenizers.models import BPE

        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
        tok = cls._skeleton(BPE(vocab={t: i for i, t in enumerate(vocab)}, merges=merges, end_of_word_suffix="</w>"))
        tok.add_special_tokens([SOT, EOT])  # already in the vocabulary: keeps their ids
        return cls(tok, context_length)

    @classmethod
    def from_file(cls, path, context_length=77):
        """An HF CLIP tokenizer.json, or OpenAI's bpe_simple_vocab_16e6.txt.gz (merges, one per line)."""
        import io

        from tokenizers import Tokenizer as HFTokenizer

        if not os.path.exists(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file; pass a tokenizer.json or bpe_simple_vocab_16e6.txt.gz")
        raw = read_small_file(path, "tokenizer file", 1 << 26)
        if path.endswith(".json"):
            try:
                return cls(HFTokenizer.from_str(raw.decode("utf-8")), context_length)
            except Exception as e:  # the tokenizers library's errors run to many lines
                raise ValueError(f"{path}: not a tokenizer.json this reads ({one_line(e)})") from None
        if path.endswith(".gz"):  # unpacked to at most 64 MiB too (OpenAI's: 1.4 MiB)
            with gzip.GzipFile(fileobj=io.BytesIO(raw)) as f:
                raw = f.read(1 << 26)
        lines = raw.split(b"\n", 49152)[:49152]  # what is kept, never a line per byte of the rest
        lines = [line.decode("utf-8", "replace") for line in lines]
        # OpenAI keeps the first 49152 - 256 - 2 merges after the version line; smaller files keep all.
        return cls.from_merges([tuple(m.split()) for m in lines[1:49152 - 256 - 2 + 1] if m.strip()], context_length)

    @classmethod
    def train(cls, texts, vocab_size=1024, context_length=77):
        """A small BPE fitted to the captions at hand (the synthetic default needs no vocabulary file).

        Learnt here rather than by the tokenizers library's trainer, whose choice among equally frequent
        pairs changes from call to call: the same data and seed must give the same vocabulary.
        """
        import heapq
        from collections import Counter, defaultdict

        from tokenizers.models import BPE

        pre = cls._skeleton(BPE()).pre_tokenizer
        words = Counter()
        for t in texts:
            for piece, _ in pre.pre_tokenize_str(clean_text(t)):
                if len(piece) <= MAX_PIECE_CHARS:
                    words[tuple(piece[:-1]) + (piece[-1] + "</w>",)] += 1
        words = [[list(w), c] for w, c in sorted(words.items())]
        counts, where = Counter(), defaultdict(set)
        for i, (w, c) in enumerate(words):
            for p in zip(w, w[1:]):
                counts[p] += c
                where[p].add(i)
        heap = [(-c, p) for p, c in counts.items()]
        heapq.heapify(heap)
        merges = []
        while heap and len(merges) < vocab_size - 512 - 2:
            c, best = heapq.heappop(heap)
            if counts.get(best, 0) != -c or c == 0:
                continue  # a stale entry: its count changed after it was pushed
            merges.append(best)
            touched = set()
            for i in sorted(where.pop(best)):
                w, n = words[i]
                for p in zip(w, w[1:]):
                    counts[p] -= n
                    touched.add(p)
                j, out = 0, []
                while j < len(w):
                    if j < len(w) - 1 and (w[j], w[j + 1]) == best:
                        out.append(w[j] + w[j + 1])
                        j += 2
                    else:
                        out.append(w[j])
                        j += 1
                words[i][0] = out
                for p in zip(out, out[1:]):
                    counts[p] += n
                    where[p].add(i)
                    touched.add(p)
            counts.pop(best, None)
            for p in touched:
                if counts.get(p, 0) > 0:
                    heapq.heappush(heap, (-counts[p], p))
        return cls.from_merges(merges, context_length)

    def to_str(self):
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, s, context_length=77):
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(s), context_length)

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        encs = self.tokenizer.encode_batch([clean_text(t) for t in texts], add_special_tokens=False)
        rows = []
        for e in encs:
            ids = [self.sot] + e.ids[: self.context_length - 2] + [self.eot]  # truncation keeps EOT last
            rows.append(ids + [0] * (self.context_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long).reshape(len(texts), self.context_length)

    def decode(self, ids):
        byte_decoder = {c: b for b, c in bytes_to_unicode().items()}
        text = "".join(self.tokenizer.id_to_token(i) for i in ids if i not in (0, self.sot, self.eot))
        words = [bytes(byte_decoder[c] for c in w).decode("utf-8", errors="replace") for w in text.split("</w>")]
        return " ".join(words).strip()
# ==== end of copy: tokenizer ====


# ==== copied from clip.py: kernel (shared code, kept identical to clip.py's region) ====
# Two local ops do the heavy work of the losses, from tiles of t = scale * x @ y.T (+ bias), x the
# rows of this rank (n x D), y the keys (k x D). Neither keeps t for the backward: each saves only its
# inputs and a vector or two, O((n + k) D) in all, and the backward makes the tiles again (lse) or
# has its gradients already (sigmoid). How much of t exists at once: on the PyTorch path one tile of
# BLOCK x BLOCK (1024 x 1024 fp32, 4 MB; for n, k <= 1024 that is the whole of t, for a batch of 16k
# one 256th of it); on the Triton path the forward's tiles (64-128 a side) stay in registers, and the
# backward writes G or P in row chunks of at most WORKSPACE elements (or 4 k D), a bound that does not
# grow with the batch.
#
# lse_tiles(x, y, scale, two_way) -> (row_lse [n], col_lse [k] or [0]): log-sum-exp of t along rows
# and (two_way) along columns, from the same tiles in one pass. InfoNCE's loss is lse minus the
# positive's logit. Backward, for incoming g_row, g_col:
#     G_ij = g_row_i * exp(t_ij - row_lse_i) + g_col_j * exp(t_ij - col_lse_j)
#     dx = scale * G @ y,  dy = scale * G.T @ x,  d(scale) = sum(G * x @ y.T)
# Saved: x, y, scale, row_lse, col_lse. Cost: 2 B^2 D forward, 6 B^2 D backward (t made again).
#
# sigmoid_tiles(x, y, scale, bias, eager) -> sum_j softplus(t_ij) per row (SigLIP's loss is that
# less the positive's logit, -log sigmoid(u) = softplus(u) - u). Backward, with P_ij = g_i * sigmoid(t_ij):
#     dx = scale * P @ y,  dy = scale * P.T @ x,  d(scale) = sum(P * x @ y.T),  d(bias) = sum(P)
# A loss that is a mean over rows sends the same g to every row, and then these are g times the ones
# for g = 1. So for such a caller (eager: sigmoid_loss, when a gradient will be wanted) the forward
# makes them too, from the same tiles, and the backward only scales them: 3 B^2 D in all, as the
# naive form's one matrix product forward and two backward. Saved: x, y, scale, bias and, eager,
# dx, dy, d(scale), d(bias). Without eager (sigmoid_rows: any row weights) the backward makes the
# tiles again.
#
# Below: the PyTorch tiles (the reference, on every device), then the two ops registered as torch
# custom ops (torch.compile sees one node each), then the Triton kernels used on CUDA.


BLOCK = 1024  # tile edge of the PyTorch path: a 1024 x 1024 fp32 tile is 4 MB
WORKSPACE = 2 ** 27  # elements of the Triton backward's G chunk, or 4 k d if larger: memory stays O(B D)
_NS = __name__.replace(".", "_")  # one op namespace per file, so copies of this code can coexist


# ---- the PyTorch tiles


def _acc_dtype(x):
    return torch.promote_types(x.dtype, torch.float32)  # statistics in fp32 at least


def _lse_torch(x, y, scale, two_way):
    n, k = x.shape[0], y.shape[0]
    acc = _acc_dtype(x)
    s = scale.to(acc)
    row = torch.full((n,), -math.inf, device=x.device, dtype=acc)
    col = torch.full((k if two_way else 0,), -math.inf, device=x.device, dtype=acc)
    for i in range(0, n, BLOCK):
        for j in range(0, k, BLOCK):
            t = (x[i:i + BLOCK] @ y[j:j + BLOCK].T).to(acc) * s
            row[i:i + BLOCK] = torch.logaddexp(row[i:i + BLOCK], t.logsumexp(1))
            if two_way:  # the same tile gives the column statistics: one pass for both directions
                col[j:j + BLOCK] = torch.logaddexp(col[j:j + BLOCK], t.logsumexp(0))
    return row, col


def _lse_backward_torch(x, y, scale, row, col, g_row, g_col):
    n, k = x.shape[0], y.shape[0]
    acc = row.dtype
    s = scale.to(acc)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device)
    ds = torch.zeros((), dtype=acc, device=x.device)
    for i in range(0, n, BLOCK):
        xi = x[i:i + BLOCK]
        for j in range(0, k, BLOCK):
            yj = y[j:j + BLOCK]
            raw = (xi @ yj.T).to(acc)
            t = raw * s
            g = torch.exp(t - row[i:i + BLOCK, None]) * g_row[i:i + BLOCK, None]
            if col.numel():
                g += torch.exp(t - col[None, j:j + BLOCK]) * g_col[None, j:j + BLOCK]
            ds += (g * raw).sum()
            g = g.to(x.dtype)
            dx[i:i + BLOCK] += (g @ yj).to(acc) * s
            dy[j:j + BLOCK] += (g.T @ xi).to(acc) * s
    return dx.to(x.dtype), dy.to(y.dtype), ds.to(scale.dtype)


def _sig_torch(x, y, scale, bias, g):
    """Row sums of softplus(t), and with g (None: every g_i = 1) the gradients; g False: sums only."""
    n, k = x.shape[0], y.shape[0]
    acc = _acc_dtype(x)
    s, b = scale.to(acc), bias.to(acc)
    rows = torch.zeros(n, device=x.device, dtype=acc)
    grads = g is not False
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if grads else x.new_empty(0)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device) if grads else x.new_empty(0)
    dsb = torch.zeros(2, dtype=acc, device=x.device) if grads else x.new_empty(0, dtype=acc)
    for i in range(0, n, BLOCK):
        xi = x[i:i + BLOCK]
        for j in range(0, k, BLOCK):
            yj = y[j:j + BLOCK]
            raw = (xi @ yj.T).to(acc)
            t = raw * s + b
            if g is not False and g is not None:
                p = torch.sigmoid(t) * g[i:i + BLOCK, None].to(acc)
            else:
                rows[i:i + BLOCK] += F.softplus(t).sum(1)
                if not grads:
                    continue
                p = torch.sigmoid(t)
            dsb[0] += (p * raw).sum()
            dsb[1] += p.sum()
            p = p.to(x.dtype)
            dx[i:i + BLOCK] += (p @ yj).to(acc) * s
            dy[j:j + BLOCK] += (p.T @ xi).to(acc) * s
    return rows, dx.to(x.dtype), dy.to(y.dtype), dsb


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


# ---- the ops: contracts (custom ops), backend choice, autograd


try:  # Triton ships with CUDA builds of torch; without it the blockwise PyTorch path runs everywhere.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


def _use_triton(x):
    # TRITON_INTERPRET=1 runs the kernels on the CPU (slowly): that is how CI tests them.
    return (triton is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
            and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1"))


@torch.library.custom_op(f"{_NS}::lse_tiles", mutates_args=())
def lse_tiles(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, two_way: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(row_lse [n], col_lse [k] or [0]) of scale * x @ y.T, never materialising it."""
    if _use_triton(x):
        row, col = _lse_triton(x.contiguous(), y.contiguous(), scale, two_way)
        return row.to(_acc_dtype(x)), col.to(_acc_dtype(x))
    return _lse_torch(x, y, scale, two_way)


@lse_tiles.register_fake
def _lse_tiles_fake(x, y, scale, two_way):
    return x.new_empty(x.shape[0], dtype=_acc_dtype(x)), x.new_empty(y.shape[0] if two_way else 0, dtype=_acc_dtype(x))


@torch.library.custom_op(f"{_NS}::lse_tiles_backward", mutates_args=())
def lse_tiles_backward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, row: torch.Tensor, col: torch.Tensor,
                       g_row: torch.Tensor, g_col: torch.Tensor, need_x: bool, need_y: bool
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    if _use_triton(x):
        return _lse_backward_triton(x.contiguous(), y.contiguous(), scale, row, col, g_row, g_col, need_x, need_y)
    return _lse_backward_torch(x, y, scale, row, col, g_row, g_col)


@lse_tiles_backward.register_fake
def _lse_tiles_backward_fake(x, y, scale, row, col, g_row, g_col, need_x, need_y):
    return torch.empty_like(x), torch.empty_like(y), torch.empty_like(scale)


def _lse_setup(ctx, inputs, output):
    x, y, scale, _ = inputs
    ctx.save_for_backward(x, y, scale, *output)


def _lse_backward(ctx, g_row, g_col):
    x, y, scale, row, col = ctx.saved_tensors
    g_row = torch.zeros_like(row) if g_row is None else g_row
    g_col = torch.zeros_like(col) if g_col is None else g_col
    need_x, need_y, need_s = ctx.needs_input_grad[:3]
    dx, dy, ds = lse_tiles_backward(x, y, scale, row, col, g_row, g_col, need_x, need_y)
    return dx if need_x else None, dy if need_y else None, ds if need_s else None, None


lse_tiles.register_autograd(_lse_backward, setup_context=_lse_setup)


@torch.library.custom_op(f"{_NS}::sigmoid_tiles", mutates_args=())
def sigmoid_tiles(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eager: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row sums [n], then for g = 1: dx, dy, and d(scale), d(bias) as [2]; the last three empty unless eager)."""
    if _use_triton(x):
        return _sig_triton(x.contiguous(), y.contiguous(), scale, bias, None if eager else False)
    return _sig_torch(x, y, scale, bias, None if eager else False)


@sigmoid_tiles.register_fake
def _sigmoid_tiles_fake(x, y, scale, bias, eager):
    acc = _acc_dtype(x)
    if eager:
        return x.new_empty(x.shape[0], dtype=acc), torch.empty_like(x), torch.empty_like(y), x.new_empty(2, dtype=acc)
    return x.new_empty(x.shape[0], dtype=acc), x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=acc)


@torch.library.custom_op(f"{_NS}::sigmoid_tiles_backward", mutates_args=())
def sigmoid_tiles_backward(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                           g: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, dsb: torch.Tensor
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(dx, dy, [d(scale), d(bias)]) for row weights g: the forward's gradients for g = 1 (dx, dy, dsb,
    when it made them, which it does only for callers whose rows all get the same g) scaled; else from
    the tiles again."""
    if dsb.numel():  # eager: the caller sums or averages the rows, so every g_i is g_0 (no check, no sync)
        c = g[0].to(dsb.dtype)
        return dx * c.to(dx.dtype), dy * c.to(dy.dtype), dsb * c
    if _use_triton(x):
        return _sig_triton(x.contiguous(), y.contiguous(), scale, bias, g)[1:]
    return _sig_torch(x, y, scale, bias, g)[1:]


@sigmoid_tiles_backward.register_fake
def _sigmoid_tiles_backward_fake(x, y, scale, bias, g, dx, dy, dsb):
    return torch.empty_like(x), torch.empty_like(y), x.new_empty(2, dtype=_acc_dtype(x))


def _sig_setup(ctx, inputs, output):
    x, y, scale, bias, _ = inputs
    ctx.save_for_backward(x, y, scale, bias, *output[1:])


def _sig_backward(ctx, g, *_):
    x, y, scale, bias, dx, dy, dsb = ctx.saved_tensors
    dx, dy, dsb = sigmoid_tiles_backward(x, y, scale, bias, g, dx, dy, dsb)
    need = ctx.needs_input_grad
    return (dx if need[0] else None, dy if need[1] else None, dsb[0].to(scale.dtype).reshape(scale.shape) if need[2]
            else None, dsb[1].to(bias.dtype).reshape(bias.shape) if need[3] else None, None)


sigmoid_tiles.register_autograd(_sig_backward, setup_context=_sig_setup)


def sigmoid_rows(x, y, scale, bias):
    """sum_j softplus(scale * x_i . y_j + bias) per row i, differentiable in all four (with any weights on
    the rows: the backward recomputes the tiles), O(B D) memory."""
    return sigmoid_tiles(x, y, scale, bias, False)[0]


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


# ---- the Triton kernels (CUDA; TRITON_INTERPRET=1 runs them on the CPU)


if triton is not None:
    @triton.jit
    def _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
              BD: tl.constexpr):
        # x[rm] @ y[rn].T in fp32, D in chunks of BD; rows and columns past the ends read as zeros.
        raw = tl.zeros([BM, BN], dtype=tl.float32)
        for d0 in range(0, d, BD):
            rd = d0 + tl.arange(0, BD)
            xa = tl.load(X + rm[:, None] * sxn + rd[None, :] * sxd, mask=(rm[:, None] < n) & (rd[None, :] < d), other=0.0)
            yb = tl.load(Y + rn[:, None] * syn + rd[None, :] * syd, mask=(rn[:, None] < k) & (rd[None, :] < d), other=0.0)
            raw += tl.dot(xa, tl.trans(yb), input_precision=PREC)
        return raw

    @triton.jit
    def _lse_fwd_kernel(X, Y, SCALE, OFFSET, ROW, COL, n, k, d, sxn, sxd, syn, syd,
                        TWO_WAY: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        # Program (row block, column split): sums of exp(t - offset) over its tiles, added atomically.
        # offset = the largest |t| possible less 80, so no exp overflows fp32 (see _lse_triton).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        s = tl.load(SCALE).to(tl.float32)
        c = tl.load(OFFSET)
        row_sum = tl.zeros([BM], dtype=tl.float32)
        for jb in range(tl.program_id(1), tl.cdiv(k, BN), SPLIT):
            rn = jb * BN + tl.arange(0, BN)
            raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
            e = tl.where((rm[:, None] < n) & (rn[None, :] < k), tl.exp(raw * s - c), 0.0)
            row_sum += tl.sum(e, 1)
            if TWO_WAY:
                tl.atomic_add(COL + rn, tl.sum(e, 0), mask=rn < k)
        tl.atomic_add(ROW + rm, row_sum, mask=rm < n)

    @triton.jit
    def _grad_tile_kernel(X, Y, SCALE, ROW, COL, GROW, GCOL, G, DSP, n, k, d, sxn, sxd, syn, syd, sgn,
                          TWO_WAY: tl.constexpr, PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr,
                          BD: tl.constexpr):
        # One tile of scale * G for a chunk of rows, written out, and the tile's share of d(scale).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        s = tl.load(SCALE).to(tl.float32)
        raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
        t = raw * s
        row = tl.load(ROW + rm, mask=rm < n, other=0.0)
        g = tl.exp(t - row[:, None]) * tl.load(GROW + rm, mask=rm < n, other=0.0)[:, None]
        if TWO_WAY:
            col = tl.load(COL + rn, mask=rn < k, other=0.0)
            g += tl.exp(t - col[None, :]) * tl.load(GCOL + rn, mask=rn < k, other=0.0)[None, :]
        inside = (rm[:, None] < n) & (rn[None, :] < k)
        g = tl.where(inside, g, 0.0)
        tl.store(DSP + tl.program_id(0) * tl.num_programs(1) + tl.program_id(1), tl.sum(tl.sum(g * raw, 1), 0))
        tl.store(G + rm[:, None] * sgn + rn[None, :], (g * s).to(G.dtype.element_ty), mask=inside)


def _tiles(x):
    big = x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda
    prec = "ieee" if x.dtype == torch.float32 else "tf32"  # exact fp32; half types use their own dot
    return dict(PREC=prec, BM=128 if big else 64, BN=128 if big else 64, BD=64 if x.shape[1] >= 64 else 32,
                num_warps=4, num_stages=3)


def _lse_triton(x, y, scale, two_way):
    n, k = x.shape[0], y.shape[0]
    # exp(t - offset) must neither overflow (t - offset <= 80 < 88) nor, for a whole row or column,
    # underflow: exact while a row or column has a logit within 167 of the largest possible |t|,
    # which always holds for unit features with scale <= 83, and in practice at CLIP's cap of 100.
    offset = _offset(x, y, scale)
    row = torch.zeros(n, device=x.device, dtype=torch.float32)
    col = torch.zeros(k if two_way else 0, device=x.device, dtype=torch.float32)
    meta = _tiles(x)
    # Enough programs to fill the GPU: split the columns when there are few row blocks.
    sms = torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 4
    blocks = triton.cdiv(n, meta["BM"])
    split = max(1, min(triton.cdiv(k, meta["BN"]), triton.cdiv(4 * sms, blocks)))
    _lse_fwd_kernel[(blocks, split)](x, y, scale.reshape(1), offset, row, col, n, k, x.shape[1], x.stride(0),
                                     x.stride(1), y.stride(0), y.stride(1), TWO_WAY=two_way, SPLIT=split, **meta)
    return row.log() + offset, col.log() + offset


def _mm_f32(a, b):
    # fp32 result of a half-precision product, accumulated and written in fp32 by cuBLAS where torch can
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch < 2.8
            pass
    return (a @ b).float()


def _lse_backward_triton(x, y, scale, row, col, g_row, g_col, need_x, need_y):
    # The kernel writes scale * G for a chunk of rows into a workspace; dx and dy are then plain matrix
    # products (cuBLAS's speed) and each tile is recomputed once. Adding into dx and dy from inside the
    # kernel instead costs an atomic per element per tile, an order of magnitude slower.
    n, k, d = x.shape[0], y.shape[0], x.shape[1]
    two_way = col.numel() > 0
    meta = _tiles(x)
    bm, bn = meta["BM"], meta["BN"]
    rows = min(n, max(bm, max(WORKSPACE, 4 * k * d) // max(k, 1) // bm * bm))
    work = torch.empty(rows, k, device=x.device, dtype=x.dtype)
    dsp = torch.empty(triton.cdiv(rows, bm) * triton.cdiv(k, bn), device=x.device, dtype=torch.float32)
    # Full-size outputs even when not needed: the op's fake (for torch.compile) promises these shapes.
    dx = torch.empty_like(x) if need_x else torch.zeros_like(x)
    dy = torch.zeros(y.shape, device=x.device, dtype=torch.float32)
    ds = torch.zeros((), device=x.device, dtype=torch.float32)
    row, g_row = row.float(), g_row.float()
    col, g_col = (col.float(), g_col.float()) if two_way else (row, g_row)
    for i in range(0, n, rows):
        m = min(rows, n - i)
        g, xi = work[:m], x[i:i + m]
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bn))
        _grad_tile_kernel[grid](xi, y, scale.reshape(1), row[i:i + m], col, g_row[i:i + m], g_col, g, dsp, m, k, d,
                                xi.stride(0), xi.stride(1), y.stride(0), y.stride(1), g.stride(0),
                                TWO_WAY=two_way, **meta)
        ds += dsp[:grid[0] * grid[1]].sum()
        if need_x:
            torch.mm(g, y, out=dx[i:i + m])
        if need_y:
            dy += _mm_f32(g.T, xi)
    return dx, dy.to(y.dtype), ds.to(scale.dtype)


if triton is not None:
    @triton.jit
    def _sig_tile_kernel(X, Y, SCALE, BIAS, GROW, ROWS, P, DSP, n, k, d, sxn, sxd, syn, syd, spn,
                         ROWSUM: tl.constexpr, GRAD: tl.constexpr, WEIGHTED: tl.constexpr, PREC: tl.constexpr,
                         BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        # One tile of t = scale * x @ y.T + bias: its softplus row sums (added atomically), and
        # scale * g * sigmoid(t) written out with the tile's shares of d(scale) and d(bias).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        s = tl.load(SCALE).to(tl.float32)
        b = tl.load(BIAS).to(tl.float32)
        raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
        t = raw * s + b
        inside = (rm[:, None] < n) & (rn[None, :] < k)
        if ROWSUM:  # softplus, stable both ways: max(t, 0) + log(1 + exp(-|t|))
            sp = tl.where(inside, tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t))), 0.0)
            tl.atomic_add(ROWS + rm, tl.sum(sp, 1), mask=rm < n)
        if GRAD:
            p = 1.0 / (1.0 + tl.exp(-t))
            if WEIGHTED:
                p = p * tl.load(GROW + rm, mask=rm < n, other=0.0)[:, None]
            p = tl.where(inside, p, 0.0)
            at = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 2
            tl.store(DSP + at, tl.sum(tl.sum(p * raw, 1), 0))
            tl.store(DSP + at + 1, tl.sum(tl.sum(p, 1), 0))
            tl.store(P + rm[:, None] * spn + rn[None, :], (p * s).to(P.dtype.element_ty), mask=inside)


def _sig_triton(x, y, scale, bias, g):
    # As _lse_backward_triton: the kernel writes a chunk of rows of scale * P into a workspace and dx,
    # dy are cuBLAS products of it. g None: gradients for g = 1 with the row sums; g False: sums only.
    n, k, d = x.shape[0], y.shape[0], x.shape[1]
    meta = _tiles(x)
    bm, bn = meta["BM"], meta["BN"]
    rowsum, grad, weighted = g is None or g is False, g is not False, g is not None and g is not False
    rows = torch.zeros(n, device=x.device, dtype=torch.float32)
    if not grad:
        _sig_tile_kernel[(triton.cdiv(n, bm), triton.cdiv(k, bn))](
            x, y, scale.reshape(1), bias.reshape(1), rows, rows, rows, rows, n, k, d, x.stride(0), x.stride(1),
            y.stride(0), y.stride(1), 0, ROWSUM=True, GRAD=False, WEIGHTED=False, **meta)
        return rows, x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    chunk = min(n, max(bm, max(WORKSPACE, 4 * k * d) // max(k, 1) // bm * bm))
    work = torch.empty(chunk, k, device=x.device, dtype=x.dtype)
    dsp = torch.empty(triton.cdiv(chunk, bm) * triton.cdiv(k, bn) * 2, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dy = torch.zeros(y.shape, device=x.device, dtype=torch.float32)
    dsb = torch.zeros(2, device=x.device, dtype=torch.float32)
    gw = g.float() if weighted else rows
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        p, xi = work[:m], x[i:i + m]
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bn))
        _sig_tile_kernel[grid](xi, y, scale.reshape(1), bias.reshape(1), gw[i:i + m], rows[i:i + m], p, dsp, m, k, d,
                               xi.stride(0), xi.stride(1), y.stride(0), y.stride(1), p.stride(0),
                               ROWSUM=rowsum, GRAD=True, WEIGHTED=weighted, **meta)
        dsb += dsp[:grid[0] * grid[1] * 2].view(-1, 2).sum(0)
        torch.mm(p, y, out=dx[i:i + m])
        dy += _mm_f32(p.T, xi)
    return rows, dx, dy.to(y.dtype), dsb


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


def _offset(a, b, scale):
    # The largest |logit| possible less 80: exp(t - offset) never overflows fp32 (see _lse_triton).
    bound = (scale.float().abs() * torch.linalg.vector_norm(a, dim=1, dtype=torch.float32).max()
             * torch.linalg.vector_norm(b, dim=1, dtype=torch.float32).max())
    return torch.clamp(bound - 80, min=0).reshape(1)


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
# ==== end of copy: kernel ====


# ----------------------------------------------------------------------------------------------
# The model: CLIP (copied above) with LaCLIP's training texts and loss mixed in


class LaCLIP(LaCLIPMethod, CLIP):
    pass


if __name__ == "__main__":

    commands = {"rewrite": rewrite_main, "predict": predict_main, "export": export_main}
    if sys.argv[1:2] not in ([c] for c in commands):
        raise SystemExit("usage: python laclip.py rewrite --captions IN.txt --out OUT.txt --endpoint URL\n"
                         "       python laclip.py predict --ckpt CHECKPOINT --image A.jpg --labels 'a dog,a cat'\n"
                         "       python laclip.py export CHECKPOINT OUT_DIR --format open_clip|hf\n"
                         "(train with: torchrun train.py --model laclip)")
    commands[sys.argv[1]](sys.argv[2:])
