"""Model families: SD 1.x, SD 2.x and SDXL, each with epsilon or v-prediction.

The one place that says which family a model is, from

* a diffusers folder (:func:`family_of_folder`): the UNet's cross-attention width (768 SD 1.x,
  1024 SD 2.x, 2048 SDXL) or SDXL's second text encoder / ``text_time`` embedding, and the
  scheduler's ``prediction_type``;
* a loaded pipeline (:func:`family_of_pipeline`), from the same configs;
* a single-file checkpoint (:func:`family_of_checkpoint`), from its state-dict keys as diffusers'
  own ``single_file_utils.infer_diffusers_model_type`` infers them, plus the prediction type:
  a ``v_pred`` key (and ``ztsnr`` for zero terminal SNR, as ComfyUI writes and reads them), else
  for SD 2.x diffusers' ``global_step`` rule and ComfyUI's weight statistic.

A family id is ``sd1``, ``sd2`` or ``sdxl``, with ``-v`` appended for v-prediction (``sd2-v``).
Models of a non-standard size (the embedded model, test models) are placed by structure: SD 2.x
has OpenCLIP's text encoder (``gelu``) and linear transformer projections, SD 1.x neither.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelLoadError

SD1, SD2, SDXL = "sd1", "sd2", "sdxl"
V_SUFFIX = "-v"
UNKNOWN = "unknown"
ARCHITECTURES = (SD1, SD2, SDXL)
_ARCH_LABELS = {SD1: "SD 1.x", SD2: "SD 2.x", SDXL: "SDXL"}
#: The shipped config folder (model_configs.CONFIG_NAMES) for each family.
DEFAULT_CONFIGS = {SD1: "sd15", SD1 + V_SUFFIX: "sd15", SD2: "sd2-base", SD2 + V_SUFFIX: "sd21-v",
                   SDXL: "sdxl-base", SDXL + V_SUFFIX: "sdxl-base"}

#: Cross-attention widths of the real models.
_CROSS_ATTENTION = {768: SD1, 1024: SD2, 2048: SDXL}
#: ComfyUI's SD 2.x v-prediction test: this bias's standard deviation is above 0.09 in v models.
SD2_V_STATISTIC_KEY = "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.norm1.bias"
SD2_V_STATISTIC_THRESHOLD = 0.09
#: diffusers' rule: an SD 2.x checkpoint saved at this step is SD 2.0 base (epsilon).
SD2_BASE_GLOBAL_STEP = 875000


def family_id(architecture: str, v_prediction: bool) -> str:
    return architecture + (V_SUFFIX if v_prediction else "")


def architecture(family: str | None) -> str:
    """``sd1``/``sd2``/``sdxl`` of a family id (``unknown`` for a missing or unknown one)."""
    arch = (family or UNKNOWN).removesuffix(V_SUFFIX)
    return arch if arch in ARCHITECTURES else UNKNOWN


def is_v_prediction(family: str | None) -> bool:
    return architecture(family) != UNKNOWN and family.endswith(V_SUFFIX)


def label(family: str | None) -> str:
    """``"SD 2.x (v-prediction)"``, ``"SDXL"``, ``"unknown family"``..."""
    arch = architecture(family)
    if arch == UNKNOWN:
        return "unknown family"
    return _ARCH_LABELS[arch] + (" (v-prediction)" if is_v_prediction(family) else "")


def known(family: str | None) -> bool:
    return architecture(family) != UNKNOWN


# ------------------------------------------------------------------------------ from configs
def family_from_configs(unet: Mapping, scheduler: Mapping | None = None, text_encoder: Mapping | None = None,
                        *, dual_text_encoders: bool = False) -> str:
    """The family of a pipeline with these component configs (plain dicts or diffusers FrozenDicts)."""
    v_prediction = (scheduler or {}).get("prediction_type") == "v_prediction"
    cross = unet.get("cross_attention_dim")
    if dual_text_encoders or unet.get("addition_embed_type") == "text_time" or cross == 2048:
        arch = SDXL
    elif cross in _CROSS_ATTENTION:
        arch = _CROSS_ATTENTION[cross]
    else:  # a non-standard size: SD 2.x's OpenCLIP text encoder and linear projections, or SD 1.x
        open_clip = (text_encoder or {}).get("hidden_act") == "gelu"
        arch = SD2 if open_clip and unet.get("use_linear_projection") else SD1
    return family_id(arch, v_prediction)


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path}: unreadable ({type(e).__name__}: {e})") from e
    return data if isinstance(data, dict) else {}


def family_of_folder(folder: str | os.PathLike) -> str:
    """The family of a diffusers pipeline folder, from its JSON configs alone (no weights read)."""
    folder = Path(folder)
    index = _read_json(folder / "model_index.json")
    unet = _read_json(folder / "unet" / "config.json")
    if not unet:
        return UNKNOWN
    return family_from_configs(
        unet,
        _read_json(folder / "scheduler" / "scheduler_config.json"),
        _read_json(folder / "text_encoder" / "config.json"),
        dual_text_encoders=bool(index.get("text_encoder_2")) and index.get("text_encoder_2") != [None, None],
    )


def family_of_pipeline(pipe) -> str:
    """The family of a loaded pipeline (its base scheduler config, as loaded, decides the prediction type)."""
    unet = getattr(pipe, "unet", None)
    if unet is None:
        return UNKNOWN
    scheduler = getattr(pipe, "_share_base_scheduler_config", None) or dict(pipe.scheduler.config)
    text_encoder = getattr(pipe, "text_encoder", None)
    return family_from_configs(
        unet.config,
        scheduler,
        dict(text_encoder.config.to_dict()) if text_encoder is not None else None,
        dual_text_encoders=getattr(pipe, "text_encoder_2", None) is not None,
    )


# ------------------------------------------------------------------------------ from a checkpoint
class LazyCheckpoint(Mapping):
    """Key/shape view of a .safetensors file, enough for diffusers' model-type sniffing without loading tensors."""

    class _Shape:
        def __init__(self, shape):
            self.shape = tuple(shape)

    def __init__(self, handle):
        self._handle = handle
        self._keys = list(handle.keys())
        self._key_set = set(self._keys)

    def __contains__(self, key):
        return key in self._key_set

    def __getitem__(self, key):
        if key not in self._key_set:
            raise KeyError(key)
        return self._Shape(self._handle.get_slice(key).get_shape())

    def __iter__(self):
        return iter(self._keys)

    def __len__(self):
        return len(self._keys)

    def tensor(self, key):
        return self._handle.get_tensor(key)


@dataclass(frozen=True)
class CheckpointFamily:
    """What :func:`family_of_checkpoint` found in a single-file checkpoint."""

    family: str
    model_type: str  # diffusers' infer_diffusers_model_type (its DIFFUSERS_DEFAULT_PIPELINE_PATHS key)
    explicit_v_prediction: bool = False  # a ``v_pred`` key says so
    zero_terminal_snr: bool = False  # a ``ztsnr`` key says so
    evidence: str = ""  # how the prediction type was decided, for messages

    @property
    def architecture(self) -> str:
        return architecture(self.family)


#: diffusers model types this product can load into an SD / SDXL text-to-image pipeline.
_LOADABLE_TYPES = {"v1": SD1, "v2": SD2, "xl_base": SDXL}


def _sd2_statistic_key(ckpt: LazyCheckpoint) -> str | None:
    """ComfyUI's SD 2.x statistic key, or in a smaller model the last output block's first norm1 bias."""
    if SD2_V_STATISTIC_KEY in ckpt:
        return SD2_V_STATISTIC_KEY
    prefix, suffix = "model.diffusion_model.output_blocks.", ".1.transformer_blocks.0.norm1.bias"
    blocks = [k for k in ckpt if k.startswith(prefix) and k.endswith(suffix)]
    return max(blocks, key=lambda k: int(k[len(prefix):].split(".")[0]), default=None)


def _sd2_v_prediction(ckpt: LazyCheckpoint) -> tuple[bool, str]:
    if "global_step" in ckpt:
        try:
            if int(ckpt.tensor("global_step").reshape(-1)[0]) == SD2_BASE_GLOBAL_STEP:
                return False, f"global_step {SD2_BASE_GLOBAL_STEP} (SD 2.0 base)"
        except Exception:  # noqa: BLE001 - a malformed step says nothing
            pass
    key = _sd2_statistic_key(ckpt)
    if key is None:
        return True, "no statistic key; diffusers' default for SD 2.x"
    import torch

    std = float(torch.std(ckpt.tensor(key).float(), unbiased=False))
    return std > SD2_V_STATISTIC_THRESHOLD, f"std of {key.removeprefix('model.diffusion_model.')} = {std:.3f}"


def family_of_checkpoint(path: str | os.PathLike) -> CheckpointFamily:
    """The family of a single-file ``.safetensors`` checkpoint (A1111/original layout).

    Raises :class:`ModelLoadError` (one line) for a file that is unreadable or of a kind this
    product does not load (inpainting, SDXL refiner, Playground, SD3, Flux...).
    """
    from diffusers.loaders import single_file_utils as sfu
    from safetensors import safe_open

    path = Path(path)
    try:
        handle_cm = safe_open(str(path), framework="pt")
    except Exception as e:  # noqa: BLE001 - any unreadable header
        raise ModelLoadError(f"could not read the checkpoint {path.name}: {type(e).__name__}: {e}") from e
    with handle_cm as handle:
        ckpt = LazyCheckpoint(handle)
        try:
            model_type = sfu.infer_diffusers_model_type(ckpt)
        except Exception:  # noqa: BLE001 - diffusers' sniffing indexes keys some files lack
            model_type = "unknown"
        arch = _LOADABLE_TYPES.get(model_type)
        # Models smaller than the real ones (diffusers' probes look at layer 9 or at widths of 1024):
        # the text encoders' layout decides, with diffusers' own key probes.
        if model_type == "v1" and sfu.is_open_clip_sdxl_model(ckpt) and sfu.is_clip_sdxl_model(ckpt):
            arch = SDXL
        elif model_type == "v1" and sfu.is_open_clip_model(ckpt):
            arch = SD2
        if "edm_vpred.sigma_max" in ckpt or "edm_mean" in ckpt:
            arch = None  # EDM-parameterised SDXL (Playground v2.5, EDM v-prediction): not an SDXL base schedule
        if arch is None:
            raise ModelLoadError(
                f"{path.name} is a {model_type!r} checkpoint (diffusers' model type); Share Studio loads SD 1.x, SD 2.x "
                "and SDXL base text-to-image checkpoints"
            )
        explicit_v = "v_pred" in ckpt
        zero_snr = "ztsnr" in ckpt
        if explicit_v:
            v_prediction, evidence = True, "v_pred key"
        elif arch == SD2:
            v_prediction, evidence = _sd2_v_prediction(ckpt)
        else:
            v_prediction, evidence = False, "no v_pred key"
    return CheckpointFamily(family_id(arch, v_prediction), model_type, explicit_v, zero_snr, evidence)
