"""Loading, fingerprints, generation and PNG metadata on a tiny random pipeline (real diffusers objects, no mocks).

Tests that the *embedded* model draws the right shapes are added by the model engineer in
tests/test_embedded_model.py.
"""

from __future__ import annotations

import hashlib
import pickle

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image

from share_diffusion import devices, fingerprint, generation, loading, png_metadata, schedulers
from share_diffusion.errors import GenerationError, ModelLoadError
from share_diffusion.library import LibraryError, StyleLibrary, new_metadata
from share_diffusion.share import ShareConfig
from share_diffusion.studio import Studio


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
    info = loading.model_info(pipe)
    assert (info.kind, info.name, info.attention, info.dtype) == ("folder", tiny_pipeline_dir.name, "sdpa", "float32")
    assert info.fingerprint == fingerprint.model_fingerprint(pipe)
    assert generation.native_size(pipe) == (64, 64)


def test_load_single_file_safetensors_equals_folder(tiny_pipe, tiny_single_file, tiny_pipeline_dir):
    pipe = loading.load_pipeline(str(tiny_single_file), device="cpu", config=tiny_pipeline_dir, progress=False)
    assert loading.model_info(pipe).kind == "single_file"
    for name in ("unet", "vae", "text_encoder"):
        assert _state_equal(getattr(pipe, name), getattr(tiny_pipe, name)), name
    assert fingerprint.model_fingerprint(pipe) == fingerprint.model_fingerprint(tiny_pipe)
    # A1111's "Model hash" of a checkpoint: the first 10 hex digits of the whole file's sha256.
    assert loading.model_info(pipe).a1111_hash == hashlib.sha256(tiny_single_file.read_bytes()).hexdigest()[:10]
    assert loading.model_info(tiny_pipe).a1111_hash is None  # a diffusers folder is no single file


def test_single_file_offline_not_fitting_its_family_config_is_one_clear_line(tiny_single_file, monkeypatch, tmp_path):
    # Offline, a checkpoint without --model-config gets its family's shipped config (no Hub); a
    # checkpoint of another size does not fit it, and the message says how to fix that.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    with pytest.raises(ModelLoadError) as err:
        loading.load_pipeline(str(tiny_single_file), device="cpu", progress=False)
    message = str(err.value)
    assert "\n" not in message and "does not fit the shipped SD 1.x" in message and "--model-config" in message


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
        loading.load_pipeline(str(path), device="cpu", progress=False)
    message = str(err.value)
    assert "pickle" in message and ".safetensors" in message and "code" in message
    assert not marker.exists()


def test_unknown_hub_id_offline_is_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError) as err:
        loading.load_pipeline("share-studio-tests/no-such-model", device="cpu", progress=False)
    message = str(err.value)
    assert "\n" not in message
    assert "share-studio-tests/no-such-model" in message and "HF_HUB_OFFLINE" in message
    assert "hf download share-studio-tests/no-such-model" in message and "local" in message


def test_missing_paths_and_embedded_model(tmp_path, monkeypatch):
    with pytest.raises(ModelLoadError, match="no such model file or folder"):
        loading.load_pipeline(str(tmp_path / "missing"), device="cpu")
    with pytest.raises(ModelLoadError, match="not a diffusers model folder"):
        loading.load_pipeline(str(tmp_path), device="cpu")
    monkeypatch.setattr(loading, "EMBEDDED_MODEL_DIR", tmp_path / "base-model")
    with pytest.raises(ModelLoadError, match="embedded base model is missing"):
        loading.load_pipeline(None, device="cpu")


def test_device_dtype_and_attention_choices():
    cpu = torch.device("cpu")
    assert devices.resolve_dtype(None, cpu) == torch.float32
    assert devices.resolve_dtype("bf16", cpu) == torch.bfloat16
    assert devices.resolve_dtype(None, torch.device("cuda")) == torch.float16
    with pytest.raises(ModelLoadError, match="float16 is not supported on the CPU"):
        devices.resolve_dtype("fp16", cpu)
    with pytest.raises(ModelLoadError, match="unknown dtype"):
        devices.resolve_dtype("int8", cpu)
    assert devices.xformers_usable(cpu) is False
    if not torch.cuda.is_available():
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            devices.resolve_device("cuda")
        if not devices._mps_available():
            assert devices.resolve_device(None) == cpu


# ---------------------------------------------------------------------------- fingerprint
def test_fingerprint_stable_across_reloads_and_dtypes(tiny_pipe, tiny_pipeline_dir):
    again = loading.load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    assert fingerprint.model_fingerprint(again) == fingerprint.model_fingerprint(tiny_pipe)
    fp = fingerprint.model_fingerprint(tiny_pipe)
    assert len(fp) == 16 and int(fp, 16) >= 0

    # A bf16 load reports the fingerprint of the full-precision weights...
    half = loading.load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="bf16", progress=False)
    assert half.unet.dtype == torch.bfloat16
    assert fingerprint.model_fingerprint(half) == fp
    # ... until its weights change.
    with torch.no_grad():
        half.text_encoder.encoder.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert fingerprint.model_fingerprint(half) != fp


def test_legacy_fp32_fingerprint_survives_a_cast_until_the_weights_change(tiny_pipe, tiny_pipeline_dir):
    """The fingerprint libraries saved before fp16 rounding recorded: fp32 weights, taken before a cast."""
    legacy = fingerprint.legacy_fingerprint(tiny_pipe)
    assert len(legacy) == 16 and legacy != fingerprint.model_fingerprint(tiny_pipe)
    half = loading.load_pipeline(str(tiny_pipeline_dir), device="cpu", dtype="bf16", progress=False)
    assert fingerprint.legacy_fingerprint(half) == legacy
    with torch.no_grad():
        half.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight[0, 0] += 1.0
    assert fingerprint.legacy_fingerprint(half) != legacy


def _saved_copy(folder, dtype: torch.dtype, target) -> StableDiffusionPipeline:
    """The pipeline in ``folder`` saved again with its weights stored as ``dtype``; returns it."""
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True, dtype=dtype)
    pipe.save_pretrained(target, safe_serialization=True)
    return pipe


def test_fp16_and_fp32_copies_of_a_base_model_share_libraries(tiny_pipeline_dir, tiny_pipe, tmp_path):
    """The decision: an fp16 copy of a base model is the same model for a style library; bf16 is not.

    People share libraries between the fp32 and the fp16 files of a model, and on CUDA both run as
    the same fp16 weights anyway.  bf16 keeps 3 mantissa bits fewer than fp16, so a bf16 copy's
    weights are not what the fp32 ones round to: it counts as another model, like any other change.
    """
    fp = fingerprint.model_fingerprint(tiny_pipe)
    library_path = tmp_path / "made-on-fp32.safetensors"
    StyleLibrary(new_metadata("tiny-sd", fp, ShareConfig()), {}).save(library_path)

    for dtype, same_model in ((torch.float16, True), (torch.bfloat16, False)):
        stored = _saved_copy(tiny_pipeline_dir, dtype, tmp_path / str(dtype))
        assert stored.unet.dtype == dtype
        copy = loading.load_pipeline(str(tmp_path / str(dtype)), device="cpu", progress=False)
        assert copy.unet.dtype == torch.float32  # loaded back in full precision...
        unet_weights = zip(copy.unet.parameters(), tiny_pipe.unet.parameters())
        assert not all(torch.equal(a, b) for a, b in unet_weights)  # ...but the rounding is in it
        assert (fingerprint.model_fingerprint(copy) == fp) is same_model
        assert (fingerprint.model_fingerprint(stored) == fp) is same_model  # also while stored as dtype
        if same_model:
            assert Studio(copy, library_path).style_names() == []
        else:
            with pytest.raises(LibraryError, match="fingerprint"):
                Studio(copy, library_path)


def test_fingerprint_changes_when_a_weight_changes(tiny_pipeline_dir, tiny_pipe):
    pipe = loading.load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    to_k = next(m for n, m in pipe.unet.named_modules() if n.endswith("attn2.to_k"))
    with torch.no_grad():
        to_k.weight[0, 0] += 1e-3
    assert fingerprint.model_fingerprint(pipe) != fingerprint.model_fingerprint(tiny_pipe)
    # Weights outside the attention projections are not part of the fingerprint.
    pipe2 = loading.load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)
    with torch.no_grad():
        pipe2.vae.decoder.conv_in.weight.mul_(2)
    assert fingerprint.model_fingerprint(pipe2) == fingerprint.model_fingerprint(tiny_pipe)


# ---------------------------------------------------------------------------- generation
def test_seed_determinism(tiny_pipe):
    a = generation.generate_images(tiny_pipe, "the cat", seed=1, steps=2)
    b = generation.generate_images(tiny_pipe, "the cat", seed=1, steps=2)
    c = generation.generate_images(tiny_pipe, "the cat", seed=2, steps=2)
    assert len(a) == 1 and a[0].size == (64, 64)
    assert np.array_equal(_pixels(a[0]), _pixels(b[0]))
    assert not np.array_equal(_pixels(a[0]), _pixels(c[0]))
    # Image i of a batch starts from the noise of seed + i.  Batched math may round differently
    # from a single image (a pixel level or so), but it is the same picture.
    batch = generation.generate_images(tiny_pipe, "the cat", seed=1, steps=2, num_images=2)
    assert len(batch) == 2
    different_seed = np.abs(_pixels(a[0]) - _pixels(c[0])).max()
    assert np.abs(_pixels(batch[0]) - _pixels(a[0])).max() <= 2 < different_seed
    assert np.abs(_pixels(batch[1]) - _pixels(c[0])).max() <= 2


def test_schedulers_are_per_call_and_set_scheduler_switches(tiny_pipe):
    original = type(tiny_pipe.scheduler)
    for name in schedulers.SCHEDULERS:
        images = generation.generate_images(tiny_pipe, "x", seed=0, steps=2, scheduler=name)
        assert images[0].size == (64, 64)
        assert type(tiny_pipe.scheduler) is original  # restored after the call
    assert schedulers.canonical_scheduler_name("Euler a") == "euler_a"
    assert schedulers.canonical_scheduler_name("DPM++ 2M") == "dpm++"
    with pytest.raises(GenerationError, match="unknown scheduler"):
        generation.generate_images(tiny_pipe, "x", steps=1, scheduler="nope")
    try:
        assert schedulers.set_scheduler(tiny_pipe, "dpm++") == "dpm++"
        assert schedulers.scheduler_name(tiny_pipe) == "dpm++"
        assert schedulers.set_scheduler(tiny_pipe, "euler") == "euler"
        assert tiny_pipe.scheduler.config.num_train_timesteps == tiny_pipe._share_base_scheduler_config["num_train_timesteps"]
    finally:
        tiny_pipe.scheduler = original.from_config(tiny_pipe._share_base_scheduler_config)


def test_non_native_size_and_invalid_parameters(tiny_pipe):
    (image,) = generation.generate_images(tiny_pipe, "x", steps=1, width=32, height=48)
    assert image.size == (32, 48)
    for kwargs, pattern in [
        ({"width": 30}, "multiple of 4"),
        ({"steps": 0}, "steps"),
        ({"seed": -1}, "seed"),
        ({"guidance": float("nan")}, "guidance"),
        ({"num_images": 0}, "number of images"),
    ]:
        with pytest.raises(GenerationError, match=pattern):
            generation.generate_images(tiny_pipe, "x", **{"steps": 1, **kwargs})


def test_resolve_seed():
    assert generation.resolve_seed(42) == 42
    seeds = {generation.resolve_seed(-1) for _ in range(5)} | {generation.resolve_seed(None)}
    assert all(0 <= s < 2**32 for s in seeds) and len(seeds) > 1


# ---------------------------------------------------------------------------- PNG metadata
def test_png_metadata_round_trip(tmp_path):
    image = Image.fromarray(np.arange(64 * 64 * 3, dtype=np.uint8).reshape(64, 64, 3))
    metadata = png_metadata.png_metadata(
        "a café, at night: «watercolour»",
        negative_prompt="blurry",
        seed=1234,
        steps=20,
        guidance=4.5,
        scheduler="euler_a",
        model="tiny",
        width=64,
        height=64,
        model_hash="0123456789",
        base_fingerprint="0123456789abcdef",
        style="ink wash",
        library_hash="feedbeef",
    )
    path = png_metadata.save_png(image, tmp_path / "sub" / "out.png", metadata)
    assert png_metadata.read_png_metadata(path) == metadata
    with Image.open(path) as saved:
        assert np.array_equal(np.asarray(saved), np.asarray(image))
        parameters = saved.text["parameters"]
    prompt, negative, fields = parameters.split("\n")
    assert prompt == "a café, at night: «watercolour»"
    assert negative == "Negative prompt: blurry"
    assert fields.startswith("Steps: 20, Sampler: Euler a, CFG scale: 4.5, Seed: 1234, Size: 64x64, ")
    assert "Model hash: 0123456789, Model: tiny, Share base fingerprint: 0123456789abcdef" in fields
    assert 'Style: ink wash, Library hash: feedbeef' in fields
    assert not list(tmp_path.joinpath("sub").glob("*.tmp"))


def test_save_generated_and_numbered_paths(tiny_pipe, tmp_path):
    assert png_metadata.numbered_output_paths(tmp_path / "a.png", 1) == [tmp_path / "a.png"]
    paths = png_metadata.numbered_output_paths(tmp_path / "a.png", 2)
    assert [p.name for p in paths] == ["a-0.png", "a-1.png"]
    images = generation.generate_images(tiny_pipe, "the cat", seed=7, steps=1, num_images=2)
    saved = png_metadata.save_generated(tiny_pipe, images, paths, prompt="the cat", seed=7, steps=1, guidance=4.0, style="ink")
    meta = [png_metadata.read_png_metadata(p) for p in saved]
    assert [m["seed"] for m in meta] == [7, 8]
    assert meta[0]["scheduler"] == "ddim" and meta[0]["style"] == "ink"
    assert meta[0]["base_fingerprint"] == fingerprint.model_fingerprint(tiny_pipe)
    # A diffusers folder has no checkpoint file A1111 or Civitai could know it by: no "Model hash".
    assert "model_hash" not in meta[0]
    with Image.open(saved[0]) as image:
        assert "Model hash" not in image.text["parameters"]


def test_save_generated_writes_a1111_model_hash_of_a_checkpoint(tiny_single_file, tiny_pipeline_dir, tmp_path):
    pipe = loading.load_pipeline(str(tiny_single_file), device="cpu", config=tiny_pipeline_dir, progress=False)
    shorthash = hashlib.sha256(tiny_single_file.read_bytes()).hexdigest()[:10]
    images = generation.generate_images(pipe, "the cat", seed=3, steps=1)
    (path,) = png_metadata.save_generated(pipe, images, [tmp_path / "cat.png"], prompt="the cat", seed=3, steps=1,
                                          guidance=4.0)
    meta = png_metadata.read_png_metadata(path)
    assert meta["model_hash"] == shorthash and meta["model"] == "tiny-sd"
    assert meta["base_fingerprint"] == fingerprint.model_fingerprint(pipe)
    with Image.open(path) as image:
        assert f"Model hash: {shorthash}, Model: tiny-sd, Share base fingerprint: {meta['base_fingerprint']}" in (
            image.text["parameters"]
        )
