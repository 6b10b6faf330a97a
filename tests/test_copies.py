"""Repository shape: marked copies match their source; model files stand alone; README and CI agree."""
import ast
import os
import re

import pytest

from conftest import ROOT

MODEL_FILES = ["clip.py", "brivl.py", "clippo.py", "altclip.py", "laclip.py"]
REPO_MODULES = {m[:-3] for m in MODEL_FILES} | {"data", "train"}
MARK = re.compile(r"^(\s*)# Copied from (\w+\.py): (\w+)\s*$")


def definition(source, name):
    """Source text of the top-level (or class-level) def/class/assignment called name, or None."""
    tree = ast.parse(source)
    lines = source.splitlines()
    for node in ast.walk(tree):
        names = [node.name] if isinstance(node, (ast.FunctionDef, ast.ClassDef)) else \
            [t.id for t in getattr(node, "targets", []) if isinstance(t, ast.Name)]
        if name in names:
            start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
            return "\n".join(lines[start - 1:node.end_lineno])
    return None


def marked_copies(source):
    """(source file, name, copied text) for each '# Copied from X.py: Name' line in source."""
    out = []
    lines = source.splitlines()
    for i, line in enumerate(lines):
        m = MARK.match(line)
        if m:
            rest = "\n".join(lines[i + 1:])
            text = definition(rest, m.group(3))
            out.append((m.group(2), m.group(3), text))
    return out


def check_copies(files):
    problems = []
    for path in files:
        for src, name, text in marked_copies(open(path, encoding="utf-8").read()):
            src_path = os.path.join(os.path.dirname(path), src)
            if not os.path.isfile(src_path):
                problems.append(f"{path}: copied from {src}, which does not exist")
                continue
            original = definition(open(src_path, encoding="utf-8").read(), name)
            if original is None:
                problems.append(f"{path}: {name} is not defined in {src}")
            elif text is None or text.strip() != original.strip():
                problems.append(f"{path}: {name} differs from {src}; copy it again or drop the mark")
    return problems


def present(files):
    return [os.path.join(ROOT, f) for f in files if os.path.isfile(os.path.join(ROOT, f))]


def test_marked_copies_match_their_source():
    assert check_copies(present(MODEL_FILES + ["data.py", "train.py"])) == []


def test_checker_catches_a_stale_copy(tmp_path):
    (tmp_path / "clip.py").write_text("def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n")
    (tmp_path / "good.py").write_text("# Copied from clip.py: f\ndef f(x):\n    return x + 1\n")
    (tmp_path / "bad.py").write_text("# Copied from clip.py: f\ndef f(x):\n    return x + 2\n")
    (tmp_path / "gone.py").write_text("# Copied from clip.py: g\ndef g():\n    pass\n")
    assert check_copies([str(tmp_path / "good.py")]) == []
    assert "differs" in check_copies([str(tmp_path / "bad.py")])[0]
    assert "not defined" in check_copies([str(tmp_path / "gone.py")])[0]


@pytest.mark.parametrize("path", present(MODEL_FILES))
def test_model_file_imports_nothing_from_the_repo(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            imported.add(node.module.split(".")[0])
    assert not imported & REPO_MODULES, f"{path} imports {imported & REPO_MODULES}"


def test_ci_runs_the_readme_test_command():
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read()
    commands = re.findall(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    test_command = commands[1].strip().splitlines()[-1]
    assert "pytest" in test_command and test_command in ci
