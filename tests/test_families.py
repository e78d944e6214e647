"""Model families (SD 1.x, SD 2.x epsilon / v, SDXL) and single-file loading with the network off.

Tiny random pipelines of each family are built here (tests/tiny_families.py), saved as diffusers
folders and as A1111-layout single files, and loaded back with HF_HUB_OFFLINE=1.  The shipped
full-size config folders are checked against the real architectures without building any weights.
"""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from safetensors.torch import save_file

from share_diffusion import families, loading, model_configs
from share_diffusion.errors import ModelLoadError
from tests.tiny_families import build_tiny_sd2_pipeline, build_tiny_sdxl_pipeline, ldm_state_dict

BUILDERS = {
    "sd2": lambda workdir: build_tiny_sd2_pipeline(workdir, "epsilon"),
    "sd2-v": lambda workdir: build_tiny_sd2_pipeline(workdir, "v_prediction"),
    "sdxl": build_tiny_sdxl_pipeline,
}


@pytest.fixture(scope="session")
def family_models(tmp_path_factory, tiny_pipeline_dir, tiny_single_file):
    """{family: (diffusers folder, single-file checkpoint)} for sd1, sd2, sd2-v and sdxl."""
    models = {"sd1": (tiny_pipeline_dir, tiny_single_file)}
    for family, build in BUILDERS.items():
        root = tmp_path_factory.mktemp(f"tiny-{family}")
        pipe = build(root)
        folder = root / f"tiny-{family}"
        pipe.save_pretrained(folder, safe_serialization=True)
        checkpoint = root / f"tiny-{family}.safetensors"
        save_file(ldm_state_dict(pipe), str(checkpoint))
        models[family] = (folder, checkpoint)
    return models


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """The network off for the Hub, and an empty HF cache: nothing can come from outside."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-home" / "hub"))


def _same_weights(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


# ------------------------------------------------------------------------------ detection
@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_family_is_detected_from_folder_checkpoint_and_loaded_pipeline(family, family_models, offline):
    folder, checkpoint = family_models[family]
    assert families.family_of_folder(folder) == family
    assert families.family_of_checkpoint(checkpoint).family == family
    pipe = loading.load_pipeline(str(folder), device="cpu", progress=False)
    assert loading.model_info(pipe).family == family
    assert isinstance(pipe, StableDiffusionXLPipeline if family == "sdxl" else StableDiffusionPipeline)


def test_embedded_model_folder_is_sd1_by_structure():
    assert families.family_of_folder(loading.EMBEDDED_MODEL_DIR) == "sd1"


def test_family_from_configs_uses_the_real_cross_attention_widths_and_prediction_type():
    for name, expected in (("sd15", "sd1"), ("sd2-base", "sd2"), ("sd21-v", "sd2-v"), ("sdxl-base", "sdxl")):
        assert families.family_of_folder(model_configs.shipped_folder(name)) == expected, name
    assert families.family_from_configs({"cross_attention_dim": 768}, {"prediction_type": "v_prediction"}) == "sd1-v"
    assert families.label("sd2-v") == "SD 2.x (v-prediction)" and families.label(None) == "unknown family"


def test_sd2_prediction_type_of_a_checkpoint_follows_the_weight_statistic(family_models):
    eps = families.family_of_checkpoint(family_models["sd2"][1])
    v = families.family_of_checkpoint(family_models["sd2-v"][1])
    assert (eps.family, v.family) == ("sd2", "sd2-v")
    assert "norm1.bias" in v.evidence and not v.explicit_v_prediction


def test_unsupported_checkpoint_kind_is_refused_by_name(tmp_path):
    path = tmp_path / "inpaint.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 9, 3, 3)}, str(path))
    with pytest.raises(ModelLoadError) as err:
        families.family_of_checkpoint(path)
    assert "'inpainting'" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ single files offline
@pytest.mark.parametrize("family", ["sd1", "sd2", "sd2-v", "sdxl"])
def test_single_file_of_each_family_loads_offline_and_equals_its_folder(family, family_models, offline):
    folder, checkpoint = family_models[family]
    reference = loading.load_pipeline(str(folder), device="cpu", progress=False)
    pipe = loading.load_pipeline(str(checkpoint), device="cpu", config=folder, progress=False)
    info = loading.model_info(pipe)
    assert (info.kind, info.family) == ("single_file", family)
    components = ["unet", "vae", "text_encoder"] + (["text_encoder_2"] if family == "sdxl" else [])
    for name in components:
        assert _same_weights(getattr(pipe, name), getattr(reference, name)), name
    assert pipe.scheduler.config.prediction_type == ("v_prediction" if family.endswith("-v") else "epsilon")


def test_sdxl_checkpoint_with_v_pred_and_ztsnr_keys_gets_a_v_prediction_zero_snr_scheduler(family_models, offline, tmp_path):
    folder, checkpoint = family_models["sdxl"]
    from safetensors.torch import load_file

    state = load_file(str(checkpoint))
    state.update(v_pred=torch.tensor([]), ztsnr=torch.tensor([]))
    marked = tmp_path / "tiny-sdxl-vpred.safetensors"
    save_file(state, str(marked))
    detected = families.family_of_checkpoint(marked)
    assert (detected.family, detected.explicit_v_prediction, detected.zero_terminal_snr) == ("sdxl-v", True, True)
    pipe = loading.load_pipeline(str(marked), device="cpu", config=folder, progress=False)
    config = pipe.scheduler.config
    assert (config.prediction_type, config.rescale_betas_zero_snr, config.timestep_spacing) == ("v_prediction", True, "trailing")
    assert loading.model_info(pipe).family == "sdxl-v"


@pytest.mark.parametrize("family, label", [("sd1", "SD 1.x"), ("sd2", "SD 2.x"), ("sd2-v", "SD 2.x (v-prediction)"), ("sdxl", "SDXL")])
def test_single_file_without_config_uses_the_shipped_config_of_its_family_offline(family, label, family_models, offline,
                                                                                   monkeypatch, tmp_path):
    # A tiny checkpoint cannot fit the full-size shipped config: the one-line refusal names the
    # config that was picked, which proves the family's shipped folder was used with no Hub.
    monkeypatch.setattr(loading, "EMBEDDED_MODEL_DIR", tmp_path / "no-embedded-model")
    with pytest.raises(ModelLoadError) as err:
        loading.load_pipeline(str(family_models[family][1]), device="cpu", progress=False)
    message = str(err.value)
    assert f"the shipped {label} architecture config" in message
    assert "--model-config" in message and "\n" not in message


def test_single_file_with_a_config_of_another_family_is_one_clear_line(family_models, offline):
    with pytest.raises(ModelLoadError) as err:
        loading.load_pipeline(str(family_models["sdxl"][1]), device="cpu", config=family_models["sd1"][0], progress=False)
    assert "SDXL checkpoint" in str(err.value) and "StableDiffusionPipeline" in str(err.value)


# ------------------------------------------------------------------------------ shipped configs
REAL_PARAMETER_COUNTS = {  # of the Hub models these folders describe
    "sd15": {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480},
    "sd2-base": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sd21-v": {"unet": 865_910_724, "vae": 83_653_863, "text_encoder": 340_387_840},
    "sdxl-base": {"unet": 2_567_463_684, "vae": 83_653_863, "text_encoder": 123_060_480, "text_encoder_2": 694_659_840},
}


@pytest.mark.parametrize("name", model_configs.CONFIG_NAMES)
def test_shipped_config_folders_build_the_real_architectures(name, offline):
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    folder = model_configs.config_folder(name)
    with init_empty_weights():  # shapes only, no memory
        models = {
            "unet": UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(folder, subfolder="unet")),
            "vae": AutoencoderKL.from_config(AutoencoderKL.load_config(folder, subfolder="vae")),
            "text_encoder": CLIPTextModel(CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder")),
        }
        if (folder / "text_encoder_2").is_dir():
            models["text_encoder_2"] = CLIPTextModelWithProjection(
                CLIPTextConfig.from_pretrained(folder, subfolder="text_encoder_2")
            )
    counts = {key: sum(p.numel() for p in model.parameters()) for key, model in models.items()}
    assert counts == REAL_PARAMETER_COUNTS[name]
    index = json.loads((folder / "model_index.json").read_text())
    assert set(index) >= set(counts) | {"scheduler", "tokenizer"}


@pytest.mark.parametrize("name, subfolder, pad_id", [("sd15", "tokenizer", 49407), ("sd2-base", "tokenizer", 0),
                                                     ("sd21-v", "tokenizer", 0), ("sdxl-base", "tokenizer", 49407),
                                                     ("sdxl-base", "tokenizer_2", 0)])
def test_shipped_tokenizers_are_clips_built_from_the_bpe_file(name, subfolder, pad_id, offline):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(model_configs.config_folder(name), subfolder=subfolder)
    assert len(tokenizer) == 49408
    # CLIP's well-known ids: <|startoftext|> a photo of a cat <|endoftext|>
    assert tokenizer("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tokenizer.pad_token_id == pad_id  # SD 1.x pads with <|endoftext|>, OpenCLIP encoders with "!"


def test_config_folder_is_built_in_the_cache_once_and_rebuilt_when_missing(monkeypatch, tmp_path):
    monkeypatch.setenv("SHARE_STUDIO_CACHE", str(tmp_path / "cache"))
    model_configs.config_folder.cache_clear()
    try:
        first = model_configs.config_folder("sd15")
        assert first.is_relative_to(tmp_path / "cache") and (first / "tokenizer" / "merges.txt").is_file()
        model_configs.config_folder.cache_clear()
        assert model_configs.config_folder("sd15") == first
        (first / "tokenizer" / "merges.txt").unlink()
        model_configs.config_folder.cache_clear()
        assert (model_configs.config_folder("sd15") / "tokenizer" / "merges.txt").is_file()
    finally:
        model_configs.config_folder.cache_clear()


def test_missing_clip_bpe_file_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setattr(model_configs, "SHIPPED_BPE", tmp_path / "missing.txt.gz")
    monkeypatch.setattr(model_configs, "PACKAGED_BPE", (("no_such_package_here", "x.gz"),))
    with pytest.raises(ModelLoadError) as err:
        model_configs.clip_bpe_file()
    assert "clip-bpe" in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------ libraries and display
def _save_library(path, family, fingerprint, model_id="tiny-sd"):
    from share_diffusion.library import StyleLibrary, new_metadata
    from share_diffusion.share import ShareConfig

    meta = new_metadata(model_id, fingerprint, ShareConfig(), family=family)
    if family is None:
        del meta["base_model"]["family"]  # as written before families were recorded
    StyleLibrary(meta, {}).save(path)


def _list_json(path, capsys) -> dict:
    from share_diffusion import cli

    assert cli.main(["list", "--library", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.fixture
def sd1_pipe(tiny_pipeline_dir):
    """A tiny SD 1.x pipeline of this test's own: a Studio puts Share layers into it (conftest's tiny_pipe is read-only)."""
    return loading.load_pipeline(str(tiny_pipeline_dir), device="cpu", progress=False)


def test_new_library_records_the_model_family_and_list_json_shows_it(sd1_pipe, tmp_path, capsys):
    from share_diffusion.studio import Studio

    path = tmp_path / "library.safetensors"
    studio = Studio(sd1_pipe, path, model_id="tiny-sd")
    assert studio.library.meta["base_model"]["family"] == "sd1" and studio.info()["family"] == "sd1"
    studio.library.save(path)
    assert _list_json(path, capsys)["base_model"]["family"] == "sd1"
    from share_diffusion import cli

    assert cli.main(["list", "--library", str(path)]) == 0
    assert "base model tiny-sd (SD 1.x)" in capsys.readouterr().out


def test_library_of_another_family_is_refused_naming_both_families(family_models, tiny_pipe, offline, tmp_path):
    from share_diffusion.fingerprint import model_fingerprint
    from share_diffusion.library import LibraryError
    from share_diffusion.studio import Studio

    path = tmp_path / "library.safetensors"
    _save_library(path, "sd1", model_fingerprint(tiny_pipe))
    sd2 = loading.load_pipeline(str(family_models["sd2-v"][0]), device="cpu", progress=False)
    with pytest.raises(LibraryError) as err:
        Studio(sd2, path, model_id="tiny-sd2-v")
    message = str(err.value)
    assert "made for an SD 1.x base model" in message and "SD 2.x (v-prediction)" in message and "\n" not in message


def test_library_without_a_family_field_still_loads_and_lists_as_unknown(sd1_pipe, tmp_path, capsys):
    from share_diffusion.fingerprint import model_fingerprint
    from share_diffusion.studio import Studio

    path = tmp_path / "old-library.safetensors"
    _save_library(path, None, model_fingerprint(sd1_pipe))
    studio = Studio(sd1_pipe, path, model_id="tiny-sd")
    assert studio.info()["family"] == "unknown"
    assert _list_json(path, capsys)["base_model"]["family"] == "unknown"


def test_app_header_and_library_facts_show_the_family(sd1_pipe, tmp_path):
    import gradio as gr

    from app.ui import build_app

    demo = build_app(sd1_pipe, library_path=tmp_path / "library.safetensors", output_dir=tmp_path / "out",
                     work_dir=tmp_path / "work")
    assert isinstance(demo, gr.Blocks)
    texts = [str(c["props"].get("value")) for c in demo.get_config_file()["components"] if c["type"] == "markdown"]
    assert any(t.startswith("## Share Studio") and "(SD 1.x)" in t for t in texts)
    from app.callbacks import StudioCallbacks

    facts = StudioCallbacks(sd1_pipe, demo.share_studio, tmp_path / "out", work_dir=tmp_path / "work").library_facts()
    assert "(SD 1.x, fingerprint" in facts
