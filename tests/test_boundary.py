"""The boundary, round 2: what a command writes (whole or not at all, never through a link, into a FIFO
or over a folder), what changes between runs (the inputs a checkpoint was trained on, checked when it
resumes), what a writer and its reader agree on, and the paths that used to skip the checked readers.
Each case ends in one line naming the file or flag, or runs as it should; nothing outside is touched."""
import errno
import json
import os
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

import brivl
import clip
import data
import train
from conftest import ROOT
from test_train import FAST, rows

RUN = ["--model", "clip", "--size", "tiny", "--batch-size", "8", "--synthetic-size", "64", *FAST]


def one_line(argv, said, script="train.py", timeout=120):
    """`python script argv` fails with one line holding `said`, and no traceback."""
    proc = subprocess.run([sys.executable, os.path.join(ROOT, script), *argv], capture_output=True, text=True,
                          timeout=timeout, errors="replace")
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert proc.returncode != 0 and "Traceback" not in proc.stderr and lines and said in lines[-1], proc.stderr[-2000:]
    return lines[-1]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    """A finished two-step run to copy: its checkpoint is also a teacher for --distill."""
    out = str(tmp_path_factory.mktemp("run2") / "run")
    train.main([*RUN, "--steps", "2", "--out", out])
    return out


def copy_run(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return str(dst)


# ----------------------------------------------------------------------------------------------
# What a run writes


def test_a_run_never_writes_through_a_link_into_a_fifo_or_over_a_folder(tmp_path, run2):
    outside = tmp_path / "precious.txt"
    outside.write_text("keep me")
    out = tmp_path / "linked"
    out.mkdir()
    os.symlink(outside, out / "metrics.jsonl")  # a new run would have truncated the file it points to
    one_line([*RUN, "--steps", "2", "--out", str(out)], "metrics.jsonl is not a regular file")
    assert outside.read_text() == "keep me"
    fifo = copy_run(run2, tmp_path / "fifo")
    os.remove(os.path.join(fifo, "metrics.jsonl"))
    os.mkfifo(os.path.join(fifo, "metrics.jsonl"))  # --resume read it, and waited for a writer forever
    start = time.time()
    one_line([*RUN, "--steps", "3", "--out", fifo, "--resume"], "metrics.jsonl is not a regular file")
    assert time.time() - start < 60
    folder = copy_run(run2, tmp_path / "folder")
    os.mkdir(os.path.join(folder, "report.html"))
    one_line(["report", folder], "report.html: exists and is not a regular file")
    os.symlink(outside, os.path.join(folder, "checkpoint-0000003.pt"))  # the next numbered checkpoint
    one_line([*RUN, "--steps", "3", "--out", folder, "--resume", "--save-every", "1"], "checkpoint-0000003.pt")
    assert outside.read_text() == "keep me"
    assert not [f for f in os.listdir(folder) if ".tmp" in f]  # the temporary file went with the failure


def test_a_resume_whose_rewrite_of_the_metrics_fails_keeps_every_row(tmp_path, run2, monkeypatch):
    out = copy_run(run2, tmp_path / "run")
    with open(os.path.join(out, "metrics.jsonl"), "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a torn last line: the resume rewrites the file without it
    before = open(os.path.join(out, "metrics.jsonl"), "rb").read()

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)  # the new file fails before it is renamed over the old one
    with pytest.raises(SystemExit, match="could not rewrite .*metrics.jsonl .*No space left.*it is as it was"):
        train.main([*RUN, "--steps", "3", "--out", out, "--resume"])
    assert open(os.path.join(out, "metrics.jsonl"), "rb").read() == before
    assert not [f for f in os.listdir(out) if ".tmp" in f]
    monkeypatch.undo()
    train.main([*RUN, "--steps", "3", "--out", out, "--resume"])
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3]


def test_every_command_that_writes_a_folder_holds_its_lock(tmp_path, run2):
    out = str(tmp_path / "busy")
    os.makedirs(out)
    data.lock_folder(out, "another command", "train.lock")
    data.lock_folder(out + "/", "another command")  # the name data.py's commands and export lock
    try:
        one_line([*RUN, "--steps", "2", "--out", out], "is in use by another command")
        one_line(["reinforce", "--teacher", os.path.join(run2, "checkpoint.pt"), "--data", "synthetic",
                  "--synthetic-size", "8", "--out", out], "is in use by another command", script="data.py")
        one_line(["export", os.path.join(run2, "checkpoint.pt"), out, "--format", "hf"], "is in use by another command")
        assert sorted(os.listdir(out)) == [".lock", "train.lock"]  # nothing of theirs was written
    finally:
        data.unlock_folder(out)
        data.unlock_folder(out + "/")


def test_export_into_a_file_or_through_one_is_one_line(tmp_path, run2):
    ckpt = os.path.join(run2, "checkpoint.pt")
    (tmp_path / "afile").write_text("keep me")
    for fmt in ("hf", "open_clip"):
        one_line(["export", ckpt, str(tmp_path / "afile"), "--format", fmt], "cannot make the folder")
        one_line(["export", ckpt, str(tmp_path / "afile" / "sub"), "--format", fmt], "cannot make the folder")
    (tmp_path / "out").mkdir()
    os.symlink(tmp_path / "afile", tmp_path / "out" / "config.json")
    one_line(["export", ckpt, str(tmp_path / "out"), "--format", "hf"], "config.json: exists and is not a regular")
    assert (tmp_path / "afile").read_text() == "keep me"


# ----------------------------------------------------------------------------------------------
# What changes between runs


def test_a_resume_refuses_inputs_that_changed_unless_told(tmp_path, run2):
    teacher = str(tmp_path / "teacher.pt")
    copy_run(run2, tmp_path / "t")
    os.rename(tmp_path / "t" / "checkpoint.pt", teacher)
    out = str(tmp_path / "run")
    train.main([*RUN, "--steps", "2", "--out", out, "--distill", teacher])
    other = torch.load(teacher, weights_only=False)
    other["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in other["model"].items()}
    torch.save(other, teacher)  # the same name, other weights: it would have trained on against them
    with pytest.raises(SystemExit, match=r"trained on other contents of --distill .*--allow-changed-inputs distill"):
        train.main([*RUN, "--steps", "3", "--out", out, "--distill", teacher, "--resume"])
    train.main([*RUN, "--steps", "3", "--out", out, "--distill", teacher, "--resume", "--allow-changed-inputs",
                "distill"])
    assert [r["step"] for r in rows(out) if "loss" in r] == [1, 2, 3]
    # a CSV's rows changed under a run: the data is an input too
    folder = tmp_path / "csv"
    folder.mkdir()
    for i in range(4):
        data.Synthetic(0, "train", 4).image(i).save(folder / f"{i}.png")
    table = folder / "d.csv"
    table.write_text("filepath,title\n" + "".join(f"{i}.png,a caption {i}\n" for i in range(4)))
    csv_run = [*RUN[:-len(FAST)], *FAST, "--data", str(table), "--val-size", "0", "--batch-size", "2"]
    train.main([*csv_run, "--steps", "1", "--out", str(tmp_path / "c")])
    table.write_text("filepath,title\n" + "".join(f"{i}.png,another {i}\n" for i in range(4)))
    with pytest.raises(SystemExit, match="other contents of --data"):
        train.main([*csv_run, "--steps", "2", "--out", str(tmp_path / "c"), "--resume"])


def test_allow_changed_inputs_takes_flag_names_as_they_are_written():
    args, _ = train.parse_args([*RUN, "--steps", "2", "--allow-changed-inputs", "distill,--init,distill-model"])
    assert args.allow_changed_inputs == ["distill", "init", "distill_model"]
    with pytest.raises(SystemExit):
        train.parse_args([*RUN, "--steps", "2", "--allow-changed-inputs", "distill,teachers"])


# ----------------------------------------------------------------------------------------------
# The paths that skipped the checked readers


def lying_tokenizer(folder):
    """A CLIP tokenizer.json whose end-of-text id (5000) lies far past its 600 other ids."""
    tok = clip.train_bpe(data.Synthetic().caption_corpus(2000), vocab_size=600, context_length=16)
    tok.tokenizer.save(str(folder / "small.json"))
    spec = json.loads((folder / "small.json").read_text())
    spec["model"]["vocab"][clip.EOT] = 5000
    for added in spec["added_tokens"]:
        if added["content"] == clip.EOT:
            added["id"] = 5000
    (folder / "lying.json").write_text(json.dumps(spec))
    return str(folder / "small.json"), str(folder / "lying.json")


def test_a_tokenizer_is_sized_by_its_highest_id_and_checked_against_the_table_it_feeds(tmp_path):
    small, lying = lying_tokenizer(tmp_path)
    tok = clip.Tokenizer.from_file(lying, 16)
    assert tok.eot == 5000 and tok.vocab_size == 5001  # was 600: an IndexError at step 1
    out = str(tmp_path / "run")
    train.main([*RUN, "--tokenizer", lying, "--steps", "1", "--out", out])
    assert torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["model"]["token_embedding.weight"].shape[0] == 5001
    from test_interop import SMALL

    openai = clip.CLIP(replace(SMALL, vocab_size=600), clip.Tokenizer.from_file(small, 16))
    torch.save(openai.state_dict(), tmp_path / "ViT-S.pt")  # OpenAI's layout: a table of 600
    with pytest.raises(ValueError, match="eos_id 5000 is past the vocabulary of 600"):
        train.main(["--model", "clip", "--init", str(tmp_path / "ViT-S.pt"), "--tokenizer", lying,
                    "--steps", "1", "--out", str(tmp_path / "ft"), "--batch-size", "8", *FAST])


def test_a_resumed_checkpoint_is_checked_against_a_model_built_on_the_meta_device(tmp_path, run2):
    """Its config claims a text tower 2^20 wide over tensors of the tiny one: refused before any model of
    that size is built (4 TB of embedding), in one line."""
    out = copy_run(run2, tmp_path / "run")
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    ckpt["extra"]["config"]["text_width"] = 1 << 20
    ckpt["extra"]["config"]["vocab_size"] = 1 << 20
    torch.save(ckpt, os.path.join(out, "checkpoint.pt"))
    start = time.time()
    one_line([*RUN, "--steps", "3", "--out", out, "--resume"], "weights that do not fit their config")
    assert time.time() - start < 60


def test_lora_on_resume_is_checked_in_one_line(tmp_path, run2):
    one_line([*RUN, "--steps", "3", "--out", copy_run(run2, tmp_path / "a"), "--resume", "--lora", "4",
              "--allow-flag-changes"], "--lora cannot join a run on resume")
    out = str(tmp_path / "lora")
    train.main([*RUN, "--steps", "2", "--out", out, "--lora", "4"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    for lie in ({"rank": 64}, {"targets": ["q", "nose"]}, {"alpha": float("inf")}):
        torch.save({**ckpt, "lora": {**ckpt["lora"], "spec": {**ckpt["lora"]["spec"], **lie}}},
                   os.path.join(out, "checkpoint.pt"))
        one_line([*RUN, "--steps", "3", "--out", out, "--resume", "--lora", "4"], "LoRA")


def test_brivl_context_and_queue_pointer_are_checked_where_they_are_read(tmp_path):
    with pytest.raises(ValueError, match="context_length 30 is past BERT's 24 positions"):
        replace(brivl.CONFIGS["tiny"], context_length=30)
    model = brivl.BriVL(brivl.CONFIGS["tiny"], None)
    sd = model.state_dict()
    for ptr in (model.cfg.queue_size, -1, 1 << 40):
        with pytest.raises(ValueError, match="outside the queue"):
            model.load_state_dict({**sd, "queue_ptr": torch.tensor(ptr)})
    model.load_state_dict({**sd, "queue_ptr": torch.tensor(model.cfg.queue_size - 1)})  # the last slot: in
    model.queue_ptr.fill_(5)  # inside, but not where a global batch of 128 starts: it would write past the end
    model._keys = (torch.zeros(128, model.cfg.embed_dim), torch.zeros(128, model.cfg.embed_dim))
    with pytest.raises(ValueError, match="does not take whole global batches of 128"):
        model.after_step()


def test_a_font_that_is_not_a_font_is_refused_when_the_model_is_made(tmp_path):
    (tmp_path / "font.ttf").write_bytes(b"\0\1\0\0 not a font at all" * 20)
    one_line(["--model", "clippo", "--size", "tiny", "--font", str(tmp_path / "font.ttf"), "--steps", "1",
              "--out", str(tmp_path / "run"), *FAST], "font.ttf: not a font Pillow reads")
    assert not os.path.exists(tmp_path / "run" / "checkpoint.pt")


def test_distillation_needs_images_and_says_so(tmp_path, run2):
    teacher = os.path.join(run2, "checkpoint.pt")
    one_line(["--model", "altclip", "--size", "tiny", "--teacher", teacher, "--distill", teacher, "--steps", "1",
              "--out", str(tmp_path / "run"), "--batch-size", "8", "--synthetic-size", "64", *FAST],
             "no image to distil")
    out = {"text": torch.zeros(2, 4), "scale": torch.tensor(1.0)}
    with pytest.raises(ValueError, match="distils image and text features"):
        train.Distiller([], 1.0, 1.0).loss(out, [])


# ----------------------------------------------------------------------------------------------
# A writer and its reader agree


def test_what_reinforce_writes_training_reads_up_to_the_same_caps(tmp_path):
    """A sigmoid teacher (a negative bias) just under MAX_SCALE is written and every sample then trains; a scale
    past the cap is refused by the writer, in one line, not skipped sample by sample by the reader."""
    out = str(tmp_path / "sig")
    train.main([*RUN, "--steps", "1", "--out", out, "--loss", "sigmoid"])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    for scale, fine in ((data.MAX_SCALE * 0.9999, True), (data.MAX_SCALE * 1.001, False)):  # float32 exp(log) rounds
        ckpt["model"]["logit_scale"] = torch.tensor(scale).log()
        ckpt["model"]["logit_bias"] = torch.tensor(-data.MAX_SCALE)
        torch.save(ckpt, tmp_path / "teacher.pt")
        written = str(tmp_path / f"rf{fine}")
        argv = ["--teacher", str(tmp_path / "teacher.pt"), "--out", written, "--augmentations", "1", "--synthetic-size",
                "16", "--per-shard", "16", "--batch-size", "16"]
        if not fine:
            one_line(["reinforce", *argv], "is past the 1000.0 stored teachers may have", script="data.py")
            continue
        data.reinforce_main(argv)
        manifest = data.read_manifests([os.path.join(written, "00000.tar")])
        assert manifest[0]["bias"] == -data.MAX_SCALE and 0.999 * data.MAX_SCALE < manifest[0]["scale"] <= data.MAX_SCALE
        run = str(tmp_path / "student")
        train.main([*RUN, "--data", os.path.join(written, "00000.tar"), "--steps", "2", "--batch-size", "8",
                    "--distill", "stored", "--out", run, "--val-size", "0", "--loss", "sigmoid"])
        assert not any(r.get("skips") for r in rows(run)), rows(run)
