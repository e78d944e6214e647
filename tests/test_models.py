"""share_diffusion.models on a tiny random pipeline (real diffusers objects, no mocks).

Tests that the *embedded* model draws the right shapes are added by the model engineer in
tests/test_embedded_model.py.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from share_diffusion import models
from share_diffusion.models import GenerationError, ModelLoadError


def _state_equal(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------- loading
def test_load_local_folder(tiny_pipe, tiny_pipeline_dir):
    pipe = tiny_pipe
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    assert pipe.device.type == "cpu" and pipe.unet.dtype == torch.float32
    assert all(isinstance(p, AttnProcessor2_0) for p in pipe.unet.attn_processors.values())
    info = models.model_info(pipe)
    assert (info.kind, info.name, info.attention, info.dtype) == ("folder", tiny_pipeline_dir.name, "sdpa", "float32")
    assert info.fingerprint == models.model_fingerprint(pipe)
    assert models.native_size(pipe) == (64, 64)


def test_load_single_file_safetensors_equals_folder(tiny_pipe, tiny_single_file, tiny_pipeline_dir):
    pipe = models.load_pipeline(str(tiny_single_file), device="cpu", config=tiny_pipeline_dir, progress=False)
    assert models.model_info(pipe).kind == "single_file"
    for name in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(pipe, name), getattr(tiny_pipe, name)), name
    assert models.model_fingerprint(pipe) == models.model_fingerprint(tiny_pipe)


def test_single_file_offline_without_config_is_one_clear_line(tiny_single_file, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    with pytest.raises(ModelLoadError) as err:
        models.load_pipeline(str(tiny_single_file), device="cpu", progress=False)
    message = str(err.value)
    assert "\n" not in message and "offline" in message and "--model-config" in message


class _MarkerPayload:
    """Unpickling this creates the marker file: proof of whether a file was unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".bin"])
def test_refuses_pickle_checkpoints_without_unpickling(tmp_path, suffix):
    marker = tmp_path / "unpickled.marker"
    path = tmp_path / f"model{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": _MarkerPayload(marker)}))

    # The payload is live: unpickling a copy really creates a marker.
    probe = tmp_path / "probe.marker"
    pickle.loads(pickle.dumps(_MarkerPayload(probe))).close()
    assert probe.exists()

    with pytest.raises(ModelLoadError) as err:
        models.load_pipeline(str(path), device="cpu", progress=False)
    message = str(err.value)
    assert "pickle" in message and ".safetensors" in message and "code" in message
    assert not marker.exists()


def test_unknown_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        models.load_pipeline("share-studio-tests/no-such-model", device="cpu", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "share-studio-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message
    assert "hf download share-studio-tests/no-such-model" in message and "local" in message


def test_missing_paths_and_embedded_model(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such model file or folder"):
        models.load_pipeline(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        models.load_pipeline(str(tmp_path), device="cpu")
    monkeypatch.setattr(models, "EMBEDDED_MODEL_DIR", tmp_path / "base-model")
    with pytest.raises(ModelLoadError, match="embedded base model is missing"):
        models.load_pipeline(None, device="cpu")


def test_device_dtype_and_attention_choices():
    cpu = torch.device("cpu")
    assert models.resolve_dtype(None, cpu) == torch.float32
    assert models.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert models.resolve_dtype(None, torch.device("cuda")) == torch.float16
    with pytest.raises(ModelLoadError, match="float16 is not supported on the CPU"):
        models.resolve_dtype("fp16", cpu)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        models.resolve_dtype("int8", cpu)
    assert models.xformers_usable(cpu) is False
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            models.resolve_device("cuda")
        if not models._mps_available():
            assert models.resolve_device(None) == cpu


# ---------------------------------------------------------------------------- fingerprint
def test_fingerprint_stable_across_reloads_and_dtypes(tiny_pipe, tiny_pipeline_dir):
    again = models.load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    assert models.model_fingerprint(again) == models.model_fingerprint(tiny_pipe)
    fp = models.model_fingerprint(tiny_pipe)
    assert len(fp) == 16 and int(fp, 16) >= 0

    # A bf16 load reports the fingerprint of the full-precision weights...
    half = models.load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="bf16", progress=False)
    assert half.unet.dtype == torch.bfloat16
    assert models.model_fingerprint(half) == fp
    # ... until its weights change.
    with torch.no_grad():
        half.text_encoder.encoder.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert models.model_fingerprint(half) != fp


def test_fingerprint_changes_when_a_weight_changes(tiny_pipeline_dir, tiny_pipe):
    pipe = models.load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    to_k = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    with torch.no_grad():
        to_k.weight[0, 0] += 1e-3
    assert models.model_fingerprint(pipe) != models.model_fingerprint(tiny_pipe)
    # Weights outside the attention projections are not part of the fingerprint.
    pipe2 = models.load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    with torch.no_grad():
        pipe2.vae.decoder.conv_in.weight.mul_(2)
    assert models.model_fingerprint(pipe2) == models.model_fingerprint(tiny_pipe)


# ---------------------------------------------------------------------------- generation
def test_seed_determinism(tiny_pipe):
    a = models.generate_images(tiny_pipe, "the cat", seed=1, steps=2)
    b = models.generate_images(tiny_pipe, "the cat", seed=1, steps=2)
    c = models.generate_images(tiny_pipe, "the cat", seed=2, steps=2)
    assert len(a) == 1 and a[0].size == (64, 64)
    assert np.array_equal(_pixels(a[0]), _pixels(b[0]))
    assert not np.array_equal(_pixels(a[0]), _pixels(c[0]))
    # Image i of a batch starts from the noise of seed + i.  Batched math may round differently
    # from a single image (a pixel level or so), but it is the same picture.
    batch = models.generate_images(tiny_pipe, "the cat", seed=1, steps=2, num_images=2)
    assert len(batch) == 2
    different_seed = np.abs(_pixels(a[0]) - _pixels(c[0])).max()
    assert np.abs(_pixels(batch[0]) - _pixels(a[0])).max() <= 2 < different_seed
    assert np.abs(_pixels(batch[1]) - _pixels(c[0])).max() <= 2


def test_schedulers_are_per_call_and_set_scheduler_switches(tiny_pipe):
    original = type(tiny_pipe.scheduler)
    for name in models.SCHEDULERS:
        images = models.generate_images(tiny_pipe, "x", seed=0, steps=2, scheduler=name)
        assert images[0].size == (64, 64)
        assert type(tiny_pipe.scheduler) is original  # restored after the call
    assert models.canonical_scheduler_name("Euler a") == "euler_a"
    assert models.canonical_scheduler_name("DPM++ 2M") == "dpm++"
    with pytest.raises(GenerationError, match="unknown scheduler"):
        models.generate_images(tiny_pipe, "x", steps=1, scheduler="nope")
    try:
        assert models.set_scheduler(tiny_pipe, "dpm++") == "dpm++"
        assert models.scheduler_name(tiny_pipe) == "dpm++"
        assert models.set_scheduler(tiny_pipe, "euler") == "euler"
        assert tiny_pipe.scheduler.config.num_train_timesteps == tiny_pipe._share_base_scheduler_config["num_train_timesteps"]
    finally:
        tiny_pipe.scheduler = original.from_config(tiny_pipe._share_base_scheduler_config)


def test_non_native_size_and_invalid_parameters(tiny_pipe):
    (image,) = models.generate_images(tiny_pipe, "x", steps=1, width=32, height=48)
    assert image.size == (32, 48)
    for kwargs, pattern in [
        ({"width": 30}, "multiple of 4"),
        ({"steps": 0}, "steps"),
        ({"seed": -1}, "seed"),
        ({"guidance": float("nan")}, "guidance"),
        ({"num_images": 0}, "number of images"),
    ]:
        with pytest.raises(GenerationError, match=pattern):
            models.generate_images(tiny_pipe, "x", **{"steps": 1, **kwargs})


def test_resolve_seed():
    assert models.resolve_seed(42) == 42
    seeds = {models.resolve_seed(-1) for _ in range(5)} | {models.resolve_seed(None)}
    assert all(0 <= s < 2**32 for s in seeds) and len(seeds) > 1


# ---------------------------------------------------------------------------- PNG metadata
def test_png_metadata_round_trip(tmp_path):
    image = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    metadata = models.png_metadata(
        "a café, at night: «watercolour»",
        negative_prompt="blurry",
        seed=1234,
        steps=20,
        guidance=4.5,
        scheduler="euler_a",
        model="tiny",
        width=64,
        height=64,
        model_hash="0123456789abcdef",
        style="ink wash",
        library_hash="feedbeef",
    )
    path = models.save_png(image, tmp_path / "sub" / "out.png", metadata)
    assert models.read_png_metadata(path) == metadata
    with Image.open(path) as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(image))
        parameters = saved.text["parameters"]
    prompt, negative, fields = parameters.split("\n")
    assert prompt == "a café, at night: «watercolour»"
    assert negative == "Negative prompt: blurry"
    assert fields.startswith("Steps: 20, Sampler: Euler a, CFG scale: 4.5, Seed: 1234, Size: 64x64, ")
    assert "Model hash: 0123456789abcdef, Model: tiny" in fields
    assert 'Style: ink wash, Library hash: feedbeef' in fields
    assert not list(tmp_path.joinpath("sub").glob("*.tmp"))


def test_save_generated_and_numbered_paths(tiny_pipe, tmp_path):
    assert models.numbered_output_paths(tmp_path / "a.png", 1) == [tmp_path / "a.png"]
    paths = models.numbered_output_paths(tmp_path / "a.png", 2)
    assert [p.name for p in paths] == ["a-0.png", "a-1.png"]
    images = models.generate_images(tiny_pipe, "the cat", seed=7, steps=1, num_images=2)
    saved = models.save_generated(tiny_pipe, images, paths, prompt="the cat", seed=7, steps=1, guidance=4.0, style="ink")
    meta = [models.read_png_metadata(p) for p in saved]
    assert [m["seed"] for m in meta] == [7, 8]
    assert meta[0]["scheduler"] == "ddim" and meta[0]["style"] == "ink"
    assert meta[0]["model_hash"] == models.model_fingerprint(tiny_pipe)
