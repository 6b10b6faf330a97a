"""The fast input path (header-only reads, JPEG draft decoding, uint8 pixels normalised by the model)
against the old one (a full decode on reading, float32 out of the transform)."""
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


def old_path(payload, train, seed, size=32):
    """The transform as it was: the image decoded in full on reading, normalised to float32 in the worker."""
    img = Image.open(io.BytesIO(payload)).convert("RGB")
    w, h = img.size
    t = clip.ImageTransform(size, train)
    if train:
        img = img.resize((size, size), Image.BICUBIC, box=t.crop_box(w, h, np.random.default_rng(seed)))
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
        shipped = clip.ImageTransform(32, train, uint8=True)(data.open_image(payload, "x"), np.random.default_rng(seed))
        assert shipped.dtype == torch.uint8
        assert torch.equal(clip.normalize_pixels(shipped, clip.MEAN, clip.STD), old_path(payload, train, seed))


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
@pytest.mark.parametrize("train", [True, False])
def test_downscales_through_torch_stay_within_the_resampling_bound(fmt, train):
    # Downscales run through torch's antialiased bicubic: the same crop, pixels within RESAMPLE_MAX.
    mean = torch.tensor(clip.MEAN).view(3, 1, 1)
    std = torch.tensor(clip.STD).view(3, 1, 1)
    for side, size, seed in ((40, 32, 0), (256, 224, 1), (500, 224, 2)):
        payload = picture(side, seed, fmt)
        new = clip.ImageTransform(size, train, uint8=True, draft=False)(data.open_image(payload, "x"),
                                                                         np.random.default_rng(seed)).float()
        old = (old_path(payload, train, seed, size) * std + mean) * 255
        diff = (new - old).abs()
        assert diff.max() <= RESAMPLE_MAX and diff.mean() <= RESAMPLE_MEAN, (side, diff.max(), diff.mean())


@pytest.mark.parametrize("train", [True, False])
def test_draft_decodes_smaller_keeps_the_crop_and_bounds_the_pixel_error(train):
    for side, seed in ((512, 0), (1024, 1), (2048, 2)):
        payload = picture(side, seed)
        fast_img, full_img = data.open_image(payload, "x"), data.open_image(payload, "x")
        fast = clip.ImageTransform(224, train, uint8=True)(fast_img, np.random.default_rng(seed)).float()
        full = clip.ImageTransform(224, train, uint8=True, draft=False)(full_img, np.random.default_rng(seed)).float()
        assert fast_img.size[0] < side and full_img.size[0] == side  # the decoder really scaled down
        assert fast_img.size[0] * 224 / side < 256 or side == 512  # and no further than the crop allows
        diff = (fast - full).abs()
        assert diff.max() <= DRAFT_MAX and diff.mean() <= DRAFT_MEAN, (side, diff.max(), diff.mean())
        # the same crop: another crop of the same image differs by far more than the resampling does
        other = clip.ImageTransform(224, True, uint8=True, draft=False)(data.open_image(payload, "x"),
                                                                         np.random.default_rng(seed + 100)).float()
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
    batches = data.ShardBatches(data.Shards(str(tmp_path / "000000.tar"), buffer=1), model.transform(True), 7)
    batch, info = next(iter(data.loader(batches)))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (7, 3, 48, 48)
    assert info["skips"] == ["unreadable image"]
    with pytest.raises(data.SampleError, match=r"000000\.tar:000000003\.jpg"):
        img = data.open_image(whole[: len(whole) // 2], f"{tmp_path / '000000.tar'}:000000003.jpg")
        data.apply(model.transform(True), {"image": img, "text": "x"}, np.random.default_rng(0), "here")
