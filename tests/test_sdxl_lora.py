"""SDXL LoRA files in and out of a Share library (issue #18): the UNet, the CLIP text encoder
(text_encoder, kohya lora_te1_) and the OpenCLIP one (text_encoder_2, lora_te2_).

The files are made in the test from PEFT adapters on the tiny SDXL pipeline (tests/tiny_families),
saved by diffusers (StableDiffusionXLPipeline.save_lora_weights) and renamed to kohya keys by
diffusers' own converter; the kohya sd-scripts layout (UNet layers by their original blocks,
lora_unet_input_blocks_…) is written from a table for this UNet. Each file is checked against
diffusers' own StableDiffusionXLPipeline.load_lora_weights."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import load_file

from share_diffusion.generation import generate_images
from share_diffusion import share
from share_diffusion.lora_interop import read_lora_components, save_lora, sgm_unet_name
from share_diffusion.studio import Studio, library_style_factors
from tests.test_lycoris_import import add_locon
from tests.tiny_families import build_tiny_sdxl_pipeline

UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
PROMPT = "a red circle on a blue background"
ALPHA, RANK = 8, 4  # alpha/r = 2, as in many real files
TOLERANCE = 2 / 255 + 1e-6
#: kohya sd-scripts' names of this UNet's attention blocks (layers_per_block = 1: two layers per
#: block, input_blocks.0 is conv_in): its down block 1 is input block 3, its up block 0 output
#: blocks 0 and 1.
SD_SCRIPTS_BLOCKS = {
    "down_blocks_1_attentions_0_": "input_blocks_3_1_",
    "mid_block_attentions_0_": "middle_block_1_",
    "up_blocks_0_attentions_0_": "output_blocks_0_1_",
    "up_blocks_0_attentions_1_": "output_blocks_1_1_",
}
FILES = ("diffusers", "kohya", "kohya-sd-scripts")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny-sdxl")
    folder = root / "tiny-sdxl"
    build_tiny_sdxl_pipeline(root).save_pretrained(folder, safe_serialization=True)
    return folder


def fresh_pipe(folder: Path) -> StableDiffusionXLPipeline:
    pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe) -> np.ndarray:
    return np.asarray(generate_images(pipe, PROMPT, seed=3, steps=4, guidance=4.0)[0], dtype=np.float32) / 255


def studio_draw(studio: Studio, style: str) -> np.ndarray:
    image = studio.generate(PROMPT, style=style, add_trigger=False, seed=3, steps=4, guidance=4.0)[0][0]
    return np.asarray(image, dtype=np.float32) / 255


def diffusers_image(folder: Path, path: Path) -> np.ndarray:
    pipe = fresh_pipe(folder)
    pipe.load_lora_weights(str(path), adapter_name="sdxl")
    return draw(pipe)


def peft_state(model, text: bool) -> dict[str, torch.Tensor]:
    """The adapter's PEFT keys, CLIP layers under their classic text_model. names (see lora_interop)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    if text:
        state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    return state


@pytest.fixture(scope="module")
def lora_files(sdxl_folder, tmp_path_factory):
    """({file kind: path}, base image, PEFT image) of one random LoRA on the UNet and both text encoders."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig

    folder = tmp_path_factory.mktemp("sdxl-lora")
    pipe = fresh_pipe(sdxl_folder)
    base = draw(pipe)
    unet_config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
    models = {"unet": pipe.unet, "text_encoder": pipe.text_encoder, "text_encoder_2": pipe.text_encoder_2}
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    pipe.text_encoder_2.add_adapter(text_config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for component in COMPONENTS:
            for name, parameter in models[component].named_parameters():
                if "lora_B" in name:  # a trained LoRA: lora_B is no longer zero
                    parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.05)
    peft_image = draw(pipe)
    states = {component: peft_state(model, text=component != "unet") for component, model in models.items()}
    StableDiffusionXLPipeline.save_lora_weights(
        folder, unet_lora_layers=states["unet"], text_encoder_lora_layers=states["text_encoder"],
        text_encoder_2_lora_layers=states["text_encoder_2"], unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(), text_encoder_2_lora_adapter_metadata=text_config.to_dict(),
    )
    packed = {f"{c}.{k}": v for c, state in states.items() for k, v in state.items()}
    kohya = {k: torch.tensor(float(ALPHA)) if k.endswith(".alpha") else v for k, v in convert_state_dict_to_kohya(packed).items()}
    assert {k.split("_text_model")[0] for k in kohya if k.startswith("lora_te")} == {"lora_te1", "lora_te2"}
    sd_scripts = {}
    for key, value in kohya.items():
        for diffusers_block, sgm_block in SD_SCRIPTS_BLOCKS.items():
            key = key.replace("lora_unet_" + diffusers_block, "lora_unet_" + sgm_block)
        sd_scripts[key] = value
    assert not any(b in k for k in sd_scripts for b in SD_SCRIPTS_BLOCKS), "every UNet layer renamed"
    files = {"diffusers": folder / "pytorch_lora_weights.safetensors",
             "kohya": save_lora(folder / "kohya.safetensors", kohya),
             "kohya-sd-scripts": save_lora(folder / "kohya-sd-scripts.safetensors", sd_scripts)}
    return files, base, peft_image


@pytest.mark.parametrize("kind", FILES)
def test_an_sdxl_lora_imports_drawing_what_diffusers_draws(lora_files, sdxl_folder, kind, tmp_path):
    files, base, peft_image = lora_files
    expected = diffusers_image(sdxl_folder, files[kind])
    assert np.abs(expected - peft_image).max() <= TOLERANCE, "diffusers reads the file as the PEFT model it came from"
    assert np.abs(expected - base).mean() > 0.01, "the LoRA must visibly change the image"

    studio = Studio(fresh_pipe(sdxl_folder), tmp_path / "library.safetensors")
    report = studio.import_with_report([files[kind]])
    (name,) = report.names
    kept = report.files[files[kind].name]["kept"]
    assert list(kept) == list(COMPONENTS)
    assert all(k["kept"] == 1.0 and k["layers_lost"] == 0 for k in kept.values()), kept
    assert report.warnings == []
    assert report.kept_lines() == [f"{files[kind].name}: kept unet 100%, text_encoder 100%, text_encoder_2 100% of its ΔW energy"]
    assert np.abs(studio_draw(studio, name) - expected).max() <= TOLERANCE


def without_text_encoder_2(kohya_file: Path, folder: Path) -> Path:
    state = {k: v for k, v in load_file(str(kohya_file)).items() if not k.startswith("lora_te2_")}
    return save_lora(folder / "no-te2.safetensors", state)


def test_the_second_text_encoder_part_is_drawn(lora_files, sdxl_folder, tmp_path):
    """Without its text_encoder_2 layers the same file draws another image, in diffusers and here alike."""
    files, _, peft_image = lora_files
    path = without_text_encoder_2(files["kohya"], tmp_path)
    expected = diffusers_image(sdxl_folder, path)
    assert np.abs(expected - peft_image).mean() > 0.005, "text_encoder_2's part visibly changes the image"
    studio = Studio(fresh_pipe(sdxl_folder), tmp_path / "library.safetensors")
    (name,) = studio.import_files([path])
    assert np.abs(studio_draw(studio, name) - expected).max() <= TOLERANCE


@pytest.fixture(scope="module")
def sdxl_studio(lora_files, sdxl_folder, tmp_path_factory):
    """A Studio on the SDXL model whose library holds the LoRA as style "Full"."""
    files, _, _ = lora_files
    studio = Studio(fresh_pipe(sdxl_folder), tmp_path_factory.mktemp("library") / "library.safetensors")
    studio.import_files([files["diffusers"]])
    studio.rename("pytorch_lora_weights", "Full")
    return studio


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_an_sdxl_style_exports_to_a_file_diffusers_draws_the_same(sdxl_studio, sdxl_folder, format, tmp_path):
    path = sdxl_studio.export_lora("Full", tmp_path / f"full-{format}.safetensors", format=format)
    keys = load_file(str(path)).keys()
    if format == "kohya":  # kohya sd-scripts' SDXL names
        prefixes = ("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_", "lora_te1_", "lora_te2_")
        assert all(k.startswith(prefixes) for k in keys)
        assert {p for p in prefixes if any(k.startswith(p) for k in keys)} == set(prefixes)
    else:
        assert {k.split(".")[0] for k in keys} == set(COMPONENTS)
    expected = studio_draw(sdxl_studio, "Full")
    assert np.abs(diffusers_image(sdxl_folder, path) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("format", ["kohya", "diffusers"])
def test_an_exported_sdxl_style_imports_back_exactly(sdxl_studio, format, tmp_path):
    path = sdxl_studio.export_lora("Full", tmp_path / f"full-{format}.safetensors", format=format)
    models = sdxl_studio._models()
    assert set(models) == set(COMPONENTS)
    again, info = read_lora_components(path, models)
    assert info["warnings"] == [] and info["skipped_count"] == 0
    style_id = sdxl_studio.library.style("Full")["id"]
    for component in COMPONENTS:
        original = library_style_factors(sdxl_studio.library, style_id, component)
        assert original and set(again[component]) == set(original), component
        for layer, (b, a) in original.items():
            reference = b.double() @ a.double().mT
            error = (again[component][layer][0].double() @ again[component][layer][1].double().mT - reference).norm()
            assert error <= 1e-5 * reference.norm(), f"{component}.{layer}: {error / reference.norm():.1e}"


def test_every_sdxl_unet_layer_has_a_kohya_name_diffusers_maps_back(sdxl_folder):
    """sgm_unet_name inverts diffusers' reading of kohya sd-scripts' SDXL names for every Linear and
    convolution of the UNet, the layers an imported file can give Share layers."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    unet = fresh_pipe(sdxl_folder).unet
    layers = {name for name, module in unet.named_modules() if share.adaptable(module)}
    state = {}
    for name in layers:
        key = "lora_unet_" + sgm_unet_name(name, unet.config.layers_per_block).replace(".", "_")
        state[f"{key}.lora_down.weight"], state[f"{key}.lora_up.weight"] = torch.zeros(1, 1), torch.zeros(1, 1)
    converted, _ = StableDiffusionXLPipeline.lora_state_dict(state, unet_config=unet.config)
    peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
    assert {key.removesuffix(".lora_A.weight") for key in peft if key.endswith(".lora_A.weight")} == layers


def test_an_sdxl_locon_exports_under_kohya_sd_scripts_names_diffusers_draws_the_same(sdxl_folder, tmp_path):
    """A LoCon on the resnets and samplers (Share layers of their own) exports under kohya
    sd-scripts' names for them (in_layers_2, emb_layers_1, skip_connection, op, …), and diffusers
    draws the file as it draws the LoCon and as the library does."""
    pipe = fresh_pipe(sdxl_folder)
    base = draw(pipe)
    StableDiffusionXLPipeline.save_lora_weights(tmp_path, unet_lora_layers=add_locon(pipe.unet, seed=7, std=0.05))
    locon = tmp_path / "pytorch_lora_weights.safetensors"

    studio = Studio(fresh_pipe(sdxl_folder), tmp_path / "library.safetensors")
    (name,) = studio.import_files([locon])
    expected = diffusers_image(sdxl_folder, locon)
    assert np.abs(expected - base).mean() > 0.01, "the LoCon must visibly change the image"
    assert np.abs(studio_draw(studio, name) - expected).max() <= TOLERANCE
    path = studio.export_lora(name, tmp_path / "locon-kohya.safetensors", format="kohya")
    layers = {key.split(".")[0] for key in load_file(str(path))}
    assert {"lora_unet_input_blocks_2_0_op", "lora_unet_input_blocks_3_0_skip_connection",
            "lora_unet_middle_block_2_emb_layers_1", "lora_unet_output_blocks_1_2_conv",
            "lora_unet_output_blocks_3_0_in_layers_2"} <= layers, sorted(layers)
    assert not any(diffusers in layer for layer in layers for diffusers in ("down_blocks", "mid_block", "up_blocks",
                                                                             "resnets", "samplers"))
    assert np.abs(diffusers_image(sdxl_folder, path) - studio_draw(studio, name)).max() <= TOLERANCE


def test_a_second_text_encoder_layer_share_does_not_adapt_is_reported_as_text_encoder_2(lora_files, sdxl_studio):
    """The kept-energy report covers text_encoder_2 on its own line (here its final LayerNorm,
    not a Linear or convolution)."""
    files, _, _ = lora_files
    state = load_file(str(files["diffusers"]))
    generator = torch.Generator().manual_seed(1)
    state["text_encoder_2.text_model.final_layer_norm.lora_A.weight"] = torch.randn(RANK, 48, generator=generator)
    state["text_encoder_2.text_model.final_layer_norm.lora_B.weight"] = torch.randn(48, RANK, generator=generator)
    _, info = read_lora_components(state, sdxl_studio._models())
    assert info["kept"]["text_encoder_2"]["layers_lost"] == 1 and info["kept"]["text_encoder_2"]["kept"] < 0.999
    assert info["kept"]["text_encoder"] == {"kept": 1.0, "bound": False, "layers_lost": 0, "layers_cut": 0}
    (warning,) = info["warnings"]
    assert warning.startswith("text_encoder_2: kept ") and "not a layer kind Share adapts" in warning


def test_an_sdxl_library_from_before_text_encoder_2_opens_and_takes_it(lora_files, sdxl_folder, tmp_path):
    """A library as Share Studio wrote it before text_encoder_2 was adapted (no targets, no tensors
    for it) opens, draws its style as before, and grows text_encoder_2 layers on the next import."""
    from share_diffusion.library import StyleLibrary

    files, _, _ = lora_files
    library = tmp_path / "library.safetensors"
    studio = Studio(fresh_pipe(sdxl_folder), library)
    (old,) = studio.import_files([without_text_encoder_2(files["kohya"], tmp_path)])
    before = studio_draw(studio, old)
    saved = StyleLibrary.load(library)
    del saved.meta["target_modules"]["text_encoder_2"]
    StyleLibrary(saved.meta, {k: v for k, v in saved.state.items() if not k.startswith("text_encoder_2.")}).save(library)
    assert not StyleLibrary.load(library).component_state("text_encoder_2")

    studio = Studio(fresh_pipe(sdxl_folder), library)
    assert studio_draw(studio, old).tolist() == before.tolist()
    report = studio.import_with_report([files["kohya"]])
    assert report.files[files["kohya"].name]["kept"]["text_encoder_2"]["kept"] == 1.0
    assert report.warnings == [] and all(d.after <= 1e-5 for d in report.drifts)
    assert StyleLibrary.load(library).component_state("text_encoder_2")
