"""Training-image intake: turn the files a user drops in into RGB training images.

    images = load_training_images(["my_style/", "extra.png"], resolution=512).require_some()
    for item in images.images:
        item.image    # PIL RGB, 512×512
        item.source   # Path of the file it came from
        item.caption  # text of my_style/<stem>.txt (kohya_ss style), or None

    buckets = AspectBuckets.around(512, step=64)   # aspect-ratio bucketing (kohya's enable_bucket)
    images = load_training_images(["my_style/"], resolution=512, buckets=buckets)
    item.image.size        # the bucket nearest the file's aspect ratio, e.g. (448, 576)
    item.original_size     # (height, width) of the file's image, for SDXL's size conditioning
    item.crop_top_left     # (top, left) of the crop in the resized image, for SDXL's crop conditioning

What users of kohya_ss / A1111 can expect:

* Paths may be files or folders. A folder contributes the files directly inside it, sorted by
  name (not recursive; a subfolder is reported as rejected so a kohya-style ``10_mystyle/``
  layout one level too deep is explained rather than silently empty). ``.txt`` files and
  hidden files (name starting with ".") in folders are skipped silently.
* Accepted: .png .jpg .jpeg .webp .bmp .gif .tif .tiff (any case). The extension only decides
  whether a file is considered; the content is then sniffed, so a PNG saved as ``.jpg`` works,
  but only the PNG/JPEG/WebP/BMP/GIF/TIFF decoders are ever run on user files.
* Captions: ``<stem>.txt`` next to the image (kohya ``caption_extension=.txt``), UTF-8 (a BOM
  is fine). Whitespace, newlines included, is collapsed to single spaces; an empty file gives
  ``None``. A caption file that is not UTF-8 rejects its image, so a caption is never lost
  silently.
* EXIF orientation is applied. Transparent images (RGBA, LA, PA, P/L/RGB with a transparent
  colour) are composited on white. 16-bit images (I;16) map 0..65535 onto 0..255 by scaling;
  Pillow's own convert would clip everything above 255 to white. Animated GIF/APNG/WebP and
  multi-page TIFF use the first frame.
* Cropping: without ``buckets``, the shorter side is resized to ``resolution`` with LANCZOS and
  the longer side is centre-cropped (done in one ``resize(box=...)`` so the crop is exactly
  centred, without rounding an intermediate size). With ``buckets`` (:class:`AspectBuckets`),
  each image goes to the bucket nearest its aspect ratio and is resized to cover it, the small
  excess centre-cropped, by the same single resample; a square image lands in the
  ``resolution``×``resolution`` bucket and comes out bit for bit as without buckets.
* Duplicates: a file whose bytes equal an already accepted file is rejected as a duplicate,
  and the same path given twice (e.g. a folder and a file inside it) is used once.

Nothing here raises for a bad file. Each problem becomes a ``Rejected(path, reason)``, with a
reason meant to be shown to the user:
unreadable / not an image, empty file, truncated or corrupt data (``ImageFile.LOAD_TRUNCATED_IMAGES``
is never touched; every image is fully decoded with ``load()`` and errors are caught),
too large, too small, unsupported extension, folder with no images, caption not UTF-8.
``ImageSet.require_some()`` raises ``NoUsableImagesError`` (a ``ValueError``) listing every
rejected file when nothing usable is left.

Size limits (both checked from the header, before any pixel is decoded):

* ``max_pixels`` (default ``DEFAULT_MAX_PIXELS`` = 64 megapixels, e.g. 8000×8000; a 12000×12000
  scan is rejected). This guards against decompression bombs, tiny files whose header claims a
  huge image, and bounds memory: decoding a 64 MP RGBA image takes about 0.5 GB. Pillow's own
  bomb guard also stays in force: images over ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (about 179 MP
  by default) are rejected whatever ``max_pixels`` says. Pillow's DecompressionBombWarning (for
  images between ``MAX_IMAGE_PIXELS`` and twice that) is silenced, because ``max_pixels`` is
  the limit that applies here; so are Pillow's warnings about corrupt metadata (the file is
  accepted or rejected instead). This uses ``warnings.catch_warnings``, which on Python < 3.14
  briefly changes process-wide warning filters while a file is decoded.
* ``min_side`` (default ``resolution // 2``): images whose shorter side is smaller are rejected;
  they would be upscaled more than 2× and teach the model blur.
"""

from __future__ import annotations

import hashlib
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
CAPTION_EXTENSION = ".txt"
DEFAULT_MAX_PIXELS = 64_000_000
# The only decoders ever run on user files (the JPEG one also opens cameras' multi-picture MPO files).
_PILLOW_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
_FORMATS_TEXT = "PNG, JPEG, WebP, BMP, GIF or TIFF"
_WHITE = (255, 255, 255)

__all__ = [
    "AspectBuckets",
    "CAPTION_EXTENSION",
    "DEFAULT_MAX_PIXELS",
    "IMAGE_EXTENSIONS",
    "ImageSet",
    "NoUsableImagesError",
    "Rejected",
    "TrainingImage",
    "load_training_images",
]


@dataclass(frozen=True)
class TrainingImage:
    image: Image.Image  # RGB, resolution × resolution, or its bucket's size
    source: Path
    caption: str | None  # from <stem>.txt beside the source; None when absent or empty
    # Where the pixels came from, in SDXL's conditioning order (height, width) and (top, left):
    original_size: tuple[int, int] | None = None  # the file's image before resizing; None: the image's own size
    resized_size: tuple[int, int] | None = None  # what it was resized to before the crop; None: the image's own
    crop_top_left: tuple[int, int] = (0, 0)  # the crop's corner in the resized image

    def size_and_crop(self, mirrored: bool = False) -> tuple[tuple[int, int], tuple[int, int]]:
        """(original (height, width), crop (top, left)); for the mirror image, the crop as seen in the
        mirrored resized image, so that the left offset counts from the other side."""
        width, height = self.image.size
        original = self.original_size or (height, width)
        top, left = self.crop_top_left
        if mirrored:
            left = (self.resized_size or (height, width))[1] - width - left
        return original, (top, left)


@dataclass(frozen=True)
class AspectBuckets:
    """Training sizes (width, height) of about ``resolution``² pixels, at ``step``-px steps.

    kohya sd-scripts' bucketing (``make_bucket_resolutions``): every width from about
    ``resolution``/2 to 2·``resolution`` in steps of ``step``, each with the largest height that
    keeps the area at most ``resolution``², and their transposes; aspect ratios up to 4:1. The
    square ``resolution``×``resolution`` bucket is always there.
    """

    resolution: int
    step: int
    sizes: tuple[tuple[int, int], ...]

    @classmethod
    def around(cls, resolution: int, step: int) -> AspectBuckets:
        if resolution < 1 or step < 1:
            raise ValueError(f"resolution and step must be positive, got {resolution} and {step}")
        area, low, high = resolution * resolution, max(step, resolution // 2 // step * step), 2 * resolution
        sizes = {(resolution, resolution)}
        for width in range(low, high + 1, step):
            height = min(high, area // width // step * step)
            if height >= low:
                sizes |= {(width, height), (height, width)}
        return cls(resolution, step, tuple(sorted(sizes)))

    def nearest(self, width: int, height: int) -> tuple[int, int]:
        """The bucket whose aspect ratio is nearest (in log ratio) to width:height."""
        ratio = math.log(width / height)
        return min(self.sizes, key=lambda size: (abs(math.log(size[0] / size[1]) - ratio), -size[0] * size[1]))


@dataclass(frozen=True)
class Rejected:
    path: Path
    reason: str  # human-readable, for the user

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


class NoUsableImagesError(ValueError):
    """No training image could be used; ``rejected`` holds why, file by file."""

    def __init__(self, rejected: Iterable[Rejected] = ()):
        self.rejected = list(rejected)
        if not self.rejected:
            message = "No usable training images: no image files were given."
        else:
            n = len(self.rejected)
            lines = "\n".join(f"  - {r}" for r in self.rejected)
            message = f"No usable training images: {'the only file was' if n == 1 else f'all {n} files were'} rejected:\n{lines}"
        super().__init__(message)


@dataclass
class ImageSet:
    images: list[TrainingImage] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)

    def require_some(self) -> ImageSet:
        """Return self, or raise NoUsableImagesError (listing every rejection) if no image is usable."""
        if not self.images:
            raise NoUsableImagesError(self.rejected)
        return self


def load_training_images(
    paths: Iterable[str | Path] | str | Path,
    resolution: int,
    min_side: int | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    buckets: AspectBuckets | None = None,
) -> ImageSet:
    """Load files and folders as resolution×resolution RGB training images, or each at the size of its
    aspect-ratio bucket when ``buckets`` are given; never raises for a bad file.

    A single path is accepted as well as a list. min_side defaults to resolution // 2.
    Raises ValueError/TypeError only for invalid arguments.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    if min_side is None:
        min_side = resolution // 2
    if isinstance(min_side, bool) or not isinstance(min_side, int) or min_side < 0:
        raise ValueError(f"min_side must be an int >= 0, got {min_side!r}")
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels < 1:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")
    if isinstance(paths, (str, Path)):
        paths = [paths]

    result = ImageSet()
    candidates = _expand(paths, result.rejected)
    accepted_by_digest: dict[str, Path] = {}
    for path in candidates:
        try:
            outcome = _load_one(path, resolution, min_side, max_pixels, accepted_by_digest, buckets)
        except Exception as e:  # safety net: a bad file must never stop the others
            outcome = Rejected(path, f"could not be loaded ({type(e).__name__}: {e})")
        if isinstance(outcome, Rejected):
            result.rejected.append(outcome)
        else:
            result.images.append(outcome)
    return result


# ---------------------------------------------------------------------------------------
# Finding the files
# ---------------------------------------------------------------------------------------


def _expand(paths: Iterable[str | Path], rejected: list[Rejected]) -> list[Path]:
    """Files to try, in order, each once; folders expanded one level. Problems go to rejected."""
    files: list[Path] = []
    seen: set[Path] = set()

    def add(p: Path) -> None:
        try:
            key = p.resolve()
        except (OSError, RuntimeError):
            key = p.absolute()
        if key not in seen:
            seen.add(key)
            files.append(p)

    for raw in paths:
        p = Path(raw)
        try:
            is_dir = p.is_dir()
        except OSError:
            is_dir = False
        if not is_dir:
            add(p)  # existence and type are checked per file
            continue
        try:
            entries = sorted(p.iterdir(), key=lambda e: e.name)
        except OSError as e:
            rejected.append(Rejected(p, f"could not list the folder ({e.strerror or e})"))
            continue
        found_image = False
        for entry in entries:
            if entry.name.startswith(".") or entry.suffix.lower() == CAPTION_EXTENSION:
                continue
            if entry.is_dir():
                rejected.append(Rejected(entry, "subfolder not searched (folders are read one level deep)"))
                continue
            found_image = found_image or entry.suffix.lower() in IMAGE_EXTENSIONS
            add(entry)
        if not found_image:
            rejected.append(Rejected(p, f"folder contains no image files ({_extensions_text()})"))
    return files


def _extensions_text() -> str:
    return "accepted: " + " ".join(IMAGE_EXTENSIONS)


# ---------------------------------------------------------------------------------------
# One file
# ---------------------------------------------------------------------------------------


class _Reject(Exception):
    """Internal: this file is rejected for the reason given."""


def _load_one(
    path: Path, resolution: int, min_side: int, max_pixels: int, accepted_by_digest: dict[str, Path],
    buckets: AspectBuckets | None = None,
) -> TrainingImage | Rejected:
    try:
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            kind = f"'{path.suffix}'" if path.suffix else "(no extension)"
            raise _Reject(f"unsupported file type {kind}; {_extensions_text()}")
        if not path.exists():
            raise _Reject("file not found")
        if not path.is_file():
            raise _Reject("not a regular file")
        try:
            empty = path.stat().st_size == 0
        except OSError as e:
            raise _Reject(f"could not read the file ({e.strerror or e})") from None
        if empty:
            raise _Reject("empty file (0 bytes)")
        image, original_size, resized_size, crop_top_left = _decode_fitted(path, resolution, min_side, max_pixels, buckets)
        caption = _read_caption(path)
        # Hashed only once it decodes, so a huge non-image is rejected without reading it all.
        try:
            with path.open("rb") as f:
                digest = hashlib.file_digest(f, "sha256").hexdigest()
        except OSError as e:
            raise _Reject(f"could not read the file ({e.strerror or e})") from None
        if digest in accepted_by_digest:
            raise _Reject(f"duplicate of {accepted_by_digest[digest]} (identical file contents)")
    except _Reject as r:
        return Rejected(path, str(r))
    accepted_by_digest[digest] = path
    return TrainingImage(image, path, caption, original_size, resized_size, crop_top_left)


_Fitted = tuple[Image.Image, tuple[int, int], tuple[int, int], tuple[int, int]]


def _decode_fitted(path: Path, resolution: int, min_side: int, max_pixels: int, buckets: AspectBuckets | None) -> _Fitted:
    """(image at its training size, original (height, width), resized (height, width), crop (top, left))."""
    # Pillow warns about corrupt metadata in user files (and DecompressionBombWarning, where
    # max_pixels is the limit that applies); the outcome is reported as accept/reject instead.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _decode_fitted_quietly(path, resolution, min_side, max_pixels, buckets)


def _decode_fitted_quietly(path: Path, resolution: int, min_side: int, max_pixels: int, buckets: AspectBuckets | None) -> _Fitted:
    try:
        im = Image.open(path, formats=_PILLOW_FORMATS)
    except Image.DecompressionBombError:
        raise _Reject(
            f"image too large: over {_megapixels(2 * (Image.MAX_IMAGE_PIXELS or 0))} megapixels"
            " (possible decompression bomb); not decoded"
        ) from None
    except UnidentifiedImageError:
        raise _Reject(f"not a readable image (not {_FORMATS_TEXT} data)") from None
    except Exception as e:
        raise _Reject(f"not a readable image ({_describe(e)})") from None

    with im:
        width, height = im.size
        if width * height > max_pixels:
            raise _Reject(
                f"image too large: {width}×{height} is {_megapixels(width * height)} megapixels, over the"
                f" {_megapixels(max_pixels)}-megapixel limit (possible decompression bomb); not decoded;"
                " downscale it first"
            )
        if min(width, height) < min_side:
            raise _Reject(f"too small: {width}×{height}; the shorter side must be at least {min_side} px")
        try:
            im.load()  # full decode of the first frame: truncated or corrupt data fails here
        except Exception as e:
            if isinstance(e, OSError) and "truncated" in str(e):
                raise _Reject(f"file is truncated (incomplete download or copy?): {e}") from None
            raise _Reject(f"image data is corrupt ({_describe(e)})") from None
        try:
            ImageOps.exif_transpose(im, in_place=True)  # in place: no copy of a big image
        except Exception:
            pass  # unreadable EXIF: use the pixels as stored rather than reject the image
        try:
            rgb = _to_rgb(im)
        except ValueError as e:
            raise _Reject(f"unsupported colour mode {im.mode} ({e})") from None
        # inside `with`: rgb may still be im itself
        size = buckets.nearest(*rgb.size) if buckets else (resolution, resolution)
        image, resized_size, crop_top_left = _cover_and_crop(rgb, size)
        return image, (rgb.height, rgb.width), resized_size, crop_top_left


def _describe(e: Exception) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _megapixels(pixels: int) -> str:
    return f"{pixels / 1e6:.1f}".removesuffix(".0")


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow mode -> RGB; transparency composited on white; high bit depths scaled, not clipped."""
    mode = im.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        return Image.fromarray(_gray_to_uint8(np.asarray(im), mode)).convert("RGB")
    if mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in im.info:
        rgba = im if mode == "RGBA" else im.convert("RGBA")
        out = Image.new("RGB", rgba.size, _WHITE)
        out.paste(rgba, (0, 0), rgba)  # straight-alpha "over" white
        return out
    if mode == "RGB":
        return im
    return im.convert("RGB")  # 1, L, P, CMYK, YCbCr, RGBX; ValueError for modes Pillow cannot convert


def _gray_to_uint8(a: np.ndarray, mode: str) -> np.ndarray:
    """Single-channel high-bit-depth pixels -> uint8.

    I;16*: 0..65535 -> 0..255 (rounded). I and F carry no range in the file, so: I within
    0..65535 is taken as 16-bit data; F within 0..1 as unit range, within 0..255 as 8-bit range,
    within 0..65535 as 16-bit range; anything else is stretched from its min..max.
    """
    if mode.startswith("I;16"):
        return ((a.astype(np.uint32) + 128) // 257).astype(np.uint8)
    a = np.nan_to_num(a.astype(np.float32), nan=0.0, posinf=0.0, neginf=0.0)
    lo, hi = (float(a.min()), float(a.max())) if a.size else (0.0, 0.0)
    if mode == "F" and lo >= 0 and hi <= 1:
        scale, offset = 255.0, 0.0
    elif mode == "F" and lo >= 0 and hi <= 255:
        scale, offset = 1.0, 0.0
    elif lo >= 0 and hi <= 65535:
        scale, offset = 255.0 / 65535.0, 0.0
    elif hi > lo:
        scale, offset = 255.0 / (hi - lo), lo
    else:
        scale, offset = 0.0, lo
    return np.clip(np.rint((a - offset) * scale), 0, 255).astype(np.uint8)


def _cover_and_crop(im: Image.Image, size: tuple[int, int]) -> tuple[Image.Image, tuple[int, int], tuple[int, int]]:
    """Resize to cover ``size`` (width, height) and centre-crop the excess, as one LANCZOS resample.

    Returns the image, the size it was resized to before the crop (height, width) and the crop's
    top-left corner in it (top, left), rounded to whole pixels.
    """
    width, height = im.size
    bucket_width, bucket_height = size
    if width * bucket_height > height * bucket_width:  # wider than the bucket: full height, crop the sides
        box_width, box_height = height * bucket_width / bucket_height, height
    else:  # full width, crop top and bottom
        box_width, box_height = width, width * bucket_height / bucket_width
    left, top = (width - box_width) / 2, (height - box_height) / 2
    image = im.resize(size, Image.Resampling.LANCZOS, box=(left, top, left + box_width, top + box_height))
    scale = bucket_width / box_width
    return image, (round(height * scale), round(width * scale)), (round(top * scale), round(left * scale))


def _read_caption(image_path: Path) -> str | None:
    caption_path = image_path.with_suffix(CAPTION_EXTENSION)
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _Reject(
            f"caption file {caption_path.name} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8"
        ) from None
    except OSError as e:
        raise _Reject(f"could not read caption file {caption_path.name} ({e.strerror or e})") from None
    return " ".join(text.split()) or None
