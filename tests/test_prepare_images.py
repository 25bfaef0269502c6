"""prepare.images: sizes, RGB conversion, draft mode accuracy, process pool, clear errors."""
import numpy as np
import pytest
from PIL import Image

from prepare import images
from prepare.core import PrepareError
from tests.fixtures import write_image


def test_target_size():
    assert images.target_size(500, 375, 256) == (341, 256)
    assert images.target_size(375, 500, 256) == (256, 341)
    assert images.target_size(640, 640, 128) == (128, 128)
    assert images.target_size(100, 300, 256, "square") == (256, 256)
    with pytest.raises(PrepareError, match="unknown resize mode 'crop'"):
        images.target_size(1, 1, 1, "crop")


def test_modes_and_color_conversion(tmp_path):
    for n, (mode, name) in enumerate([("L", "g.jpg"), ("CMYK", "c.jpg"), ("RGB", "p.png")]):
        src = write_image(tmp_path / name, size=(90, 60), mode=mode, seed=n)
        orig, mean = images.resize_image(src, tmp_path / "out" / (name + ".jpg"), 30)
        with Image.open(tmp_path / "out" / (name + ".jpg")) as img:
            assert orig == (90, 60) and img.size == (45, 30) and img.mode == "RGB" and img.format == "JPEG"
        with Image.open(src) as raw:  # the mean is of the resized image before JPEG encoding: close to the file's
            expect = np.asarray(raw.convert("RGB").resize((45, 30), Image.Resampling.BICUBIC), np.float64)
        assert np.allclose(mean, expect.reshape(-1, 3).mean(0), atol=1e-9)
    images.resize_image(tmp_path / "g.jpg", tmp_path / "sq.jpg", 32, "square")
    assert Image.open(tmp_path / "sq.jpg").size == (32, 32)


def test_draft_only_for_large_jpegs_and_close_to_full_decode(tmp_path):
    # a smooth image (draft's DCT scaling is exact enough on natural-image-like content)
    yy, xx = np.mgrid[0:480, 0:640]
    arr = np.stack([xx * 255 // 640, yy * 255 // 480, (xx + yy) * 255 // 1120], -1).astype(np.uint8)
    src = tmp_path / "big.jpg"
    Image.fromarray(arr).save(src, quality=95)
    fast, _ = images.load_resized(src, 64, draft=True)
    full, _ = images.load_resized(src, 64, draft=False)
    assert fast.size == full.size == (85, 64)
    diff = np.abs(np.asarray(fast, np.float32) - np.asarray(full, np.float32))
    assert diff.mean() < 1.5
    # draft is used only when the original is >= 2x the target: at S=256 nothing changes
    a, _ = images.load_resized(src, 256, draft=True)
    b, _ = images.load_resized(src, 256, draft=False)
    assert np.array_equal(np.asarray(a), np.asarray(b))


def test_pool_equals_serial_and_errors_name_the_file(tmp_path):
    srcs = [write_image(tmp_path / "raw" / f"{i}.jpg", size=(40 + i, 30), seed=i) for i in range(40)]
    serial = images.resize_many([(s, tmp_path / "a" / s.name) for s in srcs], 16, workers=1)
    pooled = images.resize_many([(s, tmp_path / "b" / s.name) for s in srcs], 16, workers=2)
    assert serial == pooled and [size for size, _ in serial] == [(40 + i, 30) for i in range(40)]
    for s in srcs:
        assert (tmp_path / "a" / s.name).read_bytes() == (tmp_path / "b" / s.name).read_bytes()
    bad = srcs[33]
    bad.write_bytes(bad.read_bytes()[:300])
    with pytest.raises(PrepareError, match=r"image .*33\.jpg: cannot decode it"):
        images.resize_many([(s, tmp_path / "c" / s.name) for s in srcs], 16, workers=2)
    (tmp_path / "text.jpg").write_text("not an image")
    with pytest.raises(PrepareError, match=r"text\.jpg: cannot decode it"):
        images.resize_image(tmp_path / "text.jpg", tmp_path / "x.jpg", 16)
    with pytest.raises(PrepareError, match=r"nothing\.jpg: no such file"):
        images.resize_image(tmp_path / "nothing.jpg", tmp_path / "x.jpg", 16)
