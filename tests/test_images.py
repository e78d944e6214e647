"""Training-image intake: real files written by Pillow into tmp_path, good and bad."""

from __future__ import annotations

import io
import shutil
import tempfile
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from share_diffusion.images import (
    DEFAULT_MAX_PIXELS,
    IMAGE_EXTENSIONS,
    ImageSet,
    NoUsableImagesError,
    Rejected,
    TrainingImage,
    load_training_images,
)

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def save(path: Path, image: Image.Image, fmt: str | None = None, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, fmt, **kwargs)
    return path


def solid(path: Path, color=RED, size=(64, 64), fmt: str | None = None) -> Path:
    return save(path, Image.new("RGB", size, color), fmt)


def png_claiming(path: Path, width: int, height: int) -> Path:
    """A valid 1×1 PNG whose IHDR (CRC fixed up) claims width×height: a cheap decompression bomb."""
    buf = io.BytesIO()
    Image.new("L", (1, 1)).save(buf, "PNG")
    data = bytearray(buf.getvalue())
    assert data[12:16] == b"IHDR"
    data[16:20] = width.to_bytes(4, "big")
    data[20:24] = height.to_bytes(4, "big")
    data[29:33] = zlib.crc32(bytes(data[12:29])).to_bytes(4, "big")
    path.write_bytes(bytes(data))
    return path


def only_image(result: ImageSet) -> TrainingImage:
    assert result.rejected == [], result.rejected
    assert len(result.images) == 1
    return result.images[0]


def only_rejection(result: ImageSet) -> Rejected:
    assert result.images == []
    assert len(result.rejected) == 1, result.rejected
    return result.rejected[0]


def pixel(item: TrainingImage, x: int, y: int) -> tuple[int, ...]:
    return item.image.getpixel((x, y))


def close(actual, expected, tol: int = 8) -> bool:
    return all(abs(int(a) - int(e)) <= tol for a, e in zip(actual, expected, strict=True))


# ---------------------------------------------------------------------------------------
# good images: size, crop, colour modes, orientation, frames
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [(300, 100), (100, 300), (64, 64), (40, 48)])
def test_output_is_rgb_square_shorter_side_resized_then_centre_cropped(tmp_path, size):
    rng = np.random.default_rng(0)
    src = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    path = save(tmp_path / "noise.png", src)
    item = only_image(load_training_images([path], resolution=50, min_side=0))
    assert item.image.mode == "RGB" and item.image.size == (50, 50)
    assert item.source == path and item.caption is None

    # Reference: the literal recipe (LANCZOS shorter side -> 50, then centre crop).
    w, h = size
    scaled = src.resize((round(w * 50 / min(w, h)), round(h * 50 / min(w, h))), Image.Resampling.LANCZOS)
    left, top = (scaled.width - 50) // 2, (scaled.height - 50) // 2
    expected = np.asarray(scaled.crop((left, top, left + 50, top + 50)), dtype=int)
    diff = np.abs(np.asarray(item.image, dtype=int) - expected)
    assert diff.mean() < 1.0 and diff.max() <= 40  # same up to sub-pixel rounding of the crop


def test_centre_crop_keeps_the_middle_of_a_wide_image(tmp_path):
    wide = Image.new("RGB", (300, 100), RED)
    wide.paste(Image.new("RGB", (100, 100), GREEN), (100, 0))
    wide.paste(Image.new("RGB", (100, 100), BLUE), (200, 0))
    item = only_image(load_training_images([save(tmp_path / "wide.png", wide)], resolution=32))
    assert close(pixel(item, 16, 16), GREEN, 2)
    assert close(pixel(item, 3, 3), GREEN, 30) and close(pixel(item, 28, 28), GREEN, 30)


def _stripes16(values) -> Image.Image:
    arr = np.repeat(np.asarray(values, dtype=np.uint16), 16)[None, :].repeat(64, axis=0)
    return Image.fromarray(arr)  # uint16 -> mode I;16


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    path = save(tmp_path / "deep.png", _stripes16([0, 1000, 32896, 65535]))
    with Image.open(path) as check:
        assert check.mode == "I;16"  # really a 16-bit PNG
    item = only_image(load_training_images([path], resolution=64))
    # 0..65535 -> 0..255 by v/257 rounded (Pillow's convert("L") would give 0, 255, 255, 255)
    assert [pixel(item, x, 32) for x in (8, 24, 40, 56)] == [(0, 0, 0), (4, 4, 4), (128, 128, 128), (255, 255, 255)]


def _palette_with_transparency() -> Image.Image:
    im = Image.new("P", (64, 64), 0)
    im.putpalette([*RED, *BLUE] + [0, 0, 0] * 254)
    im.paste(1, (32, 0, 64, 64))
    return im


@pytest.mark.parametrize(
    "name, make, expect_mode, expected",
    [
        ("bw.png", lambda: Image.new("1", (64, 64), 1), "1", WHITE),
        ("gray.png", lambda: Image.new("L", (64, 64), 77), "L", (77, 77, 77)),
        ("pal.png", lambda: _palette_with_transparency().crop((32, 0, 64, 64)).resize((64, 64)), "P", BLUE),
        ("cmyk.jpg", lambda: Image.new("RGB", (64, 64), RED).convert("CMYK"), "CMYK", RED),
        ("cmyk.tif", lambda: Image.new("RGB", (64, 64), GREEN).convert("CMYK"), "CMYK", GREEN),
        ("int32.tif", lambda: Image.new("I", (64, 64), 32896), "I", (128, 128, 128)),
        ("float_unit.tif", lambda: Image.new("F", (64, 64), 0.5), "F", (128, 128, 128)),
        ("float_8bit.tif", lambda: Image.new("F", (64, 64), 200.0), "F", (200, 200, 200)),
        ("rgba.png", lambda: Image.new("RGBA", (64, 64), (255, 0, 0, 128)), "RGBA", (255, 127, 127)),
        ("clear.png", lambda: Image.new("RGBA", (64, 64), (0, 0, 0, 0)), "RGBA", WHITE),
        ("la.png", lambda: Image.new("LA", (64, 64), (0, 0)), "LA", WHITE),
        ("rgba.webp", lambda: Image.new("RGBA", (64, 64), (0, 0, 255, 0)), "RGBA", WHITE),
        ("plain.bmp", lambda: Image.new("RGB", (64, 64), BLUE), "RGB", BLUE),
    ],
)
def test_colour_modes_become_rgb(tmp_path, name, make, expect_mode, expected):
    path = save(tmp_path / name, make(), lossless=True) if name.endswith(".webp") else save(tmp_path / name, make())
    with Image.open(path) as check:
        assert check.mode == expect_mode  # the file really has the mode under test
    item = only_image(load_training_images([path], resolution=32))
    assert item.image.mode == "RGB"
    assert close(pixel(item, 16, 16), expected, 2 if name.endswith((".png", ".tif", ".bmp", ".webp")) else 10)


def test_lab_tiff_becomes_rgb(tmp_path):
    ImageCms = pytest.importorskip("PIL.ImageCms")
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    path = save(tmp_path / "lab.tif", ImageCms.applyTransform(Image.new("RGB", (64, 64), (200, 30, 30)), to_lab))
    with Image.open(path) as check:
        assert check.mode == "LAB"
    assert close(pixel(only_image(load_training_images([path], resolution=32)), 16, 16), (200, 30, 30), 4)


def test_palette_png_with_transparency_composited_on_white(tmp_path):
    path = save(tmp_path / "pal.png", _palette_with_transparency(), transparency=0)
    with Image.open(path) as check:
        assert check.mode == "P" and check.info.get("transparency") == 0
    item = only_image(load_training_images([path], resolution=64))
    assert pixel(item, 8, 32) == WHITE  # index 0 is transparent
    assert pixel(item, 56, 32) == BLUE


def test_exif_orientation_is_applied(tmp_path):
    # Stored 96 wide × 64 high, red marker in the stored top-left 32×32, rest blue.
    stored = Image.new("RGB", (96, 64), BLUE)
    stored.paste(Image.new("RGB", (32, 32), RED), (0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # display rotated 90° clockwise
    path = save(tmp_path / "phone.jpg", stored, quality=95, exif=exif)
    item = only_image(load_training_images([path], resolution=64))
    # Displayed 64 wide × 96 high with the marker top-right; the centre crop drops 16 rows top
    # and bottom, leaving the marker at x 32..64, y 0..16.
    assert close(pixel(item, 56, 4), RED, 40)
    assert close(pixel(item, 8, 4), BLUE, 40)  # would be red if the EXIF were ignored
    assert close(pixel(item, 56, 40), BLUE, 40)


@pytest.mark.parametrize("fmt, ext", [("GIF", "gif"), ("PNG", "png"), ("WEBP", "webp")])
def test_animated_images_use_the_first_frame(tmp_path, fmt, ext):
    frames = [Image.new("RGB", (64, 64), c) for c in (RED, BLUE, GREEN)]
    path = tmp_path / f"anim.{ext}"
    frames[0].save(path, fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert getattr(check, "n_frames", 1) == 3
    item = only_image(load_training_images([path], resolution=32))
    assert close(pixel(item, 16, 16), RED, 10)


def test_content_is_sniffed_so_a_png_named_jpg_loads(tmp_path):
    path = solid(tmp_path / "actually_png.JPG", GREEN, fmt="PNG")
    assert pixel(only_image(load_training_images([path], resolution=32)), 5, 5) == GREEN


# ---------------------------------------------------------------------------------------
# bad files: each rejected with a reason, never raised
# ---------------------------------------------------------------------------------------


def test_zero_byte_file(tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    assert "empty" in only_rejection(load_training_images([tmp_path / "empty.png"], 64)).reason


def test_text_renamed_png(tmp_path):
    (tmp_path / "notes.png").write_text("this is not a picture\n")
    reason = only_rejection(load_training_images([tmp_path / "notes.png"], 64)).reason
    assert "not a readable image" in reason


@pytest.mark.parametrize("fmt, ext", [("JPEG", "jpg"), ("PNG", "png")])
def test_truncated_file(tmp_path, fmt, ext):
    noise = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    buf = io.BytesIO()
    noise.save(buf, fmt)
    path = tmp_path / f"cut.{ext}"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    reason = only_rejection(load_training_images([path], 64)).reason
    assert "truncated" in reason
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # never switched on globally


def test_decompression_bomb_beyond_pillows_own_limit_is_rejected_without_decoding(tmp_path):
    path = png_claiming(tmp_path / "bomb.png", 100_000, 100_000)  # 10 gigapixels in 67 bytes
    reason = only_rejection(load_training_images([path], 64)).reason
    assert "too large" in reason and "decompression bomb" in reason and "not decoded" in reason


def test_header_over_max_pixels_is_rejected_from_the_header_without_warnings(tmp_path):
    # 100 MP: above DEFAULT_MAX_PIXELS and Pillow's warning threshold, below Pillow's hard error.
    path = png_claiming(tmp_path / "big.png", 10_000, 10_000)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        reason = only_rejection(load_training_images([path], 64)).reason
    # Decoding would have failed as "truncated"; this reason comes from the header check.
    assert "10000×10000" in reason and "100 megapixels" in reason and "64-megapixel limit" in reason
    assert not [w for w in caught if issubclass(w.category, Image.DecompressionBombWarning)]


def test_real_12000x12000_image_is_rejected_by_the_default_limit(tmp_path):
    assert DEFAULT_MAX_PIXELS < 12000 * 12000
    path = save(tmp_path / "scan.png", Image.new("1", (12000, 12000)))  # ~18 KB on disk, 0.5 s
    reason = only_rejection(load_training_images([path], 512)).reason
    assert "12000×12000" in reason and "144 megapixels" in reason


def test_max_pixels_is_a_parameter(tmp_path):
    path = solid(tmp_path / "a.png", size=(100, 80))
    assert only_image(load_training_images([path], 64, max_pixels=8000))
    assert "8000×" not in only_rejection(load_training_images([path], 64, max_pixels=7999)).reason
    assert "megapixel limit" in only_rejection(load_training_images([path], 64, max_pixels=7999)).reason


def test_too_small(tmp_path):
    tiny = solid(tmp_path / "tiny.png", size=(1, 1))
    reason = only_rejection(load_training_images([tiny], 512)).reason
    assert "too small" in reason and "1×1" in reason and "256" in reason


def test_min_side_defaults_to_half_the_resolution(tmp_path):
    ok = solid(tmp_path / "ok.png", size=(32, 100))
    small = solid(tmp_path / "small.png", size=(100, 31))
    result = load_training_images([ok, small], resolution=64)
    assert [i.source for i in result.images] == [ok]
    assert [r.path for r in result.rejected] == [small]
    assert only_image(load_training_images([small], resolution=64, min_side=0)).image.size == (64, 64)


def test_missing_file_and_unsupported_extension(tmp_path):
    heic = tmp_path / "photo.heic"
    heic.write_bytes(b"\0\0\0\x18ftypheic")
    result = load_training_images([tmp_path / "nope.png", heic, tmp_path / "README"], 64)
    reasons = [r.reason for r in result.rejected]
    assert reasons[0] == "file not found"
    assert "unsupported file type '.heic'" in reasons[1] and ".png" in reasons[1]
    assert "(no extension)" in reasons[2]


def test_duplicates_are_counted_once(tmp_path):
    a = solid(tmp_path / "a.png")
    b = tmp_path / "b.png"
    shutil.copyfile(a, b)
    result = load_training_images([a, b, a, str(a)], 64)
    assert [i.source for i in result.images] == [a]
    assert len(result.rejected) == 1 and "duplicate of" in result.rejected[0].reason
    assert result.rejected[0].path == b


# ---------------------------------------------------------------------------------------
# captions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("  mystyle, a red barn \n".encode(), "mystyle, a red barn"),
        ("\ufeffcafé, naïve".encode(), "café, naïve"),  # UTF-8 with BOM (Windows Notepad)
        (b"line one\r\n\r\nline two\n", "line one line two"),
        (b"  \n\t", None),
        (b"", None),
    ],
)
def test_kohya_caption_txt_beside_the_image(tmp_path, raw, expected):
    path = solid(tmp_path / "img.v2.png")
    (tmp_path / "img.v2.txt").write_bytes(raw)
    assert only_image(load_training_images([path], 64)).caption == expected


def test_caption_that_is_not_utf8_rejects_the_image(tmp_path):
    path = solid(tmp_path / "img.png")
    (tmp_path / "img.txt").write_bytes("peinture à l'huile".encode("latin-1"))
    reason = only_rejection(load_training_images([path], 64)).reason
    assert "img.txt" in reason and "UTF-8" in reason


# ---------------------------------------------------------------------------------------
# folders and the all-bad case
# ---------------------------------------------------------------------------------------


def test_folder_input(tmp_path):
    folder = tmp_path / "style"
    b = solid(folder / "b.png", RED)
    a = solid(folder / "a.JPG", BLUE, fmt="JPEG")
    (folder / "a.txt").write_text("blue one", encoding="utf-8")
    (folder / "notes.txt").write_text("ignored")
    solid(folder / ".hidden.png", GREEN)
    (folder / "readme.md").write_text("# hi")
    solid(folder / "sub" / "deep.png", GREEN)
    extra = solid(tmp_path / "extra.webp", GREEN, fmt="WEBP")

    result = load_training_images([str(folder), extra], resolution=32)
    assert [i.source for i in result.images] == [a, b, extra]  # folder sorted by name, then the file
    assert [i.caption for i in result.images] == ["blue one", None, None]
    assert {r.path.name: r.reason for r in result.rejected}.keys() == {"readme.md", "sub"}
    assert "subfolder" in next(r.reason for r in result.rejected if r.path.name == "sub")


def test_a_single_path_is_accepted_as_well_as_a_list(tmp_path):
    solid(tmp_path / "a.png")
    assert len(load_training_images(tmp_path, 32).images) == 1


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    rejection = only_rejection(load_training_images([tmp_path / "empty"], 64))
    assert "no image files" in rejection.reason
    with pytest.raises(NoUsableImagesError, match="empty"):
        load_training_images([tmp_path / "empty"], 64).require_some()


def test_all_bad_folder_raises_listing_every_file(tmp_path):
    folder = tmp_path / "bad"
    folder.mkdir()
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.png").write_text("hello")
    good_jpeg = io.BytesIO()
    Image.new("RGB", (64, 64), RED).save(good_jpeg, "JPEG")
    (folder / "cut.jpg").write_bytes(good_jpeg.getvalue()[:300])
    solid(folder / "tiny.gif", size=(1, 1), fmt="GIF")
    png_claiming(folder / "bomb.png", 100_000, 100_000)
    (folder / "doc.pdf").write_bytes(b"%PDF-1.4")

    result = load_training_images([folder], 64)
    assert result.images == [] and len(result.rejected) == 6
    with pytest.raises(NoUsableImagesError) as info:
        result.require_some()
    assert isinstance(info.value, ValueError)
    assert info.value.rejected == result.rejected
    for name in ("zero.png", "text.png", "cut.jpg", "tiny.gif", "bomb.png", "doc.pdf"):
        assert name in str(info.value)
    for r in result.rejected:
        assert r.reason in str(info.value)


def test_require_some_returns_the_set_when_something_is_usable(tmp_path):
    good = solid(tmp_path / "good.png")
    (tmp_path / "bad.png").write_bytes(b"")
    result = load_training_images([good, tmp_path / "bad.png"], 64)
    assert result.require_some() is result
    with pytest.raises(NoUsableImagesError, match="no image files were given"):
        load_training_images([], 64).require_some()


@pytest.mark.parametrize("kwargs", [{"resolution": 0}, {"resolution": 64, "min_side": -1}, {"resolution": 64, "max_pixels": 0}])
def test_invalid_arguments_raise(tmp_path, kwargs):
    with pytest.raises(ValueError):
        load_training_images([tmp_path], **kwargs)


# ---------------------------------------------------------------------------------------
# fuzz: never raises, every file is either accepted or rejected
# ---------------------------------------------------------------------------------------


def _valid_samples() -> dict[str, bytes]:
    rng = np.random.default_rng(2)
    im = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8))
    out = {}
    for ext, fmt in [("png", "PNG"), ("jpg", "JPEG"), ("gif", "GIF"), ("webp", "WEBP"), ("bmp", "BMP"), ("tif", "TIFF")]:
        buf = io.BytesIO()
        im.save(buf, fmt)
        out[ext] = buf.getvalue()
    return out


VALID = _valid_samples()
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _check_one_outcome(data: bytes, ext: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / f"fuzz.{ext}"
        path.write_bytes(data)
        result = load_training_images([path], resolution=16, max_pixels=1_000_000)
    assert len(result.images) + len(result.rejected) == 1
    for r in result.rejected:
        assert r.path == path and isinstance(r.reason, str) and r.reason
    for item in result.images:
        assert item.image.mode == "RGB" and item.image.size == (16, 16)


@FUZZ
@given(data=st.binary(max_size=512), ext=st.sampled_from(["png", "jpg"]))
def test_fuzz_random_bytes(data, ext):
    _check_one_outcome(data, ext)


@FUZZ
@given(
    ext=st.sampled_from(sorted(VALID)),
    edits=st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(0, 255)), max_size=4),
    keep=st.floats(0.05, 1.0),
)
def test_fuzz_corrupted_real_images(ext, edits, keep):
    data = bytearray(VALID[ext])
    for where, value in edits:
        data[int(where * len(data))] = value
    _check_one_outcome(bytes(data[: max(1, int(len(data) * keep))]), ext)


@pytest.mark.parametrize("ext", IMAGE_EXTENSIONS)
def test_every_accepted_extension_loads_a_file_in_its_format(tmp_path, ext):
    fmt = Image.registered_extensions()[ext]  # the format Pillow writes for this extension
    path = solid(tmp_path / f"red{ext.upper()}", RED, fmt=fmt)  # the check ignores the case
    item = only_image(load_training_images([path], 32))
    assert item.image.size == (32, 32) and close(pixel(item, 16, 16), RED)


def test_a_readable_image_with_an_unlisted_extension_is_refused_naming_the_allowed_ones(tmp_path):
    unlisted = ".ppm"
    assert unlisted not in IMAGE_EXTENSIONS
    path = solid(tmp_path / f"red{unlisted}", RED, fmt="PPM")
    with Image.open(path) as image:
        image.load()  # Pillow itself reads it: only the list refuses it
    reason = only_rejection(load_training_images([path], 32)).reason
    assert reason.startswith("unsupported file type '.ppm'")
    assert all(ext in reason.split() for ext in IMAGE_EXTENSIONS), reason
