"""One precision policy for training (training.training_precision): a half model trains in its own
type with float32 factors, fp16 with a gradient scaler; a float32 model may autocast; asking a half
model for another type is refused with the fix; one process trains many times with different
settings. On the tiny random pipeline, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from share_diffusion import share
from share_diffusion.images import ImageSet, TrainingImage
from share_diffusion.loading import load_pipeline
from share_diffusion.training import TrainingConfig, TrainingFailed, train_style, training_precision, training_unet


@pytest.mark.parametrize(("model", "requested", "computes_in"), [
    (torch.float32, "auto", None), (torch.float32, "no", None), (torch.float32, "fp16", torch.float16),
    (torch.float32, "bf16", torch.bfloat16), (torch.float16, "auto", torch.float16), (torch.float16, "fp16", torch.float16),
    (torch.bfloat16, "auto", torch.bfloat16), (torch.bfloat16, "bf16", torch.bfloat16),
])  # fmt: skip
def test_the_compute_type_is_the_models_own_or_the_autocast_asked_for(model, requested, computes_in):
    assert training_precision(model, requested) == computes_in


@pytest.mark.parametrize(("model", "requested", "fix"), [
    (torch.float16, "no", "--dtype fp32"), (torch.bfloat16, "no", "--dtype fp32"), (torch.float16, "bf16", "--dtype bf16"),
    (torch.bfloat16, "fp16", "--dtype fp16"),
])  # fmt: skip
def test_a_half_model_asked_for_another_type_is_refused_with_the_fix(model, requested, fix):
    with pytest.raises(TrainingFailed, match=fix):
        training_precision(model, requested)


def pictures(size: int) -> ImageSet:
    rng = np.random.default_rng(0)
    return ImageSet([TrainingImage(Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)), None, "a picture") for _ in range(2)])


def trained_delta(pipe, config: TrainingConfig) -> dict[str, torch.Tensor]:
    unet = train_style(pipe, training_unet(pipe), pictures(pipe.unet.config.sample_size * pipe.vae_scale_factor), "s", "grain", config)
    deltas = {}
    for name, layer in share.share_layers(unet).items():
        factors_b, factors_a = layer.style_in_training.factors()
        assert factors_b.dtype == factors_a.dtype == torch.float32  # the trained factors stay float32
        deltas[name] = (factors_b @ factors_a.T).detach()
        assert torch.isfinite(deltas[name]).all()
    return deltas


@pytest.fixture
def float32_pipe(tiny_pipeline_dir):
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    share.inject_share_layers(pipe.unet, share.ShareConfig())
    return pipe


def test_one_process_trains_again_and_again_with_other_precisions(float32_pipe):
    config = TrainingConfig(steps=3, batch_size=2, learning_rate=1e-2, strength_previews=0)
    runs = [(p, trained_delta(float32_pipe, TrainingConfig(**{**config.__dict__, "mixed_precision": p}))) for p in ("bf16", "fp16", "no", "bf16")]
    results = dict(runs[:3])
    layer = next(name for name, delta in results["no"].items() if float(delta.norm()) > 0)
    # the same training computed in three types: close, and not identical (the types were used)
    for half in ("bf16", "fp16"):
        difference = float((results[half][layer] - results["no"][layer]).norm() / results["no"][layer].norm())
        assert 0 < difference < 0.5, (half, difference)
    assert all(torch.equal(runs[0][1][n], runs[3][1][n]) for n in results["no"])  # the second bf16 run repeats the first


@pytest.mark.parametrize("half", [torch.bfloat16, torch.float16])
def test_a_half_model_trains_in_its_own_type_with_float32_factors(tiny_pipeline_dir, half):
    pipe = load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    pipe.to(half)  # fp16 on the CPU only for this test: load_pipeline refuses it there
    share.inject_share_layers(pipe.unet, share.ShareConfig())
    deltas = trained_delta(pipe, TrainingConfig(steps=3, batch_size=2, learning_rate=1e-2, strength_previews=0))
    assert any(float(d.norm()) > 0 for d in deltas.values())
    with pytest.raises(TrainingFailed, match="--dtype fp32"):
        trained_delta(pipe, TrainingConfig(steps=1, batch_size=2, mixed_precision="no"))
