"""Image preparation on real odd images made here: EXIF, CMYK, 16-bit, alpha, palette, sizes, bombs."""

import math
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from eve_megatron.data.images import (ImageConfig, ImageError, anyratio_size, decode_rgb,
                                      image_token_count, load_image, prepare_image)
from tests.unit._data_helpers import encode, random_rgb

PNG = ImageConfig(max_size=800, encode_format="png")


def _ref_size(w, h, m):
    scale = min(1.0, m / math.sqrt(w * h))
    return tuple(max(32, 32 * int(math.floor(x * scale / 32 + 0.5))) for x in (w, h))


def test_anyratio_matches_independent_rule_on_random_sizes():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        w, h, m = int(rng.integers(1, 6000)), int(rng.integers(1, 6000)), int(rng.choice([800, 1600]))
        got = anyratio_size(w, h, m)
        assert got == _ref_size(w, h, m)
        assert got[0] % 32 == 0 and got[1] % 32 == 0 and min(got) >= 32
        if w * h <= m * m:  # never scaled down, only rounded
            assert abs(got[0] - w) <= 32 and abs(got[1] - h) <= 32


def test_token_counts_reference_values():
    assert image_token_count(50, 50) == 2551 and image_token_count(25, 25) == 651
    assert anyratio_size(1600, 1600, 1600) == (1600, 1600)
    assert anyratio_size(3200, 3200, 800) == (800, 800)


def test_exif_rotated_jpeg_is_made_upright():
    arr = random_rgb(64, 32, seed=1)  # W=64, H=32
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90 degrees clockwise
    data = encode(Image.fromarray(arr), "JPEG", quality=100, exif=exif.tobytes())
    out = np.asarray(load_image(data, 10**8)).astype(int)
    assert out.shape == (64, 32, 3)
    want = np.rot90(arr, k=-1).astype(int)
    assert np.abs(out - want).mean() < 4 < np.abs(out - np.rot90(arr, k=1)).mean()


def test_cmyk_jpeg_becomes_rgb():
    img = Image.new("CMYK", (40, 30), (0, 255, 255, 0))  # pure red in CMYK
    out = np.asarray(load_image(encode(img, "JPEG", quality=100), 10**8)).astype(int)
    assert out.shape == (30, 40, 3)
    assert np.abs(out - [255, 0, 0]).max() <= 3


def test_16bit_png_scaled_to_8bit():
    rng = np.random.default_rng(2)
    v = rng.integers(0, 65536, (33, 47), dtype=np.uint16)
    img = Image.fromarray(v)
    assert img.mode.startswith("I;16")
    data = encode(img, "PNG")
    out = np.asarray(load_image(data, 10**8))
    want = np.floor(v.astype(np.float64) / 257 + 0.5).astype(np.uint8)
    assert out.shape == (33, 47, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], want)


def test_rgba_png_alpha_dropped_by_default_or_flattened_onto_white():
    rng = np.random.default_rng(3)
    rgba = rng.integers(0, 256, (21, 19, 4), dtype=np.uint8)
    data = encode(Image.fromarray(rgba), "PNG")
    dropped = np.asarray(load_image(data, 10**8))
    np.testing.assert_array_equal(dropped, rgba[..., :3])  # the reference's convert("RGB")
    out = np.asarray(load_image(data, 10**8, alpha="white")).astype(float)
    c, a = rgba[..., :3].astype(float), rgba[..., 3:].astype(float) / 255
    want = np.floor(c * a + 255 * (1 - a) + 0.5)
    assert np.abs(out - want).max() <= 1  # rounding of the integer formula
    assert (out[rgba[..., 3] == 0] == 255).all()
    with pytest.raises(ValueError, match="alpha"):
        ImageConfig(alpha="black")


def test_palette_gif_with_and_without_transparency():
    rng = np.random.default_rng(4)
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    idx = rng.integers(0, 16, (25, 30), dtype=np.uint8)
    img = Image.fromarray(idx).convert("P")
    img.putdata(idx.flatten().tolist())
    img.putpalette(palette.flatten().tolist())
    out = np.asarray(load_image(encode(img, "GIF"), 10**8))
    np.testing.assert_array_equal(out, palette[idx])
    transparent = encode(img, "GIF", transparency=3)
    np.testing.assert_array_equal(np.asarray(load_image(transparent, 10**8)), palette[idx])
    out_t = np.asarray(load_image(transparent, 10**8, alpha="white"))
    want = palette[idx].copy()
    want[idx == 3] = 255
    np.testing.assert_array_equal(out_t, want)


@pytest.mark.parametrize("size,max_size,want", [((20, 50), 800, (32, 64)),
                                                ((4000, 300), 800, (2912, 224)),
                                                ((1000, 1000), 1600, (992, 992))])
def test_prepare_image_sizes_and_bicubic_pixels(size, max_size, want):
    arr = random_rgb(*size, seed=5)
    data, hp, wp = prepare_image(encode(Image.fromarray(arr), "PNG"),
                                 ImageConfig(max_size=max_size, encode_format="png"))
    assert (wp * 32, hp * 32) == want == _ref_size(*size, max_size)
    ref = np.asarray(Image.fromarray(arr).resize(want, Image.BICUBIC))
    np.testing.assert_array_equal(decode_rgb(data), ref)


def test_jpeg_storage_is_close_to_lossless_resize():
    arr = random_rgb(900, 700, seed=6)
    data, hp, wp = prepare_image(encode(Image.fromarray(arr), "PNG"), ImageConfig(max_size=800))
    ref = np.asarray(Image.fromarray(arr).resize((wp * 32, hp * 32), Image.BICUBIC)).astype(int)
    assert data[:2] == b"\xff\xd8" and np.abs(decode_rgb(data).astype(int) - ref).mean() < 2


def _png_header_only(w, h):
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")


def test_bad_images_are_refused_with_reasons():
    good = encode(Image.fromarray(random_rgb(64, 64, 7)), "JPEG")
    cases = {"decompression_bomb": [_png_header_only(100000, 100000)],
             "bad_image": [good[:len(good) // 2], b"not an image at all", b""]}
    for reason, blobs in cases.items():
        for blob in blobs:
            with pytest.raises(ImageError) as err:
                prepare_image(blob, PNG)
            assert err.value.reason == reason
    with pytest.raises(ImageError) as err:  # a configured limit below the image's size
        prepare_image(good, ImageConfig(max_pixels=64 * 64 - 1))
    assert err.value.reason == "decompression_bomb"
    prepare_image(good, ImageConfig(max_pixels=64 * 64))


def test_config_validation():
    for bad in (dict(max_size=16), dict(encode_format="bmp"), dict(jpeg_quality=0), dict(max_pixels=0)):
        with pytest.raises(ValueError):
            ImageConfig(**bad)
