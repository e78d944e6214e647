"""Text-encoder training (TrainingConfig.text_encoder_lr, kohya's --text_encoder_lr): the style
learns on the text encoder's attention Share layers too, is merged with the UNet's in one step,
exports with both parts and resumes exactly. On the tiny random pipelines."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from share_diffusion import share
from share_diffusion.checkpoints import CheckpointMismatch
from share_diffusion.generation import generate_images
from share_diffusion.images import load_training_images
from share_diffusion.loading import load_pipeline
from share_diffusion.studio import Studio, library_style_factors
from share_diffusion.training import (TrainingCancelled, TrainingConfig, TrainingFailed, copy_sharing_weights,
                                      native_resolution, train_style, training_unet)
from tests.test_distributed import single_config, train_in_two_processes, write_pictures
from tests.tiny_families import build_tiny_sdxl_pipeline

CONFIG = TrainingConfig(steps=6, batch_size=2, learning_rate=1e-2, text_encoder_lr=1e-2, strength_previews=0,
                        checkpoint_every=2, warmup_steps=2, lr_schedule="cosine")  # fmt: skip
PROMPT = "a red circle on a blue background"


@pytest.fixture
def picture_folder(tmp_path) -> Path:
    return write_pictures(tmp_path / "pictures")


def new_studio(pipeline_dir, library: Path) -> Studio:
    return Studio(load_pipeline(str(pipeline_dir), device="cpu", progress=False), library, model_id="tiny")


def deltas(studio: Studio, name: str, component: str) -> dict[str, torch.Tensor]:
    """The style's ΔW per layer of one component, as the library file holds it."""
    factors = library_style_factors(studio.library, studio.library.style(name)["id"], component)
    return {layer: b @ a.T for layer, (b, a) in factors.items()}


def test_a_text_encoder_learning_rate_trains_the_text_encoders_attention_and_zero_leaves_it_without_the_style(
        tiny_pipeline_dir, picture_folder, tmp_path):  # fmt: skip
    studio = new_studio(tiny_pipeline_dir, tmp_path / "library.safetensors")
    studio.train([picture_folder], "both", config=CONFIG)
    studio.train([picture_folder], "unet only", config=TrainingConfig(**{**CONFIG.__dict__, "text_encoder_lr": 0.0}))

    for name in ("both", "unet only"):
        unet = deltas(studio, name, "unet")
        attention = [delta for layer, delta in unet.items() if share.matches(layer, share.UNET_TARGET_MODULES)]
        assert attention and all(delta.norm() > 0 for delta in attention), name
    text = deltas(studio, "both", "text_encoder")
    trained = {layer for layer in text if share.matches(layer, share.CLIP_TARGET_MODULES)}
    assert len(trained) == 8 and all(text[layer].norm() > 0 for layer in trained)  # q, k, v, out of 2 layers
    assert all(delta.norm() == 0 for layer, delta in text.items() if layer not in trained)  # the MLP does not train
    assert all(delta.norm() == 0 for delta in deltas(studio, "unet only", "text_encoder").values())
    assert studio.library.style("both")["training"]["text_encoder_lr"] == CONFIG.text_encoder_lr


def draw(pipe) -> np.ndarray:
    return np.asarray(generate_images(pipe, PROMPT, seed=3, steps=4, guidance=4.0)[0], dtype=np.float32) / 255


def encoded(pipe) -> torch.Tensor:
    """The text encoder's hidden states of PROMPT."""
    ids = pipe.tokenizer([PROMPT], padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt")
    with torch.no_grad():
        return pipe.text_encoder(ids.input_ids)[0]


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_exports_carry_both_parts_and_diffusers_draws_what_studio_draws(tiny_pipeline_dir, picture_folder, tmp_path, format):
    studio = new_studio(tiny_pipeline_dir, tmp_path / "library.safetensors")
    studio.train([picture_folder], "grain", config=CONFIG)
    path = studio.export_lora("grain", tmp_path / f"grain-{format}.safetensors", format=format)
    keys = load_file(str(path)).keys()
    assert any(k.startswith("lora_te_" if format == "kohya" else "text_encoder.") for k in keys)
    assert any(k.startswith("lora_unet_" if format == "kohya" else "unet.") for k in keys)

    theirs = StableDiffusionPipeline.from_pretrained(tiny_pipeline_dir, local_files_only=True)
    theirs.set_progress_bar_config(disable=True)
    theirs.load_lora_weights(str(path))
    ours = np.asarray(studio.generate(PROMPT, style="grain", add_trigger=False, seed=3, steps=4, guidance=4.0)[0][0],
                      dtype=np.float32) / 255  # fmt: skip
    assert np.abs(ours - draw(theirs)).max() <= 1 / 255 + 1e-6

    base = encoded(studio.pipe)
    share.set_active_styles(studio.pipe.text_encoder, {studio.library.style("grain")["id"]: 1.0})
    styled = encoded(studio.pipe)
    share.set_active_styles(studio.pipe.text_encoder, None)
    assert (encoded(theirs) - styled).norm() <= 1e-5 * (styled - base).norm()  # diffusers applies the text part exactly


def test_a_cancelled_training_with_the_text_encoder_resumes_exactly_and_other_rates_are_refused(
        tiny_pipeline_dir, picture_folder, tmp_path):  # fmt: skip
    straight = new_studio(tiny_pipeline_dir, tmp_path / "straight.safetensors")
    straight.train([picture_folder], "grain", config=CONFIG)

    studio = new_studio(tiny_pipeline_dir, tmp_path / "library.safetensors")
    cancel = threading.Event()
    with pytest.raises(TrainingCancelled):
        studio.train([picture_folder], "grain", config=CONFIG, cancel=cancel, progress=lambda p: p.step == 3 and cancel.set())
    other = TrainingConfig(**{**CONFIG.__dict__, "text_encoder_lr": 5e-3})
    with pytest.raises(CheckpointMismatch, match="other settings"):
        studio.train([picture_folder], "grain", config=other, resume=True)
    assert studio.train([picture_folder], "grain", config=CONFIG, resume=True).resumed_from == 3

    for component in ("unet", "text_encoder"):
        assert_same_style(deltas(straight, "grain", component), deltas(studio, "grain", component), 1e-6)


def assert_same_style(first: dict, second: dict, tolerance: float) -> None:
    """The same ΔW on every layer, relative to the style's ΔW over all layers."""
    scale = sum(float(delta.square().sum()) for delta in first.values()) ** 0.5
    worst = max(float((first[n] - second[n]).norm()) for n in first) / scale
    assert scale > 0 and worst <= tolerance, worst


def test_two_cpu_processes_train_the_text_encoder_as_one_process_does_with_the_same_total_batch(tiny_pipeline_dir, tmp_path):
    pictures = write_pictures(tmp_path / "pictures")
    library = tmp_path / "library.safetensors"
    train_in_two_processes(tiny_pipeline_dir, pictures, library, 29518, "--text-encoder-lr", "1e-2")

    single = new_studio(tiny_pipeline_dir, tmp_path / "single.safetensors")
    config = TrainingConfig(**{**single_config(single).__dict__, "steps": 6, "batch_size": 4, "learning_rate": 1e-2,
                               "text_encoder_lr": 1e-2, "strength_previews": 0})  # fmt: skip
    single.train([pictures], "grain", config=config)
    launched = new_studio(tiny_pipeline_dir, library)
    for component in ("unet", "text_encoder"):  # the gradients of both were averaged over the processes
        assert_same_style(deltas(single, "grain", component), deltas(launched, "grain", component), 1e-4)


def test_both_sdxl_text_encoders_learn_on_their_training_copies_and_a_rate_without_them_is_refused(tmp_path):
    pipe = build_tiny_sdxl_pipeline(tmp_path)
    share.inject_share_layers(pipe.unet, share.ShareConfig(target_modules=share.UNET_LORA_MODULES))
    for text_encoder in (pipe.text_encoder, pipe.text_encoder_2):
        share.inject_share_layers(text_encoder, share.ShareConfig(target_modules=share.CLIP_LORA_MODULES))
    pictures = tmp_path / "pictures"
    pictures.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 64, 3), 60 * i, np.uint8)).save(pictures / f"{i}.png")
    images = load_training_images([pictures], native_resolution(pipe))
    config = TrainingConfig(steps=2, batch_size=2, learning_rate=1e-2, text_encoder_lr=1e-2, checkpoint_every=0)

    copies = {c: copy_sharing_weights(getattr(pipe, c)) for c in ("text_encoder", "text_encoder_2")}
    train_style(pipe, training_unet(pipe), images, "s1", "x", config, text_encoders=copies)
    learned = {}
    for component, model in copies.items():
        _, factors, _ = share.take_trained_style(model)
        learned[component] = {re.search(r"layers\.(\d+)\.", layer)[1] for layer, (b, _) in factors.items() if b.norm() > 0}
        assert len(factors) == 8, component  # q, k, v, out of 2 layers
        assert all(layer.style_in_training is None for layer in share.share_layers(getattr(pipe, component)).values())
    # SDXL takes the first encoder's penultimate hidden states: its last layer gets no gradient, as in kohya's.
    assert learned == {"text_encoder": {"0"}, "text_encoder_2": {"0", "1"}}
    with pytest.raises(TrainingFailed, match="text encoders with Share layers"):
        train_style(pipe, training_unet(pipe), images, "s2", "x", config)
