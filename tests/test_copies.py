"""Repository shape: marked copies match their source; model files stand alone; README and CI agree."""
import ast
import functools
import os
import re

import pytest

from conftest import ROOT

MODEL_FILES = ["clip.py", "brivl.py", "clippo.py", "altclip.py", "laclip.py"]
REPO_MODULES = {m[:-3] for m in MODEL_FILES} | {"data", "train"}
MARK = re.compile(r"^(\s*)# Copied from (\w+\.py): (\w+)\s*$")


@functools.lru_cache(maxsize=None)
def named_nodes(source):
    """(first line incl. decorators, name, text) of every def/class/single-name assignment, outermost first."""
    lines = source.splitlines()
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            name = node.name
        elif isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            name = node.targets[0].id
        else:
            continue
        start = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])])
        out.append((start, name, "\n".join(lines[start - 1:node.end_lineno])))
    return out


def definition(source, name):
    """Source text of the outermost definition called name, or None."""
    return next((text for _, n, text in named_nodes(source) if n == name), None)


def marked_copies(source):
    """(source file, name, copied text) for each '# Copied from X.py: Name' line in source."""
    by_start = {start: (name, text) for start, name, text in named_nodes(source)}
    out = []
    for i, line in enumerate(source.splitlines(), start=1):
        m = MARK.match(line)
        if m:
            name, text = by_start.get(i + 1, (None, None))
            out.append((m.group(2), m.group(3), text if name == m.group(3) else None))
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
    files = present(MODEL_FILES + ["data.py", "train.py"])
    assert check_copies(files) == []
    marks = sum(len(marked_copies(open(f, encoding="utf-8").read())) for f in files)
    assert marks >= 40 or len(files) == 3  # the model files besides clip.py do carry checked copies


def test_checker_catches_a_stale_copy(tmp_path):
    (tmp_path / "clip.py").write_text("def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n")
    (tmp_path / "good.py").write_text("# Copied from clip.py: f\ndef f(x):\n    return x + 1\n")
    (tmp_path / "bad.py").write_text("# Copied from clip.py: f\ndef f(x):\n    return x + 2\n")
    (tmp_path / "gone.py").write_text("# Copied from clip.py: g\ndef g():\n    pass\n")
    (tmp_path / "moved.py").write_text("# Copied from clip.py: f\n\ndef f(x):\n    return x + 1\n")
    assert check_copies([str(tmp_path / "good.py")]) == []
    assert "differs" in check_copies([str(tmp_path / "bad.py")])[0]
    assert "not defined" in check_copies([str(tmp_path / "gone.py")])[0]
    assert "differs" in check_copies([str(tmp_path / "moved.py")])[0]  # a mark must sit right above its copy


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


def fix_copies(files):
    """Re-copy every marked definition from its source (transformers' fix-copies); returns the files changed."""
    changed = []
    for path in files:
        source = open(path, encoding="utf-8").read()
        lines = source.splitlines(keepends=True)
        nodes = {start: (name, text) for start, name, text in named_nodes(source)}
        edits = []  # (first line, last line, new text), applied bottom-up so line numbers stay valid
        for i, line in enumerate(lines, start=1):
            m = MARK.match(line.rstrip("\n"))
            if not m or i + 1 not in nodes or nodes[i + 1][0] != m.group(3):
                continue
            src_path = os.path.join(os.path.dirname(path), m.group(2))
            original = definition(open(src_path, encoding="utf-8").read(), m.group(3)) if os.path.isfile(src_path) else None
            old = nodes[i + 1][1]
            if original is not None and original.strip() != old.strip():
                edits.append((i + 1, i + len(old.splitlines()), original))
        for first, last, text in sorted(edits, reverse=True):
            lines[first - 1:last] = [text.rstrip("\n") + "\n"]
        if edits:
            with open(path, "w", encoding="utf-8") as f:
                f.write("".join(lines))
            changed.append(path)
    return changed


if __name__ == "__main__":
    import sys

    if sys.argv[1:] != ["--fix"]:
        sys.exit("usage: python tests/test_copies.py --fix   (re-copies every '# Copied from' definition)")
    for changed in fix_copies(present(MODEL_FILES + ["data.py", "train.py"])):
        print(f"re-copied marked definitions in {os.path.relpath(changed, ROOT)}")
