"""SigLIP's sigmoid loss: the tiled op against the naive form and open_clip's SigLipLoss, values and
gradients of features, scale and bias; exact across ranks; memory flat in the batch."""
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import clip
from naive import sigmoid_loss as naive_sigmoid_loss
from conftest import ROOT

try:
    import triton
except ImportError:
    triton = None




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


def test_without_a_gradient_the_tiles_give_the_row_sums_alone():
    x, y, s, b = inputs(50, 16, seed=3)
    rows, dx, dy, dsb = clip.sigmoid_tiles(x, y, s, b, False)
    torch.testing.assert_close(rows, F.softplus(s * x @ y.T + b).sum(1), rtol=1e-10, atol=1e-12)
    assert dx.numel() == dy.numel() == dsb.numel() == 0


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

import sys
sys.path.insert(0, "tests")
from naive import sigmoid_loss as naive_sigmoid_loss
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

import sys
sys.path.insert(0, "tests")
from naive import sigmoid_loss as naive_sigmoid_loss
for n, k in ((70, 70), (130, 130)):
    for dtype in (torch.float32,):
        g = torch.Generator().manual_seed(n)
        x = F.normalize(torch.randn(n, 40, generator=g), dim=-1).requires_grad_()
        y = F.normalize(torch.randn(k, 40, generator=g), dim=-1).requires_grad_()
        s, b = torch.tensor(7.0, requires_grad=True), torch.tensor(-5.0, requires_grad=True)
        assert clip._use_triton(x)
        got = clip.sigmoid_loss(x, y, s, b)
        gg = torch.autograd.grad(got, (x, y, s, b))
        with torch.no_grad():
            rows = clip.sigmoid_tiles(x, y, s, b, False)[0]
        x64, y64, s64, b64 = (t.detach().double().requires_grad_() for t in (x, y, s, b))
        want = naive_sigmoid_loss(x64, y64, s64, b64)
        wg = torch.autograd.grad(want, (x64, y64, s64, b64))
        assert abs(got.item() - want.item()) < 1e-5 * abs(want.item())
        assert (rows.double() - F.softplus(s64 * x64 @ y64.T + b64).sum(1)).abs().max() < 1e-4
        for a, c in zip(gg, wg):
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


# ----------------------------------------------------------------------------------------------
# The models: --loss sigmoid (--siglip) for clip, laclip and clippo


import json  # noqa: E402

import train  # noqa: E402
from test_train import FAST, check_two_ranks_equal_one_rank, max_diff, rows, weights  # noqa: E402


@pytest.mark.parametrize("model", [["--model", "clip"], ["--model", "laclip"], ["--model", "clippo"]],
                         ids=lambda m: m[1])
def test_sigmoid_models_train_with_a_bias_outside_weight_decay(tmp_path, model):
    out = str(tmp_path / "run")
    train.main([*model, "--siglip", "--steps", "3", "--batch-size", "8", "--out", out, *FAST, "--wd", "0.5"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["model"]["logit_bias"].item() != -10.0  # it learns
    assert ckpt["model"]["logit_scale"].exp().item() == pytest.approx(10.0, rel=0.05)  # SigLIP's start
    assert ckpt["extra"]["config"]["loss"] == "sigmoid"
    groups = ckpt["optimizer"]["param_groups"]
    assert any(g["weight_decay"] == 0 for g in groups)
    assert all(r["loss"] > 0 for r in rows(out) if "loss" in r)


def test_sigmoid_accum_equals_one_big_step(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    common = ["--model", "clip", "--loss", "sigmoid", "--steps", "2", "--batch-size", "16", *FAST]
    train.main([*common, "--out", a])
    train.main([*common, "--out", b, "--accum", "4"])
    assert max_diff(weights(a), weights(b)) < 1e-5


@pytest.mark.slow
def test_sigmoid_two_ranks_equal_one_rank(tmp_path):
    check_two_ranks_equal_one_rank(tmp_path, ["--model", "clip", "--loss", "sigmoid"])


def test_open_clip_export_keeps_the_bias_and_load_reads_it_back(tmp_path):
    open_clip = pytest.importorskip("open_clip")
    pytest.importorskip("transformers")
    out = str(tmp_path / "run")
    train.main(["--model", "clip", "--siglip", "--steps", "2", "--batch-size", "8", "--out", out, *FAST])
    exported = str(tmp_path / "oc")
    train.export(os.path.join(out, "checkpoint.pt"), exported, "open_clip")
    config = json.load(open(os.path.join(exported, "open_clip_config.json")))
    model, _ = clip.load(os.path.join(out, "checkpoint.pt"))
    assert config["model_cfg"]["init_logit_bias"] == pytest.approx(model.logit_bias.item())
    oc, _, _ = open_clip.create_model_and_transforms(f"local-dir:{exported}")
    oc.eval()
    images = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)
    ids = model.tokenizer(["a red circle", "a blue square", "a green cross"])
    with torch.no_grad():
        oc_img = oc.encode_image(clip.normalize_pixels(images, model.cfg.image_mean, model.cfg.image_std), normalize=True)
        oc_txt = oc.encode_text(ids, normalize=True)
        img, txt = model.encode_image(images, normalize=True), model.encode_text(ids, normalize=True)
        oc_logits = oc.logit_scale.exp() * oc_img @ oc_txt.T + oc.logit_bias
        logits = model.logit_scale.exp() * img @ txt.T + model.logit_bias
    assert (oc_img - img).abs().max() < 1e-4 and (oc_txt - txt).abs().max() < 1e-4
    assert (oc_logits - logits).abs().max() < 1e-4
    back, _ = clip.load(exported)  # the open_clip folder, with its logit_bias key
    assert back.cfg.loss == "sigmoid" and back.logit_bias.item() == pytest.approx(model.logit_bias.item())
    with pytest.raises(ValueError, match="no logit_bias"):
        train.export(os.path.join(out, "checkpoint.pt"), str(tmp_path / "hf"), "hf")


def test_predict_shows_independent_sigmoid_probabilities(tmp_path, capsys):
    out = str(tmp_path / "run")
    train.main(["--model", "clip", "--siglip", "--steps", "1", "--batch-size", "8", "--out", out, *FAST])
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (48, 48), "red").save(image)
    capsys.readouterr()
    clip.predict_main(["--ckpt", os.path.join(out, "checkpoint.pt"), "--image", str(image), "--labels",
                       "a red circle,a blue square,a green cross", "--json"])
    probs = json.loads(capsys.readouterr().out)["probs"]
    model, preprocess = clip.load(os.path.join(out, "checkpoint.pt"))
    with torch.no_grad():
        text = model.encode_texts(["a red circle", "a blue square", "a green cross"])
        sims = clip.embed_images(model, preprocess, [str(image)]) @ text.T
    want = torch.sigmoid(model.logit_scale.exp() * sims + model.logit_bias).sort(descending=True).values[0]
    assert probs == pytest.approx(want.tolist(), abs=1e-5) and abs(sum(probs) - 1) > 1e-3  # not a softmax


def test_the_default_run_is_longer_for_the_sigmoid_loss():
    import train

    def steps(*flags):
        args, _ = train.parse_args(["--model", "clip", *flags])
        return args.steps, args.cooldown_steps

    assert steps() == clip.DEFAULT_RUN["softmax"]
    assert steps("--loss", "sigmoid") == steps("--siglip") == clip.DEFAULT_RUN["sigmoid"]
    assert clip.DEFAULT_RUN["sigmoid"][0] > clip.DEFAULT_RUN["softmax"][0]
    assert steps("--siglip", "--steps", "50", "--cooldown-steps", "5") == (50, 5)  # given flags win
