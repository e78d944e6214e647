"""The on-disk latent cache: hits are bit-identical to encoding, changed or damaged entries are redone."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from share_diffusion import latent_cache
from share_diffusion.images import ImageSet, TrainingImage
from share_diffusion.latent_cache import encode_images


def random_images(count: int, size: int = 64, seed: int = 0) -> ImageSet:
    rng = np.random.default_rng(seed)
    return ImageSet(
        images=[
            TrainingImage(Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)), Path(f"{i}.png"), None)
            for i in range(count)
        ]
    )


@pytest.fixture
def encoded_counter(monkeypatch) -> list[int]:
    """How many images each call of training.encode_images encoded (the real VAE runs)."""
    counts: list[int] = []

    def counting(pipe, images, batch_size=8):
        counts.append(len(images.images))
        return encode_images(pipe, images, batch_size)

    monkeypatch.setattr(latent_cache, "encode_images", counting)
    return counts


def cache_files(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.safetensors"))


def test_second_call_reads_the_disk_and_matches_encode_images(tiny_pipe, tmp_path, encoded_counter):
    images = random_images(11)  # more than one batch of 8
    expected_means, expected_stds = encode_images(tiny_pipe, images)

    means, stds = latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    assert torch.equal(means, expected_means) and torch.equal(stds, expected_stds)
    assert encoded_counter == [8, 3] and len(cache_files(tmp_path)) == 11

    encoded_counter.clear()
    means, stds = latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    assert encoded_counter == []
    assert torch.equal(means, expected_means) and torch.equal(stds, expected_stds)


def test_one_changed_pixel_misses(tiny_pipe, tmp_path, encoded_counter):
    images = random_images(3)
    latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    pixels = np.array(images.images[1].image)
    pixels[10, 20, 0] ^= 1
    changed = TrainingImage(Image.fromarray(pixels), images.images[1].source, None)
    images = ImageSet(images=[images.images[0], changed, images.images[2]])

    encoded_counter.clear()
    means, stds = latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    assert encoded_counter == [1] and len(cache_files(tmp_path)) == 4
    # Bit for bit what encoding the misses gives; within float rounding of encoding all the images,
    # whose batch of 3 may take other kernels than the misses' batch of 1.
    assert torch.equal(means[1], encode_images(tiny_pipe, ImageSet(images=[changed]))[0][0])
    torch.testing.assert_close(means, encode_images(tiny_pipe, images)[0])


def test_the_key_holds_the_resolution_and_the_vae_dtype(tiny_pipe):
    image = random_images(1, size=64).images[0]
    resized = TrainingImage(image.image.resize((32, 32)), image.source, None)
    identity = latent_cache.vae_identity(tiny_pipe.vae)
    keys = {
        latent_cache.latent_key(image, identity, torch.float32),
        latent_cache.latent_key(resized, identity, torch.float32),
        latent_cache.latent_key(image, identity, torch.float16),
    }
    assert len(keys) == 3


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_a_damaged_file_is_a_miss_and_is_rewritten(tiny_pipe, tmp_path, encoded_counter, damage):
    images = random_images(2)
    expected_means, expected_stds = latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    victim = cache_files(tmp_path)[0]
    data = victim.read_bytes()
    victim.write_bytes({"garbage": b"not a safetensors file", "truncated": data[: len(data) // 2], "empty": b""}[damage])

    encoded_counter.clear()
    means, stds = latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    assert encoded_counter == [1]  # re-encoded alone: equal within float rounding to its batch of 2
    torch.testing.assert_close(means, expected_means)
    torch.testing.assert_close(stds, expected_stds)

    encoded_counter.clear()
    again = latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    assert encoded_counter == [] and torch.equal(again[0], means) and torch.equal(again[1], stds)


def test_files_are_safetensors_with_mean_and_std_only(tiny_pipe, tmp_path):
    images = random_images(2)
    means, _ = latent_cache.encode_images_cached(tiny_pipe, images, tmp_path)
    files = cache_files(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [p.name for p in files]  # no temporary files left
    for path in files:
        with safe_open(path, framework="pt") as handle:
            assert sorted(handle.keys()) == ["mean", "std"]
            assert handle.metadata()["key"] == path.stem
            assert handle.get_tensor("mean").shape == means.shape[1:]


def test_without_a_folder_it_is_encode_images(tiny_pipe, encoded_counter):
    images = random_images(2)
    means, stds = latent_cache.encode_images_cached(tiny_pipe, images, None)
    assert encoded_counter == [2] and means.shape[0] == stds.shape[0] == 2


def test_a_folder_that_cannot_be_made_is_a_clear_error(tiny_pipe, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(latent_cache.LatentCacheError, match="cannot create the latent cache folder"):
        latent_cache.encode_images_cached(tiny_pipe, random_images(1), blocker / "latents")
