"""Repository shape: copied regions match their source; model files stand alone and read method-first;
README and CI agree.

Shared code lives in regions. The source file marks each one
    # ==== region NAME (copied into a.py, b.py) ====  ...  # ==== end of region NAME ====
and every file it names carries the same lines, glue included, between
    # ==== copied from SOURCE.py: NAME (...) ====  ...  # ==== end of copy: NAME ====
`python tests/test_copies.py --fix` re-copies every region from its source, as transformers'
`make fix-copies` does: edit the source, run the fixer, commit both.
"""
import ast
import os
import re
import sys

import pytest

from conftest import ROOT

sys.path.insert(0, ROOT)
from train import MODELS  # noqa: E402  (the one registry of model files)

MODEL_FILES = [f"{m}.py" for m in MODELS]
REPO_MODULES = set(MODELS) | {"data", "train"}
SOURCE = re.compile(r"^# ==== region ([\w-]+) \(copied into ([\w., ]+)\) ====\n(.*?)^# ==== end of region \1 ====\n",
                    re.S | re.M)
COPY = re.compile(r"^# ==== copied from (\w+\.py): ([\w-]+) \(.*\) ====\n(.*?)^# ==== end of copy: \2 ====\n", re.S | re.M)
BANNER = re.compile(r"^# ==== (?:region|copied from|end of)", re.M)
# The class a reader opens each file for, and how far down it may start (the method comes first).
METHOD_CLASS = {"clip.py": "CLIP", "brivl.py": "BriVL", "clippo.py": "TextRenderer", "altclip.py": "AltCLIP",
                "laclip.py": "RewriteTransform"}
METHOD_WITHIN = 300


def read(path):
    with open(path, encoding="utf-8") as f:
        return f.read()


def regions(source):
    """{name: (files it is copied into, text)} of the regions a source file marks."""
    return {m.group(1): ({f.strip() for f in m.group(2).split(",")}, m.group(3)) for m in SOURCE.finditer(source)}


def copies(source):
    """[(source file, region name, text, match)] of the copied regions in a file."""
    return [(m.group(1), m.group(2), m.group(3), m) for m in COPY.finditer(source)]


def check_copies(files):
    problems = []
    for path in files:
        text = read(path)
        name = os.path.basename(path)
        banners = len(BANNER.findall(text))
        if banners != 2 * (len(copies(text)) + len(regions(text))):
            problems.append(f"{path}: a region or copy banner lacks its partner (or is misspelt)")
        for src, region, body, _ in copies(text):
            src_path = os.path.join(os.path.dirname(path), src)
            if not os.path.isfile(src_path):
                problems.append(f"{path}: copied from {src}, which does not exist")
                continue
            found = regions(read(src_path)).get(region)
            if found is None:
                problems.append(f"{path}: {src} has no region {region}")
            elif name not in found[0]:
                problems.append(f"{path}: {src}'s region {region} does not list {name} among its copies")
            elif found[1] != body:
                problems.append(f"{path}: region {region} differs from {src}; run python tests/test_copies.py --fix")
        for region, (users, _) in regions(text).items():
            for user in sorted(users):
                user_path = os.path.join(os.path.dirname(path), user)
                if os.path.isfile(user_path) and (name, region) not in {(s, r) for s, r, _, _ in copies(read(user_path))}:
                    problems.append(f"{user_path}: lacks region {region} of {name}")
    return problems


def fix_copies(files):
    """Re-copy every copied region from its source; returns the files changed."""
    changed = []
    for path in files:
        text = read(path)

        def fresh(m):
            src_path = os.path.join(os.path.dirname(path), m.group(1))
            found = regions(read(src_path)).get(m.group(2)) if os.path.isfile(src_path) else None
            if found is None:
                return m.group(0)
            head, tail = m.group(0).split("\n", 1)[0], m.group(0).rstrip("\n").rsplit("\n", 1)[1]
            return f"{head}\n{found[1]}{tail}\n"

        new = COPY.sub(fresh, text)
        if new != text:
            with open(path, "w", encoding="utf-8") as f:
                f.write(new)
            changed.append(path)
    return changed


def present(files):
    return [os.path.join(ROOT, f) for f in files if os.path.isfile(os.path.join(ROOT, f))]


def test_copied_regions_match_their_source():
    files = present(MODEL_FILES + ["data.py", "train.py"])
    assert check_copies(files) == []
    if len(files) == len(MODEL_FILES) + 2:
        assert sum(len(copies(read(f))) for f in files) >= 25  # the copies are really there to be checked


def test_checker_catches_a_stale_copy_and_the_fixer_mends_it(tmp_path):
    src = ("import os\n\n# ==== region helpers (copied into a.py) ====\ntry:\n    import triton\nexcept ImportError:\n"
           "    triton = None\n\n\ndef f(x):\n    return x + 1\n# ==== end of region helpers ====\n")
    (tmp_path / "clip.py").write_text(src)
    good = "\n\n# ==== copied from clip.py: helpers (edit clip.py) ====\n" + src.split("====\n", 1)[1].split("# ==== end")[0] \
        + "# ==== end of copy: helpers ====\n"
    (tmp_path / "a.py").write_text("x = 1\n" + good)
    assert check_copies([str(tmp_path / "a.py"), str(tmp_path / "clip.py")]) == []
    # glue outside any definition is compared too
    (tmp_path / "a.py").write_text("x = 1\n" + good.replace("triton = None", "triton = False"))
    assert "differs" in check_copies([str(tmp_path / "a.py")])[0]
    assert fix_copies([str(tmp_path / "a.py")]) == [str(tmp_path / "a.py")]
    assert check_copies([str(tmp_path / "a.py")]) == [] and (tmp_path / "a.py").read_text() == "x = 1\n" + good
    (tmp_path / "b.py").write_text(good.replace("helpers", "gone"))
    assert "no region gone" in check_copies([str(tmp_path / "b.py")])[0]
    (tmp_path / "c.py").write_text(good)  # a copy the source does not list
    assert "does not list c.py" in check_copies([str(tmp_path / "c.py")])[0]
    (tmp_path / "d.py").write_text(good.replace("# ==== end of copy: helpers ====\n", ""))
    assert "partner" in check_copies([str(tmp_path / "d.py")])[0]
    (tmp_path / "a.py").write_text("x = 1\n")  # the source lists a.py, which lost its copy
    assert "lacks region helpers" in check_copies([str(tmp_path / "clip.py")])[0]


@pytest.mark.parametrize("path", present(MODEL_FILES))
def test_model_file_reads_method_first(path):
    # The method's own class starts near the top; copied regions come last, with nothing of the
    # file's own between them and at most a few lines (the command-line entry) after them.
    text = read(path)
    name = os.path.basename(path)
    line = next(i for i, l in enumerate(text.splitlines(), 1) if l.startswith(f"class {METHOD_CLASS[name]}"))
    assert line <= METHOD_WITHIN, f"{name}: class {METHOD_CLASS[name]} starts at line {line}"
    found = copies(text) + [(None, None, None, m) for m in SOURCE.finditer(text) if m.group(1).startswith("kernel") or m.group(1) == "sigmoid"]
    if not found:
        return
    spans = sorted(m.span() for *_, m in found)
    between = "".join(text[a[1]:b[0]] for a, b in zip(spans, spans[1:]))
    assert not between.strip(), f"{name}: own code between the copied regions: {between.strip()[:80]!r}"
    after = [l for l in text[spans[-1][1]:].splitlines() if l.strip()]
    assert len(after) <= 15, f"{name}: {len(after)} lines after the copied regions"


# A command of a model file that needs this repository's loader would import data.py inside the command alone
# (a copied file imports, trains and predicts without it); no model file has one now.
COMMAND_IMPORTS = {}


def imports(tree):
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("path", present(MODEL_FILES))
def test_model_file_imports_nothing_from_the_repo(path):
    tree = ast.parse(read(path))
    for node in ast.walk(tree):
        allowed = COMMAND_IMPORTS.get((os.path.basename(path), getattr(node, "name", None)))
        if isinstance(node, ast.FunctionDef) and allowed:
            assert imports(node) & REPO_MODULES == allowed
            assert "except ImportError" in ast.get_source_segment(read(path), node)  # one line when it is absent
            node.body = []  # the rest of the file is checked as usual
    assert not imports(tree) & REPO_MODULES, f"{path} imports {imports(tree) & REPO_MODULES}"


def test_ci_runs_the_readme_test_command():
    readme = read(os.path.join(ROOT, "README.md"))
    ci = read(os.path.join(ROOT, ".ci", "run"))
    commands = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    test_command = commands[1].strip().splitlines()[-1]
    assert "pytest" in test_command and test_command in ci


def readme_train_commands():
    """Every train.py command in the README's code blocks, continuation lines joined: (nproc, argv)."""
    import shlex

    readme = read(os.path.join(ROOT, "README.md"))
    found = []
    for block in re.findall(r"```(?:bash|sh)\n(.*?)```", readme, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line.split(" # ")[0], comments=True)
            if "train.py" in words and words[words.index("train.py") + 1:words.index("train.py") + 2] not in (["report"], ["export"]):
                nproc = next((int(w.split("=")[1]) for w in words if w.startswith("--nproc_per_node=")), 1)
                found.append((nproc, words[words.index("train.py") + 1:]))
    return found


def test_every_readme_training_command_parses_to_a_sane_schedule():
    """Each command the README shows: flags that parse, a length, warmup < steps, cooldown <= steps. A
    table or shard set the README names stands for 10,000 samples, or its --train-num-samples."""
    import train

    commands = readme_train_commands()
    assert len(commands) >= 10
    for nproc, argv in commands:
        args, _ = train.parse_args(argv)
        if args.steps is None:
            train.steps_from_epochs(args, args.train_num_samples or 10_000, nproc)
        assert args.warmup < args.steps and args.cooldown_steps <= args.steps, (argv, args.steps, args.warmup)
        demo = args.size == "tiny" and args.data == "synthetic"
        assert demo or ("--epochs" in argv or "--steps" in argv), argv  # real runs state their length


def test_a_real_run_does_not_get_the_demo_recipe():
    import train

    args, _ = train.parse_args(["--model", "clip", "--size", "ViT-B-32", "--data", "train.tsv", "--epochs", "2"])
    assert (args.lr, args.wd, args.lr_schedule, args.synthetic_resolution) == (5e-4, 0.2, "cosine", 64)
    train.steps_from_epochs(args, 100_000, 1)
    assert args.steps == 1563 and args.warmup == 156
    with pytest.raises(ValueError, match="state the run's length: --epochs N"):
        train.parse_args(["--model", "clip", "--size", "ViT-B-32", "--data", "train.tsv"])
    demo, _ = train.parse_args(["--model", "clip"])
    assert (demo.steps, demo.warmup, demo.lr_schedule, demo.cooldown_steps, demo.synthetic_resolution) == \
        (430, 20, "const-cooldown", 120, 48)
    other, _ = train.parse_args(["--model", "clippo"])
    assert (other.steps, other.warmup, other.lr_schedule, other.lr) == (800, 50, "cosine", 1e-3)


if __name__ == "__main__":
    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python tests/test_copies.py --fix   (re-copies every '# ==== copied from' region)")
    for changed in fix_copies(present(MODEL_FILES + ["data.py", "train.py"])):
        print(f"re-copied regions in {os.path.relpath(changed, ROOT)}")
