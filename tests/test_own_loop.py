"""One file, your own loop: each model file copied alone into an empty folder runs its docstring's loop.

The loop is read from the file's own docstring (the block after 'Your own loop'), so the promise a
reader sees is the one checked: build the smallest preset from keywords, train a few steps with
optimizer_groups, classify PIL images. Nothing of this repository is on the path but the one file.
"""
import ast
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from train import MODELS  # noqa: E402

# Appended to the docstring's loop: what a copier relies on, asserted in the copy's own process.
CHECKS = """
probs = model.classify(images, ["red", "green", "blue", "yellow"])
assert probs.shape == (4, 4) and bool(((probs >= 0) & (probs <= 1)).all()), probs
if getattr(model, "logit_bias", None) is None:  # softmax models: each image's row is a distribution
    assert torch.allclose(probs.sum(1), torch.ones(4), atol=1e-5), probs.sum(1)
no_decay = {id(p) for g in model.optimizer_groups(0.1) if g["weight_decay"] == 0 for p in g["params"]}
named = dict(model.named_parameters())
for name, p in named.items():
    if p.requires_grad and (p.ndim < 2 or "logit_scale" in name or "embedding" in name):
        assert id(p) in no_decay, f"{name} is decayed"
print("OWN LOOP OK", float(loss))
"""


def own_loop(path):
    doc = ast.get_docstring(ast.parse(open(path, encoding="utf-8").read()))
    assert "Your own loop" in doc, f"{path}: the docstring has no 'Your own loop' example"
    block = doc.split("Your own loop", 1)[1].split("\n\n", 1)[0].split("\n", 1)[1]
    return textwrap.dedent(block)


@pytest.mark.parametrize("model", MODELS)
def test_model_file_alone_runs_its_own_loop(model, tmp_path):
    shutil.copy(os.path.join(ROOT, f"{model}.py"), tmp_path)
    code = own_loop(tmp_path / f"{model}.py")
    assert "optimizer_groups" in code and "classify" in code and f"{model}.build(" in code
    (tmp_path / "loop.py").write_text(code + CHECKS)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # -E -s: no PYTHONPATH, no user site; the only module of this repository in reach is the copy
    r = subprocess.run([sys.executable, "-E", "-s", "loop.py"], cwd=tmp_path, env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and "OWN LOOP OK" in r.stdout, r.stderr[-3000:]
    assert sorted(os.listdir(tmp_path)) == sorted(["loop.py", f"{model}.py"] + (["__pycache__"] if (tmp_path / "__pycache__").exists() else []))
