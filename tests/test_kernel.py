"""The fused loss op: Triton kernels (interpreted on CPU), torch.compile, and the general forms."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import clip
import laclip
from conftest import ROOT
from naive import clip_loss as naive_clip_loss
from test_loss import assert_close, features, grads

try:
    import triton  # noqa: F401
except ImportError:
    triton = None

TRITON_CHECK = textwrap.dedent("""
    import torch, torch.nn.functional as F
    import clip
    assert clip._use_triton(torch.zeros(1)), "the Triton path is not selected"
    torch.manual_seed(0)
    clip.WORKSPACE = 64  # the backward's floor of 4 k d elements then rules: (300, 320, 40) takes 3 chunks

    import sys
    sys.path.insert(0, "tests")
    from naive import clip_loss, one_way_loss

    def naive(x, y, s, two_way):
        return (clip_loss if two_way else one_way_loss)(x, y, s)

    worst = {}
    # Sizes that are not multiples of the 64-wide tiles, D not a multiple of the 32/64 chunk.
    for b, k, d, dtype, two_way in [(100, 100, 48, torch.float32, True), (70, 70, 100, torch.float32, True),
                                    (40, 130, 40, torch.float32, False), (300, 320, 40, torch.float32, False),
                                    (70, 70, 32, torch.float16, True)]:
        x = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
        y = F.normalize(torch.randn(k, d, dtype=torch.float64), dim=-1)
        y[:b] = F.normalize(x + 1.5 * y[:b], dim=-1)  # positives clear but not trivial: loss ~1
        out = []
        for fn, dt in ((naive, torch.float64), (None, dtype)):
            xx, yy = x.to(dt).clone().requires_grad_(), y.to(dt).clone().requires_grad_()
            s = torch.tensor(10.0, dtype=torch.float64 if dt == torch.float64 else torch.float32, requires_grad=True)
            if fn is None:
                loss = clip.infonce(xx, yy, s, torch.arange(b), two_way)
            else:
                loss = fn(xx, yy, s, two_way)
            loss.backward()
            out.append([loss.double(), xx.grad.double(), yy.grad.double(), s.grad.double()])
        err = max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(out[1], out[0]))
        worst[str(dtype)] = max(worst.get(str(dtype), 0), err)
    # One side frozen (AltCLIP's image tower): the other side's gradient alone, still exact.
    x = F.normalize(torch.randn(100, 48), dim=-1)
    y = F.normalize(x + 1.5 * torch.randn(100, 48), dim=-1)
    for frozen in ("x", "y"):
        got, ref = [], []
        for fn, out in ((clip.contrastive_loss, got), (lambda a, b, s: naive(a, b, s, True), ref)):
            xx, yy = x.clone().requires_grad_(frozen != "x"), y.clone().requires_grad_(frozen != "y")
            fn(xx, yy, torch.tensor(10.0)).backward()
            out.append((yy if frozen == "x" else xx).grad)
        worst["frozen " + frozen] = ((got[0] - ref[0]).abs().max() / ref[0].abs().max()).item()
    # Distillation (train.py's distill_tiles): a teacher of another width; forward and the student's backward kernels.
    import train
    train.WORKSPACE = 64
    from naive import distill_loss
    for b, d, e, dtype in [(100, 48, 40, torch.float32), (70, 100, 64, torch.float32), (300, 40, 40, torch.float32),
                           (70, 32, 32, torch.float16)]:
        x = F.normalize(torch.randn(b, d, dtype=torch.float64), dim=-1)
        y = F.normalize(x + torch.randn(b, d, dtype=torch.float64), dim=-1)
        u = F.normalize(torch.randn(b, e, dtype=torch.float64), dim=-1)
        w = F.normalize(u + torch.randn(b, e, dtype=torch.float64), dim=-1)
        out = []
        for fn, dt in ((distill_loss, torch.float64), (train.distill_loss, dtype)):
            xx, yy = x.to(dt).clone().requires_grad_(), y.to(dt).clone().requires_grad_()
            sd = torch.float64 if dt == torch.float64 else torch.float32
            s = torch.tensor(10.0, dtype=sd, requires_grad=True)
            loss = fn(xx, yy, s, u.to(dt), w.to(dt), torch.tensor(30.0, dtype=sd))
            out.append([loss.double(), *(g.double() for g in torch.autograd.grad(loss, [xx, yy, s]))])
        err = max(((a - r).abs().max() / r.abs().max()).item() for a, r in zip(out[1], out[0]))
        worst["distill " + str(dtype)] = max(worst.get("distill " + str(dtype), 0), err)
    print(worst)
    assert max(v for k, v in worst.items() if "float16" not in k) < 1e-5, worst
    assert worst["torch.float16"] < 5e-3 and worst["distill torch.float16"] < 5e-3, worst
""")


@pytest.mark.skipif(triton is None, reason="triton is not installed")
@pytest.mark.skipif(torch.cuda.is_available(), reason="test_gpu.py checks the compiled kernels")
def test_triton_kernels_in_interpreter():
    # (Triton 3.6's interpreter also breaks under numpy 2: int() of a 1-element array in range().)
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": ROOT}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], env=env, cwd=ROOT, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compiles_without_graph_breaks():
    # fullgraph=True fails on any graph break: the op must trace through its fake and autograd rules.
    img, txt = features(50, 16, dtype=torch.float32)
    compiled = torch.compile(clip.contrastive_loss, backend="aot_eager", fullgraph=True)
    assert_close(grads(compiled, img, txt, 10.0), grads(naive_clip_loss, img, txt, 10.0), rtol=1e-5)


def test_several_positive_text_sets():
    # LaCLIP-MT: every image is a positive for each of its M texts; the loss is the mean over the sets.
    img, txt = features(30, 16, seed=2)
    _, txt2 = features(30, 16, seed=3)
    texts = torch.stack([txt, txt2], dim=1)  # [B, M, D]
    ref = (naive_clip_loss(img, txt, 20.0) + naive_clip_loss(img, txt2, 20.0)) / 2
    torch.testing.assert_close(laclip.multi_text_loss(img, texts, torch.tensor(20.0, dtype=img.dtype)), ref)


def test_frozen_image_side_gets_no_gradient_and_text_side_is_exact():
    # AltCLIP stage 2: the image tower is frozen, its features carry no gradient.
    img, txt = features(40, 16, seed=4)
    t1 = txt.clone().requires_grad_()
    clip.contrastive_loss(img, t1, torch.tensor(15.0, dtype=img.dtype)).backward()
    t2 = txt.clone().requires_grad_()
    naive_clip_loss(img, t2, 15.0).backward()
    torch.testing.assert_close(t1.grad, t2.grad)


def test_blockwise_path_never_builds_the_full_matrix(monkeypatch):
    # With 64-wide tiles, no intermediate of a 300 x 300 problem may have 300 * 300 elements.
    monkeypatch.setattr(clip, "BLOCK", 64)
    img, txt = features(300, 16, dtype=torch.float32)
    largest = []
    real_mm = torch.Tensor.__matmul__

    def spy(a, b):
        out = real_mm(a, b)
        largest.append(out.numel())
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    grads(clip.contrastive_loss, img, txt, 10.0)
    assert max(largest) <= 64 * 64
