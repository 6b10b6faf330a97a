"""Every model in train.py's registry implements the interface train.py relies on, and builds from
keywords (build) exactly as train.py's create(args) does."""
import importlib
import io

import numpy as np
import pytest
import torch

import clip
import data
import train
from train import MODELS

MODULE_FUNCTIONS = ("add_args", "create", "build", "load", "predict_main")
MODEL_METHODS = ("transform", "forward", "loss", "after_step", "encode_texts", "extra_state", "shard_units",
                 "optimizer_groups", "towers", "classify")
CAPTIONS = [c for i in range(40) for c in data.Synthetic().captions(i)[0]]


def parsed(name, *flags):
    """The model's module and train.py's own parse of its flags."""
    module = importlib.import_module(name)
    return module, train.build_parser(module).parse_args(["--model", name, "--batch-size", "8", *flags])


@pytest.mark.parametrize("name", MODELS)
def test_registered_model_has_the_interface(name):
    module, args = parsed(name)
    missing = [f for f in MODULE_FUNCTIONS if not callable(getattr(module, f, None))]
    assert not missing, f"{name}.py lacks {missing}"
    if name == "altclip":  # stage 1 needs a teacher; tests/test_altclip.py builds one
        return
    torch.manual_seed(0)
    model = module.create(args, CAPTIONS)
    missing = [m for m in MODEL_METHODS if not callable(getattr(model, m, None))]
    assert not missing, f"{name}'s model lacks {missing}"
    sample = data.Synthetic().sample(0, np.random.default_rng(0))
    batch = data.collate([model.transform(True)(sample, np.random.default_rng(i)) for i in range(4)])
    loss = model.loss(model(batch))
    assert loss.dim() == 0 and torch.isfinite(loss)
    blocks, towers = model.shard_units()
    assert blocks and towers
    # the recipe's AdamW groups: decay on weight matrices only; every trainable parameter in one group
    decay, no_decay = model.optimizer_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.ndim >= 2 for p in decay["params"]) and any(p.ndim == 1 for p in no_decay["params"])
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert sorted(id(p) for g in (decay, no_decay) for p in g["params"]) == sorted(trainable)
    # train.py's crop (data.RandomCrop) in place of the model's preprocessing; under --gpu-decode it leaves
    # JPEG files encoded and train.py's hand-over (data.to_device) decodes them on the device
    images = data.RandomCrop(model.cfg.image_size, defer=True)
    if name == "brivl":  # its own augmentation, no crop
        with pytest.raises(ValueError, match="without --gpu-decode"):
            model.transform(True, images=images)
        return
    buf = io.BytesIO()
    sample["image"].save(buf, format="JPEG")
    transform = model.transform(True, images=images)
    items = [transform(dict(sample, image=data.open_image(buf.getvalue(), "x.jpg")), np.random.default_rng(i))
             for i in range(4)]
    assert all(isinstance(it["image"], dict) for it in items)
    batch = data.collate(items)
    finished = data.to_device(transform.finish(batch) if hasattr(transform, "finish") else batch, torch.device("cpu"),
                              images, [])
    assert finished["image"].shape == (4, 3, model.cfg.image_size, model.cfg.image_size)
    assert finished["image"].dtype == torch.uint8
    assert torch.isfinite(model.loss(model(finished)))


CASES = {  # train.py flags, and the same model as build()'s keywords
    "clip": (["--lock-image"], dict(size="tiny", lock_image=True)),
    "laclip": (["--multi-text", "--max-rewrites", "2"], dict(size="tiny", text_sets=3)),
    "clippo": (["--pool", "map"], dict(size="tiny", pool="map")),
    "brivl": (["--queue-size", "16", "--momentum", "0.9"], dict(size="tiny", queue_size=16, momentum=0.9, batch_size=8)),
}


@pytest.mark.parametrize("name", CASES)
def test_build_from_keywords_equals_create(name):
    flags, kwargs = CASES[name]
    module, args = parsed(name, *flags)
    torch.manual_seed(0)
    ours = module.create(args, CAPTIONS)
    torch.manual_seed(0)
    built = module.build(**kwargs) if name == "clippo" else module.build(**kwargs, captions=CAPTIONS)
    assert built.extra_state() == ours.extra_state()
    a, b = ours.state_dict(), built.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [n for n, p in ours.named_parameters() if not p.requires_grad] == \
        [n for n, p in built.named_parameters() if not p.requires_grad]


def test_build_rejects_what_it_does_not_know():
    with pytest.raises(ValueError, match="unknown --size"):
        clip.build("ViT-X-99", captions=CAPTIONS)
    import brivl
    with pytest.raises(TypeError, match="unknown keywords"):
        brivl.build("tiny", captions=CAPTIONS, queue=16)
