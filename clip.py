"""CLIP (Radford et al. 2021) in one file: model, tokenizer, exact global-batch loss, weight loading.

Two towers, a ViT for images and a causal transformer for text, each projected to a shared space
and L2-normalised; a learned temperature scales the cosine similarities, and the loss is InfoNCE in
both directions over the whole global batch: every image against every text of every rank.

Use it alone (it imports nothing from this repository):
    model, preprocess = load("ViT-B-32.pt")          # OpenAI / open_clip files and folders, HF CLIPModel
    probs = model.classify([pil_image], ["a dog", "a cat"])        # [1, 2], the row sums to 1
    text = model.encode_texts(["a photo of a dog"])                # [1, D], L2-normalised
    model = build("ViT-B-16", tokenizer="bpe_simple_vocab_16e6.txt.gz")   # a new model from keywords
    python clip.py predict --ckpt CKPT --image a.jpg --labels 'a dog,a cat'
Parameter names follow OpenAI's state_dict, so OpenAI and open_clip ViT checkpoints load strictly.

Your own loop (runs as written with this file alone; four plain images stand in for data):
    import numpy as np, torch
    from PIL import Image
    import clip
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "yellow")]
    captions = ["a red picture", "a green picture", "a blue picture", "a yellow picture"]
    model = clip.build("tiny", captions=captions)        # tiny trains its BPE tokenizer on captions
    opt = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    transform, rng = model.transform(train=True), np.random.default_rng(0)
    for step in range(20):
        samples = [transform({"image": i, "text": t}, rng) for i, t in zip(images, captions)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        loss = model.loss(model(batch))                  # exact over every rank under torch.distributed
        loss.backward(); opt.step(); opt.zero_grad(); model.after_step()
    print(model.classify(images, ["red", "green", "blue", "yellow"]))   # [4, 4] probabilities

The interface (train.py and data.py use nothing else; every model file implements it):
    build(size, ...) -> model                   from keywords; create(args, captions, extra) is train.py's
                                                thin layer over it, add_args(parser) its flags (and
                                                finish_args(args) the defaults that follow from others;
                                                RANGES the (lowest, highest) of its numeric flags)
    model.transform(train, images=None)         f(sample, rng): {'image': PIL image, 'text': str} -> {'image':
                                                uint8 [3, H, W], 'text': token ids}; images: the image's
                                                transform (train.py: data.py's random crop), else preprocess
    model(batch) -> out                         batch: those dicts stacked; out: normalised 'image' and
                                                'text' features, 'scale' (the exp'd logit scale)
    model.loss(out) -> scalar                   InfoNCE (or SigLIP's sigmoid loss), exact over the global batch
    model.after_step()                          after each optimizer step: clamps the logit scale at 100
    model.optimizer_groups(weight_decay)        AdamW groups: decay on weight matrices only, none on biases,
                                                norms, embeddings and the logit scale; frozen parameters left out
    model.encode_texts(list_of_str) -> [N, D]   L2-normalised; model.encode_image(pixels, normalize=True)
    model.classify(images, labels) -> [N, C]    label probabilities for PIL images (softmax; SigLIP: sigmoid)
    model.extra_state() -> dict                 config and tokenizer, saved beside the weights
    model.towers(), model.shard_units()         the towers by name (LoRA), the residual blocks and towers
                                                (--fsdp shards each, --grad-checkpointing recomputes blocks)
    model.cfg.image_size                        the input side (train.py's crop, a teacher's view)
train.py's recipe around it (open_clip's): AdamW(optimizer_groups(0.2), lr 5e-4, betas (0.9, 0.98), eps 1e-6),
a linear warmup (10,000 steps, at most a tenth of the run) then cosine decay, the gradients' global norm
clipped at 1, after_step() after each step. The demo (--size tiny on the synthetic data) trains at lr 1e-3
with weight decay 0.1, as the loop above does. LoRA, distillation and export work through this interface,
once for every model, in train.py.

Layout: config, layers, towers, the model, its loss, inputs, building, weights in, predict, then the
tokenizer and the fused loss kernels. Regions marked `# ==== region NAME` are copied, the same lines,
into the other model files (in this repository tests/test_copies.py checks the copies and re-copies
them with --fix).
"""

import argparse
import contextlib
import gzip
import html
import inspect
import io
import json
import math
import os
import re
import sys
import unicodedata
from collections import OrderedDict
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# ----------------------------------------------------------------------------------------------
# Config
# ==== region config (copied into laclip.py) ====
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
    # The text is read at its end-of-text token: the first eos_id (transformers' rule: tokens added to a
    # vocabulary take ids above it), or with None the highest id (OpenAI's rule).
    eos_id: int = None
    loss: str = "softmax"  # CLIP's InfoNCE; sigmoid: SigLIP's pairwise loss, which adds a learnt logit bias
    init_logit_scale: float = None  # exp'd, of the softmax loss (None: 1 / 0.07); SigLIP's is always 10
    image_mean: tuple = MEAN  # the preprocessing the weights expect
    image_std: tuple = STD

    def __post_init__(self):
        self.vision_mlp = self.vision_mlp or 4 * self.vision_width
        self.text_mlp = self.text_mlp or 4 * self.text_width
        self.image_mean, self.image_std = tuple(self.image_mean), tuple(self.image_std)


CONFIGS = {
    # Two CPU cores train it in minutes on the synthetic data (vocab from the tokenizer); its 16 patches of 12 px
    # and sharp starting temperature learn shape, beyond colour, sooner there (docs/measurements.md).
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
# ==== end of region config ====


# ----------------------------------------------------------------------------------------------
# Layers
# ==== region transformer (copied into clippo.py, altclip.py, laclip.py) ====
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

    def forward(self, x, causal=False):
        b, n, w = x.shape
        q, k, v = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(b, n, 3, self.heads, -1).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(q, k, v, is_causal=causal).transpose(1, 2).reshape(b, n, w)
        return self.out_proj(x)


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

    def forward(self, x, causal=False):
        x = x + self.attn(self.ln_1(x), causal)
        return x + self.mlp(self.ln_2(x))


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


def keep_patches(x, keep):
    """x [B, N, W] -> [B, K, W]: the patches that keep [B, K] names (FLIP's patch dropout: train.py draws
    them, --patch-dropout; the batch carries them as 'patch_keep')."""
    return x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
# ==== end of region transformer ====


# ----------------------------------------------------------------------------------------------
# Towers
# ==== region vision (copied into altclip.py, laclip.py) ====
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
# ==== end of region vision ====


# ----------------------------------------------------------------------------------------------
# Model
# ==== region model (copied into laclip.py) ====
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
               "text": self.encode_text(batch["text"], normalize=True), "scale": self.logit_scale.exp()}
        if self.logit_bias is not None:
            out["bias"] = self.logit_bias
        return out

    def loss(self, out):
        if "bias" in out:  # SigLIP
            return sigmoid_loss(out["image"], out["text"], out["scale"], out["bias"])
        return contrastive_loss(out["image"], out["text"], out["scale"])

    @torch.no_grad()
    def after_step(self):
        self.logit_scale.clamp_(0, math.log(100))

    def transform(self, train, images=None):
        return Transform(self.tokenizer, images or self.preprocess(uint8=True))

    def preprocess(self, uint8=False):
        """PIL image -> the tensor the weights expect (short side resized, centre crop); uint8: not yet
        normalised, as the model's input may be (encode_image normalises on the device)."""
        return ImageTransform(self.cfg.image_size, self.cfg.image_mean, self.cfg.image_std, uint8)

    def classify(self, images, labels):
        """[N, C] probabilities of C label texts for N PIL images (label_probs: softmax, or sigmoid)."""
        return label_probs(self, images, labels)

    def encode_texts(self, texts):
        return self.encode_text(trim_padding(self.tokenizer(texts)).to(self.logit_scale.device), normalize=True)

    def extra_state(self):
        return {"config": asdict(self.cfg), "tokenizer": self.tokenizer.to_str() if self.tokenizer else None}

    def optimizer_groups(self, weight_decay):
        return adamw_groups(self, weight_decay)

    def towers(self):
        return {"image": self.visual, "text": self.transformer}

    def shard_units(self):
        # The text tower's embeddings, final norm and projection stay with the root, as the logit scale.
        return [*self.visual.transformer.resblocks, *self.transformer.resblocks], [self.visual, self.transformer]


class Transform:
    """One sample (image, caption) -> model inputs (uint8 pixels, token ids), in the loader workers (so
    picklable); images: the image's transform (train.py's is data.py's crop; by default the model's own)."""

    def __init__(self, tokenizer, images):
        self.tokenizer, self.image = tokenizer, images

    def __call__(self, sample, rng):
        return {"image": self.image(sample["image"], rng), "text": self.tokenizer([sample["text"]])[0]}

    def finish(self, batch):
        """The loader's batch as it leaves the CPU: token ids cut after its longest text (trim_padding)."""
        return {**batch, "text": trim_padding(batch["text"])} if "text" in batch else batch


def trim_padding(tokens):
    """Token ids [..., context] cut after the last column that is not padding (pad id 0) in any row: the
    attention is causal, so what follows a text changes none of its features. Cut on the CPU as the loader
    hands the batch over, a step never waits on the device to learn the length."""
    kept = tokens.reshape(-1, tokens.shape[-1]).ne(0).any(0).nonzero()
    return tokens[..., : int(kept[-1]) + 1] if len(kept) else tokens[..., :1]
# ==== end of region model ====


# ----------------------------------------------------------------------------------------------
# Loss: symmetric InfoNCE (or SigLIP's sigmoid loss) over the global batch, exact under
# torch.distributed; the logits are made tile by tile and never kept for the backward (the fused ops
# at the end of this file, where their maths is written out)
# ==== region loss (copied into clippo.py, altclip.py, laclip.py) ====
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
# ==== end of region loss ====


# ==== region optimizer (copied into brivl.py, clippo.py, altclip.py, laclip.py) ====
def adamw_groups(model, weight_decay):
    """The AdamW parameter groups of the recipe (open_clip's rule): weight decay on weight matrices only,
    none on biases, norms, embeddings and 0-d scalars (the logit scale and bias); parameters that do not
    train (LiT locks, a frozen tower) left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
# ==== end of region optimizer ====


# ----------------------------------------------------------------------------------------------
# Inputs: images to tensors in the loader workers
# ==== region preprocess (copied into clippo.py, altclip.py, laclip.py) ====
class ImageTransform:
    """PIL image -> [3, size, size] as the weights expect it (OpenAI's preprocess): the short side resized
    to size (bicubic), the centre cut out, normalised by mean and std, or with uint8 left as pixels for
    the model to normalise on its device (encode_image). Training's random crop is data.py's RandomCrop.
    A JPEG much larger than needed is decoded at 1/2, 1/4 or 1/8 scale by the decoder itself (Pillow's
    draft mode), never below the output's resolution."""

    def __init__(self, size, mean, std, uint8=False):
        self.size, self.mean, self.std, self.uint8 = size, mean, std, uint8

    def __call__(self, img, rng=None):
        w, h, side = *img.size, min(img.size)
        box, out = (0, 0, w, h), (max(self.size, round(w * self.size / side)), max(self.size, round(h * self.size / side)))
        if out[0] * out[1] > 4 * self.size * self.size:
            # A long strip (a 1 x 100000 PNG is 467 bytes) resized whole would hold billions of pixels: past
            # 4:1 the centre square is cut first, then resized; the pixels kept are the same but at its edges.
            box, out = ((w - side) // 2, (h - side) // 2, (w - side) // 2 + side, (h - side) // 2 + side), (self.size,) * 2
        if img.format == "JPEG":  # a no-op once decoded
            img.draft("RGB", out)
        if img.size[0] * img.size[1] > MAX_PIXELS:  # checked before the decode, which would hold it all
            raise ImageTooLarge(f"{getattr(img, 'source', 'image')}: {img.size[0]} x {img.size[1]} pixels, over "
                                f"the cap of {MAX_PIXELS} (a decompression bomb, or a scan to shrink first)")
        img, fx, fy = to_rgb(img), img.size[0] / w, img.size[1] / h  # drafted: the box in the smaller image
        img = img.resize(out, Image.BICUBIC, box=(box[0] * fx, box[1] * fy, box[2] * fx, box[3] * fy))
        left, top = (out[0] - self.size) // 2, (out[1] - self.size) // 2
        x = torch.from_numpy(np.array(img, dtype=np.uint8)[top:top + self.size, left:left + self.size]).permute(2, 0, 1)
        return x if self.uint8 else normalize_pixels(x, self.mean, self.std)


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
# ==== end of region preprocess ====


# ==== region image-files (copied into brivl.py, clippo.py, altclip.py, laclip.py) ====
def normalize_pixels(images, mean, std):
    """uint8 pixels [..., 3, H, W] -> floats normalised by mean and std, on the pixels' device. Images
    already in floats are taken as normalised and pass through."""
    if images.dtype != torch.uint8:
        return images
    mean = torch.tensor(mean, device=images.device).view(3, 1, 1)
    std = torch.tensor(std, device=images.device).view(3, 1, 1)
    return (images.float().div_(255) - mean) / std


# Decoding holds the whole image (4 bytes a pixel in Pillow, then a copy): larger images are refused
# before their decode (a JPEG first drafted down to what the preprocessing needs), as are larger files
# and JPEGs of more progressive scans (each decodes every pixel again; encoders write about 10).
MAX_PIXELS, MAX_IMAGE_BYTES, MAX_JPEG_SCANS = 40_000_000, 64 << 20, 100


class ImageTooLarge(OSError):
    reason = "image too large"


def to_rgb(img):
    """RGB, with 16-bit and 32-bit integer images scaled to 8 bits (Pillow's convert clips them: white)."""
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        x = np.clip(np.asarray(img).astype(np.float32) / 257.0 + 0.5, 0, 255).astype(np.uint8)  # 0..65535 -> 0..255
        return Image.fromarray(x, "L").convert("RGB")
    return img.convert("RGB")


def read_image(path):
    """A PIL image of a regular file of at most MAX_IMAGE_BYTES (a FIFO or device would block or never
    end), decoded here (a JPEG's decode waits for the preprocessing, which may draft it smaller), so a
    damaged or oversized file is one ValueError naming it."""
    payload = read_small_file(path, "image file", MAX_IMAGE_BYTES)
    try:
        img = Image.open(io.BytesIO(payload), formats=("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF"))  # no EPS
        img.source, scans = path, payload.count(b"\xff\xda") if img.format in ("JPEG", "MPO") else 1
        if scans > MAX_JPEG_SCANS or (img.size[0] * img.size[1] > MAX_PIXELS and img.format != "JPEG"):
            raise ImageTooLarge(f"{img.size[0]} x {img.size[1]} pixels in {scans} scans, over the caps of "
                                f"{MAX_PIXELS} pixels and {MAX_JPEG_SCANS} scans")
        if img.format != "JPEG":
            img.load()
        return img
    except Exception as e:  # Pillow: OSError, SyntaxError, DecompressionBombError, ValueError
        lines = str(e).strip().splitlines() or [""]
        reason = lines[0][:200] if type(e) is ValueError else f"{type(e).__name__}: {lines[0][:200]}"
        raise ValueError(f"{path}: not a readable image ({reason}); check the file or leave it out") from None
# ==== end of region image-files ====


# ----------------------------------------------------------------------------------------------
# Building a model for train.py
def add_args(parser):
    add_clip_args(parser)
    parser.set_defaults(patch_dropout_until=None)  # None: not given (finish_args tells it from 0)


# (steps, cooldown steps) of the default run. On the synthetic data the sigmoid loss learns shape (beyond
# colour) about 600 steps later than the softmax: its learnt scale and bias barely move from SigLIP's
# 10 and -10 in a run this short, and sharper starts did not bring it sooner (docs/measurements.md).
DEFAULT_RUN = {"softmax": (430, 120), "sigmoid": (1100, 300)}
# With --patch-dropout: (steps, cooldown steps, unmasked from) of the softmax default run, FLIP's masked
# steps and then its unmasked tuning. On the tiny preset's 4 x 4 patches a half of them keeps too little
# of a shape's outline: the masked steps learn colour, and shape is learnt only once every patch is seen.
PATCH_DROPOUT_RUN = (550, 150, 200)


def finish_args(args):
    """The demo's recipe (--size tiny on the synthetic data), where no flag gives it: images drawn at the
    preset's input size, a 20-step warmup, a constant rate, then a linear cooldown, the length following
    the loss and --patch-dropout. Any other run keeps train.py's defaults (open_clip's)."""
    if args.size == "tiny" and args.data == "synthetic" and args.epochs is None:
        steps, cooldown = DEFAULT_RUN["sigmoid" if args.loss == "sigmoid" else "softmax"]
        if args.patch_dropout and args.loss != "sigmoid" and args.steps is None and args.patch_dropout_until is None:
            steps, cooldown, args.patch_dropout_until = PATCH_DROPOUT_RUN
        for key, value in dict(steps=steps, cooldown_steps=cooldown, warmup=20, lr_schedule="const-cooldown",
                               synthetic_resolution=48).items():
            if getattr(args, key) is None:
                setattr(args, key, value)
    args.patch_dropout_until = args.patch_dropout_until or 0


def build(size="ViT-B-32", tokenizer=None, captions=(), init=None, quick_gelu=None, lock_image=False,
          lock_image_unlocked_layers=0, lock_text=False, lock_text_unlocked_layers=0, loss=None, extra=None):
    """A CLIP from keywords: a preset with a tokenizer file (or a BPE trained on `captions`), released
    weights to fine-tune (init), or a checkpoint's extra_state(); then the LiT locks. loss: softmax or
    sigmoid (SigLIP); default the init weights' own, else softmax."""
    cfg, tok, weights = config_and_tokenizer(size, tokenizer, captions, init, quick_gelu, extra, loss)
    return start(CLIP(cfg, tok), weights, lock_image, lock_image_unlocked_layers, lock_text, lock_text_unlocked_layers)


def create(args, captions=(), extra=None):
    return build(**build_kwargs(args), captions=captions, extra=extra)


# ==== region create (copied into laclip.py) ====
def add_clip_args(parser):
    """CLIP's flags for train.py (laclip's are these and its own)."""
    parser.add_argument("--tokenizer", help="tokenizer.json or bpe_simple_vocab_16e6.txt.gz (default: the --init "
                        "weights' own, else a BPE trained on the captions)")
    parser.add_argument("--quick-gelu", action=argparse.BooleanOptionalAction, help="QuickGELU (OpenAI's weights; "
                        "default for --init files without a config) or exact GELU (default for new models)")
    for tower in ("image", "text"):  # LiT
        parser.add_argument(f"--lock-{tower}", action="store_true", help=f"freeze the {tower} tower (LiT)")
        parser.add_argument(f"--lock-{tower}-unlocked-layers", type=int, default=0, help=f"with --lock-{tower}: its "
                            "last N residual blocks (and the layers after them) still train")
    parser.add_argument("--loss", choices=["softmax", "sigmoid"], help="softmax: CLIP's InfoNCE; sigmoid: SigLIP's "
                        "pairwise loss with a learnt bias (default: the --init weights' own, else softmax)")
    parser.add_argument("--siglip", dest="loss", action="store_const", const="sigmoid", help="--loss sigmoid")


def build_kwargs(args):
    """train.py's flags as build()'s keywords (a flag a caller's namespace lacks takes build()'s default)."""
    names = ("size", "tokenizer", "init", "quick_gelu", "lock_image", "lock_image_unlocked_layers", "lock_text",
             "lock_text_unlocked_layers", "loss")
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
        tok = train_bpe(captions, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
    cfg.vocab_size, cfg.eos_id = tok.vocab_size, tok.eot
    return cfg, tok, None


def start(model, weights=None, lock_image=False, lock_image_unlocked_layers=0, lock_text=False, lock_text_unlocked_layers=0):
    """Initial weights and the LiT locks applied to a new model."""
    if weights is not None:
        model.load_state_dict(weights, strict=True)
    if lock_image or lock_text:
        model.lock(lock_image, lock_text, lock_image_unlocked_layers, lock_text_unlocked_layers)
    return model
# ==== end of region create ====


# ----------------------------------------------------------------------------------------------
# Weights in: this repository's checkpoints, OpenAI's and open_clip's files and folders, Hugging Face
# CLIPModel folders. Everything becomes OpenAI's state-dict layout, which is this file's.
# ==== region tensor-files (copied into brivl.py, clippo.py, altclip.py, laclip.py) ====
# The boundary for weights files, which come from anywhere: nothing in them runs (tensors and plain
# containers only), nothing they claim is allocated before it is checked against the file's own size,
# and whatever goes wrong while one is read is one line naming it (reading()).
class BadInput(ValueError):
    """A file or folder the user gave that cannot be used; the message names it and says what is wrong."""


def one_line(err):
    """An exception as one short line (a pickle, zip or torch error can run to paragraphs)."""
    first = next((line.strip() for line in str(err).splitlines() if line.strip()), "").split(". ")[0][:160]
    return f"{type(err).__name__}: {first}".rstrip(": ")


@contextlib.contextmanager
def reading(what):
    """with reading(path): ... -- whatever the block raises while it reads and checks `path` (a file or
    folder the user gave) becomes one BadInput line naming it: what an input holds is the input's fault,
    whichever line of ours it trips. Code outside such a block is ours, and keeps its traceback (and
    here too with TRAIN_TRACEBACK=1)."""
    try:
        yield
    except (BadInput, ImportError, FileNotFoundError):  # one line already, or a package to install
        raise
    except Exception as err:
        if os.environ.get("TRAIN_TRACEBACK"):
            raise
        message = str(err) if isinstance(err, ValueError) and str(what) in str(err) else f"{what}: {one_line(err)}"
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
        if id(x) not in seen:
            seen.add(id(x))
            claimed += tensor_bytes(x, path) if isinstance(x, torch.Tensor) else 0
            if claimed > limit:
                raise ValueError(f"{path}: its tensors claim over {limit} bytes from a file of {os.path.getsize(path)}")
            stack.extend(x.values() if isinstance(x, dict) else x if isinstance(x, (list, tuple)) else ())
    return obj


def load_tensors(path):
    """torch.load of a file that may come from anywhere: tensors and plain containers only (weights_only:
    nothing in it runs), a .safetensors file through safetensors, every tensor checked (check_tensors);
    a damaged or foreign file is one ValueError naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    if not os.path.isfile(path):
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
    """The bytes of a file a command reads beside the weights (a config, a tokenizer, an image, --texts): a
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
# ==== end of region tensor-files ====


# ==== region weight-files (copied into altclip.py, laclip.py) ====
class UnsafeWeights(ValueError):
    """A weights file that would run code if loaded the usual way: refused."""


def read_json(path, what="config"):
    """A JSON object from a file a folder of weights holds: a regular file of at most 16 MiB, an object."""
    value = json.loads(read_small_file(path, f"{what} file").decode("utf-8"), parse_constant=lambda c: float("nan"))
    if not isinstance(value, dict):
        raise ValueError(f"{path}: holds a {type(value).__name__}, not a JSON object")
    return value


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
    running the archive (torch.jit.load compiles its code and calls its __setstate__: a crafted file runs
    what it likes). Here data.pkl (the module tree) goes through an unpickler that rebuilds tensors from
    the data/ records, records every object's attributes and refuses any other global; which attributes
    are parameters and buffers is read off the class declarations in code/ as text. A class declaring
    its own __setstate__ or __getstate__ (nothing a weights file needs) refuses the file."""
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


# ==== end of region weight-files ====


# ==== region weights (copied into laclip.py) ====
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


def read_weights(path, quick_gelu=None, tokenizer=None):
    """(config, tokenizer or None, OpenAI-layout state dict) from any CLIP weights on disk: a checkpoint of
    this repository, OpenAI's TorchScript or state-dict files, open_clip's .bin / .safetensors files or
    local-dir folders, transformers' CLIPModel folders.

    Files with no config are taken as OpenAI's: QuickGELU unless quick_gelu=False (open_clip models
    trained with exact GELU). tokenizer: a tokenizer file, for weights that carry none.
    """
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
        else:
            cfg, tok = config_from_state_dict(sd, True if quick_gelu is None else quick_gelu), None
    cfg = check_config(Config, asdict(cfg), path)  # inferred or read: every field in range before a build
    if tokenizer:
        tok = Tokenizer.from_file(tokenizer, cfg.context_length)
        if cfg.eos_id is None:  # the same token as argmax, unless the tokenizer has ids above its EOT
            cfg.eos_id = tok.eot
    check_fits(lambda: CLIP(cfg, tok), sd, path)
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
    return cfg, tok, sd


def load(path, device="cpu", quick_gelu=None, tokenizer=None):
    """(model, preprocess) from any weights read_weights reads, like OpenAI's clip.load but from local
    files only. The model is in eval mode; preprocess maps a PIL image to the tensor it expects. Any
    failure to read or fit the weights is one BadInput line naming the file."""
    with reading(path):
        cfg, tok, sd = read_weights(path, quick_gelu, tokenizer)
        model = start(CLIP(cfg, tok), sd).to(device).eval()
    return model, model.preprocess()


# ==== end of region weights ====


# ----------------------------------------------------------------------------------------------
# `python clip.py predict`: labels for images, captions for images, images for a text
# ==== region predict (copied into brivl.py, clippo.py, altclip.py, laclip.py) ====
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
    p.add_argument("--device", default="cpu")
    options = {"tokenizer": (str, "for weights that carry no tokenizer, or to replace theirs"),
               "font": (str, "a Unifont .hex file instead of the glyphs the weights carry"),
               "image_size": (int, "the input size of official weights")}
    for name in inspect.signature(load).parameters.keys() & options.keys():  # what this file's load() takes
        p.add_argument(f"--{name.replace('_', '-')}", type=options[name][0], help=options[name][1])
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be at least 1")
    if args.device.split(":")[0] not in ("cpu", "cuda", "mps") or (args.device.startswith("cuda") and not torch.cuda.is_available()):
        p.error(f"--device {args.device}: cpu, or cuda where a GPU is present")
    try:
        if args.images:
            if not os.path.isdir(args.images):
                raise FileNotFoundError(f"{args.images}: no such folder (--images takes a folder of images)")
            found = sorted(os.path.join(args.images, f) for f in os.listdir(args.images) if f.lower().endswith(IMAGE_FILES))
            candidates = [f for f in found if os.path.isfile(f)]  # not FIFOs, devices, sockets, folders
            if len(candidates) < len(found):
                print(f"{me} predict: left out {len(found) - len(candidates)} entries of {args.images} that are not "
                      f"regular files (first: {next(f for f in found if f not in candidates)})", file=sys.stderr)
            if not candidates or not args.query:
                raise ValueError(f"--images needs image files in {args.images} and at least one --query")
            queries = args.query
        else:  # --texts: a regular file of at most 64 MiB (a FIFO or /dev/zero is refused, not read)
            lines = read_small_file(args.texts, "--texts file", 1 << 26).decode("utf-8", "replace").splitlines() \
                if args.texts else (args.labels or "").split(",")
            queries, candidates = args.image, [t.strip() for t in lines if t.strip()]
            if not queries or not candidates:
                raise ValueError("pass --image FILE... with --labels 'a,b,...' or --texts FILE (or --images DIR --query TEXT)")
            for path in queries:
                if not os.path.isfile(path):
                    raise (ValueError(f"{path}: not a regular file; pass image files") if os.path.exists(path) else
                           FileNotFoundError(f"{path}: no such image file"))
        model, preprocess = load(args.ckpt, **{k: getattr(args, k) for k in options if getattr(args, k, None) is not None})
        model.to(args.device)
        if getattr(model, "tokenizer", True) is None:
            raise ValueError(f"{args.ckpt} carries no tokenizer: pass --tokenizer")
        if args.images:  # images ranked for each query: the link over the images
            with torch.no_grad():
                probs = link(model, model.encode_texts(queries).float() @ embed_images(model, preprocess, candidates).T)
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
# ==== end of region predict ====


# ----------------------------------------------------------------------------------------------
# Tokenizer: OpenAI's byte-level BPE, run by the tokenizers library
# ==== region tokenizer (copied into altclip.py, laclip.py) ====
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
    def vocab_size(self):  # the ids it hands out: the highest one + 1 (a file's added tokens may skip ids)
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

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
# ==== end of region tokenizer ====


# ==== region bpe-trainer (copied into laclip.py) ====
# The BPE trainer learns from pre-tokenized pieces up to this long: a longer "word" (a URL, a hash, a
# run of one letter) teaches no merge worth a vocabulary slot, and would cost the trainer its square.
MAX_PIECE_CHARS = 64


def train_bpe(texts, vocab_size=1024, context_length=77):
    """A CLIP Tokenizer of a small BPE fitted to the captions at hand (the demo needs no vocabulary file).

    Learnt here rather than by the tokenizers library's trainer, whose choice among equally frequent
    pairs changes from call to call: the same data and seed must give the same vocabulary.
    """
    import heapq
    from collections import Counter, defaultdict

    from tokenizers.models import BPE

    pre = Tokenizer._skeleton(BPE()).pre_tokenizer
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
    return Tokenizer.from_merges(merges, context_length)
# ==== end of region bpe-trainer ====


# ----------------------------------------------------------------------------------------------
# The fused loss ops: the maths, the PyTorch tiles, the custom ops, the Triton kernels
# ==== region kernel (copied into brivl.py, clippo.py, altclip.py, laclip.py) ====
# lse_tiles(x, y, scale, two_way) -> (row_lse [n], col_lse [k] or [0]): the log-sum-exps of t = scale *
# x @ y.T along rows and (two_way) columns from the same tiles, x this rank's rows (n x D), y the keys.
# t is never kept: the backward makes the tiles again (2 B^2 D forward, 6 B^2 D backward). For g_row, g_col:
#     G_ij = g_row_i * exp(t_ij - row_lse_i) + g_col_j * exp(t_ij - col_lse_j)
#     dx = scale * G @ y,  dy = scale * G.T @ x,  d(scale) = sum(G * x @ y.T)
# At once: one BLOCK x BLOCK tile of t on the PyTorch path (every device); on the Triton path (CUDA) the
# forward's tiles stay in registers, the backward's G in chunks of at most WORKSPACE (or 4 k D) elements.
BLOCK = 1024  # tile edge of the PyTorch path: a 1024 x 1024 fp32 tile is 4 MB
WORKSPACE = 2 ** 27  # elements of the Triton backward's G chunk, or 4 k d if larger: memory stays O(B D)
_NS = __name__.replace(".", "_")  # one op namespace per file, so copies of this code can coexist


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


def _use_triton(x):
    # The Triton kernels run on CUDA, where Triton is installed and the file carries them (the kernel-triton
    # region: brivl.py's queue loss is small and leaves it out); TRITON_INTERPRET=1 runs them on the CPU
    # (slowly): that is how CI tests them. Elsewhere the PyTorch tiles run.
    return (globals().get("triton") is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16)
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
# ==== end of region kernel ====


# ==== region kernel-triton (copied into clippo.py, altclip.py, laclip.py) ====
try:  # Triton ships with CUDA builds of torch; without it the PyTorch tiles run everywhere.
    import triton
    import triton.language as tl
except ImportError:
    triton = None


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


def _offset(a, b, scale):
    # The largest |logit| possible less 80: exp(t - offset) never overflows fp32 (see _lse_triton).
    bound = (scale.float().abs() * torch.linalg.vector_norm(a, dim=1, dtype=torch.float32).max()
             * torch.linalg.vector_norm(b, dim=1, dtype=torch.float32).max())
    return torch.clamp(bound - 80, min=0).reshape(1)
# ==== end of region kernel-triton ====


# ==== region sigmoid (copied into clippo.py, laclip.py) ====
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


# SigLIP's tiles: sigmoid_tiles(x, y, scale, bias, eager) -> sum_j softplus(t_ij) per row, t = scale *
# x @ y.T + bias (SigLIP's loss is that less the positive's logit: -log sigmoid(u) = softplus(u) - u).
# With P_ij = g_i * sigmoid(t_ij) for incoming row weights g:
#     dx = scale * P @ y,  dy = scale * P.T @ x,  d(scale) = sum(P * x @ y.T),  d(bias) = sum(P)
# sigmoid_loss averages the rows, so every g_i is the same g and these are g times the gradients for
# g = 1: when a gradient will be wanted (eager) the forward makes those from the same tiles and the
# backward only scales them, 3 B^2 D in all, as the naive form's one product forward and two backward.


def _sig_torch(x, y, scale, bias, grads):
    """Row sums of softplus(t), and with grads the gradients for g = 1 (else empty)."""
    n, k = x.shape[0], y.shape[0]
    acc = _acc_dtype(x)
    s, b = scale.to(acc), bias.to(acc)
    rows = torch.zeros(n, device=x.device, dtype=acc)
    dx = torch.zeros(x.shape, dtype=acc, device=x.device) if grads else x.new_empty(0)
    dy = torch.zeros(y.shape, dtype=acc, device=x.device) if grads else x.new_empty(0)
    dsb = torch.zeros(2, dtype=acc, device=x.device) if grads else x.new_empty(0, dtype=acc)
    for i in range(0, n, BLOCK):
        xi = x[i:i + BLOCK]
        for j in range(0, k, BLOCK):
            yj = y[j:j + BLOCK]
            raw = (xi @ yj.T).to(acc)
            t = raw * s + b
            rows[i:i + BLOCK] += F.softplus(t).sum(1)
            if grads:
                p = torch.sigmoid(t)
                dsb[0] += (p * raw).sum()
                dsb[1] += p.sum()
                p = p.to(x.dtype)
                dx[i:i + BLOCK] += (p @ yj).to(acc) * s
                dy[j:j + BLOCK] += (p.T @ xi).to(acc) * s
    return rows, dx.to(x.dtype), dy.to(y.dtype), dsb


@torch.library.custom_op(f"{_NS}::sigmoid_tiles", mutates_args=())
def sigmoid_tiles(x: torch.Tensor, y: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor, eager: bool
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(row sums [n], then for g = 1: dx, dy, and d(scale), d(bias) as [2]; the last three empty unless eager)."""
    if _use_triton(x):
        return _sig_triton(x.contiguous(), y.contiguous(), scale, bias, eager)
    return _sig_torch(x, y, scale, bias, eager)


@sigmoid_tiles.register_fake
def _sigmoid_tiles_fake(x, y, scale, bias, eager):
    acc, n = _acc_dtype(x), x.shape[0]
    if eager:
        return x.new_empty(n, dtype=acc), torch.empty_like(x), torch.empty_like(y), x.new_empty(2, dtype=acc)
    return x.new_empty(n, dtype=acc), x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=acc)


def _sig_setup(ctx, inputs, output):
    x, y, scale, bias, _ = inputs
    ctx.save_for_backward(scale, bias, *output[1:])


def _sig_backward(ctx, g, *_):
    scale, bias, dx, dy, dsb = ctx.saved_tensors
    if not dsb.numel():
        raise RuntimeError("sigmoid_tiles made no gradients: call it with eager=True when a gradient is wanted")
    c = g[0].to(dsb.dtype)  # the caller averages the rows: every g_i is g_0 (no check, no sync)
    need = ctx.needs_input_grad
    return (dx * c.to(dx.dtype) if need[0] else None, dy * c.to(dy.dtype) if need[1] else None,
            (dsb[0] * c).to(scale.dtype).reshape(scale.shape) if need[2] else None,
            (dsb[1] * c).to(bias.dtype).reshape(bias.shape) if need[3] else None, None)


sigmoid_tiles.register_autograd(_sig_backward, setup_context=_sig_setup)


if triton is not None:
    @triton.jit
    def _sig_tile_kernel(X, Y, SCALE, BIAS, ROWS, P, DSP, n, k, d, sxn, sxd, syn, syd, spn, GRAD: tl.constexpr,
                         PREC: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr):
        # One tile of t = scale * x @ y.T + bias: its softplus row sums (added atomically) and, GRAD,
        # scale * sigmoid(t) written out with the tile's shares of d(scale) and d(bias).
        rm = tl.program_id(0) * BM + tl.arange(0, BM)
        rn = tl.program_id(1) * BN + tl.arange(0, BN)
        s = tl.load(SCALE).to(tl.float32)
        raw = _tile(X, Y, rm, rn, n, k, d, sxn, sxd, syn, syd, PREC, BM, BN, BD)
        t = raw * s + tl.load(BIAS).to(tl.float32)
        inside = (rm[:, None] < n) & (rn[None, :] < k)
        sp = tl.where(inside, tl.maximum(t, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(t))), 0.0)  # softplus, stable
        tl.atomic_add(ROWS + rm, tl.sum(sp, 1), mask=rm < n)
        if GRAD:
            p = tl.where(inside, 1.0 / (1.0 + tl.exp(-t)), 0.0)
            at = (tl.program_id(0) * tl.num_programs(1) + tl.program_id(1)) * 2
            tl.store(DSP + at, tl.sum(tl.sum(p * raw, 1), 0))
            tl.store(DSP + at + 1, tl.sum(tl.sum(p, 1), 0))
            tl.store(P + rm[:, None] * spn + rn[None, :], (p * s).to(P.dtype.element_ty), mask=inside)


def _sig_triton(x, y, scale, bias, grads):
    # As _lse_backward_triton: the kernel writes a chunk of rows of scale * P into a workspace and dx, dy
    # are cuBLAS products of it; without grads, the row sums alone.
    n, k, d = x.shape[0], y.shape[0], x.shape[1]
    meta = _tiles(x)
    bm, bn = meta["BM"], meta["BN"]
    rows = torch.zeros(n, device=x.device, dtype=torch.float32)
    if not grads:
        _sig_tile_kernel[(triton.cdiv(n, bm), triton.cdiv(k, bn))](
            x, y, scale.reshape(1), bias.reshape(1), rows, rows, rows, n, k, d, x.stride(0), x.stride(1),
            y.stride(0), y.stride(1), 0, GRAD=False, **meta)
        return rows, x.new_empty(0), x.new_empty(0), x.new_empty(0, dtype=torch.float32)
    chunk = min(n, max(bm, max(WORKSPACE, 4 * k * d) // max(k, 1) // bm * bm))
    work = torch.empty(chunk, k, device=x.device, dtype=x.dtype)
    dsp = torch.empty(triton.cdiv(chunk, bm) * triton.cdiv(k, bn) * 2, device=x.device, dtype=torch.float32)
    dx = torch.empty_like(x)
    dy = torch.zeros(y.shape, device=x.device, dtype=torch.float32)
    dsb = torch.zeros(2, device=x.device, dtype=torch.float32)
    for i in range(0, n, chunk):
        m = min(chunk, n - i)
        p, xi = work[:m], x[i:i + m]
        grid = (triton.cdiv(m, bm), triton.cdiv(k, bn))
        _sig_tile_kernel[grid](xi, y, scale.reshape(1), bias.reshape(1), rows[i:i + m], p, dsp, m, k, d, xi.stride(0),
                               xi.stride(1), y.stride(0), y.stride(1), p.stride(0), GRAD=True, **meta)
        dsb += dsp[:grid[0] * grid[1] * 2].view(-1, 2).sum(0)
        torch.mm(p, y, out=dx[i:i + m])
        dy += _mm_f32(p.T, xi)
    return rows, dx, dy.to(y.dtype), dsb
# ==== end of region sigmoid ====


if __name__ == "__main__":
    if sys.argv[1:2] != ["predict"]:
        raise SystemExit("usage: python clip.py predict --ckpt CHECKPOINT --image A.jpg [B.jpg ...] --labels 'a dog,a cat'\n"
                         "(train with: torchrun train.py --model clip; export with: python train.py export)")
    predict_main(sys.argv[2:])
