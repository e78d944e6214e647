"""Generating images with a loaded pipeline: seeds, sizes and checked parameters.

:func:`generate_images` is deterministic for a seed (image ``i`` of a batch uses ``seed + i``)
and raises :class:`~share_diffusion.errors.GenerationError` with a one-line message for invalid
parameters, before any work is done.
"""

from __future__ import annotations

import math
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch
from PIL import Image

from .errors import GenerationError
from .families import SD1, SD2, SDXL, architecture, family_of_pipeline
from .schedulers import canonical_scheduler_name, set_scheduler

#: Largest seed accepted (torch generators take 64-bit seeds; random seeds stay 32-bit like A1111).
MAX_SEED = 2**63 - 1
RANDOM_SEED_BITS = 32

# One pipeline call at a time per process: generation swaps the scheduler temporarily and
# later features (style adapters) mutate the pipeline too.  Reentrant so helpers can nest.
PIPELINE_LOCK = threading.RLock()


@dataclass(frozen=True)
class GenerationDefaults:
    steps: int
    guidance: float


#: Steps and CFG scale when none are given, per family (the size is always the model's native one).
#: SD 1.x/2.x keep the values the product has always used (and the embedded model was tuned with);
#: SDXL gets diffusers' StableDiffusionXLPipeline guidance (5.0) and 30 steps.
GENERATION_DEFAULTS = {
    SD1: GenerationDefaults(steps=20, guidance=4.0),
    SD2: GenerationDefaults(steps=20, guidance=4.0),
    SDXL: GenerationDefaults(steps=30, guidance=5.0),
}


def generation_defaults(pipe) -> GenerationDefaults:
    """The default steps and CFG scale of the pipeline's family."""
    return GENERATION_DEFAULTS.get(architecture(family_of_pipeline(pipe)), GENERATION_DEFAULTS[SD1])


def native_size(pipe) -> tuple[int, int]:
    """(width, height) the model was trained at: UNet sample size × VAE scale factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scale = pipe.vae_scale_factor
    return int(w) * scale, int(h) * scale


def resolve_seed(seed: int | None) -> int:
    """``None`` or a negative seed → a fresh random 32-bit seed; otherwise the seed itself (validated)."""
    if seed is None or (isinstance(seed, (int, float)) and seed < 0):
        return secrets.randbelow(2**RANDOM_SEED_BITS)
    return _check_seed(seed)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or seed != int(seed):
        raise GenerationError(f"seed must be a whole number, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise GenerationError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise GenerationError(f"{name} must be a whole number, got {value!r}")
    if not low <= int(value) <= high:
        raise GenerationError(f"{name} must be between {low} and {high}, got {int(value)}")
    return int(value)


def generate_images(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int | None = None,
    guidance: float | None = None,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    scheduler: str | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Generate ``num_images`` images; deterministic for a given seed.

    Image ``i`` uses seed ``seed + i`` (its own CPU ``torch.Generator``), so image 2 of a batch equals a
    single image generated with ``seed + 2``.  ``width``/``height`` default to :func:`native_size`
    and must be multiples of the VAE scale factor; ``steps`` and ``guidance`` to the family's
    :func:`generation_defaults`.  ``scheduler`` (a :data:`SCHEDULERS` name) is used for this call
    only.  ``progress(step, total)`` is called after each denoising step.  SD 1.x/2.x and SDXL
    pipelines are driven alike: the active Share styles act on the whole classifier-free-guidance
    batch, as a LoRA's weights do.
    """
    if not isinstance(prompt, str):
        raise GenerationError("prompt must be text")
    seed = _check_seed(seed)
    defaults = generation_defaults(pipe)
    steps = _check_int("steps", defaults.steps if steps is None else steps, 1, 1000)
    guidance = defaults.guidance if guidance is None else guidance
    num_images = _check_int("number of images", num_images, 1, 64)
    if seed + num_images - 1 > MAX_SEED:
        raise GenerationError(f"seed too large for {num_images} images")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError) as e:
        raise GenerationError(f"guidance must be a number, got {guidance!r}") from e
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise GenerationError(f"guidance must be between 0 and 100, got {guidance}")
    native_w, native_h = native_size(pipe)
    multiple = pipe.vae_scale_factor
    width = native_w if width is None else _check_int("width", width, multiple, 8192)
    height = native_h if height is None else _check_int("height", height, multiple, 8192)
    for name, value in (("width", width), ("height", height)):
        if value % multiple:
            raise GenerationError(f"{name} must be a multiple of {multiple}, got {value}")
    scheduler_key = canonical_scheduler_name(scheduler) if scheduler else None

    callback = None
    if progress is not None:

        def callback(_pipe, step, _timestep, kwargs):
            progress(step + 1, steps)
            return kwargs

    with PIPELINE_LOCK:
        original = pipe.scheduler
        try:
            if scheduler_key:
                set_scheduler(pipe, scheduler_key)
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
            with torch.inference_mode():
                result = pipe(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    num_images_per_prompt=num_images,
                    generator=generators,
                    output_type="pil",
                    callback_on_step_end=callback,
                )
        finally:
            pipe.scheduler = original
    return list(result.images)
