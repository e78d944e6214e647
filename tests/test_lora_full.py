"""A full SD1.x LoRA, as kohya sd-scripts trains one by default, imports faithfully (issue #19):
UNet attention, proj_in/proj_out (1×1 convs here) and feed-forward, and the text encoder's
attention and MLP. The files are made in the test from PEFT adapters on the embedded model, saved
by diffusers (save_lora_weights) and converted to kohya names by diffusers' own converter."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from share_diffusion import share
from share_diffusion.generation import generate_images
from share_diffusion.lora_interop import read_lora, save_lora
from share_diffusion.studio import Studio

EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "base-model"
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]
PROMPT = "a red circle on a blue background"
ALPHA, RANK = 8, 4  # alpha/r = 2, as in many real files


def fresh_pipe() -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(EMBEDDED, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def draw(pipe) -> np.ndarray:
    return np.asarray(generate_images(pipe, PROMPT, seed=3, steps=4, guidance=4.0)[0], dtype=np.float32) / 255


def peft_state(model, prefix: str) -> dict[str, torch.Tensor]:
    """The adapter's PEFT keys (convert_state_dict_to_diffusers would turn only the attention ones
    into the old `.lora.down` names, a mix that diffusers' own loader then drops the attention of)."""
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(model)
    if prefix == "text_encoder":  # files keep CLIP's classic names (see lora_interop)
        state = {k if k.startswith("text_model.") else "text_model." + k: v for k, v in state.items()}
    return state


@pytest.fixture(scope="module")
def lora_files(tmp_path_factory):
    """(diffusers file, kohya file, base image) of one random full LoRA on the embedded model."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya
    from peft import LoraConfig

    folder = tmp_path_factory.mktemp("full-lora")
    pipe = fresh_pipe()
    base = draw(pipe)
    unet_config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=UNET_TARGETS)
    text_config = LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=TEXT_TARGETS)
    pipe.unet.add_adapter(unet_config)
    pipe.text_encoder.add_adapter(text_config)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, parameter in [*pipe.unet.named_parameters(), *pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:  # a trained LoRA: lora_B is no longer zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.03)
    unet, text = peft_state(pipe.unet, "unet"), peft_state(pipe.text_encoder, "text_encoder")
    kinds = {k.split(".lora")[0].rsplit(".", 1)[-1] for k in [*unet, *text]}
    assert {"proj_in", "proj_out", "2", "proj", "fc1", "fc2", "to_q", "q_proj"} <= kinds
    assert any(v.dim() == 4 for v in unet.values()), "proj_in/proj_out are 1×1 convolutions here"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=unet, text_encoder_lora_layers=text,
                                              unet_lora_adapter_metadata=unet_config.to_dict(),
                                              text_encoder_lora_adapter_metadata=text_config.to_dict())
    diffusers_file = folder / "pytorch_lora_weights.safetensors"
    packed = StableDiffusionPipeline.pack_weights(unet, "unet") | StableDiffusionPipeline.pack_weights(text, "text_encoder")
    kohya = {}
    for key, value in convert_state_dict_to_kohya(packed).items():
        key = key.replace("lora_te1_", "lora_te_")  # SD 1.x kohya names
        kohya[key] = torch.tensor(float(ALPHA)) if key.endswith(".alpha") else value
    assert any(k.startswith("lora_te_text_model_encoder_layers_") and "_mlp_fc1." in k for k in kohya)
    assert any(k.endswith("_proj_in.lora_down.weight") for k in kohya) and any("_ff_net_0_proj." in k for k in kohya)
    kohya_file = save_lora(folder / "full-kohya.safetensors", kohya)
    return diffusers_file, kohya_file, base


def diffusers_image(path: Path) -> np.ndarray:
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(path), adapter_name="full")
    return draw(pipe)


@pytest.mark.parametrize("format", ["diffusers", "kohya"])
def test_a_full_lora_draws_what_diffusers_draws(lora_files, format, tmp_path):
    diffusers_file, kohya_file, base = lora_files
    path = diffusers_file if format == "diffusers" else kohya_file
    expected = diffusers_image(path)
    change = np.abs(expected - base).mean()
    assert change > 0.01, "the LoRA must visibly change the image"

    studio = Studio(fresh_pipe(), tmp_path / "library.safetensors")
    report = studio.import_with_report([path])
    (name,) = report.names
    kept = report.files[path.name]["kept"]
    assert set(kept) == {"unet", "text_encoder"}
    assert all(k["kept"] == 1.0 and k["layers_lost"] == 0 for k in kept.values()), kept
    assert report.warnings == []
    ours = np.asarray(studio.generate(PROMPT, style=name, add_trigger=False, seed=3, steps=4, guidance=4.0)[0][0],
                      dtype=np.float32) / 255
    assert np.abs(ours - expected).max() <= 1 / 255 + 1e-6
    assert np.abs(ours - expected).mean() <= 0.02 * change

    # export -> import is exact: the same ΔW in every layer, both components
    for out_format in ("kohya", "diffusers"):
        exported = studio.export_lora(name, tmp_path / f"out-{out_format}.safetensors", format=out_format)
        again_unet, again_text, info = read_lora(exported, studio.pipe.unet, studio.pipe.text_encoder)
        original_unet, original_text, _ = read_lora(path, studio.pipe.unet, studio.pipe.text_encoder)
        assert info["warnings"] == [] and set(again_unet) == set(original_unet) and set(again_text) == set(original_text)
        for again, original in ((again_unet, original_unet), (again_text, original_text)):
            for layer, (b, a) in original.items():
                reference = b.double() @ a.double().mT
                error = (again[layer][0].double() @ again[layer][1].double().mT - reference).norm() / reference.norm()
                assert error <= 1e-5, f"{layer}: {error:.1e}"


def test_parts_share_cannot_import_are_named_with_the_energy_they_held(lora_files, tmp_path):
    """A LoRA on a layer Share does not adapt (a GroupNorm) is left out with its energy, a LyCORIS
    layer that is not ΔW = B·A (OFT) with its energy unknown; a LoCon 3×3 layer next to them imports."""
    _, kohya_file, _ = lora_files
    state = load_file(str(kohya_file))
    generator = torch.Generator().manual_seed(0)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"  # a LoCon 3×3 layer
    state[f"{conv}.lora_down.weight"] = torch.randn(RANK, 64, 3, 3, generator=generator)
    state[f"{conv}.lora_up.weight"] = torch.randn(64, RANK, 1, 1, generator=generator)
    state[f"{conv}.alpha"] = torch.tensor(float(RANK))
    norm = "lora_unet_down_blocks_0_attentions_0_norm"  # a GroupNorm
    state[f"{norm}.lora_down.weight"] = torch.randn(RANK, 64, generator=generator)
    state[f"{norm}.lora_up.weight"] = torch.randn(64, RANK, generator=generator)
    oft = "lora_te_text_model_encoder_layers_1_mlp_fc2"
    for key in [k for k in state if k.startswith(oft + ".")]:
        del state[key]
    state[f"{oft}.oft_blocks"] = torch.randn(4, 32, 32, generator=generator)
    path = save_lora(tmp_path / "partly.safetensors", state)
    pipe = fresh_pipe()
    _, _, info = read_lora(path, pipe.unet, pipe.text_encoder)
    assert info["kept"]["unet"]["kept"] < 0.999 and info["kept"]["unet"]["layers_lost"] == 1
    assert info["kept"]["text_encoder"]["layers_lost"] == 1 and info["kept"]["text_encoder"]["bound"]
    unet_warning = next(w for w in info["warnings"] if w.startswith("unet:"))
    assert "1 layer left out (not a layer kind Share adapts; " in unet_warning
    text_warning = next(w for w in info["warnings"] if w.startswith("text_encoder:"))
    assert "kept at most 100%" in text_warning and "(not a plain LoRA layer; energy unknown)" in text_warning

    studio = Studio(pipe, tmp_path / "library.safetensors")
    report = studio.import_with_report([path])
    assert len(report.names) == 1 and len(report.warnings) == 2
    assert report.files[path.name]["skipped_count"] == 2
    assert share.share_layers(studio.pipe.unet)["down_blocks.0.resnets.0.conv1"].is_conv


def test_the_cli_shows_what_each_file_kept(lora_files, tmp_path, capsys):
    from share_diffusion.cli import main

    _, kohya_file, _ = lora_files
    library = tmp_path / "library.safetensors"
    assert main(["import", str(kohya_file), "--library", str(library), "--model", str(EMBEDDED)]) == 0
    out, err = capsys.readouterr()
    assert f"{kohya_file.name}: kept unet 100%, text_encoder 100% of its ΔW energy" in out
    assert "warning" not in err


def test_a_version_2_library_still_loads_draws_the_same_and_takes_a_full_lora(lora_files, tmp_path):
    """A library as version 2 wrote it (Share layers on the UNet's attention only, no text-encoder
    tensors) opens, draws its style as before, and grows the other layers on the next import."""
    from share_diffusion.fingerprint import model_fingerprint
    from share_diffusion.library import FORMAT_VERSION, StyleLibrary, new_metadata
    from share_diffusion.loading import model_info

    pipe = fresh_pipe()
    fingerprint, family = model_fingerprint(pipe), model_info(pipe).family
    share.inject_share_layers(pipe.unet, share.ShareConfig())
    generator = torch.Generator().manual_seed(9)
    share.add_style(pipe.unet, "s1", {n: (0.1 * torch.randn(l.d_out, 4, generator=generator),
                                          0.1 * torch.randn(l.d_in, 4, generator=generator))
                                      for n, l in share.share_layers(pipe.unet).items()})
    share.set_active_styles(pipe.unet, {"s1": 1.0})
    before = draw(pipe)
    meta = new_metadata("embedded", fingerprint, share.ShareConfig(), family=family)
    meta |= {"format_version": 2, "next_style_number": 2}
    meta["styles"] = [{"id": "s1", "name": "Old", "trigger": "old", "created_at": "2025-01-01T00:00:00+00:00",
                       "error": 0.0, "error_exact": True, "cuts": 0, "rank": 4, "drift_budget": 0.01, "error_history": []}]
    path = tmp_path / "v2.safetensors"
    StyleLibrary(meta, {f"unet.{k}": v for k, v in share.share_state_dict(pipe.unet).items()}).save(path)

    studio = Studio(fresh_pipe(), path)
    assert studio.library.meta["format_version"] == FORMAT_VERSION
    image = studio.generate(PROMPT, style="Old", add_trigger=False, seed=3, steps=4, guidance=4.0)[0][0]
    assert np.abs(np.asarray(image, dtype=np.float32) / 255 - before).max() <= 1 / 255 + 1e-6
    _, kohya_file, _ = lora_files
    report = studio.import_with_report([kohya_file])
    assert report.warnings == [] and all(d.after <= 1e-5 for d in report.drifts)
    saved = StyleLibrary.load(path)
    assert saved.meta["format_version"] == FORMAT_VERSION and saved.component_state("text_encoder")
