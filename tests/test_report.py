"""First use and watching a run: `python X.py predict` in every model file (also copied alone),
--report-to tensorboard, and `python train.py report OUT` (a self-contained page)."""
import importlib
import json
import os
import re
import shutil
import subprocess
import sys
from html.parser import HTMLParser

import pytest
import torch

import data
import train
from conftest import ROOT
from test_train import FAST, rows

LABELS = "a red circle,a blue square,a green cross"


def run(*args, cwd=ROOT):
    proc = subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=240)
    return proc


class Done:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def predict(capsys, model, *args):
    """`python MODEL.py predict ARGS` in this process (a subprocess would spend seconds importing torch)."""
    capsys.readouterr()
    try:
        importlib.import_module(model).predict_main(list(args))
        code = 0
    except SystemExit as e:
        code, message = 1, str(e.code)
    captured = capsys.readouterr()
    return Done(code, captured.out, captured.err if code == 0 else message + "\n")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Short runs of every model (clip long enough to learn a little), and held-out synthetic images."""
    root = tmp_path_factory.mktemp("runs")
    out = {}
    train.main(["--model", "clip", "--steps", "60", "--batch-size", "32", "--out", str(root / "clip"), "--workers", "0",
                "--val-size", "64", "--log-every", "10", "--eval-every", "30", "--warmup", "10", "--save-every", "30"])
    out["clip"] = str(root / "clip" / "checkpoint.pt")
    for model in ("laclip", "clippo", "brivl"):
        train.main(["--model", model, "--steps", "2", "--batch-size", "8", "--out", str(root / model), *FAST])
        out[model] = str(root / model / "checkpoint.pt")
    train.main(["--model", "altclip", "--teacher", out["clip"], "--steps", "1", "--batch-size", "8",
                "--out", str(root / "altclip"), *FAST])
    out["altclip"] = str(root / "altclip" / "checkpoint.pt")
    images = root / "images"
    images.mkdir()
    val = data.Synthetic(0, "val", 8)
    for i in range(4):
        val.image(i).save(images / f"{i}.png")
    out["images"] = sorted(str(images / f) for f in os.listdir(images))
    out["root"] = str(root)
    return out


def test_predict_prints_label_probabilities(trained):
    proc = run("clip.py", "predict", "--ckpt", trained["clip"], "--image", *trained["images"][:2], "--labels", LABELS)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0] == trained["images"][0] and len(lines) == 8  # an image, then its 3 labels, twice
    probs = [float(line.split("%")[0]) for line in lines[1:4]]
    assert probs == sorted(probs, reverse=True) and abs(sum(probs) - 100) < 0.5
    assert {line.split("%", 1)[1].strip() for line in lines[1:4]} == set(LABELS.split(","))


def test_predict_json_and_text_ranking(trained, tmp_path, capsys):
    texts = tmp_path / "captions.txt"
    texts.write_text("a small red circle on a gray background\na large blue cross on a black background\n")
    for how in (["--labels", LABELS], ["--texts", str(texts)]):
        proc = predict(capsys, "clip", "--ckpt", trained["clip"], "--image", *trained["images"], *how, "--json")
        assert proc.returncode == 0, proc.stderr
        objects = [json.loads(line) for line in proc.stdout.splitlines()]
        assert [o["image"] for o in objects] == trained["images"]
        for o in objects:
            assert o["probs"] == sorted(o["probs"], reverse=True) and abs(sum(o["probs"]) - 1) < 1e-4
            assert len(o["labels"]) == (3 if "--labels" in how else 2)
    folder = os.path.dirname(trained["images"][0])
    proc = predict(capsys, "clip", "--ckpt", trained["clip"], "--images", folder, "--query", "a red circle", "--json")
    assert proc.returncode == 0, proc.stderr
    ranked = json.loads(proc.stdout)
    assert ranked["query"] == "a red circle" and sorted(ranked["images"]) == trained["images"]


def test_predict_learned_something(trained, capsys):
    # 60 steps of the tiny CLIP: on held-out images the true class should beat a wrong one more often than not.
    val = data.Synthetic(0, "val", 40)
    names = val.classnames["en"]
    folder = os.path.join(trained["root"], "learned")
    os.makedirs(folder, exist_ok=True)
    paths, truth = [], []
    for i in range(20):
        paths.append(os.path.join(folder, f"{i:02d}.png"))
        val.image(i).save(paths[-1])
        truth.append(names[val.captions(i)[3]])
    proc = predict(capsys, "clip", "--ckpt", trained["clip"], "--image", *paths, "--labels", ",".join(names), "--json")
    assert proc.returncode == 0, proc.stderr
    ranks = [json.loads(line)["labels"].index(t) for line, t in zip(proc.stdout.splitlines(), truth)]
    assert sum(ranks) / len(ranks) < 0.4 * len(names), ranks  # chance: 19.5 of 40


@pytest.mark.parametrize("model", ["laclip", "clippo", "brivl", "altclip"])
def test_predict_in_every_model_file(trained, model, capsys):
    labels = "a red circle,ein blauer Kreis,一个绿色的十字" if model == "altclip" else LABELS
    proc = predict(capsys, model, "--ckpt", trained[model], "--image", trained["images"][0], "--labels", labels, "--json")
    assert proc.returncode == 0, proc.stderr
    o = json.loads(proc.stdout)
    assert sorted(o["labels"]) == sorted(labels.split(",")) and abs(sum(o["probs"]) - 1) < 1e-4


def test_predict_works_from_a_file_copied_alone(trained, tmp_path):
    shutil.copy(os.path.join(ROOT, "clip.py"), tmp_path / "clip.py")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run([sys.executable, "clip.py", "predict", "--ckpt", trained["clip"], "--image",
                           trained["images"][0], "--labels", LABELS], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(trained["images"][0])


def test_predict_on_released_format_weights(trained, tmp_path, capsys):
    # An OpenAI-layout state dict (no config, no tokenizer) with the tokenizer passed beside it.
    ckpt = torch.load(trained["clip"], weights_only=True)
    torch.save(ckpt["model"], tmp_path / "released.pt")
    from clip import Tokenizer

    Tokenizer.from_str(ckpt["extra"]["tokenizer"]).tokenizer.save(str(tmp_path / "tokenizer.json"))
    proc = predict(capsys, "clip", "--ckpt", str(tmp_path / "released.pt"), "--tokenizer",
               str(tmp_path / "tokenizer.json"), "--image", trained["images"][0], "--labels", LABELS)
    assert proc.returncode == 0, proc.stderr
    proc = predict(capsys, "clip", "--ckpt", str(tmp_path / "released.pt"), "--image", trained["images"][0],
                   "--labels", LABELS)
    assert proc.returncode == 1 and "carries no tokenizer: pass --tokenizer" in proc.stderr


def test_predict_errors_are_one_line(trained, capsys):
    proc = predict(capsys, "clip", "--ckpt", trained["clip"], "--image", "nothere.jpg", "--labels", LABELS)
    assert proc.returncode == 1 and proc.stderr.strip() == "clip.py predict: nothere.jpg: no such image file"


# ----------------------------------------------------------------------------------------------
# TensorBoard and the report


def test_tensorboard_mirrors_metrics_and_purges_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = str(tmp_path / "tb")
    common = ["--batch-size", "8", "--out", out, *FAST[:-2], "--report-to", "tensorboard"]
    train.main(["--steps", "4", *common, "--save-every", "2"])
    for f in ("checkpoint.pt", "checkpoint-0000004.pt"):  # as if the run died after logging step 4
        os.remove(os.path.join(out, f))
    train.main(["--steps", "6", *common, "--save-every", "0", "--resume"])  # resumes at step 2
    acc = EventAccumulator(os.path.join(out, "tensorboard"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert {"train/loss", "train/lr", "train/samples_per_s", "val/zeroshot_top1", "val/i2t_r1"} <= set(tags)
    loss = acc.Scalars("train/loss")
    assert [e.step for e in loss] == [1, 2, 3, 4, 5, 6]  # steps 3-4 were logged twice: the resumed run's purge kept its own
    jsonl = {r["step"]: r["loss"] for r in rows(out) if "loss" in r}
    assert all(abs(e.value - jsonl[e.step]) < 1e-6 for e in loss)


def test_report_to_a_missing_package_is_one_clear_line(tmp_path, monkeypatch):
    real = train.importlib.util.find_spec
    monkeypatch.setattr(train.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ImportError, match="--report-to wandb needs the wandb package: pip install wandb"):
        train.parse_args(["--report-to", "wandb"])


class Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.text, self.images = [], [], 0

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.images += tag == "img" and dict(attrs).get("src", "").startswith("data:image/png;base64,")

    def handle_data(self, text):
        self.text.append(text)


def test_report_page_holds_every_metric_and_the_image_grid(trained):
    out = os.path.dirname(trained["clip"])
    proc = run("train.py", "report", out)
    assert proc.returncode == 0, proc.stderr
    page = open(os.path.join(out, "report.html"), encoding="utf-8").read()
    parser = Page()
    parser.feed(page)
    text = " ".join(parser.text)
    metrics = {k for r in rows(out) for k in r if k != "step" and isinstance(r[k], (int, float))}
    assert metrics and all(m in text for m in metrics), [m for m in metrics if m not in text]
    evals = [r for r in rows(out) if "loss" not in r]
    assert len(evals) == 2 and parser.tags.count("svg") == 4  # two evaluations: a table, not charts of two dots
    assert "Evaluations" in text and " / ".join(str(r["step"]) for r in evals) in text
    assert parser.images == 16 and "top-1 right on" in text
    third = os.path.join(os.path.dirname(out), "three")  # a third evaluation: now each metric is a chart
    shutil.copytree(out, third)
    with open(os.path.join(third, "metrics.jsonl"), "a") as f:
        f.write(json.dumps({**evals[-1], "step": 90}) + "\n")
    charts = Page()
    charts.feed(open(train.report(third), encoding="utf-8").read())
    assert charts.tags.count("svg") == 4 + len(metrics - {"loss", "lr", "samples_per_s", "skipped_samples"})
    assert re.search(r"<th>lr</th><td>0.001</td>", page)  # the run's flags
    assert not re.search(r"""(src|href)=["']?(https?:|//)""", page)  # nothing fetched: the page is self-contained


def test_report_renders_in_a_browser(trained, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        pytest.skip("no browser engine installed")
    out = os.path.dirname(trained["clip"])
    train.report(out)
    shot = tmp_path / "report.png"
    proc = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                           "--window-size=1400,2400", f"file://{os.path.join(out, 'report.html')}"],
                          capture_output=True, text=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 20_000, proc.stderr


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = str(tmp_path / "wb")
    common = ["--batch-size", "8", "--out", out, *FAST[:-2], "--report-to", "wandb"]
    train.main(["--steps", "2", *common, "--save-every", "2"])
    first = open(os.path.join(out, "wandb_id")).read()
    train.main(["--steps", "4", *common, "--save-every", "2", "--resume"])
    assert open(os.path.join(out, "wandb_id")).read() == first
    runs = [d for d in os.listdir(os.path.join(out, "wandb")) if d.startswith("offline-run-")]
    assert len(runs) == 2 and all(d.endswith(first) for d in runs)  # two sessions of one run id
