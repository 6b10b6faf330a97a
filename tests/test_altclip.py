"""altclip.py: stage 1 learns the teacher's hidden states, stage 2 keeps the image tower frozen,
HF AltCLIP folders reproduce transformers' features, both stages are exact under DDP and resume."""
import os
from types import SimpleNamespace

import pytest
import torch

import altclip
import clip
import data
import train
from test_train import check_sigterm_then_resume, check_two_ranks_equal_one_rank, rows

FAST = ["--workers", "0", "--val-size", "32", "--log-every", "1", "--warmup", "2", "--lr-schedule", "cosine", "--save-every", "0"]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny CLIP checkpoint as train.py writes it (a few steps, so its weights are not the init)."""
    out = str(tmp_path_factory.mktemp("teacher"))
    train.main(["--model", "clip", "--steps", "2", "--batch-size", "8", "--out", out, *FAST])
    return os.path.join(out, "checkpoint.pt")


@pytest.fixture(scope="module")
def stage1(teacher, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("stage1"))
    train.main(["--model", "altclip", "--teacher", teacher, "--steps", "2", "--batch-size", "8", "--out", out, *FAST])
    return os.path.join(out, "checkpoint.pt")


def args(**kw):
    base = dict(size="tiny", stage="distill", teacher=None, teacher_tokenizer=None, init=None, student=None,
                tokenizer=None)
    base.update(kw)
    return SimpleNamespace(**base)


def captions():
    ds = data.Synthetic(parallel=True)
    return list(ds.caption_corpus(200))


def test_stage1_loss_is_mse_to_the_teachers_eot_state(teacher):
    model = altclip.create(args(teacher=teacher), captions())
    ref, _ = clip.load(teacher)
    texts = ["a red circle", "a photo of a blue cross in the center"]
    tokens = ref.tokenizer(texts)
    with torch.no_grad():
        # The teacher is CLIP's own text tower: through the copied projection it gives CLIP's features.
        assert torch.allclose(model.text_projection(model.teacher(tokens)), ref.encode_text(tokens), atol=1e-5)
        assert torch.equal(model.visual.conv1.weight, ref.visual.conv1.weight)
    ds, t = data.Synthetic(parallel=True), model.transform(True)
    import numpy as np
    items = [t(ds.sample(i, np.random.default_rng(i)), np.random.default_rng(i)) for i in range(6)]
    assert "image" not in items[0]  # stage 1 reads text only
    batch = data.collate(items)
    out = model(batch)
    with torch.no_grad():
        x = ref.token_embedding(batch["teacher_text"]) + ref.positional_embedding
        x = ref.ln_final(ref.transformer(x, causal=True))
        eot = x[torch.arange(6), batch["teacher_text"].argmax(-1)]
    student = model.text_model.transformation(model.text_model.pre_LN(model.text_model.roberta(batch["text"], batch["text_mask"])))[:, 0]
    assert torch.allclose(model.loss(out), ((student - eot) ** 2).mean(), atol=1e-6)
    # Only the student learns in stage 1.
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"text_model"}


def test_stage1_student_sees_every_language():
    import numpy as np

    ds = data.Synthetic(parallel=True)
    tok = altclip.BertTokenizer.train(captions(), context_length=32)
    cfg = altclip.Config(stage="distill", vocab_size=tok.vocab_size, pad_id=tok.pad_id)
    t = altclip.Transform(cfg, tok, None, True, None)  # stage 1 reads no image
    seen = set()
    for i in range(60):
        sample = ds.sample(i, np.random.default_rng(i))
        ids = t(sample, np.random.default_rng(i))["text"]
        text = tok.tokenizer.decode(ids.tolist())
        seen |= {lang for lang, s in sample["texts"].items() if tok.tokenizer.decode(tok([s])[0][0].tolist()) == text}
        assert tok.tokenizer.token_to_id("[UNK]") not in ids.tolist()  # the vocabulary covers zh and de too
    assert seen == {"en", "zh", "de"}


def test_stage2_keeps_the_image_tower_bit_identical(stage1, teacher, tmp_path):
    out = str(tmp_path / "s2")
    train.main(["--model", "altclip", "--stage", "contrastive", "--init", stage1, "--steps", "3", "--batch-size", "8",
                "--out", out, *FAST])
    ckpt = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=True)
    ref = torch.load(teacher, weights_only=True)["model"]
    visual = {k: v for k, v in ckpt["model"].items() if k.startswith("visual.")}
    assert visual and all(torch.equal(v, ref[k]) for k, v in visual.items())
    assert not any(k.startswith("teacher.") for k in ckpt["model"])
    s1 = torch.load(stage1, weights_only=True)["model"]
    assert not torch.equal(ckpt["model"]["text_projection.weight"], s1["text_projection.weight"])  # stage 2 trains it
    n_trainable = sum(1 for k in ckpt["model"] if k.startswith(("text_model.", "text_projection", "logit_scale")))
    assert len(ckpt["optimizer"]["state"]) == n_trainable  # no optimizer state for the frozen tower
    model, _ = altclip.load(os.path.join(out, "checkpoint.pt"))
    assert model.encode_texts(["一个红色圆形", "a red circle"]).shape == (2, model.cfg.embed_dim)


def test_clear_errors(teacher, tmp_path):
    with pytest.raises(ValueError, match="needs --teacher"):
        altclip.create(args(), captions())
    fresh = altclip.create(args(stage="contrastive"), captions())  # no --init: fresh towers, both trained
    assert fresh.cfg.stage == "contrastive" and not fresh.cfg.lock_image
    assert all(p.requires_grad for p in fresh.visual.parameters())
    with pytest.raises(ValueError, match="not a checkpoint of altclip --stage distill"):
        altclip.create(args(stage="contrastive", init=teacher), captions())
    (tmp_path / "notclip.pt").write_bytes(b"")
    torch.save({"w": torch.zeros(1)}, tmp_path / "notclip.pt")
    with pytest.raises(ValueError, match="not a CLIP ViT checkpoint"):
        altclip.create(args(teacher=str(tmp_path / "notclip.pt")), captions())


def test_parallel_tsv_with_and_without_header(tmp_path, teacher):
    (tmp_path / "p.tsv").write_text("en\tzh\na red circle\t一个红色圆形\na blue cross\t\nonly one field\n"
                                    "a green square\t一个绿色正方形\n")
    ds = data.ParallelText(str(tmp_path / "p.tsv"))
    assert len(ds) == 4 and ds.sample(0, None) == {"text": "a red circle", "texts": {"en": "a red circle", "zh": "一个红色圆形"}}
    for bad in (1, 2):
        with pytest.raises(data.SampleError):
            ds.sample(bad, None)
    (tmp_path / "q.tsv").write_text("a red circle\tein roter Kreis\n")
    assert data.ParallelText(str(tmp_path / "q.tsv")).sample(0, None)["texts"] == {"en": "a red circle", "text1": "ein roter Kreis"}
    out = str(tmp_path / "run")
    train.main(["--model", "altclip", "--teacher", teacher, "--data", str(tmp_path / "p.tsv"), "--steps", "2",
                "--batch-size", "4", "--out", out, *FAST])
    assert rows(out)[1]["skipped_samples"] > 0  # the two bad lines, counted


def test_xlmr_style_unigram_tokenizer(tmp_path):
    from tokenizers import Tokenizer, pre_tokenizers, processors, decoders
    from tokenizers.models import Unigram

    pieces = [("<s>", 0.0), ("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁a", -1.0), ("▁red", -2.0),
              ("▁circle", -2.0), ("▁", -3.0), ("红", -3.0), ("色", -3.0)]
    tok = Tokenizer(Unigram(pieces, unk_id=3))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.save(str(tmp_path / "tokenizer.json"))
    t = altclip.BertTokenizer.from_file(str(tmp_path / "tokenizer.json"), context_length=8)
    ids, mask = t(["a red circle", "红色"])
    assert t.pad_id == 1 and ids[0, :5].tolist() == [0, 4, 5, 6, 2] and ids[0, 5:].eq(1).all()
    assert mask[1].sum() == 5 and ids[1, :5].tolist()[-1] == 2


def _hf_altclip(tmp_path, safe):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.AltCLIPConfig(
        text_config=dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=40, project_dim=24, pad_token_id=1),
        vision_config=dict(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=192,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    model = transformers.AltCLIPModel(cfg).eval()
    with torch.no_grad():  # make the layer norms and biases non-trivial
        for n, p in model.named_parameters():
            if "LayerNorm" in n or "layer_norm" in n or "layrnorm" in n or n.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    save(model, tmp_path, safe)
    return model


def save(model, folder, safe):
    # config.json from transformers; the weights as either file (newer transformers writes safetensors only)
    model.save_pretrained(str(folder))
    if not safe:
        os.remove(folder / "model.safetensors")
        torch.save(model.state_dict(), folder / "pytorch_model.bin")


@pytest.mark.parametrize("safe", [False, True], ids=["bin", "safetensors"])
def test_hf_altclip_folder_reproduces_transformers(tmp_path, safe):
    if safe:
        pytest.importorskip("safetensors")
    hf = _hf_altclip(tmp_path, safe)
    if not safe:  # older checkpoints: position_ids buffers, and the encoder.layers spelling
        sd = torch.load(tmp_path / "pytorch_model.bin", weights_only=True)
        sd = {k.replace("roberta.encoder.layer.", "roberta.encoder.layers."): v for k, v in sd.items()}
        sd["text_model.roberta.embeddings.position_ids"] = torch.arange(40)[None]
        torch.save(sd, tmp_path / "pytorch_model.bin")
    ours, preprocess = altclip.load(str(tmp_path))
    ids = torch.tensor([[0, 5, 17, 99, 2, 1, 1], [0, 44, 2, 1, 1, 1, 1]])
    mask = ids.ne(1).long()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref_t, ref_i = hf.get_text_features(input_ids=ids, attention_mask=mask), hf.get_image_features(pixel_values=images)
        ref_t = getattr(ref_t, "pooler_output", ref_t)
        ref_i = getattr(ref_i, "pooler_output", ref_i)
        assert torch.allclose(ours.encode_text(ids, mask.bool()), ref_t, atol=1e-4)
        assert torch.allclose(ours.encode_image(images), ref_i, atol=1e-4)
    assert ours.logit_scale.item() == pytest.approx(hf.logit_scale.item())


def test_student_from_an_hf_xlmr_folder(tmp_path, teacher):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.XLMRobertaConfig(vocab_size=60, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        intermediate_size=64, max_position_embeddings=40, type_vocab_size=1)
    hf = transformers.XLMRobertaModel(cfg, add_pooling_layer=True).eval()
    save(hf, tmp_path, safe=False)
    test_xlmr_style_unigram_tokenizer(tmp_path)  # a tokenizer.json beside the weights
    model = altclip.create(args(teacher=teacher, student=str(tmp_path)), captions())
    ids, mask = model.tokenizer(["a red circle", "红"])
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask.long()).last_hidden_state
        assert torch.allclose(model.text_model.roberta(ids, mask)[mask], ref[mask], atol=1e-5)


STAGE_ARGS = {"distill": lambda t, s: ["--teacher", t], "contrastive": lambda t, s: ["--stage", "contrastive", "--init", s]}


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_two_ranks_equal_one_rank(tmp_path, teacher, stage1, stage):
    check_two_ranks_equal_one_rank(tmp_path, ["--model", "altclip", *STAGE_ARGS[stage](teacher, stage1)])


@pytest.mark.slow
@pytest.mark.parametrize("stage", list(STAGE_ARGS))
def test_sigterm_then_resume_equals_uninterrupted(tmp_path, teacher, stage1, stage):
    check_sigterm_then_resume(tmp_path, ["--model", "altclip", *STAGE_ARGS[stage](teacher, stage1)])
