"""brivl.py: queue loss vs a naive one, momentum and queue updates, queues across ranks, region
pooling vs torchvision's roi_align, the BERT encoder vs a plain reimplementation, boxes, checkpoints."""
import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from PIL import Image

import brivl
import data
import train
from conftest import free_port

CAPTIONS = [data.Synthetic().captions(i)[0][j] for i in range(60) for j in range(5)]


def args(**kw):
    base = dict(size="tiny", batch_size=8, backbone=None, backbone_weights=None, text_encoder=None, tokenizer=None,
                queue_size=32, momentum=None, temperature=None, freeze_cnn=None, freeze_text=None)
    base.update(kw)
    return SimpleNamespace(**base)


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return brivl.create(args(**kw), CAPTIONS)


def batch(model, start=0, n=8, train=True):
    ds, t = data.Synthetic(), model.transform(train)
    items = [t(ds.sample(i, np.random.default_rng(i)), np.random.default_rng(i)) for i in range(start, start + n)]
    return data.collate(items)


def test_queue_loss_matches_naive_cross_entropy():
    torch.manual_seed(0)
    q = F.normalize(torch.randn(37, 24, dtype=torch.float64), dim=1).requires_grad_()
    k = F.normalize(torch.randn(37, 24, dtype=torch.float64), dim=1).requires_grad_()
    queue = F.normalize(torch.randn(1500, 24, dtype=torch.float64), dim=1)  # > one 1024 tile
    scale = torch.tensor(1 / 0.07, dtype=torch.float64)
    ours = brivl.queue_infonce(q, k, queue, scale)
    logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) * scale  # MoCo's: positive first
    naive = F.cross_entropy(logits, torch.zeros(37, dtype=torch.long))
    assert ours.item() == pytest.approx(naive.item(), rel=1e-10)
    g_ours, = torch.autograd.grad(ours, q)
    g_naive, = torch.autograd.grad(naive, q)
    assert torch.allclose(g_ours, g_naive, rtol=1e-9, atol=1e-12)
    assert torch.autograd.grad(brivl.queue_infonce(q, k, queue, scale), k, allow_unused=True)[0] is None


def test_model_loss_is_both_directions_summed():
    model = make_model()
    out = model(batch(model))
    s = out["scale"]
    i2t = torch.cat([(out["image"] * out["text_key"]).sum(1, keepdim=True), out["image"] @ model.text_queue.T], 1) * s
    t2i = torch.cat([(out["text"] * out["image_key"]).sum(1, keepdim=True), out["text"] @ model.image_queue.T], 1) * s
    target = torch.zeros(8, dtype=torch.long)
    naive = F.cross_entropy(i2t, target) + F.cross_entropy(t2i, target)
    assert model.loss(out).item() == pytest.approx(naive.item(), rel=1e-5)
    assert s.item() == pytest.approx(1 / 0.07)


def test_after_step_enqueues_keys_and_moves_the_key_encoders():
    model = make_model()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    keys = []
    for step in range(5):  # 5 x 8 keys into a queue of 32: the pointer wraps once
        out = model(batch(model, start=8 * step))
        model.loss(out).backward()
        opt.step()
        opt.zero_grad()
        keys.append((out["image_key"].detach(), out["text_key"].detach()))
        if step == 0:
            q_params = dict(model.named_parameters())
            model.after_step()
            for name, p in model.visual_momentum.named_parameters():
                expected = 0.99 * before[f"visual_momentum.{name}"] + 0.01 * q_params[f"visual.{name}"].detach()
                assert torch.allclose(p, expected, atol=1e-7), name
            for name, p in model.textual_momentum.named_parameters():
                expected = 0.99 * before[f"textual_momentum.{name}"] + 0.01 * q_params[f"textual.{name}"].detach()
                assert torch.allclose(p, expected, atol=1e-7), name
            assert torch.equal(model.image_queue[:8], keys[0][0]) and torch.equal(model.text_queue[:8], keys[0][1])
            assert torch.equal(model.image_queue[8:], before["image_queue"][8:])  # the rest: still the random init
            assert int(model.queue_ptr) == 8
        else:
            model.after_step()
    assert int(model.queue_ptr) == 8  # 40 keys through 32 slots
    assert torch.equal(model.image_queue[:8], keys[4][0]) and torch.equal(model.text_queue[8:16], keys[1][1])
    # The initial momentum copies are exact copies, and they never get gradients.
    assert all(not p.requires_grad for p in model.visual_momentum.parameters())
    assert all(p.grad is None for p in model.textual_momentum.parameters())


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    with pytest.raises(ValueError, match="--queue-size 30 must be a multiple of the global batch 8.*--queue-size 32"):
        brivl.create(args(queue_size=30), CAPTIONS)


def two_steps(model, forward, b):
    # Two SGD steps with the queue and momentum updates after each; forward is the model or its DDP wrapper.
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        model.loss(forward(b)).backward()
        opt.step()
        opt.zero_grad()
        model.after_step()


def _rank_step(rank, world, port, n, queue):
    # One training step of a fresh model on this rank's share of a global batch of n.
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = make_model()
    b = batch(model, start=rank * n // world, n=n // world)
    two_steps(model, torch.nn.parallel.DistributedDataParallel(model, **train.NO_BUFFER_SYNC), b)
    # numpy arrays travel by value (tensors would go through shared memory that dies with this process)
    queue.put((rank, model.image_queue.numpy().copy(), model.text_queue.numpy().copy(), int(model.queue_ptr),
               model.textual_momentum.mlp[0].weight.detach().numpy().copy()))
    torch.distributed.destroy_process_group()


@pytest.mark.slow
def test_queues_identical_across_ranks_and_equal_to_one_process():
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_step, args=(r, 2, port, 16, queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = {r[0]: [torch.from_numpy(v) if isinstance(v, np.ndarray) else v for v in r[1:]]
           for r in (queue.get(timeout=120) for _ in procs)}
    for p in procs:
        p.join(timeout=60)
    single = make_model()
    b = batch(single, n=16)
    two_steps(single, single, b)
    for r in (0, 1):
        image_q, text_q, ptr, w = got[r]
        assert ptr == int(single.queue_ptr) == 0  # 2 steps x 16 keys filled the queue of 32
        assert torch.equal(image_q, got[0][0]) and torch.equal(text_q, got[0][1])  # same on every rank
        assert torch.allclose(image_q, single.image_queue, atol=1e-5)
        assert torch.allclose(text_q, single.text_queue, atol=1e-5)
        assert torch.allclose(w, single.textual_momentum.mlp[0].weight, atol=1e-6)
    assert not torch.allclose(single.image_queue[:32], make_model().image_queue[:32])  # the keys did go in


def test_region_pool_equals_roi_align():
    from torchvision.ops import roi_align

    torch.manual_seed(0)
    fmap = torch.randn(3, 16, 8, 8, requires_grad=True)
    pool = brivl.RegionPool(16, 4)
    boxes = torch.rand(3, 6, 4) * 80 - 8  # some reach past the image, some are tiny
    boxes[..., 2:] = boxes[..., :2] + torch.rand(3, 6, 2) * 50
    boxes[0, 0] = torch.tensor([0.0, 0.0, 64.0, 64.0])
    ours = pool(fmap, boxes, 64)
    rois = torch.cat([torch.arange(3.0).repeat_interleave(6)[:, None], boxes.reshape(-1, 4)], 1)
    ref = roi_align(fmap, rois, 4, spatial_scale=8 / 64, sampling_ratio=2, aligned=True)
    ref = pool.conv(ref).mean((2, 3)).view(3, 6, -1)
    assert torch.allclose(ours, ref, atol=1e-5)
    g_ours, = torch.autograd.grad(ours.square().sum(), fmap)
    g_ref, = torch.autograd.grad(ref.square().sum(), fmap)
    assert torch.allclose(g_ours, g_ref, atol=1e-5)


def test_boxes_from_the_data_are_scaled_and_padding_is_ignored():
    model = make_model().eval()
    t = model.transform(False)
    img = Image.new("RGB", (128, 96), (200, 30, 30))
    x, boxes, mask = t.image(img, None, [[0, 0, 64, 48], [64, 48, 128, 96], [5, 5, 5, 50]])  # the last is empty
    assert mask.tolist() == [True] * 3 + [False] * 14
    assert boxes[:3].tolist() == [[0, 0, 64, 64], [0, 0, 32, 32], [32, 32, 64, 64]]
    x2, grid_boxes, grid_mask = t.image(img, None, None)
    assert grid_mask.all() and grid_boxes[1].tolist() == [0, 0, 16, 16]  # whole image, then 4 x 4 cells
    with torch.no_grad():
        a = model.encode_image(x[None], boxes[None], mask[None])
        junk = boxes.clone()
        junk[3:] = torch.rand(14, 4) * 64  # what sits in padded rows must not matter
        b = model.encode_image(x[None], junk[None], mask[None])
    assert torch.allclose(a, b, atol=1e-6)


def test_shard_json_boxes_reach_the_transform(tmp_path):
    import io
    import tarfile

    def member(tar, name, payload):
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))

    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (0, 200, 0)).save(buf, "PNG")
    with tarfile.open(tmp_path / "0.tar", "w") as tar:
        member(tar, "a.png", buf.getvalue())
        member(tar, "a.txt", b"a green square")
        member(tar, "a.json", json.dumps({"boxes": [[0, 0, 16, 16]]}).encode())
        member(tar, "b.png", buf.getvalue())
        member(tar, "b.txt", b"a green square")
        member(tar, "b.json", json.dumps({"boxes": [[0, 0, "x", 16]]}).encode())
    groups = list(data.read_shard(str(tmp_path / "0.tar"), []))
    sample = data.decode_sample(*groups[0], "0.tar")
    assert sample["boxes"] == [[0, 0, 16, 16]]
    with pytest.raises(data.SampleError, match="bad boxes"):
        data.decode_sample(*groups[1], "0.tar")
    model = make_model()
    out = model.transform(False)(sample, None)
    assert out["box_mask"].sum() == 2 and out["boxes"][1].tolist() == [0, 0, 32, 32]  # 32 px image -> 64 px


class NaiveBert(torch.nn.Module):
    """BERT written out from the paper's equations over a state dict, for comparison."""

    def __init__(self, sd, heads, eps=1e-12):
        super().__init__()
        self.sd, self.heads, self.eps = sd, heads, eps

    def forward(self, ids, mask, positions):
        sd = self.sd
        ln = lambda x, p: F.layer_norm(x, x.shape[-1:], sd[p + ".weight"], sd[p + ".bias"], self.eps)
        lin = lambda x, p: x @ sd[p + ".weight"].T + sd[p + ".bias"]
        x = sd["embeddings.word_embeddings.weight"][ids] + sd["embeddings.position_embeddings.weight"][positions]
        x = ln(x + sd["embeddings.token_type_embeddings.weight"][0], "embeddings.LayerNorm")
        i = 0
        while f"encoder.layer.{i}.attention.self.query.weight" in sd:
            p = f"encoder.layer.{i}."
            b, n, w = x.shape
            split = lambda t: t.view(b, n, self.heads, -1).transpose(1, 2)
            q, k, v = (split(lin(x, p + "attention.self." + m)) for m in ("query", "key", "value"))
            scores = q @ k.transpose(-1, -2) / math.sqrt(w // self.heads)
            scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
            a = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, w)
            x = ln(x + lin(a, p + "attention.output.dense"), p + "attention.output.LayerNorm")
            h = lin(x, p + "intermediate.dense")
            h = 0.5 * h * (1 + torch.erf(h / math.sqrt(2)))
            x = ln(x + lin(h, p + "output.dense"), p + "output.LayerNorm")
            i += 1
        return x


@pytest.mark.parametrize("roberta", [False, True])
def test_bert_matches_a_plain_reimplementation_and_loads_hf_names(tmp_path, roberta):
    torch.manual_seed(0)
    pad = 1 if roberta else 0
    bert = brivl.Bert(50, 32, 2, 4, 64, 40, pad_id=pad, roberta=roberta).eval()
    # An HF-style file: model prefix, pooler, position_ids, old gamma/beta spellings.
    prefix = "roberta." if roberta else "bert."
    hf = {prefix + k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in bert.state_dict().items()}
    hf[prefix + "pooler.dense.weight"] = torch.zeros(32, 32)
    hf[prefix + "embeddings.position_ids"] = torch.arange(40)[None]
    fresh = brivl.Bert(50, 32, 2, 4, 64, 40, pad_id=pad, roberta=roberta).eval()
    fresh.load_state_dict(brivl.bert_state_dict(hf), strict=True)
    ids = torch.randint(3, 50, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 2:] = False
    ids[~mask] = pad
    if roberta:  # fairseq: the first real token has position pad + 1; padding sits at position pad
        positions = torch.where(mask, torch.cumsum(mask, 1) + pad, torch.full_like(ids, pad))
    else:
        positions = torch.arange(9).expand(3, 9)
    with torch.no_grad():
        ours = fresh(ids, mask)
        ref = NaiveBert(bert.state_dict(), 4)(ids, mask, positions)
    assert torch.allclose(ours[mask], ref[mask], atol=1e-5)


def test_text_encoder_from_an_hf_folder(tmp_path):
    torch.manual_seed(0)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle", "红", "色", "##s"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    cfg = {"model_type": "bert", "vocab_size": len(vocab), "hidden_size": 32, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 40, "hidden_act": "gelu"}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    src = brivl.Bert(len(vocab), 32, 2, 4, 64, 40)
    torch.save({"bert." + k: v for k, v in src.state_dict().items()}, tmp_path / "pytorch_model.bin")
    model = brivl.create(args(text_encoder=str(tmp_path), freeze_text=1), CAPTIONS)
    for tower in (model.textual, model.textual_momentum):
        assert all(torch.equal(v, src.state_dict()[k]) for k, v in tower.bert.state_dict().items())
    ids, mask = model.tokenizer(["A red circles", "红色"])
    assert model.tokenizer.tokenizer.decode(ids[0].tolist(), skip_special_tokens=False).startswith("[CLS] a red circle ##s [SEP]")
    assert ids[1, :4].tolist() == [2, 8, 9, 3] and mask[1].sum() == 4  # CJK split per character
    frozen = [n for n, p in model.textual.named_parameters() if not p.requires_grad]
    assert any(n.startswith("bert.embeddings") for n in frozen) and any("layer.0." in n for n in frozen)
    assert not any("layer.1." in n for n in frozen)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        brivl.create(args(text_encoder=str(tmp_path / "nothere")), CAPTIONS)


def test_tokenizer_built_from_captions_is_deterministic_and_truncates_keeping_sep():
    a = brivl.BertTokenizer.train(CAPTIONS, context_length=8)
    b = brivl.BertTokenizer.train(list(CAPTIONS), context_length=8)
    assert a.to_str() == b.to_str()
    ids, mask = a(["a small red circle on a black background with many words", "red"])
    toks = [a.tokenizer.id_to_token(i) for i in ids[0].tolist()]
    assert toks[0] == "[CLS]" and toks[-1] == "[SEP]" and mask[0].all()
    assert mask[1].sum() == 3 and ids[1, 3:].eq(a.pad_id).all()
    assert a.tokenizer.id_to_token(ids[1, 1].item()) == "red"


def test_backbone_weights_and_frozen_stages(tmp_path):
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    model = brivl.create(args(backbone="resnet18", backbone_weights=str(tmp_path / "r18.pth"), freeze_cnn=2), CAPTIONS)
    assert torch.equal(model.visual.backbone[1][0].conv1.weight, net.layer1[0].conv1.weight)
    assert torch.equal(model.visual_momentum.backbone[4][1].conv2.weight, net.layer4[1].conv2.weight)
    assert not any(p.requires_grad for p in model.visual.backbone[:2].parameters())
    assert all(p.requires_grad for p in model.visual.backbone[2:].parameters())
    model.train()
    assert not any(m.training for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    with pytest.raises(ValueError, match="unknown backbone"):
        brivl.create(args(backbone="vgg16"), CAPTIONS)


def test_checkpoint_round_trip(tmp_path):
    out = str(tmp_path / "run")
    train.main(["--model", "brivl", "--steps", "2", "--batch-size", "8", "--queue-size", "32", "--out", out,
                "--workers", "0", "--val-size", "16", "--save-every", "0"])
    path = os.path.join(out, "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    assert int(ckpt["model"]["queue_ptr"]) == 16
    model, preprocess = brivl.load(path)
    assert torch.equal(model.image_queue, ckpt["model"]["image_queue"])
    image, boxes, mask = preprocess(Image.new("RGB", (64, 64)))
    with torch.no_grad():
        assert model.encode_image(image[None], boxes[None], mask[None], normalize=True).shape == (1, 128)
        assert model.encode_texts(["a red circle"]).norm(dim=-1).item() == pytest.approx(1.0, abs=1e-5)


# ------------------------------------------------------------------------------------------------
# The official-compatible configuration and the released checkpoints' format


def test_same_padding_is_tensorflows_asymmetric_pad():
    torch.manual_seed(0)
    # (input size, kernel) -> (left/top, right/bottom) padding by TensorFlow's rule for stride 2, by hand:
    # total = (ceil(n / 2) - 1) * 2 + k - n, the odd pixel going right/bottom.
    for n, k, pad in ((8, 3, (0, 1)), (7, 3, (1, 1)), (8, 5, (1, 2)), (9, 5, (2, 2))):
        conv = brivl.same_conv(4, 6, k, stride=2)
        x = torch.randn(2, 4, n, n)
        want = F.conv2d(F.pad(x, (*pad, *pad)), conv.weight, stride=2)
        assert conv(x).shape[-1] == math.ceil(n / 2)
        torch.testing.assert_close(conv(x), want, rtol=0, atol=1e-6)
    conv = brivl.same_conv(4, 6, 5)  # stride 1: symmetric
    x = torch.randn(1, 4, 9, 9)
    torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, padding=2), rtol=0, atol=0)


def test_tf_efficientnet_shapes():
    # EfficientNet-B5 and -B7 (Tan & Le 2019; timm's tf_efficientnet_b5 / _b7): stem, blocks per stage, head.
    # Parameter counts: timm 1.0's tf_efficientnet_b5 / _b7 (30,389,784 / 66,347,960) less the classifier.
    for name, stem, depths, head, params in (("tf_efficientnet_b5", 48, [3, 5, 5, 7, 7, 9, 3], 2048, 30389784),
                                             ("tf_efficientnet_b7", 64, [4, 7, 7, 10, 10, 13, 4], 2560, 66347960)):
        s, blocks, h = brivl.effnet_spec(name)
        assert (s, [len(b) for b in blocks], h) == (stem, depths, head)
        net = brivl.TFEfficientNet.variant(name)
        assert sum(p.numel() for p in net.parameters()) == params - (head * 1000 + 1000)
        assert brivl.effnet_spec_of(net.state_dict()) == brivl.effnet_spec(name)


def test_tf_efficientnet_matches_timm():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("tf_efficientnet_b0", pretrained=False).eval()
    for m in ref.modules():  # statistics that matter
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    sd = {k: v for k, v in ref.state_dict().items() if not k.startswith("classifier.")}
    net = brivl.TFEfficientNet(*brivl.effnet_spec_of(sd)).eval()
    net.load_state_dict(sd, strict=True)
    for size in (64, 77):  # even and odd sizes: the padding differs
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            torch.testing.assert_close(net(x), ref.forward_features(x), rtol=0, atol=1e-5)
    b5 = timm.create_model("tf_efficientnet_b5", pretrained=False).state_dict()
    ours = brivl.TFEfficientNet.variant("tf_efficientnet_b5").state_dict()
    assert {k: v.shape for k, v in b5.items() if not k.startswith("classifier.")} == {k: v.shape for k, v in ours.items()}


def test_grid_pool_equals_the_official_per_box_loop():
    torch.manual_seed(0)
    pool = brivl.GridPool(8, 4)
    fmap = torch.randn(2, 8, 15, 15)
    size = 456
    boxes = torch.tensor(brivl.grid_boxes(6, size), dtype=torch.float32)[:10]
    boxes = torch.stack([boxes, torch.cat([torch.tensor([[-40.0, 10, 500, 300], [100, 120, 101, 121]]), boxes[2:],
                                           ])]).clone()
    boxes[1, -1] = 0  # a padding box
    want = []
    for b in range(2):  # affine_grid + grid_sample per image, a 1x1 conv, then AvgPool, as the official code
        h, w = fmap.shape[-2:]
        x0, y0, x1, y1 = (boxes[b, :, i] * h / size for i in range(4))
        z = torch.zeros_like(x0)
        theta = torch.stack([(x1 - x0) / (w - 1), z, (x0 + x1 - w + 1) / (w - 1),
                             z, (y1 - y0) / (h - 1), (y0 + y1 - h + 1) / (h - 1)], 1).view(-1, 2, 3)
        grid = F.affine_grid(theta, [boxes.shape[1], 8, 4, 4], align_corners=False)
        sampled = F.grid_sample(fmap[b:b + 1].expand(boxes.shape[1], -1, -1, -1), grid, align_corners=False)
        want.append(F.avg_pool2d(pool.conv(sampled), 4).flatten(1))
    torch.testing.assert_close(pool(fmap, boxes, size), torch.stack(want), rtol=0, atol=1e-5)


VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "一", "只", "狗", "猫", "红", "色", "的", "圆", "a", "red", "circle"]


def to_official_names(sd):
    """A state dict of brivl.py's in the official names (model.learnable's), queues as [D, K]: the inverse of
    brivl.from_official_names, to write files in the released layout."""
    towers = {v: k for k, v in brivl.OFFICIAL_TOWERS.items()}
    out = {}
    for k, v in sd.items():
        if k in ("image_queue", "text_queue"):
            out["img_queue" if k == "image_queue" else "text_queue"] = v.T.contiguous()
            continue
        if k == "queue_ptr":
            out["img_queue_ptr"] = out["text_queue_ptr"] = v.reshape(1)
            continue
        tower, _, rest = k.partition(".")
        names = brivl.OFFICIAL_NAMES["image" if tower.startswith("visual") else "text"]
        out[f"{towers[tower]}.{next(old + rest[len(new):] for old, new in names if rest.startswith(new))}"] = v
    return out


def official_model(tmp_path, seed=0):
    """A small model in the official configuration (EfficientNet-B0, a 5-layer BERT 64 wide) and the
    official-format file of its weights."""
    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    cfg = brivl.Config(**{**vars(brivl.CONFIGS["brivl-official"]),
                          **dict(backbone="tf_efficientnet_b0", embed_dim=1280, image_size=64, image_layers=1,
                                 image_mlp=64, context_length=16, vocab_size=len(VOCAB), text_width=64, text_layers=5,
                                 text_heads=1, text_mlp=128, text_max_positions=32, text_attn_layers=2,
                                 text_attn_mlp=64, queue_size=32, freeze_text=1)})
    torch.manual_seed(seed)
    model = brivl.BriVL(cfg, brivl.BertTokenizer.from_file(str(tmp_path / "vocab.txt"), 16)).eval()
    with torch.no_grad():  # momentum encoders that differ from the query ones, and BatchNorm statistics that matter
        for p in model.visual_momentum.parameters():
            p.add_(torch.randn_like(p), alpha=0.01)
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 1.5)
    sd = {k: v for k, v in to_official_names(model.state_dict()).items() if "queue" not in k}
    # What released files also hold: the classifier, BERT's pooler and position_ids
    sd["imgencoder.backbone.classifier.weight"] = torch.zeros(1000, 1280)
    sd["textencoder.backbone.bert.pooler.dense.weight"] = torch.zeros(64, 64)
    sd["textencoder_mom.backbone.bert.embeddings.position_ids"] = torch.arange(32)[None]
    torch.save({"learnable": sd}, tmp_path / "official.pth")
    return model, str(tmp_path / "official.pth")


def test_official_names_round_trip_and_load(tmp_path):
    model, path = official_model(tmp_path)
    sd = model.state_dict()
    back = brivl.from_official_names(to_official_names(sd))
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    loaded, preprocess = brivl.load(path, image_size=64, tokenizer=str(tmp_path / "vocab.txt"))
    assert loaded.cfg.backbone == "tf_efficientnet_b0" and loaded.cfg.text_layers == 5 and loaded.cfg.freeze_text == 1
    got = loaded.state_dict()
    assert all(torch.equal(got[k], sd[k]) for k in sd if "queue" not in k)  # momentum encoders included
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    image, boxes, mask = (x[None] for x in preprocess(img))
    ids, tmask = loaded.tokenizer(["一只红色的狗"])
    with torch.no_grad():
        torch.testing.assert_close(loaded.encode_image(image, boxes, mask.float(), normalize=True),
                                   model.encode_image(image, boxes, mask, normalize=True), rtol=0, atol=1e-6)
        torch.testing.assert_close(loaded.encode_text(ids, tmask.long(), normalize=True),
                                   model.encode_text(ids, tmask, normalize=True), rtol=0, atol=1e-6)
    # The whole VL_model's state dict (prefix "learnable.", queues [D, K]) and a DDP "module." prefix load too.
    whole = {f"module.learnable.{k}": v for k, v in torch.load(path, weights_only=True)["learnable"].items()}
    whole["module.img_queue"] = F.normalize(torch.randn(1280, 64), dim=0)
    whole["module.text_queue"] = F.normalize(torch.randn(1280, 64), dim=0)
    whole["module.img_queue_ptr"] = whole["module.text_queue_ptr"] = torch.tensor([32])
    m2 = brivl.from_official(whole, image_size=64)
    assert torch.equal(m2.image_queue, whole["module.img_queue"].T) and int(m2.queue_ptr) == 32
    with pytest.raises(ValueError, match="unknown keys.*imgencoder.extra"):
        brivl.from_official({**whole, "imgencoder.extra.weight": torch.zeros(1)})


def test_official_preprocessing_is_the_tensor_resize():
    import torchvision.transforms as T

    cfg = brivl.Config(**{**vars(brivl.CONFIGS["brivl-official"]), "image_size": 40})
    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    ref = T.Compose([T.ToTensor(), T.Resize((40, 40), antialias=False), T.Normalize(brivl.MEAN, brivl.STD)])(img)
    image, boxes, mask = brivl.ImageTransform(cfg, train=False)(img)
    torch.testing.assert_close(image, ref, rtol=0, atol=1e-5)
    assert mask.sum() == 37 and boxes[0].tolist() == [0, 0, 40, 40]  # the whole image and a 6 x 6 grid


def test_official_bert_attends_to_padding(tmp_path):
    model, _ = official_model(tmp_path)
    ids, mask = model.tokenizer(["一只狗", "一只狗"])
    ids[1, mask[1].sum():] = 5  # other ids where the mask says padding
    with torch.no_grad():
        a, b = model.encode_text(ids, mask)
        assert not torch.allclose(a, b)  # the official text tower lets padding tokens into BERT
        model.textual.bert_mask = True
        a, b = model.encode_text(ids, mask)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


def test_fine_tune_from_official_weights(tmp_path):
    model, path = official_model(tmp_path)
    out = str(tmp_path / "run")
    vocab = str(tmp_path / "vocab.txt")
    with pytest.raises(ValueError, match="pass --tokenizer"):
        train.main(["--model", "brivl", "--init", path, "--out", out, "--steps", "1"])
    train.main(["--model", "brivl", "--init", path, "--tokenizer", vocab, "--image-size", "64", "--steps", "2",
                "--batch-size", "8", "--queue-size", "32", "--out", out, "--workers", "0", "--val-size", "16",
                "--save-every", "0", "--lr", "1e-3"])
    tuned, _ = brivl.load(os.path.join(out, "checkpoint.pt"))
    before, after = model.state_dict(), tuned.state_dict()

    def moved(prefix):
        return any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)
                   and before[k].is_floating_point() and "running" not in k)

    # The official freezing: the CNN's stem, blocks 0-2 and head; BERT's embeddings and all but its top 4 layers.
    for frozen in ("visual.backbone.conv_stem", "visual.backbone.blocks.2.", "visual.backbone.conv_head",
                   "visual.backbone.bn2", "textual.bert.embeddings.", "textual.bert.encoder.layer.0."):
        assert not moved(frozen), frozen
    for trained in ("visual.backbone.blocks.3.", "visual.backbone.blocks.6.", "visual.attn.", "visual.pool.",
                    "textual.bert.encoder.layer.1.", "textual.mlp.", "visual_momentum.mlp."):
        assert moved(trained), trained
    assert tuned.cfg.pooling == "grid_sample" and not tuned.cfg.bert_mask and int(tuned.queue_ptr) == 16
