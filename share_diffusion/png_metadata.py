"""Generated images on disk: PNG metadata (our JSON and A1111's "parameters") and file names.

A saved PNG carries two text chunks: ``share_studio``, a JSON document that
:func:`read_png_metadata` returns as written, and ``parameters``, the text AUTOMATIC1111 writes,
which A1111's "PNG Info", Civitai and most image sites read.  "Model hash" there is A1111's own
hash of the checkpoint file (:func:`~share_diffusion.fingerprint.a1111_model_hash`), written only
for single-file checkpoints; "Share base fingerprint" is our fingerprint of the base weights,
written always.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PIL import Image, PngImagePlugin

from .errors import ShareStudioError, one_line
from .loading import model_info
from .schedulers import A1111_SAMPLER_NAMES, canonical_scheduler_name, scheduler_name

PNG_JSON_KEY = "share_studio"
PNG_A1111_KEY = "parameters"


def png_metadata(
    prompt: str,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    scheduler: str | None = None,
    model: str | None = None,
    width: int | None = None,
    height: int | None = None,
    model_hash: str | None = None,
    base_fingerprint: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata dict for :func:`save_png`.

    Keys match :func:`~share_diffusion.generation.generate_images` arguments (``prompt``,
    ``negative_prompt``, ``seed``, ``steps``, ``guidance``, ``width``, ``height``, ``scheduler``)
    plus ``model``, ``model_hash`` (A1111's hash of the checkpoint file), ``base_fingerprint``
    (:func:`~share_diffusion.fingerprint.model_fingerprint`) and any extra keys (e.g. ``style=``,
    ``library_hash=``); ``None`` values are dropped.  Values must be JSON-serialisable.
    """
    data: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": int(seed),
        "steps": int(steps),
        "guidance": float(guidance),
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "scheduler": scheduler,
        "model": model,
        "model_hash": model_hash,
        "base_fingerprint": base_fingerprint,
    }
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def _a1111_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    text = one_line(text)
    # A1111 quotes values that would break its "Key: value, Key: value" line.
    return json.dumps(text) if any(c in text for c in ',:"') else text


def a1111_parameters(metadata: Mapping[str, Any]) -> str:
    """The AUTOMATIC1111-style "parameters" text: prompt, "Negative prompt:" line, "Key: value, ..." line."""
    lines = [str(metadata.get("prompt", ""))]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    fields: list[tuple[str, Any]] = []
    if "steps" in metadata:
        fields.append(("Steps", metadata["steps"]))
    if metadata.get("scheduler"):
        fields.append(("Sampler", A1111_SAMPLER_NAMES.get(metadata["scheduler"], metadata["scheduler"])))
    if "guidance" in metadata:
        fields.append(("CFG scale", metadata["guidance"]))
    if "seed" in metadata:
        fields.append(("Seed", metadata["seed"]))
    if metadata.get("width") and metadata.get("height"):
        fields.append(("Size", f"{metadata['width']}x{metadata['height']}"))
    if metadata.get("model_hash"):
        fields.append(("Model hash", metadata["model_hash"]))
    if metadata.get("model"):
        fields.append(("Model", metadata["model"]))
    if metadata.get("base_fingerprint"):
        fields.append(("Share base fingerprint", metadata["base_fingerprint"]))
    known = {
        "prompt", "negative_prompt", "steps", "scheduler", "guidance", "seed", "width", "height",
        "model_hash", "model", "base_fingerprint",
    }
    for key, value in metadata.items():
        if key not in known and value is not None:
            label = str(key).replace("_", " ")
            fields.append((label[:1].upper() + label[1:], value))
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``image`` as PNG with a "parameters" (A1111) and a JSON "share_studio" text chunk.

    Creates parent folders; writes atomically (temporary file + rename).  Returns the path.
    """
    path = Path(path)
    try:
        payload = json.dumps(dict(metadata), ensure_ascii=False, sort_keys=False)
    except TypeError as e:
        raise ShareStudioError(f"PNG metadata must be JSON-serialisable: {e}") from e
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_A1111_KEY, a1111_parameters(metadata))  # becomes iTXt when not latin-1
    info.add_text(PNG_JSON_KEY, payload)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        raise ShareStudioError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The "share_studio" metadata dict of a PNG written by :func:`save_png` (``{}`` if it has none).

    For other PNGs with only an A1111 "parameters" chunk, returns ``{"parameters": text}``.
    """
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if PNG_JSON_KEY in text:
        try:
            data = json.loads(text[PNG_JSON_KEY])
            if isinstance(data, dict):
                return data
        except ValueError:
            pass
    if PNG_A1111_KEY in text:
        return {PNG_A1111_KEY: text[PNG_A1111_KEY]}
    return {}


def numbered_output_paths(out: str | os.PathLike, count: int) -> list[Path]:
    """``out`` itself for one image; ``out-0.png, out-1.png, ...`` for several."""
    out = Path(out)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_generated(
    pipe,
    images: list[Image.Image],
    paths: list[str | os.PathLike],
    *,
    prompt: str,
    negative_prompt: str = "",
    seed: int,
    steps: int,
    guidance: float,
    scheduler: str | None = None,
    **extra: Any,
) -> list[Path]:
    """Save the output of :func:`~share_diffusion.generation.generate_images` with full PNG metadata.

    ``images[i]`` goes to ``paths[i]`` with seed ``seed + i``, its actual size, the scheduler
    (``None``: the model's own), the model's name, A1111 hash (single-file checkpoints only) and
    base fingerprint, and any ``extra`` keys.
    """
    if len(images) != len(paths):
        raise ValueError("one path per image is needed")
    info = model_info(pipe)
    scheduler = canonical_scheduler_name(scheduler) if scheduler else scheduler_name(pipe)
    saved = []
    for i, (image, path) in enumerate(zip(images, paths)):
        metadata = png_metadata(
            prompt,
            negative_prompt=negative_prompt,
            seed=seed + i,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            model=info.name,
            width=image.width,
            height=image.height,
            model_hash=info.a1111_hash,
            base_fingerprint=info.fingerprint,
            **extra,
        )
        saved.append(save_png(image, path, metadata))
    return saved
