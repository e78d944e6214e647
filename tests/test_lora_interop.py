"""Standard LoRA interop on the real tiny StableDiffusionPipeline (no mocks): Share styles out
to kohya/diffusers files that diffusers' own loader reproduces, and LoRAs made by PEFT in."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file, save_file

from share_diffusion import share
from share_diffusion.lora_interop import FORMATS, LoraFormatError, export_lora, read_lora, save_lora

CLIP = share.ShareConfig(target_modules=share.CLIP_TARGET_MODULES)
IMAGE_TOLERANCE = 1e-4


def fresh_pipe(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(7)
    prompt = "the fox and the hound"
    return pipe(prompt, num_inference_steps=3, guidance_scale=5.0, generator=generator, output_type="np").images


def inject(pipe, unet_config: share.ShareConfig | None = None) -> None:
    share.inject_share_layers(pipe.unet, unet_config or share.ShareConfig())
    share.inject_share_layers(pipe.text_encoder, CLIP)


def random_factors(model, rank: int, seed: int, std: float = 0.3) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {
        name: (
            torch.randn(layer.base_layer.out_features, rank, generator=generator) * std,
            torch.randn(layer.base_layer.in_features, rank, generator=generator) * std,
        )
        for name, layer in share.share_layers(model).items()
    }


def delta(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return factors[0].double() @ factors[1].double().mT


def assert_same_deltas(expected: dict, actual: dict, tolerance: float = 1e-5) -> None:
    assert set(actual) == set(expected)
    for name in expected:
        reference = delta(expected[name])
        error = (delta(actual[name]) - reference).norm() / reference.norm()
        assert error <= tolerance, f"{name}: relative ΔW error {error:.2e}"


@pytest.fixture(scope="module")
def styled(tiny_pipeline_dir):
    """A pipeline with Share layers in the UNet and the text encoder and one random style,
    plus the base image and the image with the style active."""
    pipe = fresh_pipe(tiny_pipeline_dir)
    base_image = generate(pipe)
    inject(pipe)
    share.add_style(pipe.unet, "ink", random_factors(pipe.unet, rank=4, seed=1))
    share.add_style(pipe.text_encoder, "ink", random_factors(pipe.text_encoder, rank=3, seed=2))
    share.set_active_styles(pipe.unet, {"ink": 1.0})
    share.set_active_styles(pipe.text_encoder, {"ink": 1.0})
    image = generate(pipe)
    assert np.abs(image - base_image).max() > 0.05, "the style must visibly change the image"
    factors = share.export_style(pipe.unet, "ink"), share.export_style(pipe.text_encoder, "ink")
    return pipe, factors, image


@pytest.mark.parametrize("format", FORMATS)
def test_round_trip_keeps_every_delta(styled, format, tmp_path):
    pipe, (factors_unet, factors_text), _ = styled
    state = export_lora(factors_unet, factors_text, format=format)
    if format == "kohya":
        assert any(k.startswith("lora_unet_") and k.endswith(".lora_down.weight") for k in state)
        assert any(k.startswith("lora_te_text_model_encoder_layers_") for k in state)
        assert all(float(v) == 4 for k, v in state.items() if k.endswith(".alpha"))  # alpha = r: scale 1
    else:
        assert any(k.startswith("unet.") and k.endswith(".lora_A.weight") for k in state)
        assert any(k.startswith("text_encoder.text_model.encoder.layers.") for k in state)
    path = save_lora(tmp_path / f"ink-{format}.safetensors", state, metadata={"style": "ink", "steps": 3})
    read_unet, read_text, info = read_lora(path, pipe.unet, pipe.text_encoder)
    assert info["format"] == format and info["skipped_count"] == 0
    assert info["layers"] == len(state) // (3 if format == "kohya" else 2)
    assert info["metadata"]["style"] == "ink" and info["metadata"]["steps"] == "3"
    assert_same_deltas(factors_unet, read_unet)
    assert_same_deltas(factors_text, read_text)

    if format == "kohya":  # alpha is per layer in kohya files (A1111 scales each by its own alpha/r)
        halved = dict(state)
        for key in [k for k in state if k.endswith(".alpha")][::2]:
            halved[key] = state[key] / 2
            halved[key.replace(".alpha", ".lora_up.weight")] = state[key.replace(".alpha", ".lora_up.weight")] * 2
        read_unet, read_text, _ = read_lora(halved, pipe.unet, pipe.text_encoder)
        assert_same_deltas(factors_unet, read_unet)
        assert_same_deltas(factors_text, read_text)

    half_state = export_lora(factors_unet, factors_text, format=format, dtype=torch.float16)
    half = read_lora(half_state, pipe.unet, pipe.text_encoder)
    assert_same_deltas(factors_unet, half[0], tolerance=2e-3)
    assert_same_deltas(factors_text, half[1], tolerance=2e-3)

    # an explicit rank (and, in kohya files, another alpha) change the numbers in the file, not ΔW
    scaled = export_lora(factors_unet, factors_text, format=format, rank=6, alpha=1.5 if format == "kohya" else None)
    read_unet, read_text, info = read_lora(scaled, pipe.unet, pipe.text_encoder)
    assert info["rank"] == 6
    assert_same_deltas(factors_unet, read_unet)
    assert_same_deltas(factors_text, read_text)


@pytest.mark.parametrize("format", FORMATS)
def test_diffusers_load_lora_weights_reproduces_the_share_image(styled, format, tiny_pipeline_dir, tmp_path):
    """The product promise: an exported style looks the same in any diffusers-based tool."""
    _, (factors_unet, factors_text), share_image = styled
    path = save_lora(tmp_path / f"ink-{format}.safetensors", export_lora(factors_unet, factors_text, format=format))
    other = fresh_pipe(tiny_pipeline_dir)
    other.load_lora_weights(str(path), adapter_name="ink")
    lora_layers = [n for n, m in other.text_encoder.named_modules() if hasattr(m, "lora_A") and "ink" in m.lora_A]
    assert len(lora_layers) == len(factors_text), "the text-encoder part must load too"
    other.set_adapters(["ink"], [1.0])
    assert np.abs(generate(other) - share_image).max() <= IMAGE_TOLERANCE
    other.fuse_lora()
    other.unload_lora_weights()
    assert np.abs(generate(other) - share_image).max() <= IMAGE_TOLERANCE


def test_import_of_a_lora_trained_with_peft_matches_the_peft_model(tiny_pipeline_dir, tmp_path):
    """A LoRA made the way diffusers' training scripts make one (PEFT adapters, alpha ≠ r)."""
    from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    peft_pipe = fresh_pipe(tiny_pipeline_dir)
    base_image = generate(peft_pipe)
    unet_targets, text_targets = ["to_q", "to_k", "to_v", "to_out.0"], ["q_proj", "k_proj", "v_proj", "out_proj"]
    unet_config = LoraConfig(r=8, lora_alpha=16, init_lora_weights="gaussian", target_modules=unet_targets)
    text_config = LoraConfig(r=8, lora_alpha=4, init_lora_weights="gaussian", target_modules=text_targets)
    peft_pipe.unet.add_adapter(unet_config)
    peft_pipe.text_encoder.add_adapter(text_config)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in [*peft_pipe.unet.named_parameters(), *peft_pipe.text_encoder.named_parameters()]:
            if "lora_B" in name:  # trained adapters: lora_B is no longer zero
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)
    peft_image = generate(peft_pipe)
    assert np.abs(peft_image - base_image).max() > 0.05, "the LoRA must visibly change the image"
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(peft_pipe.unet)),
        text_encoder_lora_layers=convert_state_dict_to_diffusers(get_peft_model_state_dict(peft_pipe.text_encoder)),
        unet_lora_adapter_metadata=unet_config.to_dict(),
        text_encoder_lora_adapter_metadata=text_config.to_dict(),
    )
    path = tmp_path / "pytorch_lora_weights.safetensors"

    pipe = fresh_pipe(tiny_pipeline_dir)
    inject(pipe, share.ShareConfig(max_basis_rank=16))
    factors_unet, factors_text, info = read_lora(path, pipe.unet, pipe.text_encoder)
    assert info["format"] == "diffusers" and info["rank"] == 8 and info["skipped_count"] == 0
    assert len(factors_unet) == len(share.share_layers(pipe.unet))
    assert len(factors_text) == len(share.share_layers(pipe.text_encoder))
    share.add_style(pipe.unet, "peft", factors_unet)
    share.add_style(pipe.text_encoder, "peft", factors_text)
    share.set_active_styles(pipe.unet, {"peft": 1.0})
    share.set_active_styles(pipe.text_encoder, {"peft": 1.0})
    assert np.abs(generate(pipe) - peft_image).max() <= IMAGE_TOLERANCE


def test_kohya_layers_without_a_share_layer_yet_are_read_and_the_rest_reported(styled, tmp_path):
    """Conv, feed-forward, proj_in and CLIP MLP layers (what kohya LoCon / full-network LoRAs add
    next to the attention) are read although these models hold Share layers on the attention only
    (a library gives them Share layers of their own); a LyCORIS layer that is not ΔW = B·A (OFT)
    and a LoRA on a layer Share does not adapt (a GroupNorm) are skipped and reported."""
    pipe, (factors_unet, factors_text), _ = styled
    state = export_lora(factors_unet, factors_text, format="kohya")
    extra = {  # what kohya-ss sd-scripts LoCon / full-network LoRAs add next to the attention layers
        "lora_unet_down_blocks_0_resnets_0_conv1": ("down_blocks.0.resnets.0.conv1", (4, 32, 3, 3), (32, 4, 1, 1)),
        "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_2":
            ("down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2", (4, 128), (32, 4)),
        "lora_unet_down_blocks_0_attentions_0_proj_in": ("down_blocks.0.attentions.0.proj_in", (4, 32), (32, 4)),
        "lora_te_text_model_encoder_layers_0_mlp_fc1": ("encoder.layers.0.mlp.fc1", (4, 32), (64, 4)),
    }
    for name, (_, down, up) in extra.items():
        state[f"{name}.lora_down.weight"], state[f"{name}.lora_up.weight"] = torch.randn(down), torch.randn(up)
        state[f"{name}.alpha"] = torch.tensor(2.0)
    oft, norm = "lora_unet_up_blocks_1_attentions_0_proj_out", "lora_unet_down_blocks_0_attentions_0_norm"
    state[f"{oft}.oft_blocks"] = torch.randn(4, 8, 8)
    state[f"{norm}.lora_down.weight"], state[f"{norm}.lora_up.weight"] = torch.randn(4, 32), torch.randn(32, 4)
    path = save_lora(tmp_path / "locon.safetensors", state)

    read_unet, read_text, info = read_lora(path, pipe.unet, pipe.text_encoder)
    assert info["skipped_count"] == 2 == len(info["skipped"])
    assert info["skipped"][oft] == "not a plain LoRA layer (oft_blocks)"
    assert info["skipped"]["unet.down_blocks.0.attentions.0.norm"] == "not a layer kind Share adapts"
    assert info["kept"]["unet"]["bound"] and info["kept"]["unet"]["layers_lost"] == 2
    assert any(w.startswith("unet: kept at most ") for w in info["warnings"])
    assert info["layers"] == len(factors_unet) + len(factors_text) + len(extra)
    for name, (module, down, up) in extra.items():
        read = {**read_unet, **read_text}[module]
        expected = state[f"{name}.lora_up.weight"].flatten(1) @ state[f"{name}.lora_down.weight"].flatten(1) * 2.0 / 4
        assert torch.allclose(delta(read), expected.double(), atol=1e-5), module
    assert_same_deltas(factors_unet, {name: read_unet[name] for name in factors_unet})
    assert_same_deltas(factors_text, {name: read_text[name] for name in factors_text})

    # without a text encoder its layers are reported as skipped too
    read_unet, read_text, info = read_lora(path, pipe.unet)
    assert read_text == {} and info["skipped_count"] == 2 + len(factors_text) + 1


def test_pickle_files_are_refused_without_being_opened(styled, tmp_path):
    pipe = styled[0]
    marker = tmp_path / "unpickled"
    payload = pickle.dumps(type("Trap", (), {"__reduce__": lambda self: (os.makedirs, (str(marker),))})())
    for name in ("style.pt", "style.ckpt", "renamed-pickle.safetensors"):
        (tmp_path / name).write_bytes(payload)
        with pytest.raises(LoraFormatError, match="pickle"):
            read_lora(tmp_path / name, pipe.unet)
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1)}, tmp_path / "torch-zip.safetensors")
    with pytest.raises(LoraFormatError, match="pickle"):
        read_lora(tmp_path / "torch-zip.safetensors", pipe.unet)
    assert not marker.exists()
    # a real safetensors file whose header length starts with the pickle opcode byte 0x80
    state = export_lora(styled[1][0])
    for padding in range(256):
        path = save_lora(tmp_path / "ok.safetensors", state, metadata={"note": "x" * padding})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_lora(path, pipe.unet)[2]["format"] == "kohya"
    (tmp_path / "junk.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(LoraFormatError, match="not a readable .safetensors"):
        read_lora(tmp_path / "junk.safetensors", pipe.unet)
    with pytest.raises(ValueError, match=".safetensors"):
        save_lora(tmp_path / "out.pt", export_lora(styled[1][0]))


def test_files_that_are_not_a_fitting_lora_raise_clear_errors(styled, tmp_path):
    pipe, (factors_unet, _), _ = styled
    checkpoint = {"model.diffusion_model.conv_in.weight": torch.zeros(4, 4), "foo": torch.zeros(1)}
    save_file(checkpoint, str(tmp_path / "ckpt.safetensors"))
    with pytest.raises(LoraFormatError, match="no recognisable LoRA keys"):
        read_lora(tmp_path / "ckpt.safetensors", pipe.unet)

    for format in FORMATS:  # a LoRA for a bigger model: the same layer names, other widths
        state = export_lora(factors_unet, format=format)
        key = next(k for k in state if k.endswith((".lora_down.weight", ".lora_A.weight")))
        state[key] = torch.zeros(state[key].shape[0], 320)
        with pytest.raises(LoraFormatError, match="does not fit this model"):
            read_lora(state, pipe.unet)

    state = export_lora(factors_unet, format="diffusers")
    state = {k.replace("down_blocks.0.", "down_blocks.3."): v for k, v in state.items()}  # a layer the model lacks
    with pytest.raises(LoraFormatError, match="not in this model"):
        read_lora(state, pipe.unet)

    dora = load_file(str(save_lora(tmp_path / "d.safetensors", export_lora(factors_unet))))
    dora["lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.dora_scale"] = torch.ones(1, 32)
    with pytest.raises(LoraFormatError, match="DoRA"):
        read_lora(dora, pipe.unet)

    oft_only = {"lora_unet_down_blocks_0_resnets_0_conv1.oft_blocks": torch.zeros(4, 8, 8)}  # LyCORIS OFT
    with pytest.raises(LoraFormatError, match="none of its 1 layers"):
        read_lora(oft_only, pipe.unet)
