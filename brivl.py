"""BriVL / WenLan (Huo et al. 2021, "WenLan: Bridging Vision and Language by Large-Scale Multi-Modal
Pre-Training") in one file: two towers trained MoCo-style, with momentum encoders and queues.

Image side: a CNN, region features pooled from its feature map over boxes (a grid of boxes plus the
whole image by default, as brivl-nmi does; detector boxes when the data brings them), self-attention
over the regions, masked mean, an MLP. Text side: a BERT encoder (initialised from a local HF
BERT/RoBERTa directory if you have one), self-attention over its tokens, masked mean, an MLP. Each
tower has a momentum copy (k <- m k + (1 - m) q after every step) whose outputs, the keys, fill one
queue per modality; an image is contrasted with its text's key against the text queue, and a text
with its image's key against the image queue.

Where the official inference code (BAAI-WuDao/BriVL, models/vl_model.py) and the paper differ, this
file follows the code and says so. The default configuration trains from scratch on CPU-friendly parts;
`--size brivl-official` reproduces the official code's numerics (timm's TF EfficientNet, grid_sample
pooling, unmasked BERT, its resize).

Use it alone (it imports nothing from this repository):
    model, preprocess = load("brivl-with-roberta-base.pth", image_size=456, tokenizer="vocab.txt")
    model = build("tiny", text_encoder="chinese-roberta-wwm-ext/")   # a new model from keywords
    python brivl.py predict --ckpt CKPT --image a.jpg --labels '狗,猫'

Your own loop (runs as written with this file alone; four plain images stand in for data):
    import numpy as np, torch
    from PIL import Image
    import brivl
    images = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue", "yellow")]
    captions = ["a red picture", "a green picture", "a blue picture", "a yellow picture"]
    model = brivl.build("tiny", captions=captions)   # tiny trains a WordPiece on captions
    opt = torch.optim.AdamW(model.optimizer_groups(weight_decay=0.1), lr=1e-3, betas=(0.9, 0.98), eps=1e-6)
    transform, rng = model.transform(train=True), np.random.default_rng(0)
    for step in range(20):
        samples = [transform({"image": i, "text": t}, rng) for i, t in zip(images, captions)]
        batch = {k: torch.stack([s[k] for s in samples]) for k in samples[0]}
        loss = model.loss(model(batch))                  # exact over every rank under torch.distributed
        loss.backward(); opt.step(); opt.zero_grad(); model.after_step()
    print(model.classify(images, ["red", "green", "blue", "yellow"]))   # [4, 4] probabilities

The interface is clip.py's (train.py and data.py use nothing else): build, create, add_args; the
model's transform, forward, loss, after_step, optimizer_groups, encode_texts, classify, extra_state,
towers and shard_units. Here a sample may bring detector 'boxes'; the transform returns the image,
its boxes and mask, and token ids and mask; out also holds the momentum encoders' keys and 'scale' is
1 / T; after_step moves the momentum encoders and fills the queues with the global batch's keys.
train.py's recipe around it is clip.py's (open_clip's); the demo (--size tiny on the synthetic data)
trains at lr 1e-3 with weight decay 0.1, as the loop above does.

Layout: the method (config, region pooling, towers, model, queue loss, inputs), building, weights
(this repository's and the released ones), the CNN backbones, BERT; then, behind banners, the
weights reader, inputs, predict and fused-kernel regions copied from clip.py.
"""

import argparse
import contextlib
import copy
import inspect
import io
import json
import math
import os
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image


# ----------------------------------------------------------------------------------------------
# Config
@dataclass
class Config:
    # check_config's caps: past these a crafted checkpoint costs more than its size (grid^2 cells, ...)
    LIMITS = {"grid": 64, "max_boxes": 1024, "pool_size": 32, "queue_size": 1 << 20, "text_max_positions": 4096}
    embed_dim: int = 2048
    image_size: int = 456  # images are resized to a square, never cropped: the boxes keep their meaning
    backbone: str = "efficientnet_b5"  # any torchvision ResNet or EfficientNet, "tf_efficientnet_b0".."b7", or "tiny"
    grid: int = 6  # default boxes: grid x grid cells plus the whole image
    max_boxes: int = 36  # detector boxes kept per image (plus the whole image)
    pool_size: int = 4  # each box is sampled to pool_size x pool_size before its 1x1 conv and mean
    pooling: str = "roi_align"  # or "grid_sample": the official code's sampling (one sample a bin, zero padding)
    image_heads: int = 4  # self-attention over the regions, as wide as the CNN's features
    image_layers: int = 4
    image_mlp: int = 2048  # feed-forward width of those layers (nn.TransformerEncoderLayer's default)
    context_length: int = 80
    vocab_size: int = 21128
    text_width: int = 768
    text_layers: int = 12  # the BERT encoder
    text_heads: int = 12
    text_mlp: int = 3072
    text_max_positions: int = 512
    text_attn_heads: int = 4  # self-attention over the BERT tokens
    text_attn_layers: int = 4
    text_attn_mlp: int = 2048
    bert_mask: bool = True  # False: BERT attends to the padding too, as the official code (it passes no mask)
    resize: str = "bicubic"  # Pillow's; or "bilinear": the official tensor resize (no antialiasing)
    # Frozen in the official code: the CNN's stem and first three block stages, BERT's embeddings
    # and its lower 8 layers (only the top 4 train).
    freeze_cnn: int = 4  # leading stages of the backbone
    freeze_text: int = 8  # BERT layers from the bottom (its embeddings too, when > 0)
    freeze_cnn_head: bool = False  # the CNN's last 1x1 conv and norm too (the official code freezes them)
    momentum: float = 0.99
    queue_size: int = 9600
    temperature: float = 0.07
    # Train augmentation: colour jitter (0.4, 0.4, 0.4, 0.1) with this probability, grayscale with that one.
    jitter: float = 0.8
    grayscale: float = 0.2

    def __post_init__(self):
        if self.context_length > self.text_max_positions:  # BERT would index past its position table
            raise ValueError(f"context_length {self.context_length} is past BERT's {self.text_max_positions} positions")


CONFIGS = {
    # Small enough to train on two CPU cores in minutes on the synthetic data. No colour augmentation:
    # there, colour is half of what a caption says.
    "tiny": Config(embed_dim=128, image_size=64, backbone="tiny", grid=4, max_boxes=16, image_layers=2,
                   image_mlp=256, context_length=24, vocab_size=1024, text_width=128, text_layers=2,
                   text_heads=4, text_mlp=256, text_max_positions=24, text_attn_layers=2, text_attn_mlp=256,
                   freeze_cnn=0, freeze_text=0, jitter=0.0, grayscale=0.0),
    # The released model's shapes: EfficientNet-B5 at 456 px, Chinese RoBERTa-wwm-ext (BERT-base shapes).
    "efficientnet-b5": Config(),
    # The official code's numerics, so the released weights (load() reads them) give their features: timm's
    # tf_efficientnet_b5 (TensorFlow "same" padding, timm's parameter names), grid_sample region pooling, BERT
    # without an attention mask, the tensor resize, and the official freezing (the CNN's stem, first three
    # block stages and head; BERT's embeddings and lower 8 layers).
    "brivl-official": Config(backbone="tf_efficientnet_b5", pooling="grid_sample", bert_mask=False,
                             resize="bilinear", freeze_cnn_head=True),
}


MEAN = (0.485, 0.456, 0.406)  # ImageNet's normalisation, which the torchvision backbones expect
STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------------------------
# Region pooling: each image becomes a set of region features (the whole image, then boxes)
def _bilinear_weights(coords, size):
    """[..., n] sample coordinates -> [..., size]: each one's bilinear weights on a feature-map axis,
    averaged over the n samples, with RoIAlign's border rules (torchvision's roi_align kernel)."""
    valid = (coords >= -1) & (coords <= size)  # further out, a sample reads as zero
    c = coords.clamp(min=0)
    low = c.floor().clamp(max=size - 1)
    frac = torch.where(low >= size - 1, torch.zeros_like(c), c - low)
    high = (low + 1).clamp(max=size - 1)
    axis = torch.arange(size, device=coords.device, dtype=coords.dtype)
    w = (1 - frac)[..., None] * (axis == low[..., None]) + frac[..., None] * (axis == high[..., None])
    return (w * valid[..., None]).mean(-2)


class RegionPool(nn.Module):
    """Per box: RoIAlign to pool x pool (aligned, 2 x 2 samples a bin), a 1x1 conv, the mean.

    All three are linear, so the mean of the bins is taken first, as weights on the feature map:
    the same numbers as torchvision.ops.roi_align (tested), at a fraction of its CPU cost. The
    bilinear weights are separable, one vector per axis. The official code samples with grid_sample.
    """

    def __init__(self, channels, pool, ratio=2):
        super().__init__()
        self.pool, self.ratio = pool, ratio
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, fmap, boxes, image_size):
        h, w = fmap.shape[-2:]
        x0, y0, x1, y1 = (boxes.float() * (w / image_size) - 0.5).unbind(-1)  # aligned: pixel centres
        n = self.pool * self.ratio  # bin p's sample i sits at (p * ratio + i + 0.5) / n of the box
        t = (torch.arange(n, device=boxes.device, dtype=torch.float32) + 0.5) / n
        wy = _bilinear_weights(y0[..., None] + t * (y1 - y0)[..., None], h)
        wx = _bilinear_weights(x0[..., None] + t * (x1 - x0)[..., None], w)
        x = torch.einsum("bry,brx,bcyx->brc", wy.to(fmap.dtype), wx.to(fmap.dtype), fmap)
        return F.linear(x, self.conv.weight[:, :, 0, 0], self.conv.bias)


def _grid_sample_weights(coords, size):
    """[..., n] sample coordinates (pixel units) -> [..., size]: each one's bilinear weights on a feature-map
    axis, averaged over the n samples, with grid_sample's zero padding (a tap outside the map reads 0)."""
    low = coords.floor()
    frac = coords - low
    axis = torch.arange(size, device=coords.device, dtype=coords.dtype)
    w = (1 - frac)[..., None] * (axis == low[..., None]) + frac[..., None] * (axis == low[..., None] + 1)
    return w.mean(-2)


class GridPool(nn.Module):
    """The official region pooling: per box, affine_grid + grid_sample to pool x pool (one bilinear sample a
    bin, align_corners=False, zero padding), a 1x1 conv, the mean (AvgPool).

    Boxes are in pixels of an image_size image. The official code maps them to the map by image_size / H
    and then spans (x1 - x0) / (W - 1) of the normalised grid: boxes come out slightly wider than RoIAlign's,
    which this reproduces rather than corrects. As in RegionPool, sampling, conv and mean are linear, so the
    mean of the samples is taken first, as separable weights on the feature map (tested against the loop).
    """

    def __init__(self, channels, pool):
        super().__init__()
        self.pool = pool
        self.conv = nn.Conv2d(channels, channels, 1)

    def forward(self, fmap, boxes, image_size):
        h, w = fmap.shape[-2:]
        x0, y0, x1, y1 = (boxes.float() * (h / image_size)).unbind(-1)
        base = (2 * torch.arange(self.pool, device=boxes.device, dtype=torch.float32) + 1) / self.pool - 1

        def taps(lo, hi, size):  # affine_grid's normalised coordinates, then grid_sample's pixel ones
            norm = ((hi - lo) / (size - 1))[..., None] * base + ((lo + hi - size + 1) / (size - 1))[..., None]
            return ((norm + 1) * size - 1) / 2

        wy = _grid_sample_weights(taps(y0, y1, h), h)
        wx = _grid_sample_weights(taps(x0, x1, w), w)
        x = torch.einsum("bry,brx,bcyx->brc", wy.to(fmap.dtype), wx.to(fmap.dtype), fmap)
        return F.linear(x, self.conv.weight[:, :, 0, 0], self.conv.bias)


def grid_boxes(grid, size):
    """The whole image, then grid x grid cells, row by row, as (x0, y0, x1, y1) in pixels."""
    edges = np.linspace(0, size, grid + 1)
    cells = [(edges[j], edges[i], edges[j + 1], edges[i + 1]) for i in range(grid) for j in range(grid)]
    return [(0.0, 0.0, float(size), float(size))] + cells


# ----------------------------------------------------------------------------------------------
# Towers: a CNN with region pooling and a BERT, each topped by self-attention over its tokens
def attention_layers(width, heads, mlp, layers):
    # nn.TransformerEncoderLayer (post-LN, ReLU), as the official code; dropout off, so runs are exact.
    layer = nn.TransformerEncoderLayer(width, heads, mlp, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


def masked_mean(x, mask):
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp(min=1)


class ImageEncoder(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.backbone, width = cnn_backbone(cfg.backbone)
        if cfg.pooling not in ("roi_align", "grid_sample"):
            raise ValueError(f"unknown pooling {cfg.pooling!r}: roi_align or grid_sample")
        self.pool = RegionPool(width, cfg.pool_size) if cfg.pooling == "roi_align" else GridPool(width, cfg.pool_size)
        # grid_sample maps boxes by the configured size, as the official code (its IMG_SIZE), not the input's
        self.box_scale = cfg.image_size if cfg.pooling == "grid_sample" else None
        self.attn = attention_layers(width, cfg.image_heads, cfg.image_mlp, cfg.image_layers)
        self.mlp = nn.Sequential(nn.Linear(width, cfg.embed_dim), nn.ReLU(), nn.Linear(cfg.embed_dim, cfg.embed_dim))
        stages = self.backbone.stages() if isinstance(self.backbone, TFEfficientNet) else self.backbone
        for stage in stages[:cfg.freeze_cnn]:
            stage.requires_grad_(False)
        if cfg.freeze_cnn_head:
            (self.backbone.head() if isinstance(self.backbone, TFEfficientNet) else self.backbone[-1]).requires_grad_(False)

    def forward(self, images, boxes, box_mask):
        box_mask = box_mask.bool()  # the official code's masks are float 0/1
        x = F.normalize(self.pool(self.backbone(images), boxes, self.box_scale or images.shape[-1]), dim=-1)
        x = self.attn(x, src_key_padding_mask=~box_mask)
        return self.mlp(masked_mean(x, box_mask))


class TextEncoder(nn.Module):
    def __init__(self, cfg: Config, pad_id=0):
        super().__init__()
        self.bert = Bert(cfg.vocab_size, cfg.text_width, cfg.text_layers, cfg.text_heads, cfg.text_mlp,
                         cfg.text_max_positions, pad_id=pad_id)
        self.attn = attention_layers(cfg.text_width, cfg.text_attn_heads, cfg.text_attn_mlp, cfg.text_attn_layers)
        self.mlp = nn.Sequential(nn.Linear(cfg.text_width, cfg.embed_dim), nn.ReLU(), nn.Linear(cfg.embed_dim, cfg.embed_dim))
        self.bert_mask = cfg.bert_mask
        if cfg.freeze_text > 0:
            self.bert.embeddings.requires_grad_(False)
            for layer in self.bert.encoder["layer"][:cfg.freeze_text]:
                layer.requires_grad_(False)

    def forward(self, ids, mask):
        mask = mask.bool()
        x = self.bert(ids, mask if self.bert_mask else torch.ones_like(mask))
        x = F.normalize(x, dim=-1)  # per token, as the official code
        x = self.attn(x, src_key_padding_mask=~mask)
        return self.mlp(masked_mean(x, mask))


# ----------------------------------------------------------------------------------------------
# Model: two towers, their momentum copies and two queues of momentum keys
class BriVL(nn.Module):
    def __init__(self, cfg: Config, tokenizer=None):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.visual = ImageEncoder(cfg)
        self.textual = TextEncoder(cfg, tokenizer.pad_id if tokenizer else 0)
        # The momentum (key) encoders start as copies and only ever move by the momentum update.
        self.visual_momentum = copy.deepcopy(self.visual).requires_grad_(False)
        self.textual_momentum = copy.deepcopy(self.textual).requires_grad_(False)
        # Random unit vectors stand in for keys until the first K have been enqueued. The buffers are
        # saved with the weights, so a resumed run has the same queues; every rank enqueues the same
        # gathered keys, so the queues stay identical across ranks without being broadcast.
        self.register_buffer("image_queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=1))
        self.register_buffer("text_queue", F.normalize(torch.randn(cfg.queue_size, cfg.embed_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys = None  # this step's keys, enqueued by after_step

    def load_state_dict(self, state_dict, strict=True):
        ptr = state_dict.get("queue_ptr")  # a file's pointer must lie in its queue, or after_step writes past it
        if ptr is not None and not (ptr.numel() == 1 and 0 <= int(ptr) < self.cfg.queue_size):
            raise ValueError(f"queue_ptr {ptr.flatten()[:1].tolist()} is outside the queue of {self.cfg.queue_size}")
        return super().load_state_dict(state_dict, strict=strict)

    def train(self, mode=True):
        # BatchNorm keeps its (pretrained) statistics: a sample's features then never depend on the
        # rest of its batch, so DDP and accumulation are exact. The official code shuffles batches
        # across GPUs for BatchNorm instead.
        super().train(mode)
        for m in self.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.eval()
        return self

    def encode_image(self, images, boxes, box_mask, normalize=False, momentum=False):
        images = normalize_pixels(images, MEAN, STD)
        x = (self.visual_momentum if momentum else self.visual)(images, boxes, box_mask)
        return F.normalize(x, dim=-1) if normalize else x

    def encode_text(self, ids, mask, normalize=False, momentum=False):
        x = (self.textual_momentum if momentum else self.textual)(ids, mask.bool())  # int 0/1 masks too
        return F.normalize(x, dim=-1) if normalize else x

    @property
    def logit_scale(self):
        """log(1 / temperature), fixed: read as CLIP's learnt logit_scale is (classify, predict)."""
        return torch.tensor(math.log(1 / self.cfg.temperature))

    def forward(self, batch):
        image = (batch["image"], batch["boxes"], batch["box_mask"])
        text = (batch["text"], batch["text_mask"])
        with torch.no_grad():
            keys = {"image_key": self.encode_image(*image, normalize=True, momentum=True),
                    "text_key": self.encode_text(*text, normalize=True, momentum=True)}
        return {"image": self.encode_image(*image, normalize=True), "text": self.encode_text(*text, normalize=True),
                **keys, "scale": torch.tensor(1 / self.cfg.temperature, device=self.queue_ptr.device)}

    def loss(self, out):
        if self.training:
            self._keys = (out["image_key"].detach(), out["text_key"].detach())
        # Both directions summed, as the official code: image vs text keys, text vs image keys.
        return (queue_infonce(out["image"], out["text_key"], self.text_queue, out["scale"])
                + queue_infonce(out["text"], out["image_key"], self.image_queue, out["scale"]))

    @torch.no_grad()
    def after_step(self):
        # The momentum encoders move after the optimizer step; the official forward moves them just before
        # it computes the keys: the same updates, one step apart at the start.
        if self._keys is None:
            return
        image_keys, text_keys = (gather(k) for k in self._keys)
        self._keys = None
        n, k, ptr = image_keys.shape[0], self.cfg.queue_size, int(self.queue_ptr)
        if k % n or ptr % n:  # a pointer a file brought from another global batch would write past the end
            raise ValueError(f"brivl: the queue of {k} (at {ptr}) does not take whole global batches of {n}; "
                             f"pass --queue-size {max(n, round(k / n) * n)}, or resume at the checkpoint's batch")
        self.image_queue[ptr:ptr + n] = image_keys
        self.text_queue[ptr:ptr + n] = text_keys
        self.queue_ptr.fill_((ptr + n) % k)
        for query, key in ((self.visual, self.visual_momentum), (self.textual, self.textual_momentum)):
            for pq, pk in zip(query.parameters(), key.parameters()):
                pk.lerp_(pq.detach(), 1 - self.cfg.momentum)

    def transform(self, train, images=None):
        # BriVL's own augmentation (square resize, colour jitter, grayscale; no crop) in place of the crop
        if getattr(images, "defer", False):  # its jitter and grayscale run in Pillow, after the decode
            raise ValueError("brivl does not decode on the GPU (its augmentation runs in Pillow in the loader "
                             "workers); train it without --gpu-decode")
        return Transform(self.cfg, self.tokenizer, train)

    def encode_texts(self, texts):
        ids, mask = self.tokenizer(texts)
        device = self.queue_ptr.device
        return self.encode_text(ids.to(device), mask.to(device), normalize=True)

    def preprocess(self):
        """PIL image -> (image, grid boxes, box mask), as evaluation sees it (short side resized, centre crop)."""
        return ImageTransform(self.cfg, train=False)

    def classify(self, images, labels):
        """[N, C] probabilities of C label texts for N PIL images (label_probs: softmax at the fixed temperature)."""
        return label_probs(self, images, labels)

    def extra_state(self):
        return {"config": asdict(self.cfg), "tokenizer": self.tokenizer.to_str() if self.tokenizer else None}

    def optimizer_groups(self, weight_decay):
        return adamw_groups(self, weight_decay)

    def towers(self):
        # LoRA's towers: each with its momentum copy, which takes the same adapters (frozen, moved by the momentum update)
        return {"image": [self.visual, self.visual_momentum], "text": [self.textual, self.textual_momentum]}

    def shard_units(self):
        # (residual blocks, towers) for train.py's --fsdp and --grad-checkpointing; the momentum
        # encoders are sharded like the query ones, so the momentum update pairs shards with shards.
        blocks = []
        for image, text in ((self.visual, self.textual), (self.visual_momentum, self.textual_momentum)):
            cnn = image.backbone
            blocks += [b for stage in cnn.blocks for b in stage] if isinstance(cnn, TFEfficientNet) else list(cnn)
            blocks += [*image.attn.layers, *text.bert.encoder["layer"], *text.attn.layers]
        return blocks, [self.visual, self.visual_momentum, self.textual, self.textual_momentum]


# ----------------------------------------------------------------------------------------------
# Loss: MoCo's InfoNCE against a queue; the queue's log-sum-exp comes from the fused lse_tiles op
# (copied from clip.py at the end of this file: tiles of scale * x @ y.T, rows only here)
def queue_infonce(q, k, queue, scale):
    """Mean over rows of -log softmax at the positive, row i's logits being [q_i.k_i; q_i.queue] * scale.

    No gradient reaches the keys or the queue. The queue's log-sum-exp comes from the fused tiles, so
    the B x K logits are never held; under DDP's gradient averaging this is the global batch mean.
    """
    k, queue = k.detach().to(q.dtype), queue.detach().to(q.dtype)
    neg, _ = lse_tiles(q, queue, scale, False)
    pos = (q * k).sum(1).to(neg.dtype) * scale.to(neg.dtype)
    return (torch.logaddexp(neg, pos) - pos).mean()


@torch.no_grad()
def gather(x, group=None):
    """Every rank's rows, in rank order (the order of the global batch); no gradient."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# Inputs: images to tensors in the loader workers
class ImageTransform:
    """PIL image -> (tensor, boxes [R, 4], box mask [R]). Square resize, no crop; train: colour jitter, grayscale.

    uint8=True: the default (bicubic) path gives uint8 pixels for the model to normalise on its device,
    and a JPEG that is not decoded yet is decoded at the smallest scale that keeps the output's
    resolution (Pillow's draft mode). The official (bilinear) path keeps its float pipeline as it is.
    """

    def __init__(self, cfg: Config, train, uint8=False):
        self.size, self.grid, self.max_boxes, self.train = cfg.image_size, cfg.grid, cfg.max_boxes, train
        self.uint8 = uint8 and cfg.resize == "bicubic"
        self.jitter, self.grayscale, self.resize = cfg.jitter, cfg.grayscale, cfg.resize
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def colour_jitter(self, img, rng):
        # torchvision's ColorJitter(0.4, 0.4, 0.4, 0.1), drawn from the sample's rng (fixed order).
        from PIL import Image, ImageEnhance

        for enhance in (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color):
            img = enhance(img).enhance(rng.uniform(0.6, 1.4))
        h, s, v = img.convert("HSV").split()
        shift = int(round(rng.uniform(-0.1, 0.1) * 255))
        h = Image.fromarray(((np.asarray(h, dtype=np.int16) + shift) % 256).astype(np.uint8))
        return Image.merge("HSV", (h, s, v)).convert("RGB")

    def boxes(self, boxes, w, h):
        """The whole image first, then the data's boxes (scaled to the resize) or the grid; padded to R."""
        s = self.size
        if boxes:
            scaled = [(x0 * s / w, y0 * s / h, x1 * s / w, y1 * s / h) for x0, y0, x1, y1 in boxes]
            clipped = [tuple(min(max(c, 0.0), s) for c in b) for b in scaled]
            kept = [b for b in clipped if b[2] > b[0] and b[3] > b[1]][:self.max_boxes]
            out = [(0.0, 0.0, float(s), float(s))] + kept
        else:
            out = grid_boxes(self.grid, s)[:self.max_boxes + 1]
        mask = torch.zeros(self.max_boxes + 1, dtype=torch.bool)
        mask[:len(out)] = True
        padded = torch.zeros(self.max_boxes + 1, 4)
        padded[:len(out)] = torch.tensor(out, dtype=torch.float32)
        return padded, mask

    def colour_jitter_tensor(self, x, rng):
        # The same draws as colour_jitter, on a float image (the official pipeline jitters after its resize).
        import torchvision.transforms.functional as TF

        for adjust in (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation):
            x = adjust(x, rng.uniform(0.6, 1.4))
        return TF.adjust_hue(x, rng.uniform(-0.1, 0.1))

    def __call__(self, img, rng=None, boxes=None):
        w, h = img.size
        if self.uint8 and img.format == "JPEG":  # a no-op once decoded, or when the full size is needed
            img.draft("RGB", (self.size, self.size))
        if img.size[0] * img.size[1] > MAX_PIXELS:  # checked before the decode, which would hold it all
            raise ImageTooLarge(f"{getattr(img, 'source', 'image')}: {img.size[0]} x {img.size[1]} pixels, over "
                                f"the cap of {MAX_PIXELS}")
        img = to_rgb(img)
        if self.resize == "bilinear":
            # The official pipeline: ToTensor, then torchvision 0.9's tensor resize (bilinear, no antialiasing).
            x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
            x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False,
                              antialias=False)[0]
            if self.train and rng.random() < self.jitter:
                x = self.colour_jitter_tensor(x, rng)
            if self.train and rng.random() < self.grayscale:
                x = (x * torch.tensor([0.2989, 0.587, 0.114]).view(3, 1, 1)).sum(0, keepdim=True).expand(3, -1, -1)
            return ((x - self.mean) / self.std, *self.boxes(boxes, w, h))
        img = img.resize((self.size, self.size), Image.BICUBIC)
        if self.train and rng.random() < self.jitter:
            img = self.colour_jitter(img, rng)
        if self.train and rng.random() < self.grayscale:
            img = img.convert("L").convert("RGB")
        x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
        return (x if self.uint8 else normalize_pixels(x, MEAN, STD), *self.boxes(boxes, w, h))


class Transform:
    """One sample (image, caption, optional 'boxes') -> model inputs; runs in the loader workers."""

    def __init__(self, cfg, tokenizer, train):
        self.image = ImageTransform(cfg, train, uint8=True)
        self.tokenizer = tokenizer

    def __call__(self, sample, rng):
        image, boxes, box_mask = self.image(sample["image"], rng, sample.get("boxes"))
        ids, mask = self.tokenizer([sample["text"]])
        return {"image": image, "boxes": boxes, "box_mask": box_mask, "text": ids[0], "text_mask": mask[0]}


# ----------------------------------------------------------------------------------------------
# Building a model for train.py
def add_args(parser):
    parser.add_argument("--backbone", default=None, help="CNN: tiny, or a torchvision ResNet / EfficientNet name "
                        "(default: the --size preset's)")
    parser.add_argument("--backbone-weights", default=None, help="a torchvision state dict (.pth) for the CNN")
    parser.add_argument("--text-encoder", default=None,
                        help="an HF BERT / RoBERTa folder (config.json + weights; its tokenizer.json or vocab.txt "
                             "is used too), e.g. chinese-roberta-wwm-ext")
    parser.add_argument("--tokenizer", default=None, help="tokenizer.json or BERT vocab.txt (default: the "
                        "--text-encoder's, else a WordPiece vocabulary built from the captions)")
    parser.add_argument("--queue-size", type=int, default=None, help="negatives per queue (default 9600); "
                        "a multiple of the global batch")
    parser.add_argument("--momentum", type=float, default=None, help="momentum of the key encoders (default 0.99)")
    parser.add_argument("--temperature", type=float, default=None, help="fixed softmax temperature (default 0.07)")
    parser.add_argument("--freeze-cnn", type=int, default=None, help="leading CNN stages kept frozen")
    parser.add_argument("--freeze-text", type=int, default=None, help="lower BERT layers kept frozen")
    parser.add_argument("--image-size", type=int, default=None, help="square input size (default: the preset's; "
                        "456 for official weights, as brivl-nmi; BAAI-WuDao's config uses 380)")


OVERRIDES = ("backbone", "image_size", "queue_size", "momentum", "temperature", "freeze_cnn", "freeze_text")
RANGES = {"queue_size": (1, 1 << 20), "momentum": (0, 1), "temperature": (1e-4, 100), "image_size": (8, 4096)}


def _check_queue(cfg, batch_size):
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if batch_size and (cfg.queue_size % (batch_size * world) or not cfg.queue_size):
        g = batch_size * world
        raise ValueError(f"brivl: --queue-size {cfg.queue_size} must be a multiple of the global batch {g} "
                         f"(--batch-size {batch_size} x {world} ranks); e.g. --queue-size "
                         f"{max(g, round(cfg.queue_size / g) * g)}")


def build(size="tiny", tokenizer=None, text_encoder=None, backbone_weights=None, init=None, captions=(),
          batch_size=None, extra=None, **overrides):
    """A BriVL from keywords: a preset with its parts (text_encoder: an HF BERT folder; backbone_weights:
    torchvision's or timm's CNN weights; a tokenizer file, else a WordPiece trained on `captions`), a
    checkpoint or the released weights to fine-tune (init), or a checkpoint's extra_state().
    overrides: any of OVERRIDES. batch_size (per rank) checks that the queue holds whole global batches."""
    if extra is None and init:  # fine-tuning a brivl checkpoint or the released weights
        overrides = {k: v for k, v in overrides.items() if k != "backbone" and v is not None}
        model, _ = load(init, tokenizer=tokenizer or text_encoder, **overrides)  # overrides: official weights only
        if model.tokenizer is None:
            raise ValueError(f"{init} is an official BriVL checkpoint, which carries no tokenizer: pass "
                             "--tokenizer vocab.txt (chinese-roberta-wwm-ext's)")
        _check_queue(model.cfg, batch_size)
        return model.train()
    if extra is not None:
        cfg = check_config(Config, extra.get("config"), "the checkpoint")
        tok = BertTokenizer.from_str(extra["tokenizer"], cfg.context_length) if extra.get("tokenizer") else None
        return BriVL(cfg, tok)
    if size not in CONFIGS:
        raise ValueError(f"unknown --size {size!r}; choose one of {', '.join(CONFIGS)}")
    unknown = set(overrides) - set(OVERRIDES)
    if unknown:
        raise TypeError(f"build() got unknown keywords {sorted(unknown)}; overrides are {', '.join(OVERRIDES)}")
    cfg = Config(**asdict(CONFIGS[size]))
    for name, value in overrides.items():
        if value is not None:
            setattr(cfg, name, value)
    _check_queue(cfg, batch_size)
    text_sd = None
    if text_encoder:
        hf, text_sd = read_hf_weights(text_encoder)
        cfg.vocab_size, cfg.text_width, cfg.text_layers = hf["vocab_size"], hf["hidden_size"], hf["num_hidden_layers"]
        cfg.text_heads, cfg.text_mlp = hf["num_attention_heads"], hf["intermediate_size"]
        cfg.text_max_positions = hf["max_position_embeddings"]
        if hf.get("hidden_act", "gelu") != "gelu":
            raise ValueError(f"{text_encoder}: hidden_act {hf['hidden_act']!r}; only BERT's exact GELU is implemented")
    if tokenizer or text_encoder:
        tok = BertTokenizer.from_file(tokenizer or text_encoder, cfg.context_length)
    else:
        tok = BertTokenizer.train(captions, vocab_size=cfg.vocab_size, context_length=cfg.context_length)
        cfg.vocab_size = tok.vocab_size
    model = BriVL(cfg, tok)
    if text_sd is not None:
        for tower in (model.textual, model.textual_momentum):
            tower.bert.load_state_dict(bert_state_dict(text_sd), strict=True)
    if backbone_weights:
        load_backbone(model, backbone_weights)
    return model


def create(args, captions=(), extra=None):
    names = ("size", "tokenizer", "text_encoder", "backbone_weights", "init", "batch_size") + OVERRIDES
    return build(**{n: getattr(args, n) for n in names if getattr(args, n, None) is not None}, captions=captions, extra=extra)


def load_backbone(model, path):
    """A torchvision classification state dict into both CNNs (its classifier is not used)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such file; pass a torchvision state dict of the --backbone")
    if isinstance(model.visual.backbone, TFEfficientNet):  # timm's weights, e.g. tf_efficientnet_b5_ns
        sd = {k: v for k, v in load_tensors(path).items() if not k.startswith("classifier.")}
        for tower in (model.visual, model.visual_momentum):
            missing, unexpected = tower.backbone.load_state_dict(sd, strict=False)
            if missing or unexpected:
                raise ValueError(f"{path}: not a timm {model.cfg.backbone} state dict (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
        return
    import torchvision

    full = getattr(torchvision.models, model.cfg.backbone)(weights=None)
    missing, unexpected = full.load_state_dict(load_tensors(path), strict=False)
    if [k for k in missing if not k.startswith(("fc.", "classifier."))] or unexpected:
        raise ValueError(f"{path}: not a state dict of torchvision's {model.cfg.backbone} "
                         f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    if model.cfg.backbone.startswith("resnet"):
        stages = nn.Sequential(nn.Sequential(full.conv1, full.bn1, full.relu, full.maxpool), full.layer1, full.layer2,
                               full.layer3, full.layer4)
    else:
        stages = full.features
    for tower in (model.visual, model.visual_momentum):
        tower.backbone.load_state_dict(stages.state_dict(), strict=True)


# ----------------------------------------------------------------------------------------------
# The released weights: official checkpoints ({"learnable": ...}, BAAI-WuDao/BriVL and brivl-nmi)
#
# Their four encoders map onto this file's towers; inside each, official sub-modules map by prefix.
# `models/vl_model.py` names: imgFC / textFC (Linear, ReLU, Linear as fc1, fc2), imgAtt / textAtt
# (nn.TransformerEncoder: the same names here), max_pool.0 (the 1x1 conv), the timm CNN, HF's BertModel.
OFFICIAL_TOWERS = {"imgencoder": "visual", "imgencoder_mom": "visual_momentum", "textencoder": "textual",
                   "textencoder_mom": "textual_momentum"}


OFFICIAL_NAMES = {
    "image": (("backbone.", "backbone."), ("learnable.max_pool.0.", "pool.conv."), ("learnable.imgAtt.", "attn."),
              ("learnable.imgFC.fc1.", "mlp.0."), ("learnable.imgFC.fc2.", "mlp.2.")),
    "text": (("backbone.bert.", "bert."), ("learnable.textAtt.", "attn."), ("learnable.textFC.fc1.", "mlp.0."),
             ("learnable.textFC.fc2.", "mlp.2.")),
}


# Saved but unused: the CNN's classifier, BERT's pooler, and buffers older libraries saved.
OFFICIAL_UNUSED = ("backbone.classifier.", "backbone.bert.pooler.")


def from_official_names(sd):
    """An official state dict (VL_model's, or its .learnable's as released) in this file's names, queues
    transposed to [K, D]. Unknown keys raise, naming them."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    out, unknown = {}, []
    for k, v in sd.items():
        key = k[len("learnable."):] if k.startswith("learnable.") else k
        if key in ("img_queue", "text_queue"):
            out["image_queue" if key == "img_queue" else "text_queue"] = v.T.contiguous()
            continue
        if key == "img_queue_ptr":
            out["queue_ptr"] = v.reshape(())
            continue
        tower, _, rest = key.partition(".")
        if key == "text_queue_ptr" or rest.endswith(("position_ids", "token_type_ids")) or rest.startswith(OFFICIAL_UNUSED):
            continue
        if tower not in OFFICIAL_TOWERS:
            unknown.append(k)
            continue
        names = OFFICIAL_NAMES["image" if tower.startswith("img") else "text"]
        ours = next((new + rest[len(old):] for old, new in names if rest.startswith(old)), None)
        if ours is None:
            unknown.append(k)
            continue
        out[f"{OFFICIAL_TOWERS[tower]}.{ours}"] = v
    if unknown:
        raise ValueError(f"not an official BriVL state dict: unknown keys {unknown[:4]}")
    if not any(k.startswith("visual_momentum.") for k in out):  # the query encoders only: keys start equal
        out.update({k.replace("visual.", "visual_momentum.", 1).replace("textual.", "textual_momentum.", 1): v
                    for k, v in out.items() if k.startswith(("visual.", "textual."))})
    return out


def official_config(sd, image_size=456):
    """The brivl-official Config with the shapes of a state dict in this file's names."""
    cfg = Config(**asdict(CONFIGS["brivl-official"]))
    cnn = {k[len("visual.backbone."):]: v for k, v in sd.items() if k.startswith("visual.backbone.")}
    spec = effnet_spec_of(cnn)
    names = [f"tf_efficientnet_b{i}" for i in range(8)]
    cfg.backbone = next((n for n in names if effnet_spec(n) == spec), None)
    if cfg.backbone is None:
        raise ValueError(f"the image backbone is no tf_efficientnet_b0-b7 (stem {spec[0]}, head {spec[2]} channels)")

    def layers(prefix):
        return len({k[len(prefix):].split(".")[0] for k in sd if k.startswith(prefix)})

    emb = sd["textual.bert.embeddings.word_embeddings.weight"]
    cfg.embed_dim = sd["visual.mlp.2.weight"].shape[0]
    cfg.image_layers, cfg.image_mlp = layers("visual.attn.layers."), sd["visual.attn.layers.0.linear1.weight"].shape[0]
    cfg.vocab_size, cfg.text_width = emb.shape
    cfg.text_layers = layers("textual.bert.encoder.layer.")
    cfg.text_heads = cfg.text_width // 64  # BERT's head width
    cfg.text_mlp = sd["textual.bert.encoder.layer.0.intermediate.dense.weight"].shape[0]
    cfg.text_max_positions = sd["textual.bert.embeddings.position_embeddings.weight"].shape[0]
    cfg.context_length = min(cfg.context_length, cfg.text_max_positions)  # 80, the official MAX_TEXT_LEN
    cfg.text_attn_layers = layers("textual.attn.layers.")
    cfg.text_attn_mlp = sd["textual.attn.layers.0.linear1.weight"].shape[0]
    cfg.image_size = image_size
    cfg.freeze_text = max(0, cfg.text_layers - 4)  # the official code trains BERT's top 4 layers (base and large)
    return cfg


def from_official(sd, tokenizer=None, image_size=456, **overrides):
    """A BriVL in the official-compatible configuration holding an official state dict's weights.

    tokenizer: a BertTokenizer, or a vocab.txt / tokenizer.json / folder (chinese-roberta-wwm-ext's), or None.
    The queues are random unit vectors unless the state dict holds them, as the official code's.
    """
    sd = from_official_names(sd)
    cfg = official_config(sd, image_size)
    if "image_queue" in sd:  # a whole VL_model's state dict: its queues come along
        cfg.queue_size = sd["image_queue"].shape[0]
    for k, v in overrides.items():
        setattr(cfg, k, v)
    cfg = check_config(Config, asdict(cfg), "the official weights")
    if isinstance(tokenizer, str):
        tokenizer = BertTokenizer.from_file(tokenizer, cfg.context_length)
    check_fits(lambda: BriVL(cfg, tokenizer), sd, "the official weights", strict=False)
    bad = [k for k, v in sd.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"the official weights: {len(bad)} tensors hold NaN or infinite values (first: {bad[0]})")
    model = BriVL(cfg, tokenizer)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k not in ("image_queue", "text_queue", "queue_ptr")
               and not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"official BriVL weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}")
    return model


def official_or_ours(path):
    """(weights, True) for a train.py checkpoint of brivl ('model', 'extra'), (weights, False) for an
    official one ('learnable'); anything else is a ValueError naming the file."""
    weights = load_tensors(path)
    if isinstance(weights, dict) and isinstance(weights.get("learnable"), dict):
        return weights, False
    if isinstance(weights, dict) and isinstance(weights.get("model"), dict) and isinstance(weights.get("extra"), dict):
        return weights, True
    raise ValueError(f"{path}: neither a train.py checkpoint of brivl ('model', 'extra') nor an official BriVL one "
                     f"('learnable': a table of tensors)")


def load(path, device="cpu", image_size=None, tokenizer=None, **overrides):
    """(model, preprocess) from a train.py checkpoint or an official BriVL one ({"learnable": ...});
    preprocess(img, boxes=None) -> (image, boxes, box_mask).

    image_size: official weights only (default 456, brivl-nmi's; BAAI-WuDao's config says 380): the input size,
    which also maps the boxes onto the feature map. tokenizer: a vocab.txt, tokenizer.json or folder, for
    official weights (they carry none) or to replace a checkpoint's.
    """
    with reading(path):
        weights, ours = official_or_ours(path)
        if not ours:
            model = from_official(weights["learnable"], tokenizer, image_size or overrides.pop("image_size", 456),
                                  **overrides)
        else:
            extra = weights["extra"]
            if image_size is not None:
                extra = {**extra, "config": {**extra["config"], "image_size": image_size}}
            check_fits(lambda: build(extra=extra), weights["model"], path)
            model = build(extra=extra)
            model.load_state_dict(weights["model"], strict=True)
            if tokenizer is not None:
                model.tokenizer = BertTokenizer.from_file(tokenizer, model.cfg.context_length)
        if model.tokenizer is not None and model.tokenizer.vocab_size > model.cfg.vocab_size:
            raise ValueError(f"{tokenizer or path}: a tokenizer of {model.tokenizer.vocab_size} ids for an embedding "
                             f"table of {model.cfg.vocab_size}; pass the vocabulary these weights were trained with")
        model.to(device).eval()
        return model, ImageTransform(model.cfg, train=False)


# ----------------------------------------------------------------------------------------------
# `python brivl.py predict`: the query encoder's image features, over the grid's region boxes
@torch.no_grad()
def embed_images(model, preprocess, images):
    """[N, D] normalised image features of PIL images or image files from the query encoder, over the
    grid's region boxes; 64 at a time, so memory does not grow with their number."""
    device, images, out = next(model.parameters()).device, list(images), []
    for i in range(0, len(images), 64):
        pil = (read_image(x) if isinstance(x, (str, os.PathLike)) else to_rgb(x) for x in images[i:i + 64])
        pixels, boxes, mask = (torch.stack(x).to(device) for x in zip(*(preprocess(img) for img in pil)))
        out.append(model.encode_image(pixels, boxes, mask, normalize=True).float())
    return torch.cat(out)


# ----------------------------------------------------------------------------------------------
# CNN backbones: torchvision's, a tiny one for tests
def _group_norm(c):
    return nn.GroupNorm(8, c)


def tiny_cnn():
    """Three stages, stride 8, 128 channels; GroupNorm, so a sample's features never depend on its batch."""
    def conv(i, o, stride):
        return [nn.Conv2d(i, o, 3, stride, 1, bias=False), _group_norm(o), nn.ReLU(inplace=True)]

    return nn.Sequential(nn.Sequential(*conv(3, 32, 2)), nn.Sequential(*conv(32, 64, 2)),
                         nn.Sequential(*conv(64, 128, 2), *conv(128, 128, 1)))


def cnn_backbone(name):
    """(stages as an nn.Sequential, output channels). Random weights: --backbone-weights loads yours."""
    if name == "tiny":
        return tiny_cnn(), 128
    if name.startswith("tf_efficientnet_b"):
        net = TFEfficientNet.variant(name)
        return net, net.width
    import torchvision

    if not hasattr(torchvision.models, name) or not name.startswith(("resnet", "efficientnet")):
        raise ValueError(f"unknown backbone {name!r}: use 'tiny' or a torchvision ResNet / EfficientNet name "
                         "(resnet50, efficientnet_b5, ...)")
    m = getattr(torchvision.models, name)(weights=None)
    if name.startswith("resnet"):
        stem = nn.Sequential(m.conv1, m.bn1, m.relu, m.maxpool)
        return nn.Sequential(stem, m.layer1, m.layer2, m.layer3, m.layer4), m.fc.in_features
    return m.features, m.classifier[1].in_features  # stem, 7 block stages, head conv (timm's blocks 0-6 are 1-7)


# ----------------------------------------------------------------------------------------------
# The released BriVL's CNN: timm's tf_efficientnet_bN (EfficientNet ported from TensorFlow), written out
# here with timm's parameter names so BriVL's checkpoints load as they are and timm is not needed.
class SameConv2d(nn.Conv2d):
    """TensorFlow's "same" padding: for stride 2 the padding is asymmetric (the extra row and column go
    bottom and right) and depends on the input size, so it is computed per call. torchvision's
    EfficientNet pads symmetrically, which shifts every feature of a strided layer by half a pixel."""

    def forward(self, x):
        pads = []
        for size, k, s in zip(x.shape[:-3:-1], self.kernel_size[::-1], self.stride[::-1]):  # W, then H
            total = max((math.ceil(size / s) - 1) * s + k - size, 0)
            pads += [total // 2, total - total // 2]
        return F.conv2d(F.pad(x, pads), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


def same_conv(i, o, k, stride=1, groups=1, bias=False):
    # Stride 1 with an odd kernel pads the same on both sides: a plain convolution does it.
    if stride == 1:
        return nn.Conv2d(i, o, k, 1, (k - 1) // 2, groups=groups, bias=bias)
    return SameConv2d(i, o, k, stride, groups=groups, bias=bias)


class BatchNormAct(nn.BatchNorm2d):
    """BatchNorm, then SiLU if act (timm's BatchNormAct2d: the same parameter names as BatchNorm2d)."""

    def __init__(self, c, act=True):
        super().__init__(c, eps=1e-3)  # TensorFlow's epsilon
        self.act = act

    def forward(self, x):
        x = super().forward(x)
        return F.silu(x) if self.act else x


class SqueezeExcite(nn.Module):
    def __init__(self, c, reduced):
        super().__init__()
        self.conv_reduce = nn.Conv2d(c, reduced, 1)
        self.conv_expand = nn.Conv2d(reduced, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.conv_expand(F.silu(self.conv_reduce(x.mean((2, 3), keepdim=True)))))


class MBConv(nn.Module):
    """EfficientNet's block: [1x1 expand] -> depthwise k x k -> squeeze-excite -> 1x1 project, plus the input
    when the shapes allow. expand == 1 is timm's DepthwiseSeparableConv (no expansion conv, its norms
    named bn1 and bn2); otherwise InvertedResidual (bn1, bn2, bn3)."""

    def __init__(self, i, o, k, stride, expand, reduced):
        super().__init__()
        mid = i * expand
        self.expand = expand
        if expand != 1:
            self.conv_pw = nn.Conv2d(i, mid, 1, bias=False)
            self.bn1 = BatchNormAct(mid)
        self.conv_dw = same_conv(mid, mid, k, stride, groups=mid)
        norms = ("bn2", "bn3") if expand != 1 else ("bn1", "bn2")
        setattr(self, norms[0], BatchNormAct(mid))
        self.se = SqueezeExcite(mid, reduced)
        setattr(self, "conv_pwl" if expand != 1 else "conv_pw", nn.Conv2d(mid, o, 1, bias=False))
        setattr(self, norms[1], BatchNormAct(o, act=False))
        self.skip = stride == 1 and i == o

    def forward(self, x):
        if self.expand != 1:
            y = self.bn2(self.conv_dw(self.bn1(self.conv_pw(x))))
            y = self.bn3(self.conv_pwl(self.se(y)))
        else:
            y = self.bn2(self.conv_pw(self.se(self.bn1(self.conv_dw(x)))))
        return x + y if self.skip else y


# EfficientNet-B0's stages (expansion, kernel, first stride, repeats, channels) and the (width, depth)
# multipliers of B0-B7 (Tan & Le 2019; timm's efficientnet.py).
EFFNET_STAGES = ((1, 3, 1, 1, 16), (6, 3, 2, 2, 24), (6, 5, 2, 2, 40), (6, 3, 2, 3, 80), (6, 5, 1, 3, 112),
                 (6, 5, 2, 4, 192), (6, 3, 1, 1, 320))


EFFNET_SCALES = {"b0": (1.0, 1.0), "b1": (1.0, 1.1), "b2": (1.1, 1.2), "b3": (1.2, 1.4), "b4": (1.4, 1.8),
                 "b5": (1.6, 2.2), "b6": (1.8, 2.6), "b7": (2.0, 3.1)}


def _round_channels(c, width):
    # timm's make_divisible: to a multiple of 8, never more than 10% below
    v = c * width
    out = max(8, int(v + 4) // 8 * 8)
    return out + 8 if out < 0.9 * v else out


def effnet_spec(name):
    """(stem channels, blocks per stage, head channels) of tf_efficientnet_bN; a block is (in, out,
    kernel, stride, expansion, squeeze-excite channels)."""
    key = name.rsplit("_", 1)[-1]
    if not name.startswith("tf_efficientnet_") or key not in EFFNET_SCALES:
        raise ValueError(f"unknown backbone {name!r}: tf_efficientnet_b0 ... tf_efficientnet_b7")
    width, depth = EFFNET_SCALES[key]
    stem = c = _round_channels(32, width)
    blocks = []
    for expand, k, stride, repeats, out in EFFNET_STAGES:
        out = _round_channels(out, width)
        blocks.append([])
        for j in range(math.ceil(repeats * depth)):
            i = c if j == 0 else out
            blocks[-1].append((i, out, k, stride if j == 0 else 1, expand, round(i * 0.25)))  # SE: a quarter of the input
        c = out
    return stem, blocks, _round_channels(1280, width)


def effnet_spec_of(sd):
    """The spec (as effnet_spec) a timm tf_efficientnet state dict, in timm's names, was saved from."""
    stages = {}
    for k in sd:
        if k.startswith("blocks.") and k.endswith(".conv_dw.weight"):
            s, b = (int(x) for x in k.split(".")[1:3])
            stages.setdefault(s, set()).add(b)
    if "conv_stem.weight" not in sd or "conv_head.weight" not in sd or sorted(stages) != list(range(len(EFFNET_STAGES))):
        raise ValueError("not a timm tf_efficientnet state dict (conv_stem, blocks.0-6, conv_head)")
    blocks = []
    for s in sorted(stages):
        blocks.append([])
        for b in sorted(stages[s]):
            p = f"blocks.{s}.{b}."
            mid, _, k, _ = sd[p + "conv_dw.weight"].shape
            expanded = p + "conv_pwl.weight" in sd
            o = sd[p + ("conv_pwl.weight" if expanded else "conv_pw.weight")].shape[0]
            i = sd[p + "conv_pw.weight"].shape[1] if expanded else mid
            blocks[-1].append((i, o, k, EFFNET_STAGES[s][2] if b == 0 else 1, mid // i,
                               sd[p + "se.conv_reduce.weight"].shape[0]))
    return sd["conv_stem.weight"].shape[0], blocks, sd["conv_head.weight"].shape[0]


class TFEfficientNet(nn.Module):
    """timm's tf_efficientnet_bN up to its last feature map (forward_features): stem, block stages, 1x1 head.

    blocks: per stage, a list of (in, out, kernel, stride, expand, squeeze-excite width). Eval BatchNorm
    with eps 1e-3 and SiLU throughout, as the TensorFlow original.
    """

    def __init__(self, stem, blocks, width):
        super().__init__()
        self.width = width
        self.conv_stem = same_conv(3, stem, 3, 2)
        self.bn1 = BatchNormAct(stem)
        self.blocks = nn.ModuleList(nn.Sequential(*(MBConv(*b) for b in stage)) for stage in blocks)
        self.conv_head = nn.Conv2d(blocks[-1][-1][1], width, 1, bias=False)
        self.bn2 = BatchNormAct(width)

    @classmethod
    def variant(cls, name):
        return cls(*effnet_spec(name))

    def stages(self):
        """The units frozen from the front by freeze_cnn: the stem, then each block stage."""
        return [nn.ModuleList([self.conv_stem, self.bn1]), *self.blocks]

    def head(self):
        return nn.ModuleList([self.conv_head, self.bn2])

    def forward(self, x):
        x = self.bn1(self.conv_stem(x))
        for stage in self.blocks:
            x = stage(x)
        return self.bn2(self.conv_head(x))


# ----------------------------------------------------------------------------------------------
# BERT: any HF tokenizer.json or a BERT vocab.txt (WordPiece), and an encoder with HF's parameter
# names, so BERT / RoBERTa weights load as they are
# ==== region bert (copied into altclip.py) ====
class BertTokenizer:
    """A BERT-family tokenizer (BERT's WordPiece, XLM-R's Unigram: any HF tokenizer.json, or a BERT vocab.txt).

    __call__(list of str) -> (ids [N, context], mask [N, context]); the special tokens come from the
    tokenizer's own template ([CLS] ... [SEP], <s> ... </s>).
    """

    def __init__(self, tokenizer, context_length=80):
        self.tokenizer = tokenizer
        self.context_length = context_length
        pad = next((t for t in ("[PAD]", "<pad>") if tokenizer.token_to_id(t) is not None), None)
        if pad is None:
            raise ValueError("the tokenizer has no [PAD] or <pad> token")
        self.pad_id = tokenizer.token_to_id(pad)
        tokenizer.enable_truncation(context_length)  # keeps room for [CLS] ... [SEP]
        tokenizer.enable_padding(pad_id=self.pad_id, pad_token=pad, length=context_length)

    @property
    def vocab_size(self):  # the ids it hands out: the highest one + 1 (a file's added tokens may skip ids)
        return max(self.tokenizer.get_vocab(with_added_tokens=True).values(), default=-1) + 1

    @staticmethod
    def wordpiece(vocab, lowercase=True):
        """BERT's tokenizer: normalise, split on spaces, punctuation and CJK characters, WordPiece."""
        from tokenizers import Tokenizer as HFTokenizer, normalizers, pre_tokenizers, processors
        from tokenizers.models import WordPiece

        tok = HFTokenizer(WordPiece(vocab, unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase, handle_chinese_chars=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
        return tok

    @classmethod
    def from_file(cls, path, context_length=80, lowercase=True):
        """A tokenizer.json (any HF tokenizer), or a BERT vocab.txt, one token a line."""
        from tokenizers import Tokenizer as HFTokenizer

        if os.path.isdir(path):
            found = [os.path.join(path, f) for f in ("tokenizer.json", "vocab.txt") if os.path.isfile(os.path.join(path, f))]
            if not found:
                raise FileNotFoundError(f"{path}: no tokenizer.json or vocab.txt in this folder")
            path = found[0]
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: no such tokenizer file; pass a tokenizer.json or a BERT vocab.txt")
        if path.endswith(".json"):
            return cls(HFTokenizer.from_file(path), context_length)
        with open(path, encoding="utf-8") as f:
            vocab = {line.rstrip("\n"): i for i, line in enumerate(f)}
        missing = [t for t in ("[PAD]", "[UNK]", "[CLS]", "[SEP]") if t not in vocab]
        if missing:
            raise ValueError(f"{path}: not a BERT vocab.txt (no {', '.join(missing)})")
        return cls(cls.wordpiece(vocab, lowercase), context_length)

    @classmethod
    def train(cls, texts, vocab_size=1024, context_length=80):
        """A WordPiece vocabulary from the captions at hand: specials, every character seen (alone and
        as a ##continuation), then whole words by frequency. Deterministic: ties go alphabetically."""
        from collections import Counter

        specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        probe = cls.wordpiece({t: i for i, t in enumerate(specials)})
        words = Counter()
        for t in texts:
            words.update(w for w, _ in probe.pre_tokenizer.pre_tokenize_str(probe.normalizer.normalize_str(t)))
        chars = sorted({c for w in words for c in w})
        vocab = specials + chars + ["##" + c for c in chars]
        vocab += [w for w, _ in sorted(words.items(), key=lambda wc: (-wc[1], wc[0])) if len(w) > 1]
        vocab = vocab[:max(vocab_size, len(specials) + 2 * len(chars))]
        return cls(cls.wordpiece({t: i for i, t in enumerate(vocab)}), context_length)

    def to_str(self):
        return self.tokenizer.to_str()

    @classmethod
    def from_str(cls, s, context_length=80):
        from tokenizers import Tokenizer as HFTokenizer

        return cls(HFTokenizer.from_str(s), context_length)

    def __call__(self, texts):
        if isinstance(texts, str):
            texts = [texts]
        encs = self.tokenizer.encode_batch(list(texts))
        ids = torch.tensor([e.ids for e in encs], dtype=torch.long)
        return ids, torch.tensor([e.attention_mask for e in encs], dtype=torch.bool)


class BertEmbeddings(nn.Module):
    def __init__(self, vocab_size, width, max_positions, type_vocab_size, eps, pad_id):
        super().__init__()
        self.word_embeddings = nn.Embedding(vocab_size, width, padding_idx=pad_id)
        self.position_embeddings = nn.Embedding(max_positions, width)
        self.token_type_embeddings = nn.Embedding(type_vocab_size, width)
        self.LayerNorm = nn.LayerNorm(width, eps=eps)

    def forward(self, ids, positions):
        # One segment only: every token has token type 0.
        x = self.word_embeddings(ids) + self.position_embeddings(positions) + self.token_type_embeddings.weight[0]
        return self.LayerNorm(x)


class BertLayer(nn.Module):
    """Post-LN encoder block (attention, add & norm, GELU MLP, add & norm); no dropout, so runs are exact."""

    def __init__(self, width, heads, mlp, eps):
        super().__init__()
        self.heads = heads
        self.attention = nn.ModuleDict({
            "self": nn.ModuleDict({name: nn.Linear(width, width) for name in ("query", "key", "value")}),
            "output": nn.ModuleDict({"dense": nn.Linear(width, width), "LayerNorm": nn.LayerNorm(width, eps=eps)})})
        self.intermediate = nn.ModuleDict({"dense": nn.Linear(width, mlp)})
        self.output = nn.ModuleDict({"dense": nn.Linear(mlp, width), "LayerNorm": nn.LayerNorm(width, eps=eps)})

    def forward(self, x, mask):
        b, n, w = x.shape
        att, out = self.attention["self"], self.attention["output"]
        q, k, v = (att[name](x).view(b, n, self.heads, -1).transpose(1, 2) for name in ("query", "key", "value"))
        # mask [B, N]: True for real tokens; padding is never attended to (padded queries still run).
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        x = out["LayerNorm"](x + out["dense"](a.transpose(1, 2).reshape(b, n, w)))
        h = self.output["dense"](F.gelu(self.intermediate["dense"](x)))
        return self.output["LayerNorm"](x + h)


class Bert(nn.Module):
    """BERT, or RoBERTa / XLM-R (roberta=True: positions count real tokens from pad_id + 1, fairseq's rule)."""

    def __init__(self, vocab_size, width, layers, heads, mlp, max_positions, type_vocab_size=2, eps=1e-12,
                 pad_id=0, roberta=False):
        super().__init__()
        self.pad_id, self.roberta = pad_id, roberta
        self.embeddings = BertEmbeddings(vocab_size, width, max_positions, type_vocab_size, eps, pad_id)
        self.encoder = nn.ModuleDict({"layer": nn.ModuleList([BertLayer(width, heads, mlp, eps) for _ in range(layers)])})
        self.apply(self._init)

    @staticmethod
    def _init(m):  # BERT's initialisation
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
        if isinstance(m, nn.Linear):
            nn.init.zeros_(m.bias)

    def forward(self, ids, mask):
        mask = mask.bool()  # HF tokenizers hand out int 0/1 masks; attention takes bool ones
        if self.roberta:
            positions = torch.cumsum(mask, 1) * mask + self.pad_id
        else:
            positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
        x = self.embeddings(ids, positions)
        for layer in self.encoder["layer"]:
            x = layer(x, mask)
        return x


def read_hf_weights(folder, config_only=False):
    """(config dict, state dict) of an HF model folder: config.json plus pytorch_model.bin or model.safetensors."""
    cfg_path = os.path.join(folder, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{folder}: no config.json; pass the folder of an HF model (config.json + weights)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            config = json.load(f)
    except ValueError as e:
        raise ValueError(f"{cfg_path}: not JSON ({e})") from None
    if config_only:
        return config
    for name in ("model.safetensors", "pytorch_model.bin"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return config, load_tensors(path)  # weights only, a damaged file in one line
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin beside config.json")


def bert_state_dict(sd, prefixes=("bert.", "roberta.")):
    """An HF BertModel / RobertaModel state dict in Bert's names: prefix and pooler dropped, old spellings mapped."""
    out = {}
    for k, v in sd.items():
        k = next((k[len(p):] for p in prefixes if k.startswith(p)), k)
        if k.startswith(("pooler.", "cls.", "lm_head.")) or k.endswith("position_ids"):
            continue
        k = k.replace("encoder.layers.", "encoder.layer.").replace("LayerNorm.gamma", "LayerNorm.weight")
        out[k.replace("LayerNorm.beta", "LayerNorm.bias")] = v
    return out
# ==== end of region bert ====


# ==== copied from clip.py: tensor-files (shared code, kept identical to clip.py's region) ====
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
# ==== end of copy: tensor-files ====


# ==== copied from clip.py: optimizer (shared code, kept identical to clip.py's region) ====
def adamw_groups(model, weight_decay):
    """The AdamW parameter groups of the recipe (open_clip's rule): weight decay on weight matrices only,
    none on biases, norms, embeddings and 0-d scalars (the logit scale and bias); parameters that do not
    train (LiT locks, a frozen tower) left out."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or "embedding" in name else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
# ==== end of copy: optimizer ====


# ==== copied from clip.py: image-files (shared code, kept identical to clip.py's region) ====
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
# ==== end of copy: image-files ====


# ==== copied from clip.py: predict (shared code, kept identical to clip.py's region) ====
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
# ==== end of copy: predict ====


# ==== copied from clip.py: kernel (shared code, kept identical to clip.py's region) ====
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
# ==== end of copy: kernel ====


if __name__ == "__main__":

    if sys.argv[1:2] != ["predict"]:
        raise SystemExit("usage: python brivl.py predict --ckpt CHECKPOINT --image A.jpg --labels '一只狗,一只猫' "
                         "(train with: torchrun train.py --model brivl)")
    predict_main(sys.argv[2:])
