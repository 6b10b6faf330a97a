"""CUDA-only checks (skipped without a GPU): the Triton kernels in bf16/fp32, a bf16 training step, and
--gpu-decode (nvjpeg)."""
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F

import clip
import train
from naive import clip_loss

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def naive(x, y, s):
    return clip_loss(x.float(), y.float(), s)


@cuda
@pytest.mark.parametrize("dtype,rtol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("b", [1000, 4099])
def test_triton_matches_naive_on_cuda(dtype, rtol, b):
    assert clip._use_triton(torch.zeros(1, device="cuda"))
    torch.manual_seed(0)
    x = F.normalize(torch.randn(b, 512, device="cuda"), dim=-1)
    y = F.normalize(x + 1.5 * torch.randn(b, 512, device="cuda"), dim=-1)
    out = []
    for fn, dt in ((naive, torch.float64), (clip.contrastive_loss, dtype)):
        xx, yy = x.to(dt).clone().requires_grad_(), y.to(dt).clone().requires_grad_()
        s = torch.tensor(20.0, device="cuda", dtype=torch.float64 if dt == torch.float64 else torch.float32,
                         requires_grad=True)
        loss = fn(xx, yy, s)
        loss.backward()
        out.append([loss.double(), xx.grad.double(), yy.grad.double(), s.grad.double()])
    for a, r in zip(out[1], out[0]):
        assert ((a - r).abs().max() / r.abs().max()).item() < rtol


def check_chunked_backward(device, frozen, n=1000, d=64):
    # WORKSPACE at 1 leaves the floor of 4 k d elements: 256 rows per chunk, so n = 1000 takes 4 chunks.
    torch.manual_seed(0)
    x = F.normalize(torch.randn(n, d, device=device, dtype=torch.float64), dim=-1)
    y = F.normalize(x + 1.5 * torch.randn(n, d, device=device, dtype=torch.float64), dim=-1)
    out = []
    for fn, dt in ((naive, torch.float64), (clip.contrastive_loss, torch.float32)):
        xx = x.to(dt).clone().requires_grad_(frozen != "x")
        yy = y.to(dt).clone().requires_grad_(frozen != "y")
        s = torch.tensor(20.0, device=device, dtype=dt, requires_grad=True)
        fn(xx, yy, s).backward()
        out.append([g.grad.double() for g in (xx, yy, s) if g.requires_grad])
    for a, r in zip(out[1], out[0]):
        assert ((a - r).abs().max() / r.abs().max()).item() < 1e-5


@cuda
@pytest.mark.parametrize("frozen", [None, "x", "y"])
def test_triton_backward_in_chunks_and_with_a_frozen_side(monkeypatch, frozen):
    monkeypatch.setattr(clip, "WORKSPACE", 1)
    check_chunked_backward("cuda", frozen)


@cuda
def test_fused_loss_memory_is_flat_on_cuda():
    b = 65536
    x = F.normalize(torch.randn(b, 512, device="cuda"), dim=-1).bfloat16().requires_grad_()
    y = F.normalize(torch.randn(b, 512, device="cuda"), dim=-1).bfloat16().requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    clip.contrastive_loss(x, y, torch.tensor(14.0, device="cuda", requires_grad=True)).backward()
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated() - base < 8 * b * 512 * 4  # O(B D): a B x B fp32 matrix is 16 GiB


@cuda
def test_bf16_training_step_on_cuda(tmp_path):
    metrics = train.main(["--steps", "5", "--batch-size", "32", "--out", str(tmp_path), "--workers", "0",
                          "--val-size", "64", "--device", "cuda"])
    assert "zeroshot_top1" in metrics


@cuda
@pytest.mark.parametrize("train_mode", [True, False])
def test_nvjpeg_decode_stays_within_the_bounds_of_the_worker_path(train_mode):
    # --gpu-decode on CUDA: nvjpeg and a float resample against the CPU decode of the same boxes
    # (tests/test_pipeline.py pins the boxes and the resampler there).
    from test_pipeline import DRAFT_MAX, DRAFT_MEAN, deferred_and_finished, picture

    for side, seed in ((256, 0), (700, 1), (1024, 2)):
        payload = picture(side, seed)
        gpu = deferred_and_finished(payload, train_mode, seed, device="cuda")
        assert gpu.is_cuda and gpu.dtype == torch.uint8
        diff = (gpu.cpu().float() - deferred_and_finished(payload, train_mode, seed).float()).abs()
        assert diff.max() <= DRAFT_MAX and diff.mean() <= DRAFT_MEAN, (side, diff.max(), diff.mean())


@cuda
def test_gpu_decode_trains_on_shards(tmp_path):
    from test_shards import make_shards

    make_shards(tmp_path / "train", 2, 40, truncated={3})
    out = str(tmp_path / "run")
    train.main(["--data", f"{tmp_path}/train/{{00000..00001}}.tar", "--steps", "4", "--batch-size", "16",
                "--workers", "2", "--out", out, "--device", "cuda", "--gpu-decode", "--log-every", "1"])
    rows = [json.loads(r) for r in open(os.path.join(out, "metrics.jsonl")) if '"loss"' in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and all(math.isfinite(r["loss"]) for r in rows)


def _gather_backward(rank, world, store, result):
    import torch.distributed as dist

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        x = (torch.arange(12., device="cuda").view(3, 4) + 100 * rank).requires_grad_()
        weight = torch.arange(1., 12 * world + 1, device="cuda").view(3 * world, 4)  # the same on every rank
        (clip._AllGather.apply(x, None) * weight).sum().backward()
        # every rank's loss uses every row: the gradient of this rank's rows is world x their weights
        expected = world * weight[3 * rank:3 * (rank + 1)]
        torch.save({"grad": x.grad.cpu(), "expected": expected.cpu(), "backend": dist.get_backend()},
                   f"{result}.{rank}")
    finally:
        dist.destroy_process_group()


@cuda
def test_all_gather_backward_reduce_scatters_on_nccl(tmp_path):
    """The NCCL branch of _AllGather's backward (reduce_scatter_tensor; gloo runs the all_reduce one):
    each rank gets the sum over ranks of the gradient of its own rows. Two ranks where two GPUs are
    present, else one (the branch still runs)."""
    import torch.multiprocessing as mp

    world = min(2, torch.cuda.device_count())
    mp.spawn(_gather_backward, args=(world, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=world)
    for rank in range(world):
        got = torch.load(tmp_path / f"out.{rank}")
        assert got["backend"] == "nccl" and torch.equal(got["grad"], got["expected"]), rank
