"""LyCORIS files import into a library (issue #19): a LoCon's k×k convolutions get Share layers of
their own and draw what diffusers draws; LoHa and LoKr layers arrive as the truncated SVD of their
ΔW, with the energy that cut left out reported. The files are made in the test: the LoCon from a
PEFT adapter on the embedded model, converted to kohya names by diffusers' own converter; the LoHa
and LoKr files with LyCORIS's key names, their ΔW rebuilt here the way A1111's loaders do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from share_diffusion import share
from share_diffusion.lora_interop import LoraFormatError, read_lora, save_lora
from share_diffusion.studio import Studio, library_style_factors
from tests.test_lora_full import PROMPT, draw, fresh_pipe

# What a kohya LoCon trains next to the attention: the resnets' 3×3 convolutions, their 1×1
# shortcut and time projection, and the down/upsamplers' convolutions (stride 2 going down).
LOCON_TARGETS = ["to_q", "to_v", "conv1", "conv2", "conv_shortcut", "time_emb_proj", "conv"]
ALPHA, RANK = 8, 4
KEEP = 0.99


def ours(studio: Studio, name: str) -> np.ndarray:
    image = studio.generate(PROMPT, style=name, add_trigger=False, seed=3, steps=4, guidance=4.0)[0][0]
    return np.asarray(image, dtype=np.float32) / 255


def diffusers_image(path) -> np.ndarray:
    pipe = fresh_pipe()
    pipe.load_lora_weights(str(path), adapter_name="locon")
    return draw(pipe)


def delta(factors: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return factors[0].double() @ factors[1].double().mT


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).norm() / expected.norm())


def add_locon(unet, seed: int, std: float) -> dict[str, torch.Tensor]:
    """A LoCon PEFT adapter on `unet` as if trained (lora_B random, std `std`, no longer zero): its
    PEFT state dict."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="gaussian", target_modules=LOCON_TARGETS))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in unet.named_parameters():
            if "lora_B" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * std)
    return get_peft_model_state_dict(unet)


@pytest.fixture(scope="module")
def locon(tmp_path_factory):
    """(kohya LoCon file, the image diffusers draws with it, the base image)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    folder = tmp_path_factory.mktemp("locon")
    pipe = fresh_pipe()
    base = draw(pipe)
    state = add_locon(pipe.unet, seed=11, std=0.03)
    assert any(v.dim() == 4 and v.shape[2:] == (3, 3) for v in state.values()), "3×3 conv LoRA layers"
    kohya = {key: torch.tensor(float(ALPHA)) if key.endswith(".alpha") else value
             for key, value in convert_state_dict_to_kohya(StableDiffusionPipeline.pack_weights(state, "unet")).items()}
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in kohya
    path = save_lora(folder / "locon.safetensors", kohya)
    return path, diffusers_image(path), base


def test_a_locon_draws_what_diffusers_draws_and_exports_back_exactly(locon, tmp_path):
    path, expected, base = locon
    change = np.abs(expected - base).mean()
    assert change > 0.01, "the LoCon must visibly change the image"

    library = tmp_path / "library.safetensors"
    studio = Studio(fresh_pipe(), library)
    report = studio.import_with_report([path])
    (name,) = report.names
    assert report.files[path.name]["kept"] == {"unet": {"kept": 1.0, "bound": False, "layers_lost": 0, "layers_cut": 0}}
    assert report.warnings == [] and report.files[path.name]["skipped_count"] == 0
    image = ours(studio, name)
    assert np.abs(image - expected).max() <= 1 / 255 + 1e-6

    # only the layers the file touches got Share layers, by their whole names
    layers = share.share_layers(studio.pipe.unet)
    targets = studio.library.meta["target_modules"]["unet"]
    assert "down_blocks.0.resnets.0.conv1" in targets and layers["down_blocks.0.downsamplers.0.conv"].is_conv
    assert "conv_in" not in layers and "conv_out" not in layers
    assert layers["down_blocks.0.resnets.0.conv1"].base_layer.kernel_size == (3, 3)

    # the library file alone brings them back, and so does importing it into another library
    again = Studio(fresh_pipe(), library)
    assert set(share.share_layers(again.pipe.unet)) == set(layers)
    assert np.abs(ours(again, name) - image).max() <= 1 / 255 + 1e-6
    other = Studio(fresh_pipe(), tmp_path / "other.safetensors")
    other.import_files([library])
    assert np.abs(ours(other, name) - image).max() <= 1 / 255 + 1e-6

    original, _, _ = read_lora(path, studio.pipe.unet)
    for format in ("kohya", "diffusers"):
        exported = studio.export_lora(name, tmp_path / f"out-{format}.safetensors", format=format)
        read, _, info = read_lora(exported, studio.pipe.unet)
        assert info["warnings"] == [] and set(read) == set(original)
        for layer, factors in original.items():
            assert relative_error(delta(read[layer]), delta(factors)) <= 1e-5, layer
        # written as conv LoRA weights, so that diffusers loads it as it loads the original
        assert np.abs(diffusers_image(exported) - expected).max() <= 1 / 255 + 1e-6


def test_a_dry_run_of_a_locon_import_adds_no_layers(locon, tmp_path):
    studio = Studio(fresh_pipe(), tmp_path / "library.safetensors")
    layers_before = set(share.share_layers(studio.pipe.unet))
    targets_before = list(studio.library.meta["target_modules"]["unet"])
    report = studio.check_import([locon[0]])
    assert report.names and report.basis_rank_after > 0
    assert set(share.share_layers(studio.pipe.unet)) == layers_before
    assert studio.library.meta["target_modules"]["unet"] == targets_before
    assert not (tmp_path / "library.safetensors").exists()


def test_a_locon_with_a_tucker_core_folds_it_in_exactly():
    """LyCORIS LoCon with use_tucker: lora_down (r, c_in, 1, 1), lora_mid (r, r, 3, 3), lora_up."""
    generator = torch.Generator().manual_seed(3)
    down, mid, up = (torch.randn(shape, generator=generator)
                     for shape in [(RANK, 64, 1, 1), (RANK, RANK, 3, 3), (128, RANK, 1, 1)])
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    state = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up,
             f"{name}.alpha": torch.tensor(2.0)}
    factors, _, info = read_lora(state, fresh_pipe().unet)
    # A1111's rebuild_cp_decomposition
    expected = torch.einsum("n m k l, i n, m j -> i j k l", mid.double(), up.double().flatten(1), down.double().flatten(1))
    assert info["warnings"] == []
    assert relative_error(delta(factors["down_blocks.1.resnets.0.conv1"]), expected.flatten(1) * 2.0 / RANK) <= 1e-6


# --- LoHa and LoKr --------------------------------------------------------------------------


def make_weight_cp(core: torch.Tensor, factor_a: torch.Tensor, factor_b: torch.Tensor) -> torch.Tensor:
    """A1111's lyco_helpers.make_weight_cp: a Tucker core and its two factors as (p, q, k, l)."""
    temp = torch.einsum("i j k l, j r -> i r k l", core, factor_b)
    return torch.einsum("i j k l, i r -> r j k l", temp, factor_a)


def loha_delta(parts: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """A1111's network_hada.py: (w1_a w1_b) ∘ (w2_a w2_b) · alpha/r, with Tucker cores where given."""
    p = {k: v.double() for k, v in parts.items()}
    halves = [make_weight_cp(p[f"hada_t{i}"], p[f"hada_w{i}_a"], p[f"hada_w{i}_b"]) if f"hada_t{i}" in p
              else (p[f"hada_w{i}_a"] @ p[f"hada_w{i}_b"]).reshape(shape) for i in (1, 2)]
    return (halves[0] * halves[1] * float(p["alpha"]) / p["hada_w1_b"].shape[0]).reshape(shape[0], -1)


def lokr_delta(parts: dict[str, torch.Tensor], shape) -> torch.Tensor:
    """A1111's network_lokr.py: w1 ⊗ w2 (w1 unsqueezed for a conv w2), alpha/dim with dim from the
    decomposed factors (none: scale 1)."""
    p = {k: v.double() for k, v in parts.items()}
    w1 = p["lokr_w1"] if "lokr_w1" in p else p["lokr_w1_a"] @ p["lokr_w1_b"]
    if "lokr_w2" in p:
        w2 = p["lokr_w2"]
    elif "lokr_t2" in p:
        w2 = make_weight_cp(p["lokr_t2"], p["lokr_w2_a"], p["lokr_w2_b"])
    else:
        w2 = p["lokr_w2_a"] @ p["lokr_w2_b"]
    dim = p["lokr_w2_b"].shape[0] if "lokr_w2_b" in p else p["lokr_w1_b"].shape[0] if "lokr_w1_b" in p else None
    scale = float(p["alpha"]) / dim if dim else 1.0
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return (torch.kron(w1, w2).reshape(shape) * scale).reshape(shape[0], -1)


def truncated_svd(delta_weight: torch.Tensor) -> tuple[torch.Tensor, int, float]:
    """The rank-k truncated SVD at the smallest k that keeps KEEP of ‖ΔW‖², that k and the kept share."""
    u, s, vh = torch.linalg.svd(delta_weight, full_matrices=False)
    kept = s.square().cumsum(0) / s.square().sum()
    k = int((kept < KEEP).sum()) + 1
    return (u[:, :k] * s[:k]) @ vh[:k], k, float(kept[k - 1])


def random_parts(shapes: dict[str, tuple], alpha: float, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.3 for key, shape in shapes.items()} | {"alpha": torch.tensor(alpha)}


# kohya name, module, component, weight shape, LyCORIS tensors
LOHA_LAYERS = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "unet", (64, 64),
     {"hada_w1_a": (64, 4), "hada_w1_b": (4, 64), "hada_w2_a": (64, 4), "hada_w2_b": (4, 64)}),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2",
     "mid_block.attentions.0.transformer_blocks.0.ff.net.2", "unet", (128, 512),
     {"hada_w1_a": (128, 4), "hada_w1_b": (4, 512), "hada_w2_a": (128, 4), "hada_w2_b": (4, 512)}),
    ("lora_unet_down_blocks_1_resnets_0_conv1", "down_blocks.1.resnets.0.conv1", "unet", (128, 64, 3, 3),
     {"hada_w1_a": (128, 4), "hada_w1_b": (4, 64 * 9), "hada_w2_a": (128, 4), "hada_w2_b": (4, 64 * 9)}),
    ("lora_unet_up_blocks_1_resnets_0_conv2", "up_blocks.1.resnets.0.conv2", "unet", (128, 128, 3, 3),  # Tucker
     {"hada_t1": (4, 4, 3, 3), "hada_w1_a": (4, 128), "hada_w1_b": (4, 128),
      "hada_t2": (4, 4, 3, 3), "hada_w2_a": (4, 128), "hada_w2_b": (4, 128)}),
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", "encoder.layers.0.self_attn.q_proj", "text_encoder",
     (128, 128), {"hada_w1_a": (128, 4), "hada_w1_b": (4, 128), "hada_w2_a": (128, 4), "hada_w2_b": (4, 128)}),
]
LOKR_LAYERS = [
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k",  # w1 full, w2 decomposed
     "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k", "unet", (64, 64),
     {"lokr_w1": (8, 8), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}),
    ("lora_unet_down_blocks_0_resnets_0_conv2", "down_blocks.0.resnets.0.conv2", "unet", (64, 64, 3, 3),
     {"lokr_w1": (8, 8), "lokr_w2": (8, 8, 3, 3)}),  # both full: scale 1 whatever alpha says
    ("lora_unet_down_blocks_1_resnets_0_conv2", "down_blocks.1.resnets.0.conv2", "unet", (128, 128, 3, 3),
     {"lokr_w1_a": (8, 2), "lokr_w1_b": (2, 8), "lokr_t2": (2, 2, 3, 3), "lokr_w2_a": (2, 16), "lokr_w2_b": (2, 16)}),
    ("lora_unet_up_blocks_2_resnets_0_conv1", "up_blocks.2.resnets.0.conv1", "unet", (64, 192, 3, 3),  # w2 (b, d·k·k)
     {"lokr_w1": (4, 12), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16 * 9)}),
    ("lora_te_text_model_encoder_layers_1_mlp_fc1", "encoder.layers.1.mlp.fc1", "text_encoder", (256, 128),
     {"lokr_w1": (16, 8), "lokr_w2_a": (16, 2), "lokr_w2_b": (2, 16)}),
]


@pytest.mark.parametrize("kind, layers, reference", [("LoHa", LOHA_LAYERS, loha_delta), ("LoKr", LOKR_LAYERS, lokr_delta)])
def test_loha_and_lokr_import_as_the_truncated_svd_of_their_delta(kind, layers, reference, tmp_path):
    state, expected, totals, kept = {}, {}, {}, {}
    for seed, (kohya, module, component, shape, shapes) in enumerate(layers):
        parts = random_parts(shapes, alpha=3.0, seed=seed)
        state |= {f"{kohya}.{key}": value for key, value in parts.items()}
        truth = reference(parts, shape)
        expected[component, module] = truncated_svd(truth)
        energy = float(truth.square().sum())
        totals[component] = totals.get(component, 0.0) + energy
        kept[component] = kept.get(component, 0.0) + expected[component, module][2] * energy
    path = tmp_path / f"{kind}.safetensors"
    save_file(state, str(path))

    studio = Studio(fresh_pipe(), tmp_path / "library.safetensors")
    report = studio.import_with_report([path])
    (record,) = studio.library.styles
    fractions = report.files[path.name]["kept"]
    assert set(fractions) == {"unet", "text_encoder"}
    for component, fraction in fractions.items():
        assert fraction["kept"] >= KEEP and fraction["layers_lost"] == 0
        assert fraction["kept"] == pytest.approx(kept[component] / totals[component], abs=1e-6)
        warned = [w for w in report.warnings if f": {component}: " in w]
        assert bool(warned) == (fraction["kept"] < 0.999)
        assert all(f"cut ({kind}, reduced to the rank that keeps 99% of each layer's ΔW energy;" in w for w in warned)
    assert any(share_kept < 1 - 1e-6 for _, _, share_kept in expected.values()), "some layer must be cut"
    for (component, module), (truncated, rank, _) in expected.items():
        factors = library_style_factors(studio.library, record["id"], component)[module]
        assert factors[0].shape[1] == rank, module
        assert relative_error(delta(factors), truncated) <= 1e-5, module


def test_a_loha_that_needs_more_rank_than_allowed_is_named():
    kohya, module, _, shape, _ = LOHA_LAYERS[0]
    parts = random_parts({"hada_w1_a": (64, 8), "hada_w1_b": (8, 64), "hada_w2_a": (64, 8), "hada_w2_b": (8, 64)}, 8.0, 0)
    _, needed, _ = truncated_svd(loha_delta(parts, shape))
    assert needed > 4
    factors, _, info = read_lora({f"{kohya}.{k}": v for k, v in parts.items()}, fresh_pipe().unet, max_rank=4)
    assert factors[module][0].shape[1] == 4
    assert info["kept"]["unet"]["kept"] < KEEP and info["kept"]["unet"]["layers_cut"] == 1
    (warning,) = info["warnings"]
    assert warning.startswith("unet: kept ")
    assert f"LoHa layer {kohya} needs rank {needed} to keep 99% of its ΔW energy, over the limit of 4" in warning


def test_broken_lycoris_layers_and_dora_are_refused_in_one_line():
    unet = fresh_pipe().unet
    kohya = LOHA_LAYERS[0][0]
    parts = random_parts(LOHA_LAYERS[0][4], 1.0, 0)
    incomplete = {f"{kohya}.{k}": v for k, v in parts.items() if k != "hada_w2_b"}
    with pytest.raises(LoraFormatError, match=f"{kohya}: a LoHa layer that lacks hada_w2_b"):
        read_lora(incomplete, unet)
    misranked = {f"{kohya}.{k}": v for k, v in parts.items()} | {f"{kohya}.hada_w2_b": torch.zeros(3, 64)}
    with pytest.raises(LoraFormatError, match="a LoHa layer that has a hada_w2_a of rank 4 and a hada_w2_b of rank 3"):
        read_lora(misranked, unet)
    misshapen = {f"{kohya}.{k}": v for k, v in parts.items()} | {f"{kohya}.hada_w2_b": torch.zeros(4, 32)}
    with pytest.raises(LoraFormatError, match=r"a LoHa layer that multiplies a \(64, 64\) by a \(64, 32\) product"):
        read_lora(misshapen, unet)
    dora = {f"{kohya}.{k}": v for k, v in parts.items()} | {f"{kohya}.dora_scale": torch.ones(64, 1)}
    with pytest.raises(LoraFormatError, match="DoRA"):
        read_lora(dora, unet)
