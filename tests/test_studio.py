"""The user's main loop on the embedded model: train styles, keep them in one file, share them."""

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline

from share_diffusion.fingerprint import legacy_fingerprint
from share_diffusion.library import LibraryError, LibraryLockedError, StyleLibrary
from share_diffusion.loading import EMBEDDED_MODEL_DIR, load_pipeline
from share_diffusion.studio import Studio, library_style_factors
from share_diffusion import world
from share_diffusion.style_measure import StyleMeasure, vae_round_trip
from share_diffusion.training import TrainingCancelled, TrainingConfig, TrainingFailed, sample_noise

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "styles" / "examples"
# The embedded model unless a test run points elsewhere (same architecture, e.g. a pretrain --smoke output).
MODEL = os.environ.get("SHARE_TEST_MODEL", str(EMBEDDED_MODEL_DIR))
FEW_STEPS = TrainingConfig(steps=6, batch_size=2, learning_rate=1e-2)


@pytest.fixture
def pipe():
    return load_pipeline(MODEL, device="cpu", progress=False)


@pytest.fixture
def studio(pipe, tmp_path):
    return Studio(pipe, tmp_path / "library.safetensors", model_id="embedded")


def images(style: str, count: int = 4) -> list[Path]:
    return sorted((EXAMPLES / style).glob("*.png"))[:count]


def generate(studio: Studio, style=None, **kwargs) -> np.ndarray:
    result, _ = studio.generate("a red circle on a blue background", style=style, seed=3, steps=8, **kwargs)
    return np.asarray(result[0], dtype=np.float32)


def style_delta(library: StyleLibrary, name: str) -> dict[str, torch.Tensor]:
    factors = library_style_factors(library, library.style(name)["id"], "unet")
    return {layer: b @ a.T for layer, (b, a) in factors.items()}


def test_second_style_leaves_the_first_unchanged(studio):
    studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    before_delta = style_delta(studio.library, "Hatching")
    before_image = generate(studio, "Hatching")
    assert np.abs(before_image - generate(studio)).max() > 1, "the style changes the image"

    result = studio.train(images("neon"), "Neon", config=FEW_STEPS)

    after_delta = style_delta(StyleLibrary.load(studio.path), "Hatching")
    for layer, delta in before_delta.items():
        if not delta.any():  # a layer the trained style does not use (proj, ff, text encoder): rank 0
            assert not after_delta[layer].any(), layer
            continue
        error = torch.linalg.norm(after_delta[layer] - delta) / torch.linalg.norm(delta)
        assert error <= 1e-4, layer
    assert np.abs(generate(studio, "Hatching") - before_image).max() <= 1.0  # at most 1 level of 255
    assert result.errors_after["Hatching"] <= 1e-4
    record = studio.library.style("Hatching")
    assert len(record["error_history"]) == 2 and record["images"] == 4 and record["steps"] == 6


def test_cancel_and_failures_leave_the_library_byte_identical(studio):
    studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    saved = studio.path.read_bytes()
    reference = generate(studio, "Hatching")

    cancel = threading.Event()

    def cancel_at_step_3(progress):
        if progress.step == 3:
            cancel.set()

    with pytest.raises(TrainingCancelled):
        studio.train(images("neon"), "Neon", config=FEW_STEPS, progress=cancel_at_step_3, cancel=cancel)

    def broken_callback(progress):
        raise RuntimeError("a bug in the loop")

    with pytest.raises(RuntimeError):
        studio.train(images("neon"), "Neon", config=FEW_STEPS, progress=broken_callback)

    with pytest.raises(TrainingFailed, match="learning rate"):
        studio.train(images("neon"), "Neon", config=TrainingConfig(steps=60, batch_size=2, learning_rate=1e12))

    assert studio.path.read_bytes() == saved
    assert studio.style_names() == ["Hatching"]
    assert np.array_equal(generate(studio, "Hatching"), reference)


def test_full_disk_while_saving_leaves_the_library_intact(studio, monkeypatch):
    studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    saved = studio.path.read_bytes()

    def no_space(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("share_diffusion.library._write_synced", no_space)
    with pytest.raises(OSError, match="No space"):
        studio.train(images("neon"), "Neon", config=FEW_STEPS)
    monkeypatch.undo()
    assert studio.path.read_bytes() == saved
    assert studio.style_names() == ["Hatching"]
    assert not [p for p in studio.path.parent.iterdir() if p.name.endswith(".tmp")]


def test_damaged_and_foreign_libraries_are_refused_untouched(pipe, studio, tmp_path):
    studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    good = studio.path.read_bytes()
    for name, data in {"truncated": good[: len(good) // 3], "garbage": b"\x00" * 100}.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        with pytest.raises(LibraryError):
            Studio(pipe, path)
        assert path.read_bytes() == data

    foreign = StyleLibrary.load(studio.path)
    foreign.meta["base_model"]["fingerprint"] = "0123456789abcdef"
    path = tmp_path / "foreign.safetensors"
    foreign.save(path)
    data = path.read_bytes()
    with pytest.raises(LibraryError, match="fingerprint"):
        Studio(pipe, path)
    with pytest.raises(LibraryError, match="fingerprint"):
        studio.import_files([path])
    assert path.read_bytes() == data and studio.path.read_bytes() == good


def test_libraries_saved_with_the_fp32_fingerprint_still_load(pipe, studio, tmp_path):
    """Before the fingerprint rounded weights to fp16, libraries recorded the fp32 one: they still load."""
    studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    reference = generate(studio, "Hatching")
    legacy = legacy_fingerprint(pipe)
    assert legacy != studio.fingerprint
    if MODEL == str(EMBEDDED_MODEL_DIR):
        assert legacy == "3443f8a5e4faecd1"  # what every library made on the embedded model recorded
    old = StyleLibrary.load(studio.path)
    old.meta["base_model"]["fingerprint"] = legacy
    old_path = tmp_path / "saved-before.safetensors"
    old.save(old_path)

    reopened = Studio(load_pipeline(MODEL, device="cpu", progress=False), old_path, model_id="embedded")
    assert reopened.style_names() == ["Hatching"]
    assert np.abs(generate(reopened, "Hatching") - reference).max() <= 1.0
    assert studio.import_files([old_path], on_clash="rename") == ["Hatching (2)"]
    assert np.abs(generate(studio, "Hatching (2)") - reference).max() <= 1.0

    # Any other fingerprint is still refused, with the same message as before.
    old.meta["base_model"]["fingerprint"] = "0123456789abcdef"
    foreign_path = tmp_path / "foreign.safetensors"
    old.save(foreign_path)
    expected = (f"{foreign_path}: made for base model 'embedded' (fingerprint 0123456789abcdef), but the loaded "
                f"model 'embedded' has fingerprint {studio.fingerprint}; start Share Studio with --model embedded")
    with pytest.raises(LibraryError) as refused:
        Studio(load_pipeline(MODEL, device="cpu", progress=False), foreign_path, model_id="embedded")
    assert str(refused.value) == expected
    with pytest.raises(LibraryError) as refused:
        studio.import_files([foreign_path])
    assert str(refused.value) == expected


def test_import_a_library_keeps_every_style(pipe, tmp_path):
    first = Studio(pipe, tmp_path / "a.safetensors")
    first.train(images("hatching"), "Hatching", config=FEW_STEPS)
    first.train(images("neon"), "Neon", config=FEW_STEPS)
    exported = {name: style_delta(first.library, name) for name in first.style_names()}

    other_pipe = load_pipeline(MODEL, device="cpu", progress=False)
    second = Studio(other_pipe, tmp_path / "b.safetensors")
    second.train(images("mosaic"), "Neon", config=FEW_STEPS)  # a clashing name
    added = second.import_files([first.path], on_clash="rename")

    assert added == ["Hatching", "Neon (2)"]
    assert second.style_names() == ["Neon", "Hatching", "Neon (2)"]
    reloaded = StyleLibrary.load(second.path)
    for original, imported in (("Hatching", "Hatching"), ("Neon", "Neon (2)")):
        delta = style_delta(reloaded, imported)
        for layer, reference in exported[original].items():
            assert torch.linalg.norm(delta[layer] - reference) <= 1e-4 * torch.linalg.norm(reference)

    assert second.import_files([first.path], on_clash="skip") == []
    with pytest.raises(LibraryError, match="already"):
        second.import_files([first.path], on_clash="error")


def test_exported_lora_gives_the_same_image_in_diffusers(studio, tmp_path):
    studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    ours = generate(studio, "Hatching")
    for fmt in ("kohya", "diffusers"):
        path = studio.export_lora("Hatching", tmp_path / f"hatching-{fmt}.safetensors", format=fmt)
        plain = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
        plain.load_lora_weights(str(path))
        plain.set_progress_bar_config(disable=True)
        theirs = plain(
            "a red circle on a blue background, in hatching style",
            num_inference_steps=8,
            guidance_scale=4.0,
            generator=[torch.Generator().manual_seed(3)],
        ).images[0]
        assert np.abs(np.asarray(theirs, dtype=np.float32) - ours).max() <= 2.0, fmt


def test_rename_remove_and_undo(studio):
    studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    studio.train(images("neon"), "Neon", config=FEW_STEPS)
    studio.rename("Neon", "Glow")
    assert studio.style_names() == ["Hatching", "Glow"]
    studio.remove("Hatching")
    assert studio.style_names() == ["Glow"]
    studio.undo_last_change()
    assert studio.style_names() == ["Hatching", "Glow"]
    assert StyleLibrary.load(studio.path).styles[0]["name"] == "Hatching"
    with pytest.raises(LibraryError, match="nothing to undo"):
        studio.undo_last_change()


def test_a_second_process_cannot_write_while_locked(studio):
    code = (
        "import sys, time; from share_diffusion.library import LibraryLock;"
        f"LibraryLock({str(studio.path)!r}).__enter__(); print('locked', flush=True); time.sleep(60)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LibraryLockedError, match="another Share Studio process"):
            studio.train(images("hatching"), "Hatching", config=FEW_STEPS)
    finally:
        holder.kill()
        holder.wait()
    assert not studio.path.exists()


def run_cli(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "share_diffusion", *args], cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_cli_train_list_generate_export_remove(tmp_path):
    library = str(tmp_path / "lib.safetensors")
    common = ["--library", library, "--model", MODEL]
    trained = run_cli("train", *common, "--name", "Hatching", "--images", str(EXAMPLES / "hatching"), "--steps", "4",
                      "--batch-size", "2")
    assert "learned style 'Hatching'" in trained.stdout
    listed = run_cli("list", "--library", library, "--json")
    assert '"name": "Hatching"' in listed.stdout
    out = tmp_path / "x.png"
    run_cli("generate", *common, "--style", "Hatching", "--prompt", "a red circle on a blue background",
            "--seed", "0", "--steps", "4", "--out", str(out))
    assert out.exists()
    run_cli("export-lora", *common, "--style", "Hatching", "--out", str(tmp_path / "h.safetensors"))
    missing = run_cli("remove", *common, "--style", "Nope", check=False)
    assert missing.returncode != 0 and "Traceback" not in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1 and "no style named 'Nope'" in missing.stderr
    run_cli("remove", *common, "--style", "Hatching")
    assert '"styles": []' in run_cli("list", "--library", library, "--json").stdout


STYLE_PROMPTS = ["a red circle on a blue background", "a yellow square on a green background",
                 "a white triangle on a pink background", "a blue diamond on a orange background"]


def quick_style_and_base_images(studio: Studio, style: str) -> tuple[np.ndarray, np.ndarray]:
    """Train `style` from its 12 demo images with the quick preset; then the same 4 prompts × 2 seeds
    at the default guidance, with the style and without (images in [0, 1])."""
    result = studio.train(sorted((EXAMPLES / style).glob("*.png")), style, trigger=style, preset="quick")
    assert result.rejected == []
    styled, plain = [], []
    for prompt in STYLE_PROMPTS:
        for seed in (0, 1):
            styled.append(np.asarray(studio.generate(prompt, style=style, seed=seed, steps=20)[0][0]))
            plain.append(np.asarray(studio.generate(prompt, seed=seed, steps=20)[0][0]))
    return np.stack(styled).astype(np.float32) / 255, np.stack(plain).astype(np.float32) / 255


def border_brightness(images: np.ndarray) -> np.ndarray:
    """Mean of the top and bottom 4 rows, per image."""
    return np.concatenate([images[:, :4], images[:, -4:]], axis=1).mean(axis=(1, 2, 3))


def test_quick_preset_learns_a_texture_style_and_the_measure_follows_its_weight(studio):
    """Halftone from its 12 demo images, judged by the style measure against each prompt's halftone
    render through the VAE: well above the base model, and rising with the style's weight. The
    training also scores its previews against the user's own images (what the app shows)."""
    result = studio.train(sorted((EXAMPLES / "halftone").glob("*.png")), "halftone", trigger="halftone", preset="quick")
    prompts = [(prompt, seed) for prompt in STYLE_PROMPTS for seed in (0, 1)]

    def draw(weight: float) -> np.ndarray:
        style = "halftone" if weight else None
        images = [studio.generate(p, style=style, strength=weight, seed=s, steps=20)[0][0] for p, s in prompts]
        return np.stack([np.asarray(image, dtype=np.float32) / 255 for image in images])

    renders = np.stack([world.render_styled("halftone", world.parse_caption(p), np.random.default_rng(0)) for p, _ in prompts])
    base = draw(0)
    measure = StyleMeasure(base, vae_round_trip(studio.pipe.vae, renders))
    zero, half, full, past = (measure.strength(images) for images in (base, draw(0.5), draw(1.0), draw(1.5)))
    # Rises with the weight up to 1; past 1 a learned style can saturate (0.82 then 0.81 at lr 4e-3,
    # n = 8), so w = 1.5 must not fall below w = 1's 95% interval.
    assert zero.value == 0 < half.value < full.value and past.value >= full.low, (zero, half, full, past)
    assert full.low > 0.3
    assert result.strength.count == 8 and result.strength.low > 0.1, result.strength


def test_quick_preset_learns_a_dark_style(studio):
    """Neon paints shapes on black, whatever background the caption names: every styled image is
    much darker at the border than the base model's image of the same prompt and seed."""
    styled, plain = quick_style_and_base_images(studio, "neon")
    styled, plain = border_brightness(styled), border_brightness(plain)
    assert np.all(styled < plain - 0.1), (styled, plain)
    assert styled.mean() < 0.5 * plain.mean()


def test_noise_offset_shifts_whole_channels_only():
    plain = sample_noise((64, 4, 16, 16), 0.0, torch.Generator().manual_seed(0))
    offset = sample_noise((64, 4, 16, 16), 0.3, torch.Generator().manual_seed(0))
    shift = offset - plain
    assert torch.allclose(shift, shift[..., :1, :1].expand_as(shift), atol=1e-6)  # one constant per image and channel
    assert 0.2 < shift[..., 0, 0].std().item() < 0.4
    assert torch.equal(plain, torch.randn((64, 4, 16, 16), generator=torch.Generator().manual_seed(0)))  # 0: plain noise

