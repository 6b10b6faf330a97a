"""contrastive_loss / infonce against a naive B x B reference, single-process and over 2 gloo ranks."""
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import clip
from conftest import free_port
from naive import clip_loss as naive_clip_loss


def features(b, d, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    txt = F.normalize(img + 0.7 * torch.randn(b, d, generator=g, dtype=dtype), dim=-1)
    return img, txt


def grads(fn, img, txt, scale):
    img, txt = img.clone().requires_grad_(), txt.clone().requires_grad_()
    scale = torch.tensor(scale, dtype=img.dtype, requires_grad=True)
    loss = fn(img, txt, scale)
    loss.backward()
    return loss.detach(), img.grad, txt.grad, scale.grad


def assert_close(a, b, rtol):
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=rtol, atol=rtol * y.abs().max().item())


@pytest.mark.parametrize("b,d,block", [(1000, 100, 2048), (1000, 512, 2048), (1000, 100, 256), (77, 16, 32)])
def test_matches_naive_fp32(b, d, block, monkeypatch):
    # Block sizes that do not divide the batch exercise the ragged last tiles.
    monkeypatch.setattr(clip, "BLOCK", block)
    img, txt = features(b, d, dtype=torch.float64)
    ref = grads(naive_clip_loss, img, txt, 14.3)
    ours = grads(clip.contrastive_loss, img.float(), txt.float(), 14.3)
    assert_close([o.double() for o in ours], ref, rtol=1e-5)


def test_matches_naive_fp64_tight(monkeypatch):
    monkeypatch.setattr(clip, "BLOCK", 64)
    img, txt = features(300, 32)
    assert_close(grads(clip.contrastive_loss, img, txt, 50.0), grads(naive_clip_loss, img, txt, 50.0), rtol=1e-10)


def test_rows_against_key_set_no_key_grad():
    # BriVL's form: queries against [positives; queue], one direction, keys without gradient.
    q, k = features(40, 16, seed=1)
    queue = F.normalize(torch.randn(100, 16, dtype=torch.float64), dim=-1)
    keys = torch.cat([k, queue])
    pos = torch.arange(40)
    qq = q.clone().requires_grad_()
    s = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    loss = clip.infonce(qq, keys, s, pos)
    loss.backward()
    q2 = q.clone().requires_grad_()
    s2 = torch.tensor(1 / 0.07, dtype=torch.float64, requires_grad=True)
    ref = F.cross_entropy(s2 * q2 @ keys.T, pos)
    ref.backward()
    assert_close([loss, qq.grad, s.grad], [ref, q2.grad, s2.grad], rtol=1e-10)


def _worker(rank, world, port, img, txt, scale, result):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    n = img.shape[0] // world
    x = img[rank * n:(rank + 1) * n].clone().requires_grad_()
    y = txt[rank * n:(rank + 1) * n].clone().requires_grad_()
    s = torch.tensor(scale, dtype=img.dtype, requires_grad=True)
    loss = clip.contrastive_loss(x, y, s)
    loss.backward()
    result[rank] = (loss.detach(), x.grad, y.grad, s.grad)
    dist.destroy_process_group()


def test_two_ranks_equal_single_process():
    # DDP averages gradients over ranks, so (1/W) x what each rank computes must be the global gradient.
    img, txt = features(64, 16)
    world = 2
    with mp.Manager() as manager:
        result = manager.dict()
        mp.spawn(_worker, args=(world, free_port(), img, txt, 20.0, result), nprocs=world)
        parts = [result[r] for r in range(world)]
    loss = sum(p[0] for p in parts) / world
    gx = torch.cat([p[1] for p in parts]) / world
    gy = torch.cat([p[2] for p in parts]) / world
    gs = sum(p[3] for p in parts) / world
    assert_close([loss, gx, gy, gs], grads(naive_clip_loss, img, txt, 20.0), rtol=1e-10)
    # Open_clip issue 616's trap, guarded: the features' gradients must not be W times too large.
    assert not torch.allclose(gx * world, grads(naive_clip_loss, img, txt, 20.0)[1])
