"""laclip.py: rewrite sampling, the multi-text loss, data with rewrites; and data.py rewrite, the rewrite generator."""
import argparse
import collections
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from PIL import Image

import data
import laclip
import train
from conftest import ROOT
from naive import clip_loss as naive_clip_loss
from test_train import FAST, rows


def small_model(sets=0):
    args = argparse.Namespace(size="tiny", tokenizer=None, quick_gelu=False, multi_text=bool(sets),
                              max_rewrites=max(sets - 1, 0))
    return laclip.create(args, ["a red circle on a gray background", "one big blue square", "ok"] * 20)


def test_rewrite_draw_is_uniform_deterministic_and_skips_short_texts():
    model = small_model()
    tf = model.transform(True)
    img = Image.new("RGB", (64, 64))
    sample = {"image": img, "text": "a red circle", "rewrites": ["one big blue square", "a gray background", "ok"]}
    texts = [sample["text"], *sample["rewrites"]]

    def decode(out):  # the text drawn, as the transform names it ('text_pick'), and its tokens are that text's
        text = texts[int(out["text_pick"])]
        assert torch.equal(out["text"], model.tokenizer([text])[0])
        return text

    seen = collections.Counter(decode(tf(sample, np.random.default_rng([0, 0, i, 102]))) for i in range(2000))
    # 'ok' has one word: its quarter of the draws falls back to the original.
    assert set(seen) == {"a red circle", "one big blue square", "a gray background"}
    assert abs(seen["a red circle"] / 2000 - 0.5) < 0.04
    assert abs(seen["one big blue square"] / 2000 - 0.25) < 0.04
    again = [decode(tf(sample, np.random.default_rng([0, 0, i, 102]))) for i in range(20)]
    assert again == [decode(tf(sample, np.random.default_rng([0, 0, i, 102]))) for i in range(20)]


def test_multi_text_loss_is_the_mean_over_text_sets():
    model = small_model(sets=3)
    tf = model.transform(True)
    rng = np.random.default_rng(0)
    samples = [{"image": Image.fromarray(rng.integers(0, 255, (48, 48, 3), dtype=np.uint8)), "text": f"a red circle {i}",
                "rewrites": [f"one blue square {i}"]} for i in range(6)]  # one rewrite: the third set repeats the original
    batch = data.collate([tf(s, np.random.default_rng(i)) for i, s in enumerate(samples)])
    assert batch["text"].shape[:2] == (6, 3)
    out = model(batch)
    loss = model.loss(out)
    with torch.no_grad():
        img = model.encode_image(batch["image"], normalize=True)
        sets = [model.encode_text(batch["text"][:, m], normalize=True) for m in range(3)]
        ref = sum(naive_clip_loss(img, t, model.logit_scale.exp()) for t in sets) / 3
    torch.testing.assert_close(loss.detach(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(sets[2], sets[0])


def test_csv_rewrites_from_columns_and_aligned_files(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "d.tsv").write_text("filepath\ttitle\tr1\na.png\ta dog\ta puppy\na.png\ta cat\t\n")
    (tmp_path / "r2.txt").write_text("a small dog\n")  # one line short: row 2 has no such rewrite
    ds = data.CsvData(str(tmp_path / "d.tsv"), rewrite_keys=["r1"], rewrite_files=[str(tmp_path / "r2.txt")])
    assert ds.sample(0, None)["rewrites"] == ["a puppy", "a small dog"]
    assert ds.sample(1, None)["rewrites"] == []
    notes = []
    data.load_sample(ds, lambda s, rng: {"x": torch.zeros(1)}, 1, 0, 0, [], notes)
    assert notes == ["no rewrites: original caption used"]


def test_synthetic_single_template_offers_the_others_as_rewrites():
    ds = data.Synthetic(0, "train", 50, templates=1)
    s = ds.sample(3, np.random.default_rng(1))
    assert s["text"] == s["captions"][0] and s["rewrites"] == s["captions"][1:]


# --- the rewrite generator against a stub OpenAI-compatible server on 127.0.0.1


class Stub:
    """Answers /v1/completions with 'rewritten: <caption>'; can fail or hang on chosen requests."""

    def __init__(self, fail=(), hang=(), fail_from=None):
        self.requests, self.prompts = 0, []
        self.fail, self.hang, self.fail_from = set(fail), set(hang), fail_from
        self.lock = threading.Lock()
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with stub.lock:
                    stub.requests += 1
                    n = stub.requests
                if n in stub.hang:
                    time.sleep(1.5)
                if n in stub.fail or (stub.fail_from is not None and n >= stub.fail_from):
                    self.send_response(503)
                    self.end_headers()
                    return
                assert self.path == "/v1/completions" and body["temperature"] == 0.9 and body["top_p"] == 0.95
                assert body["max_tokens"] == 77
                caption = body["prompt"].rsplit("\n", 1)[1][: -len(" =>")]
                with stub.lock:
                    stub.prompts.append(body["prompt"])
                answer = json.dumps({"choices": [{"text": f" rewritten: {caption}\nsecond line"}]}).encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(answer)))
                self.end_headers()
                self.wfile.write(answer)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def run_rewrite(*args):
    return subprocess.run([sys.executable, "data.py", "rewrite", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture
def captions(tmp_path):
    path = tmp_path / "captions.txt"
    path.write_text("".join(f"a photo of thing number {i}\n" for i in range(12)))
    return path


def test_generator_writes_one_rewrite_per_line_in_order_with_retries(captions, tmp_path):
    stub = Stub(fail=(2, 3), hang=(5,))
    try:
        out = tmp_path / "out.txt"
        r = run_rewrite("--captions", str(captions), "--out", str(out), "--endpoint", stub.url, "--concurrency", "3",
                        "--backoff", "0.01", "--timeout", "0.5")
        assert r.returncode == 0, r.stderr
        assert out.read_text().splitlines() == [f"rewritten: a photo of thing number {i}" for i in range(12)]
        prompt = stub.prompts[0].split("\n")
        assert prompt[0] == data.PROMPT_HEAD and len(prompt) == 5 and all(" => " in line for line in prompt[1:4])
    finally:
        stub.close()


def test_generator_resumes_after_the_server_goes_away(captions, tmp_path):
    out = tmp_path / "out.txt"
    stub = Stub(fail_from=6)
    try:
        r = run_rewrite("--captions", str(captions), "--out", str(out), "--endpoint", stub.url, "--concurrency", "1",
                        "--retries", "1", "--backoff", "0.01")
    finally:
        stub.close()
    assert r.returncode != 0 and "run the same command again" in r.stderr
    kept = out.read_text().splitlines()
    assert kept == [f"rewritten: a photo of thing number {i}" for i in range(5)]
    stub = Stub()
    try:
        r = run_rewrite("--captions", str(captions), "--out", str(out), "--endpoint", stub.url, "--rewrites", "1")
        assert r.returncode == 0, r.stderr
        assert stub.requests == 7  # only the lines still missing
        assert out.read_text().splitlines() == [f"rewritten: a photo of thing number {i}" for i in range(12)]
    finally:
        stub.close()


def test_generator_several_rewrites_go_to_one_file_each(captions, tmp_path):
    stub = Stub()
    try:
        r = run_rewrite("--captions", str(captions), "--out", str(tmp_path / "rw.txt"), "--endpoint", stub.url + "/v1",
                        "--rewrites", "2")
        assert r.returncode == 0, r.stderr
        for k in range(2):
            assert len((tmp_path / f"rw.{k}.txt").read_text().splitlines()) == 12
    finally:
        stub.close()


def test_generator_says_clearly_when_no_server_answers(captions, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    r = run_rewrite("--captions", str(captions), "--out", str(tmp_path / "o.txt"), "--endpoint",
                    f"http://127.0.0.1:{port}", "--retries", "1", "--backoff", "0.01")
    assert r.returncode != 0 and "Is the completion server running" in r.stderr and "Traceback" not in r.stderr


# --- training


def test_laclip_trains_with_multi_text(tmp_path):
    out = str(tmp_path / "mt")
    metrics = train.main(["--model", "laclip", "--multi-text", "--steps", "3", "--batch-size", "8", "--out", out, *FAST])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    assert ckpt["extra"]["text_sets"] == 5 and "zeroshot_top1" in metrics
    assert rows(out)[0]["loss"] > 0
