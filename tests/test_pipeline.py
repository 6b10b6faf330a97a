"""The fast input path (header-only reads, JPEG draft decoding, uint8 pixels normalised by the model):
data.py's training crop (RandomCrop) and the models' evaluation preprocessing (clip.ImageTransform)
against the plain one (a full decode on reading, Pillow's resize, float32 out of the transform)."""
import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import data

# Largest and mean |difference| (0-255 scale) between a drafted decode (its box on the nearest whole
# pixels of the smaller image) and a full one of the same crop, on noisy 512-2048 px JPEGs (measured
# 2026-11-23: at most 37, and 3.0 on average).
DRAFT_MAX, DRAFT_MEAN = 48, 4.0
# torch's antialiased bicubic against Pillow's on the same whole-pixel box, noisy 40-500 px images
# (measured 2026-11-23: at most 8 levels, 0.01 on average).
RESAMPLE_MAX, RESAMPLE_MEAN = 10, 0.05


def picture(side, seed, fmt="JPEG"):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:side, 0:side]
    c = rng.uniform(0, 255, (3, 3))
    img = c[:, 0] + c[:, 1] * np.sin(xx[..., None] / (side / 15) + c[:, 2]) * 0.4 + yy[..., None] * 0.05 \
        + rng.normal(0, 20, (side, side, 3))
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def transform(size, train, draft=True, defer=False):
    """uint8 pixels: the training crop (data.py) or the evaluation preprocessing (the model file's)."""
    if train:
        return data.RandomCrop(size, draft=draft, defer=defer)
    assert draft and not defer  # evaluation always drafts a large JPEG, and decodes in the worker
    return clip.ImageTransform(size, clip.MEAN, clip.STD, uint8=True)


def old_path(payload, train, seed, size=32):
    """The plain path: the image decoded in full on reading, Pillow's resize, float32 in the worker."""
    img = Image.open(io.BytesIO(payload)).convert("RGB")
    w, h = img.size
    if train:
        img = img.resize((size, size), Image.BICUBIC, box=data.RandomCrop(size).box(w, h, np.random.default_rng(seed)))
    else:
        r = size / min(w, h)
        img = img.resize((max(size, round(w * r)), max(size, round(h * r))), Image.BICUBIC)
        left, top = (img.size[0] - size) // 2, (img.size[1] - size) // 2
        img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255)
    return (x - torch.tensor(clip.MEAN).view(3, 1, 1)) / torch.tensor(clip.STD).view(3, 1, 1)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("train", [True, False])
def test_uint8_pixels_normalised_by_the_model_equal_the_old_path(fmt, train):
    # Upscales (the synthetic set's 64 px to the model's size) keep Pillow's resampling: bit for bit.
    for seed in range(4):
        payload = picture(24, seed, fmt)
        shipped = transform(32, train)(data.open_image(payload, "x"), np.random.default_rng(seed))
        assert shipped.dtype == torch.uint8
        assert torch.equal(clip.normalize_pixels(shipped, clip.MEAN, clip.STD), old_path(payload, train, seed))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("train", [True, False])
def test_downscales_stay_within_the_resampling_bound(fmt, train):
    # Training's downscales run through torch's antialiased bicubic: the same crop, pixels within
    # RESAMPLE_MAX. Evaluation resizes with Pillow, as open_clip and OpenAI do: the same pixels where
    # the decoder does not draft (a PNG, or a JPEG less than twice the size).
    mean = torch.tensor(clip.MEAN).view(3, 1, 1)
    std = torch.tensor(clip.STD).view(3, 1, 1)
    for side, size, seed in ((40, 32, 0), (256, 224, 1), (500, 224, 2)):
        payload = picture(side, seed, fmt)
        new = transform(size, train, draft=not train)(data.open_image(payload, "x"), np.random.default_rng(seed)).float()
        old = ((old_path(payload, train, seed, size) * std + mean) * 255).round()
        diff = (new - old).abs()
        if train:
            assert diff.max() <= RESAMPLE_MAX and diff.mean() <= RESAMPLE_MEAN, (side, diff.max(), diff.mean())
        elif fmt == "PNG" or side < 2 * size:
            assert diff.max() == 0, (side, diff.max())


@pytest.mark.parametrize("train", [True, False])
def test_draft_decodes_smaller_keeps_the_crop_and_bounds_the_pixel_error(train):
    for side, seed in ((512, 0), (1024, 1), (2048, 2)):
        payload = picture(side, seed)
        fast_img, full_img = data.open_image(payload, "x"), data.open_image(payload, "x")
        if not train:  # a file decoded before it reaches the preprocessing: no draft
            full_img.load()
        fast = transform(224, train)(fast_img, np.random.default_rng(seed)).float()
        full = (transform(224, True, draft=False)(full_img, np.random.default_rng(seed)) if train else
                clip.ImageTransform(224, clip.MEAN, clip.STD, uint8=True)(full_img)).float()
        assert fast_img.size[0] < side and (full_img.size[0] == side or not train)  # the decoder really scaled down
        assert fast_img.size[0] * 224 / side < 256 or side == 512  # and no further than the crop allows
        diff = (fast - full).abs()
        assert diff.max() <= DRAFT_MAX and diff.mean() <= DRAFT_MEAN, (side, diff.max(), diff.mean())
        # the same crop: another crop of the same image differs by far more than the resampling does
        other = transform(224, True, draft=False)(data.open_image(payload, "x"), np.random.default_rng(seed + 100)).float()
        if train:
            assert (fast - other).abs().mean() > 2 * diff.mean()


def test_model_normalises_uint8_batches_as_it_takes_float_ones():
    model = clip.build("tiny", captions=["a red circle", "a blue square"] * 20).eval()
    transform = model.transform(False)
    payloads = [picture(80, s) for s in range(3)]
    shipped = torch.stack([transform({"image": data.open_image(p, "x"), "text": "a"}, None)["image"] for p in payloads])
    floats = torch.stack([model.preprocess()(Image.open(io.BytesIO(p))) for p in payloads])
    assert shipped.dtype == torch.uint8 and floats.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(model.encode_image(shipped), model.encode_image(floats), rtol=0, atol=0)


def test_a_truncated_jpeg_decodes_in_the_transform_and_is_skipped_and_counted(tmp_path):
    whole = picture(64, 0)
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for i in range(8):
            payload = whole[: len(whole) // 2] if i == 3 else whole  # a header that reads, pixels that do not
            for ext, body in (("jpg", payload), ("txt", f"picture {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    model = clip.build("tiny", captions=["picture 1"] * 10)
    crop = model.transform(True, images=data.RandomCrop(48))
    batches = data.ShardBatches(data.Shards(str(tmp_path / "000000.tar"), buffer=1), crop, 7)
    batch, info = next(iter(data.loader(batches)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (7, 3, 48, 48)
    assert info["skips"] == ["unreadable image"]
    with pytest.raises(data.SampleError, match=r"000000\.tar:000000003\.jpg"):
        img = data.open_image(whole[: len(whole) // 2], f"{tmp_path / '000000.tar'}:000000003.jpg")
        data.apply(crop, {"image": img, "text": "x"}, np.random.default_rng(0), "here")


# --gpu-decode: the loader workers leave JPEGs encoded and draw their boxes; RandomCrop.finish
# decodes, crops and resizes the batch on the device. Run here on the CPU (torchvision's libjpeg-turbo
# decoder), the tests pin the boxes and the resampling; tests/test_gpu.py bounds nvjpeg's pixels.
# Upscales: torch's antialiased bicubic against Pillow's (the CPU path's) on noisy 24-64 px JPEGs
# (measured 2026-11-23: at most 25 levels, 0.11 on average).
UPSCALE_MAX, UPSCALE_MEAN = 32, 0.3


def deferred_and_finished(payload, seed, size=224, device="cpu"):
    item = data.RandomCrop(size, defer=True)(data.open_image(payload, "x"), np.random.default_rng(seed))
    assert isinstance(item, dict) and item["jpeg"] == payload  # left encoded for the device
    return data.RandomCrop(size).finish([item], device)[0]


def test_device_decode_draws_the_same_boxes_and_resamples_as_the_worker_path():
    for side, seed in ((256, 0), (700, 1), (1024, 2)):
        payload = picture(side, seed)
        device = deferred_and_finished(payload, seed).float()
        full = data.RandomCrop(224, draft=False)(data.open_image(payload, "x"), np.random.default_rng(seed)).float()
        drafted = data.RandomCrop(224)(data.open_image(payload, "x"), np.random.default_rng(seed)).float()
        assert torch.equal(device, full), side  # the same decoder, box and resampler: the same pixels
        diff = (device - drafted).abs()  # against the default worker path, which drafts
        assert diff.max() <= DRAFT_MAX and diff.mean() <= DRAFT_MEAN, (side, diff.max(), diff.mean())
    for side, seed in ((24, 3), (40, 4), (64, 5)):  # upscales to 224: Pillow's kernel on the worker path
        payload = picture(side, seed)
        diff = (deferred_and_finished(payload, seed).float() - data.RandomCrop(224)(
            data.open_image(payload, "x"), np.random.default_rng(seed)).float()).abs()
        assert diff.max() <= UPSCALE_MAX and diff.mean() <= UPSCALE_MEAN, (side, diff.max(), diff.mean())


def test_what_the_device_decodes_and_what_the_workers_still_do():
    defer = data.RandomCrop(32, defer=True)
    rng = np.random.default_rng
    whole = picture(64, 0)
    gray = io.BytesIO()
    Image.open(io.BytesIO(whole)).convert("L").save(gray, format="JPEG")
    cmyk = io.BytesIO()
    Image.open(io.BytesIO(whole)).convert("CMYK").save(cmyk, format="JPEG")
    assert isinstance(defer(data.open_image(whole + b"\0" * 7, "x"), rng(0)), dict)  # padding after the end marker
    item = defer(data.open_image(gray.getvalue(), "x"), rng(0))
    assert isinstance(item, dict)  # grayscale: the device decoder expands it to RGB, as Pillow does
    assert torch.equal(data.RandomCrop(32).finish([item], "cpu")[0], data.RandomCrop(32)(data.open_image(gray.getvalue(), "x"), rng(0)))
    for payload in (picture(64, 1, "PNG"), cmyk.getvalue()):  # other formats and modes: decoded in the worker
        assert defer(data.open_image(payload, "x"), rng(0)).dtype == torch.uint8
    assert defer(Image.open(io.BytesIO(whole)), rng(0)).dtype == torch.uint8  # no file bytes attached
    with pytest.raises(OSError):  # truncated: no end marker, so the worker decodes it, fails, and skips it
        defer(data.open_image(whole[: len(whole) // 2], "x"), rng(0))


def test_finish_falls_back_to_pillow_then_to_a_counted_black_image(monkeypatch):
    defer = data.RandomCrop(32, defer=True)
    payloads = [picture(64, s) for s in range(3)]
    items = [defer(data.open_image(p, "x"), np.random.default_rng(s)) for s, p in enumerate(payloads)]
    items.append(data.RandomCrop(32)(data.open_image(picture(64, 3, "PNG"), "x"), np.random.default_rng(3)))  # ready pixels
    no_scan = payloads[1][: payloads[1].find(b"\xff\xda")] + b"\xff\xd9"  # an end marker, no image data
    items[1] = dict(items[1], jpeg=no_scan)
    expected = data.RandomCrop(32).finish(items, "cpu", notes := [])
    assert expected.shape == (4, 3, 32, 32) and torch.equal(expected[3], items[3])
    assert notes == ["unreadable image on the device: a black image in its place"] and expected[1].max() == 0
    # a file the device decoder refuses but Pillow reads: Pillow's pixels, nothing counted
    real = data.decode_jpegs
    monkeypatch.setattr(data, "decode_jpegs", lambda jpegs, device: [None] + real(jpegs[1:], device))
    again = data.RandomCrop(32).finish(items, "cpu", notes := [])
    assert torch.equal(again[0], expected[0]) and notes == ["unreadable image on the device: a black image in its place"]


def test_deferred_batches_cross_worker_processes_and_train(tmp_path):
    with tarfile.open(tmp_path / "000000.tar", "w") as tar:
        for i in range(12):
            for ext, body in (("jpg", picture(64, i) if i != 5 else picture(64, i, "PNG")),
                              ("txt", f"picture {i}".encode())):
                info = tarfile.TarInfo(f"{i:09d}.{'png' if ext == 'jpg' and i == 5 else ext}")
                info.size = len(body)
                tar.addfile(info, io.BytesIO(body))
    model = clip.build("tiny", captions=["picture 1"] * 10)
    shards = data.Shards(str(tmp_path / "000000.tar"), buffer=1)
    crop = data.RandomCrop(48)
    worker_path = next(iter(data.loader(data.ShardBatches(shards, model.transform(True, crop), 12, workers=1), workers=1)))[0]
    deferring = data.RandomCrop(48, defer=True)
    transform = model.transform(True, images=deferring)
    batch, info = next(iter(data.loader(data.ShardBatches(shards, transform, 12, workers=1), workers=1)))
    assert sum(isinstance(x, dict) for x in batch["image"]) == 11  # the PNG was decoded in the worker
    finished = data.to_device(transform.finish(batch), torch.device("cpu"), deferring, info["notes"])
    assert finished["image"].shape == worker_path["image"].shape and torch.equal(finished["text"], clip.trim_padding(worker_path["text"]))
    assert torch.equal(finished["image"], worker_path["image"])  # 64 px to 48, no draft: the same pixels
    loss = model.loss(model(finished))
    loss.backward()
    assert torch.isfinite(loss) and model.logit_scale.grad is not None
