"""The training images' VAE latents, encoded in batches, and an optional on-disk cache of them
(kohya's ``--cache_latents_to_disk``).

Encoding is the one part of training that costs the same every time a style is retrained on the
same images; with the cache, a retrain reads the posterior mean and std of each image instead.

    means, stds = encode_images_cached(pipe, images, Path("latents"))

One safetensors file per image, ``<key>.safetensors``, holding its ``mean`` and ``std`` (float32,
latent channels × h × w). The key is a sha256 of

* the image's pixels as they go into the VAE: the decoded, resized RGB array, so the resolution is
  part of the key and an image saved again under another name or format still hits;
* the VAE's identity (:func:`vae_identity`): the weights of the part that makes latents, the
  encoder and ``quant_conv``. ``share_diffusion.fingerprint`` identifies a base model by its UNet
  and text-encoder attention only, which says nothing about the VAE. The decoder is left out, so a
  decoder-only fine-tune (sd-vae-ft-mse, say) keeps its cache, as it keeps its latents;
* the VAE dtype, since an fp16 encode differs from an fp32 one.

The device is not part of the key: a cache filled on a GPU is reused on the CPU, with latents that
differ only in float rounding from those the CPU would compute. Likewise misses are encoded
together, `batch_size` at a time, so a latent can differ in its last bits from the one it would
get in another batch; with every image a miss, the batches are those of ``encode_images``
and the result is bit for bit the same.

A file that cannot be read, is not a safetensors file, or holds anything other than what its key
promises counts as a miss and is rewritten. Files are written to a temporary name in the same
folder and renamed into place, so a reader never sees half a file; a crash mid-write leaves at
worst a stray ``.tmp`` file and never a torn cache file.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ShareStudioError, first_line
from .families import SDXL, architecture, family_of_pipeline
from .generation import PIPELINE_LOCK
from .images import ImageSet, TrainingImage

#: Changes whenever what a cache file holds, or how its key is made, changes.
CACHE_FORMAT = "share-latents-1"
#: The VAE's parameters that decide its latents (``AutoencoderKL.encode``).
_ENCODING_PREFIXES = ("encoder.", "quant_conv.")


class LatentCacheError(ShareStudioError):
    """The latent cache folder cannot be written."""


def vae_identity(vae: torch.nn.Module) -> str:
    """sha256 of the names, shapes, dtypes and bytes of the VAE encoder's and quant_conv's weights.

    All of them, not a sample: any change to them changes every latent, and hashing SD1.5's 34M
    encoder parameters takes about 0.1 s, once per training.
    """
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        if not name.startswith(_ENCODING_PREFIXES):
            continue
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tuple(data.shape)}\0{data.dtype}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def latent_key(image: TrainingImage, vae_id: str, vae_dtype: torch.dtype) -> str:
    """The cache key of one image's latents: its pixels (with their size), the VAE and its dtype."""
    pixels = np.ascontiguousarray(np.asarray(image.image, dtype=np.uint8))
    digest = hashlib.sha256(f"{CACHE_FORMAT}\0{vae_id}\0{vae_dtype}\0{pixels.shape}\0".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()


@contextlib.contextmanager
def encoding_vae(pipe) -> Iterator[torch.nn.Module]:
    """The pipeline's VAE, in float32 while it is used when it is an fp16 SDXL VAE with
    ``force_upcast``: that VAE overflows to NaN in fp16, which is why ``StableDiffusionXLPipeline``
    upcasts it to decode (and kohya has ``--no_half_vae``). It is the pipeline's own VAE, so this
    holds generation's lock; fp16 → fp32 → fp16 gives the same weights back exactly."""
    vae = pipe.vae
    if not (vae.dtype == torch.float16 and vae.config.get("force_upcast", False)
            and architecture(family_of_pipeline(pipe)) == SDXL):  # fmt: skip
        yield vae
        return
    with PIPELINE_LOCK:
        vae.to(torch.float32)
        try:
            yield vae
        finally:
            vae.to(torch.float16)


@torch.no_grad()
def encode_images(pipe: StableDiffusionPipeline, images: ImageSet, batch_size: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Latent posterior mean and std of every image (all of one size), `batch_size` images at a time so
    that the VAE's peak memory does not grow with the training set."""
    means, stds = [], []
    with encoding_vae(pipe) as vae:
        for start in range(0, len(images.images), batch_size):
            chunk = images.images[start : start + batch_size]
            pixels = torch.stack([torch.from_numpy(np.asarray(i.image, dtype=np.float32)) for i in chunk])
            pixels = (pixels.permute(0, 3, 1, 2) / 127.5 - 1).to(pipe.device, vae.dtype)
            posterior = vae.encode(pixels).latent_dist
            means.append(posterior.mean.float().cpu())
            stds.append(posterior.std.float().cpu())
    return torch.cat(means), torch.cat(stds)


def encode_images_cached(
    pipe: StableDiffusionPipeline, images: ImageSet, cache_dir: Path | None, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_images``, reading and writing each image's latents under `cache_dir`.

    Without a `cache_dir` it is ``encode_images`` itself. The misses are encoded `batch_size` at a
    time and each batch is written as soon as it is encoded, so an interrupted run keeps what it did.
    Raises LatentCacheError when `cache_dir` cannot be created or written.
    """
    if cache_dir is None:
        return encode_images(pipe, images, batch_size)
    cache_dir = Path(cache_dir)
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LatentCacheError(f"cannot create the latent cache folder {cache_dir}: {first_line(e)}") from None
    vae = pipe.vae
    vae_id = vae_identity(vae)
    expected_shape = _latent_shape(vae, images)
    keys = [latent_key(image, vae_id, vae.dtype) for image in images.images]

    latents: list[tuple[torch.Tensor, torch.Tensor] | None] = [
        _read(cache_dir / f"{key}.safetensors", key, expected_shape) for key in keys
    ]
    misses = [i for i, cached in enumerate(latents) if cached is None]
    for start in range(0, len(misses), batch_size):
        batch = misses[start : start + batch_size]
        means, stds = encode_images(pipe, ImageSet(images=[images.images[i] for i in batch]), batch_size)
        for i, mean, std in zip(batch, means, stds):
            _write(cache_dir, keys[i], mean, std)
            latents[i] = (mean, std)
    return torch.stack([mean for mean, _ in latents]), torch.stack([std for _, std in latents])


def _latent_shape(vae: torch.nn.Module, images: ImageSet) -> tuple[int, int, int] | None:
    """Channels × h × w of the latents of `images` (all one size); None for no images."""
    if not images.images:
        return None
    width, height = images.images[0].image.size
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.latent_channels, height // scale, width // scale)


def _read(path: Path, key: str, shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The cached (mean, std) at `path`, or None when it is missing, unreadable or not what `key` promises."""
    try:
        with safe_open(path, framework="pt") as handle:
            if (handle.metadata() or {}).get("key") != key or set(handle.keys()) != {"mean", "std"}:
                return None
            mean, std = handle.get_tensor("mean"), handle.get_tensor("std")
    except (OSError, SafetensorError):
        return None
    if any(t.dtype != torch.float32 or tuple(t.shape) != shape for t in (mean, std)):
        return None
    return mean, std


def _write(cache_dir: Path, key: str, mean: torch.Tensor, std: torch.Tensor) -> None:
    """Write one image's latents atomically: a temporary file in the same folder, then os.replace."""
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=cache_dir, prefix=f".{key[:16]}-", suffix=".tmp")
        os.close(handle)
        save_file({"mean": mean.contiguous(), "std": std.contiguous()}, temporary, metadata={"key": key, "format": CACHE_FORMAT})
        os.replace(temporary, cache_dir / f"{key}.safetensors")
    except (OSError, SafetensorError) as e:
        if temporary is not None:
            Path(temporary).unlink(missing_ok=True)
        raise LatentCacheError(f"cannot write the latent cache in {cache_dir}: {first_line(e)}") from None
