"""SigLIP's sigmoid loss: the tiled op against the naive form and open_clip's SigLipLoss, values and
gradients of features, scale and bias; exact across ranks; memory flat in the batch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import clip
from conftest import ROOT

try:
    import triton
except ImportError:
    triton = None


def naive_sigmoid_loss(x, y, scale, bias):
    logits = scale * x @ y.T + bias
    labels = 2 * torch.eye(len(logits), dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)


def inputs(n, d, dtype=torch.float64, seed=0, scale=10.0, bias=-10.0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    y = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1).requires_grad_()
    return x, y, torch.tensor(scale, dtype=dtype, requires_grad=True), torch.tensor(bias, dtype=dtype, requires_grad=True)


def value_and_grads(fn, *args):
    args = [a.detach().clone().requires_grad_() for a in args]
    loss = fn(*args)
    return [loss.detach(), *torch.autograd.grad(loss, args)]


@pytest.mark.parametrize("n", [1, 7, 64, 1030])
def test_equals_the_naive_form(n, monkeypatch):
    monkeypatch.setattr(clip, "BLOCK", 256)  # several tiles, one of them ragged
    args = inputs(n, 24, seed=n, scale=float(n % 5 + 3), bias=float(-n % 7))
    for got, want in zip(value_and_grads(clip.sigmoid_loss, *args), value_and_grads(naive_sigmoid_loss, *args)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_unequal_row_weights_recompute_the_tiles():
    x, y, s, b = inputs(50, 16, seed=3)
    w = torch.rand(50, dtype=torch.float64)
    got = torch.autograd.grad((clip.sigmoid_rows(x, y, s, b) * w).sum(), (x, y, s, b))
    want = torch.autograd.grad((F.softplus(s * x @ y.T + b).sum(1) * w).sum(), (x, y, s, b))
    for a, c in zip(got, want):
        torch.testing.assert_close(a, c, rtol=1e-10, atol=1e-12)


def test_equals_open_clips_siglip_loss():
    pytest.importorskip("open_clip")
    from open_clip.loss import SigLipLoss

    for n in (8, 100):
        x, y, s, b = inputs(n, 32, dtype=torch.float32, seed=n)
        ref = SigLipLoss()

        def theirs(x, y, s, b):
            return ref(x, y, s, b)

        for got, want in zip(value_and_grads(clip.sigmoid_loss, x, y, s, b), value_and_grads(theirs, x, y, s, b)):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_compiles_without_graph_breaks():
    x, y, s, b = inputs(40, 16, dtype=torch.float32)
    compiled = torch.compile(clip.sigmoid_loss, backend="aot_eager", fullgraph=True)
    for got, want in zip(value_and_grads(compiled, x, y, s, b), value_and_grads(naive_sigmoid_loss, x, y, s, b)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_never_builds_the_full_matrix(monkeypatch):
    monkeypatch.setattr(clip, "BLOCK", 64)
    x, y, s, b = inputs(300, 16, dtype=torch.float32)
    largest = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, c):
        out = real_mm(a, c)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    value_and_grads(clip.sigmoid_loss, x, y, s, b)
    assert max(largest) <= 64 * 64


MEMORY = """
import resource, sys, torch, torch.nn.functional as F
sys.path.insert(0, ".")
import clip

def naive_sigmoid_loss(x, y, scale, bias):
    logits = scale * x @ y.T + bias
    labels = 2 * torch.eye(len(logits), dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)
torch.set_num_threads(2)
n, d = 16384, 512
x = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
y = F.normalize(torch.randn(n, d), dim=-1).requires_grad_()
s, b = torch.tensor(10.0, requires_grad=True), torch.tensor(-10.0, requires_grad=True)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
fn = clip.sigmoid_loss if sys.argv[1] == "tiled" else naive_sigmoid_loss
fn(x, y, s, b).backward()
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024)
"""


@pytest.mark.slow
def test_memory_stays_flat_at_16k():
    peaks = {}
    for kind in ("tiled", "naive"):
        proc = subprocess.run([sys.executable, "-c", MEMORY, kind], cwd=ROOT, capture_output=True, text=True,
                              timeout=600)
        assert proc.returncode == 0, proc.stderr
        peaks[kind] = int(proc.stdout.split()[-1])
    # the naive form holds several 16384 x 16384 fp32 matrices (1 GiB each); the tiles a few MiB
    assert peaks["naive"] > 2 << 30 and peaks["tiled"] <= peaks["naive"] / 10, peaks


TRITON_CHECK = """
import torch, torch.nn.functional as F
import clip

def naive_sigmoid_loss(x, y, scale, bias):
    logits = scale * x @ y.T + bias
    labels = 2 * torch.eye(len(logits), dtype=x.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / len(logits)
for n, k in ((70, 70), (130, 130)):
    for dtype in (torch.float32,):
        g = torch.Generator().manual_seed(n)
        x = F.normalize(torch.randn(n, 40, generator=g), dim=-1).requires_grad_()
        y = F.normalize(torch.randn(k, 40, generator=g), dim=-1).requires_grad_()
        s, b = torch.tensor(7.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
        assert clip._use_triton(x)
        got = clip.sigmoid_loss(x, y, s, b)
        gg = torch.autograd.grad(got, (x, y, s, b))
        w = torch.rand(n)
        gw = torch.autograd.grad((clip.sigmoid_rows(x, y, s, b) * w).sum(), (x, y, s, b))
        with torch.no_grad():
            rows = clip.sigmoid_rows(x, y, s, b)
        x64, y64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, y, s, b))
        want = naive_sigmoid_loss(x64, y64, s64, b64)
        wg = torch.autograd.grad(want, (x64, y64, s64, b64))
        ww = torch.autograd.grad((F.softplus(s64 * x64 @ y64.T + b64).sum(1) * w.double()).sum(), (x64, y64, s64, b64))
        assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
        assert (rows.double() - F.softplus(s64 * x64 @ y64.T + b64).sum(1)).abs().max() < 1e-4
        for a, c in list(zip(gg, wg)) + list(zip(gw, ww)):
            assert (a.double() - c).abs().max() <= 1e-5 * max(c.abs().max().item(), 1e-3), (a, c)
print("ok")
"""


@pytest.mark.skipif(triton is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="test_gpu.py checks the compiled kernels")
def test_triton_kernel_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0 and "ok" in proc.stdout, proc.stdout + proc.stderr[-3000:]
