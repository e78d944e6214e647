"""Standard LoRA files in and out of Share: kohya/A1111 and diffusers/PEFT formats.

Share keeps a style as factors per layer, {layer name: (B d_out×r, A d_in×r)} with ΔW = B Aᵀ
(share.export_style / share.add_style). A standard LoRA layer stores the same product as
lora_up/lora_B = B (d_out×r) and lora_down/lora_A = Aᵀ (r×d_in), scaled by alpha/r.

  export_lora(factors_unet, factors_text, format)  -> a LoRA state dict (alpha = r: scale 1)
  save_lora(path, state, metadata)                  -> a .safetensors file
  read_lora_components(source, models)              -> factors per component (alpha/r folded into B) + info
  read_lora(source, unet, text_encoder)             -> the same for a UNet and one text encoder

Key names come from diffusers' own converters, the ones pipe.load_lora_weights uses:
  kohya:     convert_state_dict_to_kohya on export; lora_state_dict
             (_convert_non_diffusers_lora_to_diffusers) then convert_unet_state_dict_to_peft /
             convert_state_dict_to_peft on import.
  diffusers: the PEFT layout `unet.<module>.lora_A.weight`, packed with pack_weights, exactly
             what StableDiffusionPipeline.save_lora_weights writes.
Three spellings are ours: SD 1.x/2.x kohya files name the text encoder `lora_te_` (diffusers
writes the SDXL-style `lora_te1_`; both load in diffusers, A1111 wants `lora_te_` for SD 1.x);
SDXL kohya files name UNet layers by the original (SGM) blocks, `lora_unet_input_blocks_4_1_…`,
as kohya sd-scripts writes them (it trains SDXL on that UNet, and reads its SDXL files so; diffusers
maps them back by the UNet config, see sgm_unet_name); and text-encoder layers are written under
`text_model.` (transformers ≥ 5.6 flattened CLIPTextModel; files keep the classic names, and
diffusers strips the prefix when loading).

LyCORIS files use the kohya names: LoCon layers are plain lora_down/lora_up (a convolution's
ΔW flattened to d_out × (c_in·k_h·k_w)); LoHa and LoKr layers become the truncated SVD of their ΔW
(lycoris.py), and what that leaves out is reported with the rest.

Pickle-based files are never opened. Everything a user can get wrong raises LoraFormatError.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import lycoris, share
from .families import SDXL, architecture, family_from_configs
from .loading import PICKLE_SUFFIXES

FORMATS = ("kohya", "diffusers")
KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
#: The component prefixes a diffusers/PEFT LoRA file may use, with the layer kinds Share adapts in
#: each where the model has no Share layers yet.
DEFAULT_TARGETS = {"unet": share.UNET_LORA_MODULES, "text_encoder": share.CLIP_LORA_MODULES,
                   "text_encoder_2": share.CLIP_LORA_MODULES}
LORA_COMPONENTS = tuple(DEFAULT_TARGETS)
TEXT_MODEL_PREFIX = "text_model."
# Per-layer tensors of LoRA variants that are not ΔW = B Aᵀ (DoRA rescales the whole weight).
_DORA_MARKERS = ("dora_scale", "lora_magnitude_vector")
# module.lora_A.weight, module.lora_B.<adapter>.weight, module.lora_B.bias, module.alpha
_PEFT_KEY = re.compile(r"(?P<module>.+)\.(?:lora_(?P<ab>[AB])(?:\.[^.]+)?\.(?P<leaf>weight|bias)|(?P<alpha>alpha))")
_DIFFUSERS_MARKERS = (".lora_A.", ".lora_B.", ".lora.down.", ".lora.up.", "_lora.down.", "_lora.up.", ".lora_linear_layer.")

Factors = dict[str, tuple[Tensor, Tensor]]


class LoraFormatError(ValueError):
    """A file that is not a usable standard LoRA for this model (one-line message)."""


# ---------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------


def _peft_layers(factors: Mapping[str, tuple[Tensor, Tensor]], rank: int, up_scale: float, dtype, text: bool,
                 conv_shapes: Mapping[str, Sequence[int]]) -> dict:
    """{module.lora_A.weight: Aᵀ, module.lora_B.weight: B}, every layer zero-padded to `rank`; a
    convolution's as conv weights, lora_A (r, c_in, k_h, k_w) and lora_B (d_out, r, 1, 1)."""
    state = {}
    for name, (factor_b, factor_a) in factors.items():
        if factor_b.shape[1] == 0:
            continue
        factor_b, factor_a = share.canonical_factors(factor_b.double(), factor_a.double())  # balanced: fp16-safe
        lora_a, lora_b = share.pad_columns(factor_a, rank).mT, share.pad_columns(factor_b, rank) * up_scale
        if name in conv_shapes:
            lora_a, lora_b = lora_a.reshape(rank, *conv_shapes[name][1:]), lora_b[..., None, None]
        if text and not name.startswith(TEXT_MODEL_PREFIX):
            name = TEXT_MODEL_PREFIX + name
        state[f"{name}.lora_A.weight"] = lora_a.to(dtype).contiguous()
        state[f"{name}.lora_B.weight"] = lora_b.to(dtype).contiguous()
    return state


# A UNet layer in a block, by diffusers' name: down/up_blocks.<b>.<part>.<j>. or mid_block.<part>.<j>.
_UNET_BLOCK = re.compile(
    r"(?:(?P<side>down|up)_blocks\.(?P<block>\d+)|mid_block)\.(?P<part>resnets|attentions|downsamplers|upsamplers)\.(?P<layer>\d+)\."
)
#: Where a part sits in its original block: [resnet, attention, upsampler]; a downsampler stands alone.
_SGM_POSITION = {"resnets": 0, "attentions": 1, "upsamplers": 2, "downsamplers": 0}
#: Original names inside a block where they differ: a resnet's in_layers = (norm, SiLU, conv),
#: emb_layers = (SiLU, linear), out_layers = (norm, SiLU, dropout, conv); a downsampler's op.
_SGM_INNER = {"resnets": {"conv1": "in_layers.2", "time_emb_proj": "emb_layers.1", "conv2": "out_layers.3",
                          "conv_shortcut": "skip_connection"},
              "downsamplers": {"conv": "op"}}
#: The layers outside the blocks (input_blocks.0.0 is conv_in).
_SGM_OUTSIDE = {"conv_in": "input_blocks.0.0", "conv_out": "out.2", "time_embedding.linear_1": "time_embed.0",
                "time_embedding.linear_2": "time_embed.2", "add_embedding.linear_1": "label_emb.0.0",
                "add_embedding.linear_2": "label_emb.0.2"}


def sgm_unet_name(module: str, layers_per_block: int) -> str:
    """A diffusers UNet layer by its original (SGM/LDM) name, the name kohya sd-scripts gives SDXL
    LoRA layers. Each diffusers block is n = layers_per_block + 1 original blocks (down: its layers
    and the downsampler; up: its n layers), and input_blocks.0 is conv_in:

        down_blocks.b.resnets.j.…          ->  input_blocks.(1 + n·b + j).0.…
        down_blocks.b.attentions.j.…       ->  input_blocks.(1 + n·b + j).1.…
        down_blocks.b.downsamplers.0.conv  ->  input_blocks.(n·(b + 1)).0.op
        mid_block.resnets.j.…              ->  middle_block.(2j).…
        mid_block.attentions.0.…           ->  middle_block.1.…
        up_blocks.b.resnets.j.…            ->  output_blocks.(n·b + j).0.…
        up_blocks.b.attentions.j.…         ->  output_blocks.(n·b + j).1.…
        up_blocks.b.upsamplers.0.conv      ->  output_blocks.(n·b + n − 1).2.conv

    with a resnet's layers renamed (_SGM_INNER) and those outside the blocks by _SGM_OUTSIDE: the
    inverse of diffusers' _maybe_map_sgm_blocks_to_diffusers and _convert_unet_lora_key, which
    load_lora_weights and read_lora_components use (they read position 2 as the upsampler, as in
    SDXL, whose upsampling blocks all have attentions). Inside attention blocks the names agree.
    """
    if module in _SGM_OUTSIDE:
        return _SGM_OUTSIDE[module]
    match = _UNET_BLOCK.match(module)
    if match is None:
        raise ValueError(f"{module}: not a UNet layer that has a kohya SDXL name")
    part, layer, n = match["part"], int(match["layer"]), layers_per_block + 1
    inner = module[match.end():]
    inner = _SGM_INNER.get(part, {}).get(inner, inner)
    if match["side"] is None:
        block = f"middle_block.{2 * layer + (part == 'attentions')}"
    elif match["side"] == "down":
        index = n * (int(match["block"]) + 1) if part == "downsamplers" else 1 + n * int(match["block"]) + layer
        block = f"input_blocks.{index}.{_SGM_POSITION[part]}"
    else:
        index = n * int(match["block"]) + (n - 1 if part == "upsamplers" else layer)
        block = f"output_blocks.{index}.{_SGM_POSITION[part]}"
    return f"{block}.{inner}"


def export_lora(
    factors_unet: Mapping[str, tuple[Tensor, Tensor]],
    factors_text: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    format: str = "kohya",
    *,
    factors_text_2: Mapping[str, tuple[Tensor, Tensor]] | None = None,
    unet_config: Mapping | None = None,
    rank: int | None = None,
    alpha: float | None = None,
    dtype: torch.dtype = torch.float32,
    conv_shapes: Mapping[str, Sequence[int]] | None = None,
) -> dict[str, Tensor]:
    """A standard LoRA state dict of one style from share.export_style factors (ΔW = B Aᵀ).

    format "kohya" (A1111/ComfyUI: lora_unet_…/lora_te_… with lora_down, lora_up, alpha) or
    "diffusers" (PEFT: unet.…/text_encoder.… with lora_A, lora_B). factors_text_2 are SDXL's
    second text encoder's (text_encoder_2.…, kohya lora_te2_…). With an SDXL UNet's config
    (unet_config), kohya files take kohya sd-scripts' SDXL names: lora_unet_input_blocks_…
    (sgm_unet_name) and lora_te1_/lora_te2_. Every layer gets the same
    rank (default: the largest; smaller layers are zero-padded, which leaves ΔW unchanged) and
    the same alpha (default: alpha = rank, i.e. scale 1), so every loader applies one
    alpha/rank and ΔW comes out exactly. Another alpha (kohya only: diffusers files carry none)
    divides lora_up by alpha/rank.
    Layers whose style has rank 0 (ΔW = 0) are left out. conv_shapes: the weight shape
    (d_out, c_in, k_h, k_w) of each layer that is a convolution, written as a conv LoRA (LoCon).
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils.state_dict_utils import convert_state_dict_to_kohya

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {format!r}")
    factors_text, factors_text_2 = factors_text or {}, factors_text_2 or {}
    widths = []
    for name, (factor_b, factor_a) in [*factors_unet.items(), *factors_text.items(), *factors_text_2.items()]:
        if factor_b.dim() != 2 or factor_a.dim() != 2 or factor_b.shape[1] != factor_a.shape[1]:
            shapes = f"{tuple(factor_b.shape)}, {tuple(factor_a.shape)}"
            raise ValueError(f"{name}: factors must be B (d_out×r) and A (d_in×r), got {shapes}")
        widths.append(min(factor_b.shape[1], factor_b.shape[0], factor_a.shape[0]))  # canonical width
    largest = max(widths, default=0)
    if largest == 0:
        raise ValueError("nothing to export: the style changes no layer")
    rank = largest if rank is None else int(rank)
    if rank < largest:
        raise ValueError(f"rank {rank} is below the style's rank {largest} (export does not truncate)")
    alpha = float(rank if alpha is None else alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be positive, not {alpha}")
    if format == "diffusers" and alpha != rank:
        raise ValueError("the diffusers format stores no alpha (loaders use alpha = rank); set alpha only for kohya")
    up_scale = rank / alpha  # the loader multiplies by alpha / rank
    sdxl = unet_config is not None and architecture(family_from_configs(unet_config)) == SDXL
    conv_shapes = conv_shapes or {}
    if format == "kohya" and sdxl:
        layers_per_block = unet_config["layers_per_block"]
        factors_unet = {sgm_unet_name(name, layers_per_block): f for name, f in factors_unet.items()}
        conv_shapes = {sgm_unet_name(name, layers_per_block): shape for name, shape in conv_shapes.items()}

    state = {}
    for component, factors, text in (("unet", factors_unet, False), ("text_encoder", factors_text, True),
                                     ("text_encoder_2", factors_text_2, True)):
        layers = _peft_layers(factors, rank, up_scale, dtype, text, conv_shapes)
        state |= StableDiffusionPipeline.pack_weights(layers, component)
    if format == "diffusers":
        return state
    kohya = {}
    for key, value in convert_state_dict_to_kohya(state).items():
        if key.startswith("lora_te1_") and not sdxl:
            key = "lora_te_" + key.removeprefix("lora_te1_")
        if key.endswith(".alpha"):
            value = torch.tensor(alpha, dtype=torch.float32)
        kohya[key] = value
    return kohya


def _detect_format(keys: list[str]) -> str:
    kohya = [k for k in keys if k.startswith(KOHYA_PREFIXES)]
    diffusers = [k for k in keys if not k.startswith(KOHYA_PREFIXES) and any(m in k for m in _DIFFUSERS_MARKERS)]
    if kohya and diffusers:
        raise LoraFormatError(f"the file mixes kohya keys ({kohya[0]}) and diffusers keys ({diffusers[0]})")
    if kohya:
        return "kohya"
    if diffusers:
        return "diffusers"
    shown = ", ".join(keys[:3]) or "no tensors at all"
    raise LoraFormatError(
        f"no recognisable LoRA keys (kohya lora_unet_…/lora_te_… or diffusers …lora_A/lora_B); first keys: {shown}"
    )


def save_lora(path: str | os.PathLike, state: Mapping[str, Tensor], metadata: Mapping[str, object] | None = None) -> Path:
    """Write an export_lora state dict as .safetensors; metadata values that are not strings are
    stored as JSON. Kohya files also get the ss_network_* keys A1111 and kohya tools show."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path.name}: a LoRA file is written as .safetensors")
    header = {"format": "pt"}
    if _detect_format(list(state)) == "kohya":
        down = next(v for k, v in state.items() if k.endswith(".lora_down.weight"))
        alpha = next((float(v) for k, v in state.items() if k.endswith(".alpha")), float(down.shape[0]))
        header |= {"ss_network_module": "networks.lora", "ss_network_dim": str(down.shape[0])}
        header["ss_network_alpha"] = f"{alpha:g}"
    for key, value in (metadata or {}).items():
        header[str(key)] = value if isinstance(value, str) else json.dumps(value, default=str)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path), metadata=header)
    return path


# ---------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    from safetensors import SafetensorError
    from safetensors.torch import safe_open

    if path.is_dir():
        raise LoraFormatError(f"{path}: a folder; give the LoRA's .safetensors file")
    if not path.is_file():
        raise FileNotFoundError(f"no such LoRA file: {path}")
    with open(path, "rb") as file:
        head = file.read(9)
    # safetensors: an 8-byte header length, then the JSON header; torch.save: a zip archive or a raw pickle
    looks_safetensors = head[8:9] == b"{"
    pickled = not looks_safetensors and (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80")
    if path.suffix.lower() in PICKLE_SUFFIXES or pickled:
        raise LoraFormatError(
            f"{path.name}: a pickle-based file; it is never opened, since unpickling can run code. "
            "Use the .safetensors version of this LoRA."
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as file:
            metadata = dict(file.metadata() or {})
            state = {key: file.get_tensor(key) for key in file.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise LoraFormatError(f"{path.name}: not a readable .safetensors file ({error})") from None
    return state, metadata


def _kohya_component(name: str) -> str:
    for prefix, component in (("lora_unet_", "unet"), ("lora_te2_", "text_encoder_2"), ("lora_te", "text_encoder")):
        if name.startswith(prefix):
            return component
    return "unknown"


class Loss(NamedTuple):
    """What an import leaves out of one layer of a LoRA."""

    component: str
    reason: str
    energy: float | None  # ‖ΔW‖²_F left out; None where unknown
    whole: bool = True  # the whole layer; False: the part a rank reduction cut


def _reduced(name: str, parts: dict[str, Tensor], max_rank: int, lost: list[Loss]) -> tuple[Tensor, Tensor]:
    """A LoHa or LoKr layer as (lora_down, lora_up) of the truncated SVD of its ΔW (lycoris.reduce);
    what the cut leaves out goes to `lost`, naming the layer when the rank limit made the cut."""
    variant = lycoris.kind(parts)
    try:
        reduced = lycoris.reduce(*lycoris.product(parts), max_rank)
    except lycoris.LycorisError as error:
        raise LoraFormatError(f"{name}: a {variant} layer that {error}") from None
    kept = f"{100 * lycoris.KEPT_ENERGY:g}%"
    if reduced.needed > reduced.rank:
        reason = (f"{variant} layer {name} needs rank {reduced.needed} to keep {kept} of its ΔW energy, "
                  f"over the limit of {max_rank}")
    else:
        reason = f"{variant}, reduced to the rank that keeps {kept} of each layer's ΔW energy"
    if reduced.lost > 0:
        lost.append(Loss(_kohya_component(name), reason, reduced.lost, whole=False))
    return reduced.down, reduced.up


def _kohya_to_peft(state: dict[str, Tensor], unet_config, skipped: dict[str, str],
                   lost: list[Loss], max_rank: int) -> dict[str, dict[str, Tensor]]:
    """Kohya layers -> {component: PEFT keys}, each layer's alpha/r folded into lora_up; LyCORIS
    LoHa/LoKr layers as their reduced ΔW, a LoCon's lora_mid folded into lora_down."""
    from diffusers import StableDiffusionPipeline

    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        name, _, part = key.partition(".")
        layers.setdefault(name, {})[part] = value
    plain = {}
    for name, parts in layers.items():
        if not name.startswith(KOHYA_PREFIXES):
            skipped[name] = "not a LoRA layer"
            continue
        if lycoris.kind(parts):
            plain[f"{name}.lora_down.weight"], plain[f"{name}.lora_up.weight"] = _reduced(name, parts, max_rank, lost)
            continue
        has_down, has_up = "lora_down.weight" in parts, "lora_up.weight" in parts
        if has_down != has_up:
            raise LoraFormatError(f"{name}: lora_down and lora_up must come in pairs")
        if not has_down or set(parts) - {"lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha"}:
            reason = "not a plain LoRA layer"
            skipped[name] = f"{reason} ({', '.join(sorted(parts))})"
            lost.append(Loss(_kohya_component(name), reason, None))
            continue
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        if "lora_mid.weight" in parts:
            down = lycoris.fold_mid(down, parts["lora_mid.weight"])
        if "alpha" in parts:  # kohya/A1111: ΔW = up·down·alpha/r, r = lora_down rows; no alpha: scale 1
            up = up * (float(parts["alpha"]) / down.shape[0])
        plain[f"{name}.lora_down.weight"], plain[f"{name}.lora_up.weight"] = down, up
    if not plain:
        return {}
    try:
        converted, _ = StableDiffusionPipeline.lora_state_dict(plain, unet_config=unet_config)
    except (ValueError, KeyError) as error:
        raise LoraFormatError(f"diffusers cannot map its kohya layer names ({error})") from None
    return _split_components(converted, skipped)


def _text_to_peft(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """What diffusers' text-encoder loader does: to the diffusers layout, then to PEFT."""
    from diffusers.utils.state_dict_utils import StateDictType, convert_state_dict_to_diffusers, convert_state_dict_to_peft

    if all(".lora_A." in k or ".lora_B." in k for k in state):
        return state
    try:
        return convert_state_dict_to_peft(convert_state_dict_to_diffusers(state))
    except ValueError:  # e.g. a kohya text LoRA without out_proj: the auto-detection needs one
        return convert_state_dict_to_peft(state, original_type=StateDictType.DIFFUSERS_OLD)


def _split_components(state: dict[str, Tensor], skipped: dict[str, str]) -> dict[str, dict[str, Tensor]]:
    """Diffusers-layout keys -> {component: PEFT keys (module.lora_A.weight ...)}."""
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    parts: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        key = key.removeprefix("base_model.model.")  # PEFT's own save_pretrained
        component, _, rest = key.partition(".")
        if component not in LORA_COMPONENTS:  # no prefix: a bare UNet or CLIP PEFT state dict
            component, rest = ("text_encoder" if key.startswith((TEXT_MODEL_PREFIX, "encoder.layers.")) else "unet"), key
        parts.setdefault(component, {})[rest] = value
    if "unet" in parts and not all(".lora_A." in k or ".lora_B." in k or k.endswith(".alpha") for k in parts["unet"]):
        parts["unet"] = convert_unet_state_dict_to_peft(parts["unet"])
    for component in ("text_encoder", "text_encoder_2"):
        if component in parts:
            alphas = {k: v for k, v in parts[component].items() if k.endswith(".alpha")}
            rest = {k: v for k, v in parts[component].items() if k not in alphas}
            parts[component] = (_text_to_peft(rest) if rest else {}) | alphas
    return parts


def _module_layers(component: str, state: dict[str, Tensor], skipped: dict[str, str]) -> dict[str, dict[str, Tensor]]:
    """PEFT keys -> {module: {"down": r×d_in, "up": d_out×r, "alpha"?: scalar}}."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, value in state.items():
        match = _PEFT_KEY.fullmatch(key)
        if match is None:
            skipped[f"{component}.{key}"] = "not a LoRA tensor"
            continue
        if match["leaf"] == "bias":
            raise LoraFormatError(f"{component}.{match['module']}: a LoRA with a bias (lora_bias) is not ΔW = B·A")
        field = "alpha" if match["alpha"] else ("down" if match["ab"] == "A" else "up")
        modules.setdefault(match["module"], {})[field] = value
    for module, fields in modules.items():
        if "down" not in fields or "up" not in fields:
            raise LoraFormatError(f"{component}.{module}: lora_A/lora_B (down/up) must come in pairs")
    return modules


def _adapter_configs(metadata: Mapping[str, str]) -> dict[str, object]:
    """diffusers' per-component LoraConfig saved in the file (save_lora_weights(..., *_adapter_metadata))."""
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY
    from peft import LoraConfig

    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except json.JSONDecodeError as error:
        raise LoraFormatError(f"unreadable {LORA_ADAPTER_METADATA_KEY} metadata ({error})") from None
    configs = {}
    for component in LORA_COMPONENTS:
        kwargs = {k.removeprefix(f"{component}."): v for k, v in packed.items() if k.startswith(f"{component}.")}
        if kwargs:
            try:
                configs[component] = LoraConfig(**kwargs)
            except (TypeError, ValueError) as error:
                raise LoraFormatError(f"{component}: the file's LoRA config is not a LoraConfig ({error})") from None
    return configs


def _peft_scale(config, module: str) -> float:
    """alpha/r of one module the way PEFT computes it (rank/alpha patterns, rsLoRA)."""
    from peft.utils.other import get_pattern_key

    r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return alpha / math.sqrt(r) if config.use_rslora else alpha / r


def _targets(model: nn.Module, default_targets: tuple[str, ...]) -> tuple[dict[str, nn.Module], tuple[str, ...]]:
    """name -> base layer of every layer Share can adapt: its Share layers, and every other
    nn.Linear or nn.Conv2d (share.adaptable), which a library gives a Share layer when a file first
    touches it (a LoCon's k×k convolutions); and the targets (of the Share layers, else the
    defaults), whose layers must be in the model."""
    layers = share.share_layers(model)
    targets = tuple(next(iter(layers.values())).config.target_modules) if layers else default_targets
    inside_share_layers = tuple(f"{name}." for name in layers)
    bases = {name: module for name, module in model.named_modules()
             if share.adaptable(module) and not name.startswith(inside_share_layers)}
    return bases | {name: layer.base_layer for name, layer in layers.items()}, targets


def _as_matrix(tensor: Tensor, what: str, where: str) -> Tensor:
    """A LoRA factor as a matrix: a conv LoRA's down (r, c_in, k, k) -> r × (c_in·k·k), as
    torch flattens a conv weight; its up (d_out, r, 1, 1) -> d_out × r."""
    if tensor.dim() == 4:
        tensor = tensor.flatten(1)
    if tensor.dim() != 2:
        raise LoraFormatError(f"{where}: {what} has shape {tuple(tensor.shape)}, expected a matrix")
    return tensor


#: A component that keeps less of its ΔW energy than this gets a warning.
KEPT_WARNING = 0.999
NOT_ADAPTED = "not a layer kind Share adapts"


def kept_report(lost: list[Loss], kept: dict[str, float]) -> tuple[dict, list[str]]:
    """Per component, the fraction of the LoRA's ΔW energy kept, Σ‖ΔW kept‖² / Σ‖ΔW‖², and a
    warning for each component under KEPT_WARNING naming what was lost and why.

    lost: what was left out of each layer (whole layers, or the part a rank reduction cut); kept:
    ‖ΔW‖² per component imported. An unknown energy makes the fraction an upper bound ("at most").
    """
    components = sorted({loss.component for loss in lost} | set(kept), key=lambda c: (c != "unet", c))  # unet first
    energy, warnings = {}, []
    for component in components:
        mine = [loss for loss in lost if loss.component == component]
        total = kept.get(component, 0.0) + sum(loss.energy or 0.0 for loss in mine)
        fraction = kept.get(component, 0.0) / total if total > 0 else (1.0 if not mine else 0.0)
        unknown = any(loss.energy is None for loss in mine)
        energy[component] = {"kept": fraction, "bound": unknown, "layers_lost": sum(loss.whole for loss in mine),
                             "layers_cut": sum(not loss.whole for loss in mine)}
        if fraction >= KEPT_WARNING and not unknown:
            continue
        reasons = {}
        for loss in mine:
            count, share_lost, unknown_here = reasons.get((loss.reason, loss.whole), (0, 0.0, False))
            share_lost += (loss.energy or 0.0) / total if total > 0 else 0.0
            reasons[loss.reason, loss.whole] = (count + 1, share_lost, unknown_here or loss.energy is None)
        parts = [f"{count} layer{'s' * (count != 1)} {'left out' if whole else 'cut'} ({reason}; "
                 + ("energy unknown" if unknown_here and not share_lost else f"{100 * share_lost:.3g}% of its ΔW energy") + ")"
                 for (reason, whole), (count, share_lost, unknown_here) in sorted(reasons.items(), key=lambda r: -r[1][1])]
        warnings.append(f"{component}: kept {'at most ' if unknown else ''}{100 * fraction:.3g}% of the LoRA's ΔW energy; "
                        f"{', '.join(parts)}")
    return energy, warnings


def read_lora_components(
    source: str | os.PathLike | Mapping[str, Tensor],
    models: Mapping[str, nn.Module | None],
    max_rank: int = lycoris.MAX_RANK,
) -> tuple[dict[str, Factors], dict]:
    """Import a standard LoRA (.safetensors file or state dict, kohya or diffusers/PEFT format,
    LyCORIS LoCon, LoHa and LoKr files in kohya names).

    models: {component: model} of LORA_COMPONENTS (unet, text_encoder, and SDXL's text_encoder_2).
    Returns ({component: factors}, info), factors {layer name: (B d_out×r, A d_in×r)} with
    ΔW = B Aᵀ and the LoRA's alpha/r (from .alpha keys or diffusers' LoraConfig metadata)
    folded into B, ready for share.add_style once each layer has a Share layer; every component
    of LORA_COMPONENTS is there, empty where the file has none. The layers are every nn.Linear
    and nn.Conv2d of each model (a convolution's ΔW flattened, d_in = c_in·k_h·k_w); a LoRA layer
    that names one of its targets (its Share layers', else DEFAULT_TARGETS) must exist and fit.
    A LoHa or LoKr layer is the truncated SVD of its ΔW, of the smallest rank that keeps 99% of
    ‖ΔW‖², at most max_rank.
    info: format, layers (imported), rank (largest), skipped ({LoRA layer: why} for layers
    Share does not adapt; the layers of a component without a model), skipped_count, kept
    ({component: {kept: Σ‖ΔW kept‖²/Σ‖ΔW‖², bound: whether some lost energy is unknown,
    layers_lost, layers_cut (by a rank reduction)}}), warnings (one line per component under
    KEPT_WARNING: what was lost and why), metadata (the file's). Raises LoraFormatError for
    pickle or unreadable files, files without LoRA keys, DoRA, and LoRA layers that do not fit.
    """
    if isinstance(source, Mapping):
        state, metadata, label = dict(source), {}, "state dict"
    else:
        path = Path(source)
        state, metadata = _read_safetensors(path)
        label = path.name
    try:
        return _read(state, metadata, models, max_rank)
    except LoraFormatError as error:
        raise LoraFormatError(f"{label}: {error}") from None


def read_lora(
    source: str | os.PathLike | Mapping[str, Tensor],
    unet: nn.Module,
    text_encoder: nn.Module | None = None,
    max_rank: int = lycoris.MAX_RANK,
) -> tuple[Factors, Factors, dict]:
    """read_lora_components for a UNet and one text encoder: (factors_unet, factors_text, info)."""
    factors, info = read_lora_components(source, {"unet": unet, "text_encoder": text_encoder}, max_rank)
    return factors["unet"], factors["text_encoder"], info


def _read(state: dict[str, Tensor], metadata: dict[str, str], models: Mapping[str, nn.Module | None], max_rank: int):
    keys = list(state)
    if any(marker in key for key in keys for marker in _DORA_MARKERS):
        raise LoraFormatError(
            "a DoRA LoRA (dora_scale / lora_magnitude_vector): its ΔW depends on the base weight, so Share cannot import it"
        )
    format = _detect_format(keys)
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    skipped: dict[str, str] = {}
    lost: list[Loss] = []
    if format == "kohya":
        unet_config = getattr(models["unet"], "config", None)
        components, configs = _kohya_to_peft(state, unet_config, skipped, lost, max_rank), {}
    else:
        configs = _adapter_configs(metadata)
        if any(getattr(c, "use_dora", False) for c in configs.values()):
            raise LoraFormatError("a DoRA LoRA (use_dora): its ΔW depends on the base weight, so Share cannot import it")
        components = _split_components(state, skipped)

    result: dict[str, Factors] = {component: {} for component in LORA_COMPONENTS}
    misfits, ranks, kept = [], [], {}
    for component, peft_state in components.items():
        modules = _module_layers(component, peft_state, skipped)
        model = models.get(component)
        layers, target_suffixes = _targets(model, DEFAULT_TARGETS[component]) if model is not None else ({}, ())
        by_name = {name.removeprefix(TEXT_MODEL_PREFIX): name for name in layers}
        for module, fields in modules.items():
            where = f"{component}.{module}"
            down = _as_matrix(fields["down"], "lora_down/lora_A", where)
            up = _as_matrix(fields["up"], "lora_up/lora_B", where)
            if down.shape[0] != up.shape[1]:
                misfits.append(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)} have different ranks")
                continue
            name = by_name.get(module.removeprefix(TEXT_MODEL_PREFIX))
            rank = down.shape[0]
            if "alpha" in fields:
                scale = float(fields["alpha"]) / rank
            elif component in configs:
                scale = _peft_scale(configs[component], name or module)
            else:
                scale = 1.0  # diffusers/PEFT convention without alpha: alpha = r
            factors = ((up * scale).contiguous(), down.mT.clone(memory_format=torch.contiguous_format))
            energy = float(share.squared_norm_of_product(factors[0].double(), factors[1].double()))
            if name is None:
                if model is None:
                    why = "no text encoder given" if component == "text_encoder" else \
                        "no second text encoder (text_encoder_2) given"
                elif share.matches(module, target_suffixes):
                    misfits.append(f"{where} is not in this model")
                    continue
                else:
                    why = NOT_ADAPTED
                skipped[where] = why
                lost.append(Loss(component, why, energy))
                continue
            base = layers[name]
            d_out, d_in = base.weight.shape[0], base.weight[0].numel()
            if down.shape[1] != d_in or up.shape[0] != d_out:
                expected = f"(r×{d_in}) and ({d_out}×r)"
                misfits.append(f"{where}: down {tuple(down.shape)} and up {tuple(up.shape)}, the model needs {expected}")
                continue
            result[component][name] = factors
            kept[component] = kept.get(component, 0.0) + energy
            ranks.append(rank)
    if misfits:
        more = f" (and {len(misfits) - 3} more)" if len(misfits) > 3 else ""
        examples = "; ".join(misfits[:3])
        raise LoraFormatError(f"the LoRA does not fit this model, e.g. it was made for another base model: {examples}{more}")
    if not ranks:
        reasons = sorted(set(skipped.values()))
        raise LoraFormatError(f"none of its {len(skipped)} layers is a layer Share adapts ({'; '.join(reasons)})")
    energy, warnings = kept_report(lost, kept)
    info = {
        "format": format,
        "kept": energy,
        "warnings": warnings,
        "layers": len(ranks),
        "rank": max(ranks),
        "skipped": dict(sorted(skipped.items())),
        "skipped_count": len(skipped),
        "metadata": metadata,
    }
    return result, info
