"""CUDA-only checks (skipped without a GPU): the Triton kernels in bf16/fp32 and a bf16 training step."""
import pytest
import torch
import torch.nn.functional as F

import clip
import train

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def naive(x, y, s):
    logits = s * x.float() @ y.float().T
    labels = torch.arange(x.shape[0], device=x.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


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
