"""Files and servers we did not make: weights that would run code, data rows that would hang a run or
eat other rows, oversized images and members, a misbehaving rewrite server. Nothing executes, nothing
hangs, every row is read or counted, and every refusal is one line naming the file."""
import collections
import concurrent.futures
import contextlib
import http.server
import io
import json
import os
import pickle
import re
import socketserver
import struct
import subprocess
import sys
import tarfile
import threading
import time
import types
import zipfile
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data
import laclip
import train
from conftest import ROOT
from test_train import FAST, rows

TINY = ["--model", "clip", "--size", "tiny", "--batch-size", "4", *FAST]


def run(*args, timeout=120):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def one_line(proc):
    lines = [line for line in proc.stderr.splitlines() if line.strip() and "Warning" not in line
             and not line.startswith("  warnings.warn")]
    return len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr


# ----------------------------------------------------------------------------------------------
# Weights: TorchScript archives are read, never run


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    train.main([*TINY, "--steps", "1", "--out", str(out)])
    return str(out / "checkpoint.pt")


def evil_archive(path, target):
    """A TorchScript module whose __setstate__ creates `target` when torch.jit.load runs it."""

    class Evil(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(2))
            self.target = target

        def forward(self, x):
            return x * self.w

        @torch.jit.export
        def __getstate__(self):
            return (self.w, self.target, self.training)

        @torch.jit.export
        def __setstate__(self, state: tuple[torch.Tensor, str, bool]):
            self.w = state[0]
            self.target = state[1]
            self.training = state[2]
            self.w.data.add_(torch.from_file(self.target, shared=True, size=2))

    torch.jit.script(Evil()).save(str(path))
    return str(path)


def reduce_archive(path, target):
    """A zip in TorchScript's layout whose data.pkl calls os.system through a pickle REDUCE."""

    class Boom:
        def __reduce__(self):
            return (os.system, (f"touch {target}",))

    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", pickle.dumps(Boom(), protocol=2))
        z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("m/version", "3\n")
    return str(path)


def test_torchscript_state_dict_equals_torch_jit_load(tmp_path):
    model = clip.build("tiny", captions=["a red circle", "a blue square"] * 20).eval()
    traced = torch.jit.trace_module(model, {"encode_image": (torch.zeros(1, 3, 48, 48, dtype=torch.uint8),)})
    traced.save(str(tmp_path / "jit.pt"))
    theirs = torch.jit.load(str(tmp_path / "jit.pt")).state_dict()
    ours = clip.read_torchscript(str(tmp_path / "jit.pt"))
    assert list(ours) == list(theirs)
    assert all(ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]) for k in theirs)

    class Mixed(torch.nn.Module):  # buffers, half precision, a transposed (non-contiguous) parameter
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 4)
            self.register_buffer("steps", torch.arange(5))
            self.t = torch.nn.Parameter(torch.randn(5, 6).t())
            self.h = torch.nn.Parameter(torch.randn(3).half())

        def forward(self, x):
            return self.lin(x)

    torch.jit.script(Mixed()).save(str(tmp_path / "mixed.pt"))
    theirs = torch.jit.load(str(tmp_path / "mixed.pt")).state_dict()
    ours = clip.read_torchscript(str(tmp_path / "mixed.pt"))
    assert list(ours) == list(theirs)
    assert all(torch.equal(ours[k], theirs[k]) and ours[k].stride() == theirs[k].stride() for k in theirs)


def test_malicious_archives_run_nothing(tmp_path):
    target = tmp_path / "pwned"
    evil = evil_archive(tmp_path / "evil.pt", str(target))
    torch.jit.load(evil)  # the archive is really hostile: loading it the usual way creates the file
    assert target.exists()
    target.unlink()
    with pytest.raises(clip.UnsafeWeights, match=r"evil.pt: a TorchScript archive whose class .*Evil runs code"):
        clip.read_state_dict(evil)
    boom = reduce_archive(tmp_path / "boom.pt", str(target))
    with pytest.raises(clip.UnsafeWeights, match=r"boom.pt: .*asks for (posix|os)\.system"):
        clip.read_state_dict(boom)
    assert not target.exists()


def crafted_archive(path, root, code=b"", storages=None):
    """A zip in TorchScript's layout holding the module tree `root` (objects of classes in a __torch__
    module made here, so that they pickle by reference), code/ text and data/ records."""
    class Pickler(pickle.Pickler):
        def persistent_id(self, obj):
            return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, Storage) else None

    buf = io.BytesIO()
    Pickler(buf, protocol=2).dump(root)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("m/data.pkl", buf.getvalue())
        z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
        z.writestr("m/code/__torch__.py", code)
        for key, raw in (storages or {}).items():
            z.writestr(f"m/data/{key}", raw)
    return str(path)


class Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class View:
    """Pickles as torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...), whatever it claims."""
    def __init__(self, storage, size, stride, offset=0):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self):
        import torch._utils
        return torch._utils._rebuild_tensor_v2, self.args


@pytest.fixture
def torch_module(monkeypatch):
    module = types.ModuleType("__torch__")
    monkeypatch.setitem(sys.modules, "__torch__", module)

    def make(name):
        cls = type(name, (), {"__module__": "__torch__"})
        setattr(module, name, cls)
        return cls
    return make


def test_small_archives_cost_little(tmp_path, torch_module):
    """Tiny files that claimed gigabytes, hours or 2^depth walks before: each refused or read at once."""
    M = torch_module("M")
    m = M()
    m.w = View(Storage("0", 1), (20000, 20000), (0, 0))  # 1.6 GB from one stored float
    stride0 = crafted_archive(tmp_path / "stride0.pt", m, b'class M(Module):\n  __parameters__ = ["w", ]\n',
                              {"0": b"\0\0\0\0"})
    assert os.path.getsize(stride0) < 2000
    q = M()
    q.n = 1
    quadratic = crafted_archive(tmp_path / "regex.pt", q, b"class M(" + b"(" * 200_000 + b"\n" + b" x\n" * 100_000)
    node = M()  # a chain whose every level names the next twice: 2^22 paths (a walk of each: seconds), 23 objects
    node.w = View(Storage("0", 1), (1,), (1,))
    for _ in range(22):
        parent = M()
        parent.a = parent.b = node
        node = parent
    shared = crafted_archive(tmp_path / "shared.pt", node, b'class M(Module):\n  __parameters__ = ["w", ]\n',
                             {"0": b"\0\0\0\0"})
    views = tmp_path / "views.pt"  # a state dict of expanded views: a ViT-H's shapes over one float each
    one = torch.zeros(1)
    torch.save({"visual.conv1.weight": one.expand(1280, 3, 14, 14), "text_projection": one.expand(1024, 1024),
                "visual.positional_embedding": one.expand(257, 1280), "ln_final.weight": one.expand(1024)}, views)
    assert os.path.getsize(views) < 5000
    said = {stride0: "expanded over 1 stored elements", str(views): "expanded over 1 stored elements"}
    for path in (stride0, quadratic, shared, str(views)):
        start = time.time()
        try:
            sd, _ = clip.read_state_dict(path)
        except ValueError as e:
            assert said.get(path, "?") in str(e) and path in str(e), (path, e)
        else:
            assert path in (quadratic, shared), path
        assert time.time() - start < 3, (path, time.time() - start)
    assert list(clip.read_torchscript(shared)) == ["a." * 22 + "w"]  # each module once, by its first name
    assert clip.class_declarations("class M(Module):\n  __parameters__ = [\"w\", \"b\", ]\n  __buffers__ = [\"s\"]\n") == \
        {"M": (["w", "b"], ["s"], False)}


# The one global a REDUCE may call in a TorchScript archive (besides storages, and classes of its own
# __torch__ tree): gadgets that walk from an allowed callable to os are refused by name.
GADGETS = [("builtins", "getattr"), ("builtins", "eval"), ("builtins", "exec"), ("operator", "attrgetter"),
           ("posix", "system"), ("os", "system"), ("subprocess", "Popen"), ("torch", "load"), ("builtins", "__import__"),
           ("torch._utils", "_rebuild_parameter"), ("copyreg", "_reconstructor"), ("functools", "partial")]


def test_the_archive_readers_allow_exactly_what_weights_need(tmp_path, monkeypatch):
    allowed = set()
    real = pickle.Unpickler.find_class

    class Probe(pickle.Unpickler):
        pass
    monkeypatch.setattr(pickle, "Unpickler", Probe)
    model = clip.build("tiny", captions=["a red circle"] * 10).eval()
    torch.jit.trace_module(model, {"encode_image": (torch.zeros(1, 3, 48, 48, dtype=torch.uint8),)}).save(
        str(tmp_path / "jit.pt"))
    monkeypatch.undo()
    # the TorchScript reader's allow-list, pinned: one more entry would widen what a file may call
    import inspect
    source = inspect.getsource(clip.read_torchscript)
    pinned = {('"torch._utils", "_rebuild_tensor_v2"'), ('"collections", "OrderedDict"'),
              ('"torch.jit._pickle", "restore_type_tag"')}
    assert {f'"{a}", "{b}"' for a, b in re.findall(r'\("([\w.]+)", "(\w+)"\)', source)} == pinned
    assert 'allowed[("torch.jit._pickle", f"build_{kind}")] = list' in source
    assert set(clip.STORAGES) == {"FloatStorage", "DoubleStorage", "HalfStorage", "BFloat16Storage", "LongStorage",
                                  "IntStorage", "ShortStorage", "CharStorage", "ByteStorage", "BoolStorage"}
    for module, name in GADGETS:
        for kind in ("archive", "plain"):
            body = (b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n" + b"X\x02\x00\x00\x00id\x85R.")
            path = tmp_path / f"{kind}-{module}-{name}.pt"
            if kind == "archive":
                with zipfile.ZipFile(path, "w") as z:
                    z.writestr("m/data.pkl", body)
                    z.writestr("m/constants.pkl", pickle.dumps((), protocol=2))
            else:  # a plain checkpoint: torch.save's zip layout with the same data.pkl
                torch.save({"w": torch.zeros(1)}, path)
                with zipfile.ZipFile(path) as z:
                    records = {n: z.read(n) for n in z.namelist()}
                with zipfile.ZipFile(path, "w") as z:
                    for n, raw in records.items():
                        z.writestr(n, body if n.endswith("/data.pkl") else raw)
            with pytest.raises(ValueError) as e:
                clip.read_state_dict(str(path))
            assert str(path) in str(e.value) and "\n" not in str(e.value), (module, name, kind)
            if kind == "archive":
                assert isinstance(e.value, clip.UnsafeWeights) and f"{module}.{name}" in str(e.value)


def test_weights_that_do_not_fit_are_one_line(tmp_path, tiny_ckpt):
    """Missing keys, wrong shapes, configs of the wrong types or of another model, folders that point
    outside themselves: one BadInput (a ValueError) naming the file, from load and from --init alike."""
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    cases = {}
    sd = dict(ckpt["model"])
    sd.pop("ln_final.weight")
    cases["missing.pt"] = {**ckpt, "model": sd}
    cases["shape.pt"] = {**ckpt, "model": {**ckpt["model"], "ln_final.weight": torch.zeros(7)}}
    cases["heads.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**ckpt["extra"]["config"], "vision_heads": "2"}}}
    cases["zero.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**ckpt["extra"]["config"], "text_heads": 0}}}
    cases["eps.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**ckpt["extra"]["config"], "ln_eps": [1e-5]}}}
    cases["list.pt"] = {**ckpt, "extra": [1, 2]}
    cases["clippo.pt"] = {**ckpt, "extra": {"config": {"width": 128, "layers": 4, "heads": 4, "pool": "map"}}}
    cases["huge.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**ckpt["extra"]["config"], "vision_layers": 4000}}}
    cases["tokenizer.pt"] = {**ckpt, "extra": {**ckpt["extra"], "tokenizer": "{not a tokenizer"}}
    config = ckpt["extra"]["config"]
    cases["mean.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**config, "image_mean": [0.5, 0.5]}}}
    cases["std.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**config, "image_std": [0.5, 0, 0.5]}}}
    cases["divide.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**config, "text_heads": 3}}}
    cases["eos.pt"] = {**ckpt, "extra": {**ckpt["extra"], "config": {**config, "eos_id": 1_000_000}}}
    cases["nan.pt"] = {**ckpt, "model": {**ckpt["model"], "logit_scale": torch.tensor(float("nan"))}}
    cases["complex.pt"] = {**ckpt, "model": {**ckpt["model"], "text_projection": ckpt["model"]["text_projection"] * 1j}}
    for name, obj in cases.items():
        torch.save(obj, tmp_path / name)
    said = {"missing.pt": "1 missing (first: ln_final.weight)", "shape.pt": "ln_final.weight (7,)",
            "heads.pt": "vision_heads = '2'", "zero.pt": "text_heads = 0", "eps.pt": "ln_eps = [1e-05]",
            "list.pt": "not a table", "clippo.pt": "unknown config fields", "huge.pt": "vision_layers = 4000",
            "mean.pt": "image_mean", "std.pt": "image_std", "divide.pt": "3 attention heads do not divide",
            "eos.pt": "eos_id 1000000 is past the vocabulary", "nan.pt": "NaN or infinite", "complex.pt": "complex"}
    for name in cases:
        path = str(tmp_path / name)
        for read in (lambda: clip.load(path), lambda: clip.build(init=path, tokenizer=None)):
            start = time.time()
            with pytest.raises(ValueError) as e:
                read()
            message = str(e.value)
            assert path in message and "\n" not in message and said.get(name, "") in message, (name, message)
            assert time.time() - start < 5, name
    # HF folders: a config that is a list, a sharded index naming files outside the folder
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(clip.BadInput, match=r"config.json: holds a list"):
        clip.load(str(folder))
    (tmp_path / "secret.safetensors").write_bytes(b"outside")
    for shard in ("../secret.safetensors", str(tmp_path / "secret.safetensors")):
        (folder / "config.json").write_text('{"model_type": "clip"}')
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
        with pytest.raises(clip.BadInput, match="outside the folder"):
            clip.load(str(folder))


@pytest.mark.slow
def test_every_flag_that_reads_weights_refuses_them_in_one_line(tmp_path, tiny_ckpt):
    target = tmp_path / "pwned"
    evil = evil_archive(tmp_path / "evil.pt", str(target))
    boom = reduce_archive(tmp_path / "boom.pt", str(target))
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    commands = [command for bad in (evil, boom) for command in (
        ["clip.py", "predict", "--ckpt", bad, "--image", str(image), "--labels", "a,b"],
        ["laclip.py", "predict", "--ckpt", bad, "--image", str(image), "--labels", "a,b"],
        ["train.py", "export", bad, str(tmp_path / ("x" + os.path.basename(bad))), "--format", "hf"],
        ["train.py", "--model", "clip", "--init", bad, "--steps", "1", "--out", str(tmp_path / ("r" + os.path.basename(bad)))],
        ["train.py", "--model", "altclip", "--teacher", bad, "--steps", "1", "--out", str(tmp_path / ("a" + os.path.basename(bad)))])]
    # Ten interpreters, two at a time (one per core of the CI machine): each is mostly torch's import.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda command: run(*command), commands))
    for command, proc in zip(commands, procs):
        bad = next(arg for arg in command if arg in (evil, boom))
        assert proc.returncode != 0 and one_line(proc)[0], (command, proc.stderr)
        assert os.path.basename(bad) in proc.stderr and "refused" in proc.stderr, proc.stderr
    assert not target.exists()


def test_damaged_checkpoints_are_one_line(tmp_path, tiny_ckpt, capsys):
    whole = open(tiny_ckpt, "rb").read()
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    for name, payload in (("empty.pt", b""), ("garbage.pt", os.urandom(5000)), ("truncated.pt", whole[: len(whole) // 2])):
        path = tmp_path / name
        path.write_bytes(payload)
        with pytest.raises(SystemExit) as e:
            clip.predict_main(["--ckpt", str(path), "--image", str(image), "--labels", "a,b"])
        message = str(e.value.code)
        assert "\n" not in message and name in message and "not a weights file" in message, message
        with pytest.raises(ValueError, match=name):
            clip.build(init=str(path))


# ----------------------------------------------------------------------------------------------
# Data rows: special files, sizes, quotes, encodings


def png_header(width, height, mode=2):
    """A PNG whose header claims width x height (RGB) over one byte of pixels: opens, never decodes."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, mode, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def good_images(folder, n):
    names = []
    for i in range(n):
        name = f"good{i}.png"
        data.Synthetic(0, "train", n).image(i).save(folder / name)
        names.append(name)
    return names


def test_special_and_oversized_files_are_skipped_and_counted(tmp_path):
    names = good_images(tmp_path, 6)
    os.mkfifo(tmp_path / "fifo.jpg")
    (tmp_path / "folder.jpg").mkdir()
    (tmp_path / "huge.png").write_bytes(png_header(12000, 12000))
    with open(tmp_path / "sparse.png", "wb") as f:  # 80 MB on paper, nothing on disk
        f.truncate(80 << 20)
    bad = ["fifo.jpg", "/dev/zero", "folder.jpg", "huge.png", "sparse.png"]
    lines = ["filepath\ttitle"] + [f"{n}\ta caption {i}" for i, n in enumerate(names + bad)]
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    start = time.time()
    train.main([*TINY, "--data", str(tmp_path / "d.tsv"), "--steps", "3", "--out", str(out), "--val-size", "0"])
    assert time.time() - start < 60
    skips = {}
    for r in rows(out):
        for why, n in r.get("skips", {}).items():
            skips[why] = skips.get(why, 0) + n
    assert {"not a regular file", "sample too large", "image too large"} <= set(skips), skips
    assert skips["not a regular file"] >= 3  # the FIFO, /dev/zero and the folder, once an epoch each


def test_size_cap_skips_members_unread(tmp_path):
    buf = io.BytesIO()
    data.Synthetic(0, "train", 1).image(0).save(buf, "PNG")
    with tarfile.open(tmp_path / "s.tar", "w") as tar:
        for key, payload in (("a", buf.getvalue()), ("b", b"x" * 50_000)):
            for ext, body in (("png", payload), ("txt", b"a caption")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    groups = list(data.read_shard(str(tmp_path / "s.tar"), [], max_bytes=20_000))
    assert groups[0][1]["png"] == buf.getvalue()
    assert "png" not in groups[1][1]
    with pytest.raises(data.SampleError, match="b.png: the sample's members pass --max-sample-bytes 20000"):
        data.decode_sample(*groups[1], str(tmp_path / "s.tar"))
    index = data.ShardIndex(str(tmp_path / "s.tar"), max_bytes=20_000)
    with pytest.raises(data.SampleError, match="sample too large"):
        index.sample(1, None)


HOSTILE_JSON = {  # what a scraped shard's .json may hold, and the reason its sample is counted under
    b"[1, 2]": "bad json", b'{"label": Infinity}': "bad json", b'{"x": NaN}': "bad json",
    b"[" * 200_000 + b"]" * 200_000: "bad json", b'{"a": 1': "bad json", b"\xff\xfe{}": "bad json",
    b'{"texts": {"en": 5}}': "bad text", b'{"boxes": [[0, 0, 1]]}': "bad boxes",
}


def test_no_sample_ends_a_run_whatever_it_holds(tmp_path):
    """Shard samples malformed in every way above, beside good ones: the run ends, each bad one is counted
    under its reason, and the members no model reads are passed over unread (the cap is per sample)."""
    buf = io.BytesIO()
    data.Synthetic(0, "train", 1).image(0).save(buf, "PNG")
    png = buf.getvalue()
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        def add(name, body):
            info = tarfile.TarInfo(name)
            info.size = len(body)
            tar.addfile(info, io.BytesIO(body))
        for k, meta in enumerate([b'{"label": [1], "rewrites": ["\\ud800 a red circle", 7]}', *HOSTILE_JSON]):
            add(f"{k:04d}.png", png)
            add(f"{k:04d}.txt", b"a caption " + b"x" * (k * 10_000))  # long captions are cut, not fatal
            add(f"{k:04d}.json", meta)
            for j in range(3):  # members nobody reads: not buffered, not counted against the cap
                add(f"{k:04d}.view{j}.bin", b"\0" * 400_000)
        for k in range(len(HOSTILE_JSON) + 1, 24):
            add(f"{k:04d}.png", png)
            add(f"{k:04d}.txt", b"a good caption")
    groups = list(data.read_shard(str(tmp_path / "00000.tar"), [], max_bytes=1_000_000))
    assert all(not any(e.startswith("view") for e in g) for _, g in groups) and len(groups) == 24
    good = data.decode_sample(*groups[0], "s")  # the lone surrogate replaced, the non-text rewrite left out
    assert good["rewrites"] == ["? a red circle"] and "label" not in good
    for (key, group), reason in zip(groups[1:], HOSTILE_JSON.values()):
        with pytest.raises(data.SampleError) as e:
            data.decode_sample(key, group, "s")
        assert e.value.reason == reason, (key, e.value)
    out = tmp_path / "run"
    train.main(["--model", "laclip", "--size", "tiny", "--batch-size", "4", *FAST, "--data", str(tmp_path / "00000.tar"),
                "--steps", "3", "--out", str(out), "--shuffle-buffer", "4", "--max-sample-bytes", "1000000"])
    skips = {}
    for r in rows(out):
        for why, n in r.get("skips", {}).items():
            skips[why] = skips.get(why, 0) + n
    assert skips.get("bad json", 0) >= 1 and set(skips) <= {"bad json", "bad text", "bad boxes", "sample too large"}, skips


def test_any_exception_in_a_transform_skips_that_sample_by_its_kind():
    ds = data.Synthetic(0, "train", 50)

    def transform(sample, rng):
        n = int(sample["text"].__len__()) % 3
        if n == 0:
            raise KeyError("a field the transform wanted")
        if n == 1:
            "\ud800".encode("utf-8")
        return {"x": torch.zeros(1)}

    skips = []
    out = data.load_sample(ds, transform, 0, 0, 0, skips)
    assert out["x"].shape == (1,) and set(skips) <= {"bad sample (KeyError)", "bad text"}
    with pytest.raises(data.DataError, match="100 samples in a row .*ZeroDivisionError"):  # our bug: every sample
        data.load_sample(ds, lambda sample, rng: 1 / 0, 0, 0, 0, [])


def test_csv_fields_past_the_csv_modules_limit(tmp_path):
    names = good_images(tmp_path, 3)
    long = "a long caption " + "y" * 200_000  # over Python's 131,072
    (tmp_path / "d.csv").write_text(f"filepath,title\n{names[0]},{long}\n{names[1]},{'z' * 300_000}\n{names[2]},ok\n")
    ds = data.CsvData(str(tmp_path / "d.csv"), max_bytes=250_000)
    assert len(ds) == 3 and len(ds.sample(0, None)["text"]) == data.MAX_TEXT_CHARS
    with pytest.raises(data.SampleError, match="a field over --max-sample-bytes 250000"):
        ds.sample(1, None)
    assert ds.sample(2, None)["text"] == "ok"


def test_a_stray_quote_in_a_tsv_eats_no_rows(tmp_path):
    lines = ["filepath\ttitle"] + [f"{i}.png\tcaption {i}" for i in range(15)]
    lines[4] = '3.png\ta "quoted word with no end'
    lines[6] = '5.png\t"a whole field in quotes, ""doubled"" inside"'
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    ds = data.CsvData(str(tmp_path / "d.tsv"))
    assert len(ds) == 15 and ds.texts[3] == 'a "quoted word with no end' and ds.texts[4] == "caption 4"
    assert ds.texts[5] == 'a whole field in quotes, "doubled" inside'
    # \u2028 and \x85 inside a caption are characters, not row breaks
    (tmp_path / "u.tsv").write_text("filepath\ttitle\n0.png\tone\u2028two\x85three\n1.png\tfour\n", encoding="utf-8")
    assert data.CsvData(str(tmp_path / "u.tsv")).texts == ["one\u2028two\x85three", "four"]


def test_a_quoted_field_over_lines_in_a_csv_is_said(tmp_path, capsys):
    (tmp_path / "d.csv").write_text('filepath,title\n0.png,"an open quote\n1.png,b\n2.png,c\n', encoding="utf-8")
    ds = data.CsvData(str(tmp_path / "d.csv"))
    err = capsys.readouterr().err
    assert len(ds) == 1 and "d.csv: 1 quoted fields run over several lines (first: line 2)" in err


def test_bad_utf8_rows_are_skipped_and_counted_with_their_line(tmp_path, capsys):
    names = good_images(tmp_path, 4)
    body = b"filepath\ttitle\n" + b"".join(f"{n}\tcaption {i}\n".encode() for i, n in enumerate(names))
    body = body.replace(b"caption 2", b"caption \xff\xfe 2")
    (tmp_path / "d.tsv").write_bytes(body)
    ds = data.CsvData(str(tmp_path / "d.tsv"))
    assert "d.tsv: 1 of 4 rows cannot be read" in capsys.readouterr().err
    with pytest.raises(data.SampleError, match=r"d.tsv:4: not UTF-8"):
        ds.sample(2, None)
    assert ds.sample(3, None)["text"] == "caption 3"
    skips = []
    out = data.load_sample(ds, clip.build("tiny", captions=["a caption"] * 10).transform(True), 2, 0, 0, skips)
    assert skips == ["unreadable row"] and out["image"].shape[0] == 3


# ----------------------------------------------------------------------------------------------
# Images: sizes, bit depth, predict


def test_pixels_cap_16_bit_and_predict_messages(tmp_path, tiny_ckpt, capsys):
    t = clip.ImageTransform(48, clip.MEAN, clip.STD)
    big = Image.open(io.BytesIO(png_header(12000, 12000)))
    with pytest.raises(clip.ImageTooLarge, match="12000 x 12000 pixels"):
        t(big)
    gray = np.full((40, 40), 32896, dtype=np.uint16)  # mid-gray in 16 bits
    Image.fromarray(gray).save(tmp_path / "g16.png")
    img = Image.open(tmp_path / "g16.png")
    assert img.mode.startswith("I")
    pixels = clip.ImageTransform(48, clip.MEAN, clip.STD, uint8=True)(img)
    assert pixels.float().mean().item() == pytest.approx(128, abs=1)  # scaled, not clipped to white
    (tmp_path / "huge.png").write_bytes(png_header(12000, 12000))
    (tmp_path / "bomb.png").write_bytes(png_header(20000, 20000))  # over Pillow's own bomb limit
    good = tmp_path / "ok.png"
    data.Synthetic(0, "val", 1).image(0).save(good)
    (tmp_path / "cut.png").write_bytes(good.read_bytes()[:200])
    for name in ("huge.png", "bomb.png", "cut.png"):
        with pytest.raises(SystemExit) as e:
            clip.predict_main(["--ckpt", tiny_ckpt, "--image", str(tmp_path / name), "--labels", "a,b"])
        message = str(e.value.code)
        assert "\n" not in message and name in message and "not a readable image" in message, message
    folder = tmp_path / "images"
    folder.mkdir()
    good.rename(folder / "a.png")
    os.mkfifo(folder / "z.jpg")
    start = time.time()
    clip.predict_main(["--ckpt", tiny_ckpt, "--images", str(folder), "--query", "a red circle", "--json"])
    captured = capsys.readouterr()
    assert time.time() - start < 30 and json.loads(captured.out)["images"] == [str(folder / "a.png")]
    assert "left out 1 entries" in captured.err and "z.jpg" in captured.err
    with pytest.raises(SystemExit, match="z.jpg: not a regular file"):
        clip.predict_main(["--ckpt", tiny_ckpt, "--image", str(folder / "z.jpg"), "--labels", "a,b"])


def progressive_jpeg(scans, side=1000):
    """A flat progressive JPEG of `scans` scans: Pillow writes 10, the last one repeated for the rest
    (each repeat costs the decoder a pass over every pixel, and adds a few bytes)."""
    buf = io.BytesIO()
    Image.new("RGB", (side, side), (120, 60, 30)).save(buf, "JPEG", progressive=True)
    jpeg = buf.getvalue()
    starts = [i for i in range(len(jpeg) - 1) if jpeg[i:i + 2] == b"\xff\xda"]
    assert len(starts) == 10 and scans >= 10 and jpeg.endswith(b"\xff\xd9")
    last = jpeg[starts[-1]:-2]
    return jpeg[:-2] + last * (scans - 10) + b"\xff\xd9"


def test_jpeg_scans_are_capped_before_the_decode(tmp_path, tiny_ckpt):
    """Decode time is bounded by the input's size: a JPEG of more scans than MAX_JPEG_SCANS is refused
    before it decodes (1,010 scans of 6000 x 6000 took 23 s); at the cap it trains and predicts."""
    assert data.MAX_JPEG_SCANS == clip.MAX_JPEG_SCANS == 100
    at, over = progressive_jpeg(100), progressive_jpeg(101)
    data.open_image(at, "at.jpg").load()
    with pytest.raises(data.SampleError, match="101 JPEG scans, over the cap of 100") as e:
        data.open_image(over, "over.jpg")
    assert e.value.reason == "too many scans"
    start = time.time()
    with pytest.raises(data.SampleError):
        data.open_image(progressive_jpeg(5000, side=4000), "many.jpg")  # 52 s if it were decoded
    assert time.time() - start < 5
    (tmp_path / "at.jpg").write_bytes(at)
    (tmp_path / "over.jpg").write_bytes(over)
    clip.read_image(str(tmp_path / "at.jpg"))
    with pytest.raises(ValueError, match="over.jpg: not a readable image .*101 scans, over the caps"):
        clip.read_image(str(tmp_path / "over.jpg"))
    names = good_images(tmp_path, 6)
    lines = ["filepath\ttitle"] + [f"{n}\ta caption {i}" for i, n in enumerate(names + ["at.jpg", "over.jpg"])]
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    train.main([*TINY, "--data", str(tmp_path / "d.tsv"), "--steps", "4", "--out", str(tmp_path / "run"),
                "--val-size", "0"])
    skips = {}
    for r in rows(tmp_path / "run"):
        for why, n in r.get("skips", {}).items():
            skips[why] = skips.get(why, 0) + n
    assert set(skips) == {"too many scans"}, skips  # at.jpg trains, over.jpg is skipped and counted


def test_no_image_file_runs_a_program(tmp_path, tiny_ckpt, monkeypatch):
    """Pillow opens EPS, and loading one runs it as PostScript in Ghostscript where that is installed:
    a sample or --image is read only as one of the raster formats. A `gs` on PATH records any call."""
    bin_dir, called = tmp_path / "bin", tmp_path / "gs-ran"
    bin_dir.mkdir()
    (bin_dir / "gs").write_text(f"#!/bin/sh\ntouch {called}\n")
    (bin_dir / "gs").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n0 0 moveto 64 64 lineto stroke\nshowpage\n"
    (tmp_path / "x.jpg").write_bytes(eps)
    with pytest.raises(data.SampleError, match="unreadable image"):
        data.open_image(eps, "x.jpg").load()
    with pytest.raises(ValueError, match="x.jpg: not a readable image"):
        clip.read_image(str(tmp_path / "x.jpg"))
    with pytest.raises(SystemExit, match="x.jpg: not a readable image"):
        clip.predict_main(["--ckpt", tiny_ckpt, "--image", str(tmp_path / "x.jpg"), "--labels", "a,b"])
    assert not called.exists()


# ----------------------------------------------------------------------------------------------
# data.py shards: only images, only from the CSV's folder


def test_shards_pack_only_images_from_the_csv_folder(tmp_path, capsys):
    root = tmp_path / "set"
    root.mkdir()
    names = good_images(root, 2)
    secret = tmp_path / "secret.png"
    data.Synthetic(0, "val", 1).image(0).save(secret)
    os.symlink(secret, root / "link.png")
    (root / "notes.jpg").write_text("not an image")
    os.mkfifo(root / "fifo.jpg")
    lines = ["filepath\ttitle"] + [f"{n}\tc" for n in names + ["link.png", "notes.jpg", "fifo.jpg", "../secret.png"]]
    (root / "d.tsv").write_text("\n".join(lines) + "\n")
    paths = data.write_shards(str(root / "d.tsv"), str(tmp_path / "out"))
    err = capsys.readouterr().err
    with tarfile.open(paths[0]) as tar:
        packed = sorted(m.name for m in tar if m.name.endswith((".png", ".jpg")))
    assert packed == ["000000000.png", "000000001.png"]
    assert err.count("resolves outside") == 2 and "does not open as an image" in err and "not a regular file" in err
    assert "left out 4 of 6 rows" in err
    paths = data.write_shards(str(root / "d.tsv"), str(tmp_path / "out2"), allow_outside=True)
    with tarfile.open(paths[0]) as tar:
        assert len([m for m in tar if m.name.endswith(".png")]) == 4


# ----------------------------------------------------------------------------------------------
# data.py rewrite against a misbehaving server (127.0.0.1 only, bounded)


class Server:
    """A completion server on 127.0.0.1 whose answers a test scripts: answer(prompt) -> (status, bytes, drip)."""

    def __init__(self, answer):
        outer = self
        self.requests = 0

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                outer.requests += 1
                status, payload, drip = answer(body["prompt"].rsplit("\n", 1)[-1][:-3])
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                try:
                    if drip:
                        for i in range(min(len(payload), 30)):  # bounded: at most 30 s of dripping
                            self.wfile.write(payload[i:i + 1])
                            self.wfile.flush()
                            time.sleep(1)
                    else:
                        self.wfile.write(payload)
                except OSError:
                    pass

            def log_message(self, *args):
                pass

        self.httpd = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


def completion(text):
    return 200, json.dumps({"choices": [{"text": text}]}).encode(), False


def test_flags_files_and_reports_out_of_range_are_one_line(tmp_path, tiny_ckpt):
    """Values no run can use are refused when parsed; a report is drawn from whatever a metrics file or
    checkpoint holds, and a crafted checkpoint's config builds no model."""
    for flags, said in ((["--batch-size", "0"], "--batch-size 0: from 1 to"),
                        (["--log-every", "0"], "--log-every 0: from 1 to"),
                        (["--steps", "-3"], "--steps -3: from 1 to"), (["--warmup", "-1"], "--warmup -1: from 0"),
                        (["--epochs", "inf"], "--epochs inf: from 0"), (["--save-every", "-1"], "--save-every"),
                        (["--epochs", "1e300"], "--epochs 1e+300: from 0 to"), (["--epochs", "0"], "above 0"),
                        (["--lr", "nan"], "--lr nan"), (["--steps", str(1 << 60)], "--steps"),
                        (["--beta2", "1"], "below 1"), (["--seed", "-1"], "--seed -1: from 0")):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()) as err:
            train.parse_args(["--model", "clip", *flags])
        assert said in err.getvalue(), (flags, err.getvalue())
    for argv in (["--top", "-1"], ["--device", "meta"]):
        with pytest.raises(SystemExit), contextlib.redirect_stderr(io.StringIO()):
            clip.predict_main(["--ckpt", tiny_ckpt, "--image", "x.png", "--labels", "a,b", *argv])
    proc = run("data.py", "shards", "--csv", "x.csv", "--out", str(tmp_path / "sh"), "--per-shard", "-1")
    assert proc.returncode != 0 and "--per-shard" in proc.stderr and "Traceback" not in proc.stderr
    # a batch whose samples do not all carry a label: the label is left out, the batch is built
    batch = data.collate([{"x": torch.zeros(2), "label": torch.tensor(1)}, {"x": torch.ones(2)}])
    assert set(batch) == {"x"} and batch["x"].shape == (2, 2)
    # report: rows with odd values, and a checkpoint whose config claims 200,000 layers
    out = tmp_path / "run"
    out.mkdir()
    rows_ = [{"step": 1, "loss": 1.0, "lr": 0.1}, {"step": 2, "loss": 0.5}, {"step": 3, "loss": {"a": 1}},
             {"step": 4, "loss": 1.0, "skips": [1, 2]}, {"step": 10 ** 400, "loss": 1.0}, {"step": 5, "x" * 1000: 1.0}]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows_))
    ckpt = torch.load(tiny_ckpt, weights_only=True)
    ckpt["extra"]["config"]["text_layers"] = ckpt["extra"]["config"]["vision_layers"] = 200_000
    torch.save(ckpt, out / "checkpoint.pt")
    start = time.time()
    proc = run("train.py", "report", str(out))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr and time.time() - start < 60, proc.stderr
    assert "no image grid" in open(out / "report.html").read()


def test_the_other_readers_hold_the_same_rules(tmp_path, tiny_ckpt, capsys):
    """brivl's caps on what a config may claim, predict's one line for a model that fails on its inputs,
    a crafted checkpoint in --out, and laclip rewrite's files and flags."""
    import brivl

    model = brivl.build("tiny", captions=["a red dog", "a blue cat"] * 10, queue_size=16)
    for field, value, said in (("grid", 1 << 24, "grid = 16777216 is over 64"), ("pool_size", 0, "pool_size = 0"),
                               ("temperature", 0.0, "temperature = 0.0"), ("context_length", 100, None)):
        extra = {**model.extra_state(), "config": {**model.extra_state()["config"], field: value}}
        path = tmp_path / f"brivl-{field}.pt"
        torch.save({"model": model.state_dict(), "extra": extra}, path)
        if said:
            start = time.time()
            with pytest.raises(ValueError, match=said):
                brivl.load(str(path))
            assert time.time() - start < 10
        else:  # loads, then fails on the labels' 100 positions: still one line from predict
            image = tmp_path / "a.png"
            Image.new("RGB", (32, 32), "red").save(image)
            with pytest.raises(SystemExit) as e:
                brivl.predict_main(["--ckpt", str(path), "--image", str(image), "--labels", "a red dog,a blue cat"])
            assert "\n" not in str(e.value.code) and str(path) in str(e.value.code)
    out = str(tmp_path / "run")
    train.main([*TINY, "--steps", "2", "--out", out, "--save-every", "1"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    os.remove(os.path.join(out, "checkpoint.pt"))  # a hard link to the newest: the numbered file stays whole
    torch.save({**ckpt, "step": "2", "sharded": "../../../etc"}, os.path.join(out, "checkpoint.pt"))
    capsys.readouterr()
    train.main([*TINY, "--steps", "3", "--out", out, "--resume"])
    said = capsys.readouterr().out
    assert "checkpoint.pt does not load" in said and "step, sharded are not what train.py writes" in said, said
    assert "resuming from" in said and "(step 2)" in said
    (tmp_path / "c.txt").write_text("a red circle\n")
    os.mkfifo(tmp_path / "fifo.txt")
    for argv, said in ((["--out", str(tmp_path / "fifo.txt")], "fifo.txt: not a regular file"),
                       (["--out", str(tmp_path / "r.txt"), "--concurrency", "0"], "--concurrency 0: from 1 to 1024"),
                       (["--out", str(tmp_path / "r.txt"), "--meta-pairs", "/dev/zero"], "/dev/zero: not a regular")):
        with pytest.raises(SystemExit) as e, contextlib.redirect_stderr(io.StringIO()) as err:
            data.rewrite_main(["--captions", str(tmp_path / "c.txt"), "--endpoint", "http://127.0.0.1:9", *argv])
        assert said in f"{e.value.code} {err.getvalue()}", (argv, e.value.code, err.getvalue())


def test_predict_is_bounded_whatever_it_is_given(tmp_path, tiny_ckpt, monkeypatch, capsys):
    """--texts that never ends, 2,000 texts, a 1 x 100000 strip: one line, or memory that does not grow."""
    strip = tmp_path / "strip.png"
    Image.new("RGB", (1, 100_000), "red").save(strip)
    assert os.path.getsize(strip) < 2000
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    with pytest.raises(SystemExit, match=r"zero.txt: not a regular file"):
        clip.predict_main(["--ckpt", tiny_ckpt, "--image", str(strip), "--texts", str(tmp_path / "zero.txt")])
    model, preprocess = clip.load(tiny_ckpt)
    real, widest = clip.CLIP.encode_texts, []
    monkeypatch.setattr(clip.CLIP, "encode_texts", lambda self, t: widest.append(len(t)) or real(self, t))
    real_image, tallest = clip.CLIP.encode_image, []
    monkeypatch.setattr(clip.CLIP, "encode_image", lambda self, x, **kw: tallest.append(x.shape) or real_image(self, x, **kw))
    probs = model.classify([str(strip)] * 70, [f"caption {i}" for i in range(2_000)])
    assert probs.shape == (70, 2_000) and max(widest) <= 256 and max(s[0] for s in tallest) <= 64
    assert all(s[-2:] == (48, 48) for s in tallest)  # the strip's centre cut first, then resized


def test_texts_no_encoder_takes_are_replaced_or_refused_in_one_line(tmp_path):
    import clippo
    assert data.fold("a \ud800 rewrite\u2028two") == "a ? rewrite two"  # an LLM's answer: written as UTF-8
    assert clip.train_bpe(["a red circle"] * 3)(["\ud800 red"]).shape == (1, 77)
    for line in ("110000:" + "0" * 32, "-1:" + "0" * 32, "41:" + "0" * 31):
        with pytest.raises(ValueError, match="a glyph line"):
            clippo.TextRenderer(None, 32, glyphs=[line])
    (tmp_path / "f.hex").write_text("0041:" + "0" * 32 + "\nFFFFFFF:" + "0" * 32 + "\n")
    with pytest.raises(ValueError, match=r"f.hex:2: not a .hex glyph line"):
        clippo.read_hex_font(str(tmp_path / "f.hex"))


def rewrite(captions, out, server, *extra):
    return data.rewrite_main(["--captions", str(captions), "--out", str(out), "--endpoint", server.url,
                                "--backoff", "0.01", "--concurrency", "2", *extra])


def test_rewrite_writes_one_line_per_caption_whatever_the_server_sends(tmp_path):
    breaks = ["\r", "\x0b", "\x0c", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029"]
    captions = [f"caption {i}" for i in range(len(breaks) + 2)]
    (tmp_path / "c.txt").write_text("\n".join(captions) + "\n", encoding="utf-8")

    def answer(caption):
        i = int(caption.split()[-1])
        if i < len(breaks):
            return completion(f"rewrite{breaks[i]}of {caption}")
        return completion("x" * 5000 if i == len(breaks) else f"a rewrite of {caption}\nand a second line")

    server = Server(answer)
    try:
        rewrite(tmp_path / "c.txt", tmp_path / "r.txt", server)
    finally:
        server.close()
    lines = data.read_lines(str(tmp_path / "r.txt"))[:-1]
    assert len(lines) == len(captions)
    assert all(line == f"rewrite of caption {i}" for i, line in enumerate(lines[:len(breaks)])), lines
    assert len(lines[-2]) <= data.MAX_REWRITE_CHARS and lines[-1] == f"a rewrite of caption {len(breaks) + 1}"
    assert len(open(tmp_path / "r.txt", "rb").read().split(b"\n")) == len(captions) + 1


def test_rewrite_null_text_dripping_and_huge_answers_fail_in_one_line(tmp_path):
    (tmp_path / "c.txt").write_text("a red circle\n", encoding="utf-8")
    cases = {"null": lambda c: (200, b'{"choices":[{"text":null}]}', False),
             "nochoices": lambda c: (200, b'{"id": 1}', False),
             "drip": lambda c: (200, json.dumps({"choices": [{"text": "slow"}]}).encode(), True),
             "huge": lambda c: (200, b'{"choices":[{"text":"' + b"a" * (11 << 20) + b'"}]}', False)}
    said = {"null": "without choices[0].text", "nochoices": "without choices[0].text",
            "drip": "within --timeout 2 s", "huge": "over 1 MiB"}
    for name, answer in cases.items():
        server = Server(answer)
        start = time.time()
        try:
            with pytest.raises(SystemExit) as e:
                rewrite(tmp_path / "c.txt", tmp_path / f"{name}.txt", server, "--timeout", "2", "--retries", "1")
        finally:
            server.close()
        message = str(e.value.code)
        assert "\n" not in message and "after 2 tries" in message and said[name] in message, (name, message)
        assert server.requests == 2 and time.time() - start < 15, (name, time.time() - start)


def test_rewrite_rerun_never_shortens_a_file(tmp_path):
    (tmp_path / "c.txt").write_text("".join(f"caption {i}\n" for i in range(6)), encoding="utf-8")
    server = Server(lambda c: completion(f"new {c}"))
    try:
        # a file from another run with more lines than captions is refused, untouched
        (tmp_path / "long.txt").write_text("".join(f"old {i}\n" for i in range(10)))
        with pytest.raises(SystemExit, match="long.txt has 10 lines for 6 captions"):
            rewrite(tmp_path / "c.txt", tmp_path / "long.txt", server)
        assert (tmp_path / "long.txt").read_text().count("\n") == 10
        # a partial last line is not cut: the user is told
        (tmp_path / "part.txt").write_text("old 0\nold 1\nold")
        with pytest.raises(SystemExit, match="part.txt ends in a partial line"):
            rewrite(tmp_path / "c.txt", tmp_path / "part.txt", server)
        assert (tmp_path / "part.txt").read_text() == "old 0\nold 1\nold"
        # rewrites of unequal length (a run stopped between files) each continue where they are
        (tmp_path / "r.0.txt").write_text("old 0\nold 1\nold 2\n")
        (tmp_path / "r.1.txt").write_text("old 0\n")
        rewrite(tmp_path / "c.txt", tmp_path / "r.txt", server, "--rewrites", "2")
    finally:
        server.close()
    assert (tmp_path / "r.0.txt").read_text().splitlines() == ["old 0", "old 1", "old 2", "new caption 3",
                                                               "new caption 4", "new caption 5"]
    assert (tmp_path / "r.1.txt").read_text().splitlines()[:2] == ["old 0", "new caption 1"]


@pytest.mark.parametrize("model", ["clip", "laclip", "clippo", "brivl", "altclip"])
def test_every_model_file_refuses_bad_weights_in_one_line(tmp_path, model):
    import importlib

    module = importlib.import_module(model)
    target = tmp_path / "pwned"
    image = tmp_path / "a.png"
    Image.new("RGB", (32, 32), "red").save(image)
    files = {"empty.pt": b"", "garbage.pt": os.urandom(3000)}
    for name, payload in files.items():
        (tmp_path / name).write_bytes(payload)
    for path in [str(tmp_path / n) for n in files] + [evil_archive(tmp_path / "evil.pt", str(target)),
                                                      reduce_archive(tmp_path / "boom.pt", str(target))]:
        with pytest.raises(SystemExit) as e:
            module.predict_main(["--ckpt", path, "--image", str(image), "--labels", "a,b"])
        message = str(e.value.code)
        assert "\n" not in message and os.path.basename(path) in message, message
    assert not target.exists()
