"""SDXL and SD 2.x v-prediction driven like SD 1.x: training, generation, and aspect-ratio bucketing.

Every pipeline is a tiny random one built by tests/tiny_families.py and saved as a diffusers folder
(the ``family_models`` fixture of test_families.py); nothing is mocked. A style is trained through
``Studio.train`` and drawn through ``Studio.generate`` and through the CLI in a real subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from share_diffusion import loading, share
from share_diffusion.conditioning import SDXLConditioning, TextConditioning, unet_conditioning
from share_diffusion.generation import generation_defaults, native_size
from share_diffusion.images import AspectBuckets, ImageSet, TrainingImage, load_training_images
from share_diffusion.latent_cache import encoding_vae
from share_diffusion.png_metadata import read_png_metadata
from share_diffusion.studio import Studio
from share_diffusion.training import StyleBatches, TrainingConfig, aspect_buckets, training_config
from tests.test_families import family_models, offline  # noqa: F401  (fixtures: the tiny model folders)

ROOT = Path(__file__).resolve().parent.parent
SQUARE, WIDE = (64, 64), (120, 60)  # a square file and a 2:1 one (width, height)


def write_pictures(folder: Path, sizes: list[tuple[int, int]], seed: int = 0) -> Path:
    """Red-on-dark noisy pictures, one per (width, height)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i, (width, height) in enumerate(sizes):
        pixels = np.zeros((height, width, 3), np.uint8)
        pixels[..., 0] = 200 + rng.integers(0, 40, (height, width))
        pixels[..., 2] = rng.integers(0, 60, (height, width))
        Image.fromarray(pixels).save(folder / f"{i}.png")
    return folder


def load(folder: Path):
    return loading.load_pipeline(str(folder), device="cpu", progress=False)


@pytest.fixture(scope="module", params=["sdxl", "sd2-v"])
def trained(request, family_models, tmp_path_factory):  # noqa: F811
    """(family, model folder, Studio) with one style "Ink" trained from square and 2:1 pictures."""
    family = request.param
    folder = family_models[family][0]
    work = tmp_path_factory.mktemp(f"trained-{family}")
    studio = Studio(load(folder), work / "library.safetensors", model_id=str(folder))
    config = TrainingConfig(steps=4, batch_size=2, learning_rate=1e-2, strength_previews=0, checkpoint_every=0,
                            preview_every=4)
    previews = []
    studio.train([write_pictures(work / "pictures", [SQUARE, WIDE, SQUARE, WIDE])], "Ink", config=config,
                 preview=lambda step, images: previews.append((step, [image.size for image in images])))
    assert previews == [(4, [native_size(studio.pipe)])]  # the family's own pipeline draws the previews
    return family, folder, studio


# ------------------------------------------------------------------------------ train and generate
def test_style_trained_through_studio_changes_its_images_at_the_native_size(trained):
    family, _, studio = trained
    assert studio.info()["family"] == family and studio.style_names() == ["Ink"]
    styled, metadata = studio.generate("a cat", style="Ink", seed=3)
    base, _ = studio.generate("a cat", seed=3)
    assert styled[0].size == base[0].size == native_size(studio.pipe)
    assert metadata["styles"] == {"Ink": 1.0} and metadata["prompt"] == "a cat, in ink style"
    assert np.abs(np.asarray(styled[0], dtype=int) - np.asarray(base[0], dtype=int)).max() > 0


def test_cli_generate_draws_the_style_exactly_as_studio_generate_with_the_family_defaults(trained, tmp_path):
    family, folder, studio = trained
    out = tmp_path / "ink.png"
    run = subprocess.run(
        [sys.executable, "-m", "share_diffusion", "generate", "--model", str(folder), "--library", str(studio.path),
         "--style", "Ink", "--prompt", "a cat", "--seed", "3", "--out", str(out), "--quiet"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    defaults = generation_defaults(studio.pipe)
    metadata = read_png_metadata(out)
    assert (metadata["steps"], metadata["guidance"]) == (defaults.steps, defaults.guidance)
    expected, _ = studio.generate("a cat", style="Ink", seed=3)
    assert np.abs(np.asarray(Image.open(out), dtype=int) - np.asarray(expected[0], dtype=int)).max() <= 1


def test_app_generate_tab_opens_with_the_family_defaults_and_draws_the_style_as_studio_does(trained, tmp_path):
    from app.callbacks import StudioCallbacks
    from app.ui import build_app

    _, _, studio = trained
    defaults = generation_defaults(studio.pipe)
    demo = build_app(studio.pipe, library_path=studio.path, output_dir=tmp_path / "out", work_dir=tmp_path / "work")
    sliders = {c["props"].get("label"): c["props"].get("value") for c in demo.get_config_file()["components"]
               if c["type"] == "slider"}  # fmt: skip
    assert (sliders["Steps"], sliders["Guidance (CFG scale)"]) == (defaults.steps, defaults.guidance)
    width, height = native_size(studio.pipe)
    cb = StudioCallbacks(studio.pipe, studio, tmp_path / "out", work_dir=tmp_path / "work")
    paths, used_seed, _, _ = cb.generate("a cat", "", "Ink", 1.0, None, 0.5, True, 3, defaults.steps, defaults.guidance,
                                         None, width, height, 1)  # fmt: skip
    expected, _ = studio.generate("a cat", style="Ink", seed=3)
    assert used_seed == 3 and np.array_equal(np.asarray(Image.open(paths[0]).convert("RGB")), np.asarray(expected[0]))


def test_mix_and_strength_act_on_the_whole_guidance_batch_as_for_sd1(trained):
    _, _, studio = trained
    style, _ = studio.generate("a cat", style="Ink", seed=5, steps=3)
    mix, _ = studio.generate("a cat", mix={"Ink": 1.0}, seed=5, steps=3)
    off, _ = studio.generate("a cat", style="Ink", strength=0.0, seed=5, steps=3)
    base, _ = studio.generate("a cat, in ink style", seed=5, steps=3)
    assert np.array_equal(np.asarray(mix[0]), np.asarray(style[0]))
    assert np.array_equal(np.asarray(off[0]), np.asarray(base[0]))  # weight 0 is the base model, CFG half included


def test_sdxl_unet_has_share_layers_on_every_attention_projection(family_models):  # noqa: F811
    pipe = load(family_models["sdxl"][0])
    layers = share.inject_share_layers(pipe.unet, share.ShareConfig())
    attentions = [name for name, module in pipe.unet.named_modules() if type(module).__name__ == "Attention"]
    assert attentions and any(name.endswith("attn2") for name in attentions)  # self- and cross-attention
    expected = {f"{attention}.{projection}" for attention in attentions for projection in ("to_q", "to_k", "to_v", "to_out.0")}
    assert set(layers) == expected


# ------------------------------------------------------------------------------ SD 2.x v-prediction learns
def test_tiny_sd2_v_prediction_model_learns_a_colour_style_that_measurably_moves_its_images(family_models, tmp_path):  # noqa: F811
    pipe = load(family_models["sd2-v"][0])
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    studio = Studio(pipe, tmp_path / "library.safetensors", model_id="tiny-sd2-v")
    pictures = write_pictures(tmp_path / "red", [SQUARE] * 8)
    config = TrainingConfig(steps=120, learning_rate=1e-2, batch_size=4, checkpoint_every=0, strength_previews=8)
    result = studio.train([pictures], "Red", config=config)
    # The style measure (style_measure.py): 0 is the base model's images, 1 the training pictures.
    assert result.strength.count == 8 and result.strength.low > 0.1, result.strength


# ------------------------------------------------------------------------------ aspect-ratio bucketing
def test_images_of_two_aspect_ratios_land_in_two_buckets_resized_not_centre_cropped(tmp_path):
    buckets = AspectBuckets.around(64, 8)
    assert (64, 64) in buckets.sizes and all(w % 8 == 0 and h % 8 == 0 and w * h <= 64 * 64 for w, h in buckets.sizes)
    images = load_training_images([write_pictures(tmp_path / "p", [SQUARE, WIDE, (137, 60)])], 64, buckets=buckets)
    square, wide, wider = images.images
    assert (square.image.size, wide.image.size, wider.image.size) == ((64, 64), (88, 40), (88, 40))
    assert (square.original_size, square.resized_size, square.crop_top_left) == ((64, 64), (64, 64), (0, 0))
    # 120×60 covers 88×40 at full width (resized to 88×44): 2 rows go at the top, 2 at the bottom.
    assert (wide.original_size, wide.resized_size, wide.crop_top_left) == ((60, 120), (44, 88), (2, 0))
    # 137×60 covers it at full height (resized to 91×40): 2 columns go on the left, 1 on the right,
    # which is where the crop starts in the mirror image.
    assert (wider.original_size, wider.resized_size, wider.crop_top_left) == ((60, 137), (40, 91), (0, 2))
    assert wider.size_and_crop(mirrored=True) == ((60, 137), (0, 1))


def test_square_images_in_buckets_are_bit_identical_to_square_centre_crops(tmp_path):
    pictures = write_pictures(tmp_path / "p", [(90, 90), (64, 64), (65, 64)])
    plain = load_training_images([pictures], 64)
    bucketed = load_training_images([pictures], 64, buckets=AspectBuckets.around(64, 8))
    for a, b in zip(plain.images, bucketed.images):
        assert b.image.size == (64, 64) and np.array_equal(np.asarray(a.image), np.asarray(b.image))


def test_bucket_steps_are_64_px_for_real_models_and_finer_for_tiny_ones(family_models):  # noqa: F811
    sdxl = AspectBuckets.around(1024, 64).sizes  # kohya's and SDXL's own buckets among them
    assert {(1024, 1024), (1152, 896), (1216, 832), (1344, 768), (1536, 640), (640, 1536)} <= set(sdxl)
    for family in ("sd1", "sd2-v", "sdxl"):
        buckets = aspect_buckets(load(family_models[family][0]))
        assert (buckets.resolution, buckets.step) == (64, 8)  # 64-px models: resolution / 8


def test_batches_never_mix_buckets_and_sdxl_time_ids_carry_each_images_real_size_and_crop(family_models, tmp_path):  # noqa: F811
    pipe = load(family_models["sdxl"][0])
    sizes = [(64, 64), (80, 80), (120, 60), (137, 60), (130, 64)]
    images = load_training_images([write_pictures(tmp_path / "p", sizes)], 64, buckets=aspect_buckets(pipe))
    by_bucket = {}
    for image in images.images:
        by_bucket.setdefault(image.image.size, set()).add(image.size_and_crop())
    assert set(by_bucket) == {(64, 64), (88, 40)}
    config = TrainingConfig(batch_size=3, flip=False, caption_dropout=0.0)
    batches = StyleBatches(pipe, images, "x", config, np.random.default_rng(0), torch.Generator().manual_seed(0))
    assert isinstance(batches.conditioning, SDXLConditioning)
    seen = set()
    for _ in range(12):
        noisy, _, conditioning, target = batches.next(torch.device("cpu"))
        height, width = (side * pipe.vae_scale_factor for side in noisy.shape[-2:])
        seen.add((width, height))
        time_ids = conditioning.added_cond_kwargs["time_ids"]
        assert time_ids.shape == (3, 6) and conditioning.added_cond_kwargs["text_embeds"].shape == (3, 48)
        for row in time_ids.long().tolist():
            original, crop, target_size = tuple(row[:2]), tuple(row[2:4]), tuple(row[4:])
            assert target_size == (height, width) and (original, crop) in by_bucket[(width, height)]
        assert conditioning.encoder_hidden_states.shape == (3, 77, 32 + 48) and target.shape == noisy.shape
    assert seen == {(64, 64), (88, 40)}  # both buckets are drawn, each batch from one


def test_mirrored_images_get_their_mirrored_crop_in_sdxl_time_ids():
    from share_diffusion.conditioning import time_ids

    image = TrainingImage(Image.new("RGB", (88, 40)), Path("p.png"), None, (60, 200), (40, 133), (0, 23))
    assert time_ids([image, image], [False, True]).long().tolist() == [[60, 200, 0, 23, 40, 88], [60, 200, 0, 22, 40, 88]]


# ------------------------------------------------------------------------------ per-family settings
def test_each_family_gets_its_conditioning_presets_and_generation_defaults(family_models):  # noqa: F811
    sdxl, sd2 = load(family_models["sdxl"][0]), load(family_models["sd2-v"][0])
    assert isinstance(unet_conditioning(sdxl), SDXLConditioning) and isinstance(unet_conditioning(sd2), TextConditioning)
    quick = training_config("quick", "single_file", "sdxl")
    assert (quick.learning_rate, quick.batch_size, quick.gradient_checkpointing) == (1e-4, 1, True)
    assert training_config("quick", "single_file", "sd2-v").batch_size == 4
    assert training_config("quick", "embedded", "sd1").learning_rate == 4e-3
    assert (generation_defaults(sdxl).steps, generation_defaults(sdxl).guidance) == (30, 5.0)
    assert (generation_defaults(sd2).steps, generation_defaults(sd2).guidance) == (20, 4.0)


def test_an_fp16_sdxl_vae_encodes_in_float32_and_is_given_back_unchanged(family_models):  # noqa: F811
    pipe = load(family_models["sdxl"][0])
    pipe.vae.to(torch.float16)
    before = {k: v.clone() for k, v in pipe.vae.state_dict().items()}
    with encoding_vae(pipe) as vae:
        assert vae.dtype == torch.float32  # the SDXL VAE overflows in fp16, as diffusers' SDXL pipeline knows
    assert pipe.vae.dtype == torch.float16
    assert all(torch.equal(before[k], v) for k, v in pipe.vae.state_dict().items())
    sd2 = load(family_models["sd2"][0])
    sd2.vae.to(torch.float16)
    with encoding_vae(sd2) as vae:
        assert vae.dtype == torch.float16  # SD 1.x/2.x VAEs encode in their own type, as before


def test_sdxl_training_images_all_of_one_size_keep_one_bucket(family_models, tmp_path):  # noqa: F811
    pipe = load(family_models["sdxl"][0])
    images = ImageSet([TrainingImage(Image.new("RGB", (64, 64), (200, 0, 0)), Path(f"{i}.png"), None) for i in range(2)])
    batches = StyleBatches(pipe, images, "x", TrainingConfig(batch_size=2), np.random.default_rng(0), torch.Generator())
    assert len(batches.buckets) == 1
    _, _, conditioning, _ = batches.next(torch.device("cpu"))
    # No file size recorded: the image's own size, uncropped, as diffusers' pipeline assumes.
    assert conditioning.added_cond_kwargs["time_ids"].long().tolist() == [[64, 64, 0, 0, 64, 64]] * 2
