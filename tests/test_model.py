"""clip.py's model: OpenAI-layout checkpoints load strictly and give the reference forward's features."""
import argparse

import pytest
import torch
import torch.nn.functional as F

import clip
import train

SMALL = clip.Config(embed_dim=32, image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=1,
                    context_length=16, vocab_size=100, text_width=64, text_layers=2, text_heads=1, quick_gelu=True)


def block(x, sd, p, heads, mask=None):
    # OpenAI's ResidualAttentionBlock, sequence-first, through torch's reference multi-head attention.
    w = x.shape[-1]
    y = F.layer_norm(x, (w,), sd[p + "ln_1.weight"], sd[p + "ln_1.bias"])
    y, _ = F.multi_head_attention_forward(y, y, y, w, heads, sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"],
                                          None, None, False, 0.0, sd[p + "attn.out_proj.weight"],
                                          sd[p + "attn.out_proj.bias"], need_weights=False, attn_mask=mask)
    x = x + y
    y = F.layer_norm(x, (w,), sd[p + "ln_2.weight"], sd[p + "ln_2.bias"])
    y = F.linear(y, sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"])
    y = F.linear(y * torch.sigmoid(1.702 * y), sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"])
    return x + y


def reference_image(sd, images, layers, heads, patch):
    x = F.conv2d(images, sd["visual.conv1.weight"], stride=patch).flatten(2).permute(0, 2, 1)
    cls = sd["visual.class_embedding"] + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], 1) + sd["visual.positional_embedding"]
    x = F.layer_norm(x, x.shape[-1:], sd["visual.ln_pre.weight"], sd["visual.ln_pre.bias"]).permute(1, 0, 2)
    for i in range(layers):
        x = block(x, sd, f"visual.transformer.resblocks.{i}.", heads)
    x = F.layer_norm(x.permute(1, 0, 2)[:, 0], x.shape[-1:], sd["visual.ln_post.weight"], sd["visual.ln_post.bias"])
    return x @ sd["visual.proj"]


def reference_text(sd, tokens, layers, heads):
    x = sd["token_embedding.weight"][tokens] + sd["positional_embedding"]
    n = tokens.shape[1]
    mask = torch.full((n, n), float("-inf")).triu(1)
    x = x.permute(1, 0, 2)
    for i in range(layers):
        x = block(x, sd, f"transformer.resblocks.{i}.", heads, mask)
    x = F.layer_norm(x.permute(1, 0, 2), x.shape[-1:], sd["ln_final.weight"], sd["ln_final.bias"])
    return x[torch.arange(x.shape[0]), tokens.argmax(-1)] @ sd["text_projection"]


@pytest.fixture(scope="module")
def openai_state_dict():
    torch.manual_seed(0)
    sd = clip.CLIP(SMALL).state_dict()
    # Random values everywhere (norms and biases too), so a swapped or ignored tensor cannot go unnoticed.
    return {k: torch.randn_like(v) * (0.2 if v.ndim > 1 else 0.5) + (1.0 if "ln" in k and k.endswith("weight") else 0)
            for k, v in sd.items()}


def inputs():
    g = torch.Generator().manual_seed(1)
    images = torch.randn(3, 3, 32, 32, generator=g)
    tokens = torch.randint(1, 98, (3, 16), generator=g)
    tokens[:, 10:] = 0
    tokens[:, 9] = 99  # EOT is the highest id
    return images, tokens


def check(model, sd):
    images, tokens = inputs()
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(images), reference_image(sd, images, 2, 1, 8), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(model.encode_text(tokens), reference_text(sd, tokens, 2, 1), rtol=1e-5, atol=1e-5)


def test_plain_state_dict_loads_and_matches_reference(openai_state_dict, tmp_path):
    path = tmp_path / "ViT-small.pt"
    # OpenAI's archives carry these metadata entries beside the weights.
    torch.save({**openai_state_dict, "input_resolution": torch.tensor(32), "context_length": torch.tensor(16),
                "vocab_size": torch.tensor(100)}, path)
    model, preprocess = clip.load(str(path))
    assert model.cfg == SMALL
    check(model, openai_state_dict)


def test_torchscript_archive_loads(openai_state_dict, tmp_path):
    model = clip.CLIP(SMALL)
    model.load_state_dict(openai_state_dict)
    images, _ = inputs()
    traced = torch.jit.trace_module(model, {"encode_image": (images,)})
    traced.save(str(tmp_path / "jit.pt"))
    loaded, _ = clip.load(str(tmp_path / "jit.pt"))
    check(loaded, openai_state_dict)


def test_gelu_switch_changes_outputs(openai_state_dict, tmp_path):
    torch.save(openai_state_dict, tmp_path / "m.pt")
    quick, _ = clip.load(str(tmp_path / "m.pt"))
    exact, _ = clip.load(str(tmp_path / "m.pt"), quick_gelu=False)
    images, _ = inputs()
    with torch.no_grad():
        assert not torch.allclose(quick.encode_image(images), exact.encode_image(images), atol=1e-4)


def test_presets_have_openai_shapes():
    cfg = clip.CONFIGS["ViT-L-14"]
    assert (cfg.vision_width, cfg.vision_layers, cfg.patch_size, cfg.text_width, cfg.embed_dim) == (1024, 24, 14, 768, 768)
    sd = clip.CLIP(clip.CONFIGS["ViT-B-16"]).state_dict()
    assert sd["visual.positional_embedding"].shape == (197, 768) and sd["token_embedding.weight"].shape == (49408, 512)
    assert clip.config_from_state_dict(sd, quick_gelu=False) == clip.CONFIGS["ViT-B-16"]


def test_bad_checkpoints_say_what_is_wrong(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        clip.load(str(tmp_path / "missing.pt"))
    torch.save({"visual.layer1.0.conv1.weight": torch.zeros(1)}, tmp_path / "rn50.pt")
    with pytest.raises(ValueError, match="ResNet"):
        clip.load(str(tmp_path / "rn50.pt"))


def test_logit_scale_init_and_clamp():
    model = clip.CLIP(SMALL)
    assert abs(model.logit_scale.exp().item() - 1 / 0.07) < 1e-4
    tiny = clip.CONFIGS["tiny"]  # the tiny preset starts sharper; SigLIP keeps its own start
    assert clip.CLIP(tiny).logit_scale.exp().item() == pytest.approx(tiny.init_logit_scale)
    assert clip.CLIP(clip.Config(**{**vars(tiny), "loss": "sigmoid"})).logit_scale.exp().item() == pytest.approx(10.0)
    with torch.no_grad():
        model.logit_scale.fill_(10.0)
    model.after_step()
    assert abs(model.logit_scale.exp().item() - 100) < 1e-3


def test_create_trains_tokenizer_and_rebuilds_from_extra_state():
    args = argparse.Namespace(size="tiny", tokenizer=None, quick_gelu=False)
    model = clip.create(args, ["a red circle on a gray background", "a blue square"] * 50)
    again = clip.create(None, extra=model.extra_state())
    assert again.cfg == model.cfg
    torch.testing.assert_close(again.tokenizer(["a red square"]), model.tokenizer(["a red square"]))


# open_clip 3.3.0's models of these names, counted on the meta device (logit_scale included).
LARGE = {"ViT-H-14": 986_109_441, "ViT-g-14": 1_366_678_273, "ViT-bigG-14": 2_539_567_105}


@pytest.mark.parametrize("name", LARGE)
def test_large_presets_have_open_clips_parameter_counts(name):
    with torch.device("meta"):
        ours = sum(p.numel() for p in clip.CLIP(clip.CONFIGS[name]).parameters())
    assert ours == LARGE[name] and train.open_clip_name(clip, clip.CONFIGS[name]) == name
    try:
        import open_clip
    except ImportError:
        return
    with torch.device("meta"):
        theirs = open_clip.create_model(name, device="meta")
    assert sum(p.numel() for p in theirs.parameters()) == ours
