"""Training options every LoRA trainer has: min-SNR-γ, flip on/off, gradient accumulation, a
learning-rate warm-up and schedule, and batched latent encoding; on the tiny random pipeline."""

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

from share_diffusion import share
from share_diffusion.images import ImageSet, TrainingImage
from share_diffusion.latent_cache import encode_images
from share_diffusion.training import (
    StyleBatches,
    TrainingConfig,
    min_snr_weights,
    train_style,
    training_unet,
)


def half_white_image(size: int) -> ImageSet:
    """One image, white on the left and black on the right: its mirror image is far from it."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    pixels[:, : size // 2] = 255
    return ImageSet([TrainingImage(Image.fromarray(pixels), None, "a picture")])


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_follow_the_formula(prediction_type):
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    timesteps = torch.tensor([0, 50, 400, 999])
    alphas = scheduler.alphas_cumprod[timesteps]
    snr = alphas / (1 - alphas)
    expected = torch.minimum(snr, torch.tensor(5.0)) / (snr + 1 if prediction_type == "v_prediction" else snr)

    weights = min_snr_weights(scheduler, timesteps, 5.0)

    torch.testing.assert_close(weights, expected.float(), rtol=1e-5, atol=0)
    assert weights[0] < 0.01  # nearly clean images count little
    if prediction_type == "epsilon":
        assert weights[-1] == 1  # SNR under γ: the plain loss


def mirrored_items(pipe, flip: bool, batches: int = 6) -> int:
    """How many latents in `batches` batches of 4 are the image's mirror image rather than the image."""
    images = half_white_image(pipe.unet.config.sample_size * pipe.vae_scale_factor)
    config = TrainingConfig(batch_size=4, noise_offset=0.0, flip=flip, caption_dropout=0.0)
    source = StyleBatches(pipe, images, "x", config, np.random.default_rng(0), torch.Generator().manual_seed(0))
    mean = source.buckets[0].means[0] * pipe.vae.config.scaling_factor
    alphas = source.noise_scheduler.alphas_cumprod
    mirrored = 0
    for _ in range(batches):
        noisy, timesteps, _, noise = source.next(torch.device("cpu"))
        a = alphas[timesteps].view(-1, 1, 1, 1)
        latents = (noisy - (1 - a).sqrt() * noise) / a.sqrt()
        mirrored += int(((latents - mean.flip(-1)).flatten(1).norm(dim=1) < (latents - mean).flatten(1).norm(dim=1)).sum())
    return mirrored


def test_flip_off_never_mirrors_and_on_does(tiny_pipe):
    assert mirrored_items(tiny_pipe, flip=False) == 0
    assert 4 <= mirrored_items(tiny_pipe, flip=True) <= 20  # about half of 24


def test_latents_are_encoded_in_batches_with_the_same_result(tiny_pipe):
    images = ImageSet(half_white_image(64).images * 5)
    one_batch, stds = encode_images(tiny_pipe, images, batch_size=5)
    batched, batched_stds = encode_images(tiny_pipe, images, batch_size=2)
    torch.testing.assert_close(batched, one_batch, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(batched_stds, stds, rtol=1e-5, atol=1e-6)


def test_accumulation_warmup_cosine_and_min_snr_train_a_style(tiny_pipe):
    images = half_white_image(tiny_pipe.unet.config.sample_size * tiny_pipe.vae_scale_factor)
    unet = training_unet(tiny_pipe)
    share.inject_share_layers(unet, share.ShareConfig(rank=2))
    config = TrainingConfig(steps=4, batch_size=1, rank=2, learning_rate=1e-2, gradient_accumulation=3, warmup_steps=2,
                            lr_schedule="cosine", min_snr_gamma=5.0, flip=False, strength_previews=0)
    steps = []

    trained = train_style(tiny_pipe, unet, images, "s1", "x", config, progress=lambda p: steps.append(p.step))

    assert steps == [1, 2, 3, 4]
    factors_b = [layer.style_in_training.factors_b for layer in share.share_layers(trained).values()]
    assert any(float(b.detach().abs().max()) > 0 for b in factors_b)


@pytest.mark.parametrize("bad", [dict(lr_schedule="linear"), dict(gradient_accumulation=0), dict(min_snr_gamma=-1)])
def test_bad_training_options_are_refused_clearly(bad):
    with pytest.raises(ValueError, match="lr_schedule must be one of constant, cosine|gradient accumulation must be"):
        TrainingConfig(**bad)
