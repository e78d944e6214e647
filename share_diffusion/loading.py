"""Turning a model reference into a ready ``StableDiffusionPipeline``.

This is the one place that loads a base model; the CLI, the Gradio app and the tests all go
through :func:`load_pipeline`.  A model reference is one of

* ``None``: the embedded base model shipped in ``assets/base-model/``;
* a local diffusers folder (with ``model_index.json``);
* a single-file ``.safetensors`` checkpoint (original SD / A1111 layout), configured offline by the
  architecture-config folders shipped for its family (:mod:`share_diffusion.model_configs`);
* a Hugging Face Hub id, resolved through the normal HF cache.

Every load reports the model's family (:mod:`share_diffusion.families`: SD 1.x, SD 2.x or SDXL,
epsilon or v-prediction) in :class:`ModelInfo`.

Pickle-based checkpoints (``.ckpt``, ``.pt``, ``.bin``...) are refused without being opened.
Failures, including the Hub's (offline, gated, missing, unreachable), are raised as a
:class:`~share_diffusion.errors.ModelLoadError` whose one-line message says how to fix them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

from . import families, model_configs
from .devices import attention_choice, configure_attention, resolve_device, resolve_dtype
from .errors import ModelLoadError, first_line
from .fingerprint import (
    a1111_model_hash,
    legacy_fingerprint,
    model_fingerprint,
    remember_fingerprint,
    remember_legacy_fingerprint,
)

#: The embedded default base model (a diffusers StableDiffusionPipeline folder).
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "base-model"
EMBEDDED_MODEL_NAME = "share-studio-base"

#: File types refused because loading them means unpickling, which can run arbitrary code.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
#: Pipelines whose components StableDiffusionPipeline can load.
SD_PIPELINE_CLASSES = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})
#: ... and those StableDiffusionXLPipeline can load.
SDXL_PIPELINE_CLASSES = frozenset({"StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline"})
SUPPORTED_PIPELINE_CLASSES = SD_PIPELINE_CLASSES | SDXL_PIPELINE_CLASSES


@dataclass(frozen=True)
class ModelInfo:
    """What :func:`load_pipeline` loaded; stored as ``pipe.share_info``."""

    name: str  # short display name: folder/file stem, hub id, or "share-studio-base"
    source: str  # the resolved path or hub id
    kind: str  # "embedded" | "folder" | "single_file" | "hub" | "unknown"
    fingerprint: str  # fingerprint.model_fingerprint: what a style library checks
    device: str
    dtype: str
    attention: str
    # fingerprint.a1111_model_hash of the checkpoint file; None for diffusers folders and hub
    # models, which are several files and have no hash A1111 or Civitai would recognise.
    a1111_hash: str | None = None
    family: str = families.UNKNOWN  # families: "sd1", "sd2", "sd2-v", "sdxl"... (family_of_pipeline)

    @property
    def family_label(self) -> str:
        return families.label(self.family)


def hf_offline() -> bool:
    """True when HF_HUB_OFFLINE is set (read at call time, so it also works when set after import)."""
    value = os.environ.get("HF_HUB_OFFLINE", "")
    if value.strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    try:
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    except Exception:
        return False


@contextlib.contextmanager
def _progress_bars(enabled: bool) -> Iterator[None]:
    """Temporarily disable the diffusers/transformers/hub loading bars (restored afterwards)."""
    if enabled:
        yield
        return
    import diffusers.utils.logging as dlog
    import huggingface_hub.utils as hub_utils
    import transformers.utils.logging as tlog

    was = (dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled(), hub_utils.are_progress_bars_disabled())
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    hub_utils.disable_progress_bars()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()
        if not was[2]:
            hub_utils.enable_progress_bars()


_COMMON_KWARGS = {
    "dtype": torch.float32,  # always load full precision; cast after fingerprinting
    "safety_checker": None,
    "feature_extractor": None,
    "requires_safety_checker": False,
}
_SDXL_KWARGS = {"dtype": torch.float32}  # SDXL pipelines have no safety checker


def _pipeline_class(class_name: str | None):
    """(pipeline class, loading kwargs) for a model_index ``_class_name``."""
    if class_name in SDXL_PIPELINE_CLASSES:
        return StableDiffusionXLPipeline, _SDXL_KWARGS
    return StableDiffusionPipeline, _COMMON_KWARGS
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def _looks_like_path(text: str) -> bool:
    return (
        text.startswith((".", "/", "~", "\\"))
        or os.path.isabs(text)
        or "\\" in text
        or text.count("/") > 1
        or Path(text).suffix.lower() in PICKLE_SUFFIXES | {".safetensors"}
        or not _HUB_ID.match(text)
    )


def _check_folder(folder: Path, label: str) -> str:
    """The folder's pipeline class name, once it is known to be one Share Studio loads."""
    index = folder / "model_index.json"
    if not index.is_file():
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f"; to load the checkpoint inside it, pass the file: {folder / files[0]}" if len(files) == 1 else ""
        raise ModelLoadError(f"{label} is not a diffusers model folder (no model_index.json){hint}")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{label}: unreadable model_index.json ({first_line(e)})") from e
    if class_name not in SUPPORTED_PIPELINE_CLASSES:
        raise ModelLoadError(
            f"{label} is a {class_name} model; Share Studio loads Stable Diffusion 1.x/2.x and SDXL pipelines "
            "(StableDiffusionPipeline, StableDiffusionXLPipeline)"
        )
    return class_name


def _load_folder(folder: Path, label: str) -> StableDiffusionPipeline:
    pipeline_class, kwargs = _pipeline_class(_check_folder(folder, label))
    try:
        return pipeline_class.from_pretrained(str(folder), local_files_only=True, use_safetensors=True, **kwargs)
    except Exception as e:
        message = first_line(e)
        if "safetensors" in message.lower():
            raise ModelLoadError(
                f"{label} has no .safetensors weights (pickle .bin weights are refused because unpickling can run code; "
                f"re-save the model with safetensors): {message}"
            ) from e
        raise ModelLoadError(f"could not load the model folder {label}: {message}") from e


def _checkpoint_matches_folder(path: Path, folder: Path) -> bool:
    """Cheap architecture check: do the checkpoint's key tensors have the folder model's shapes?"""
    try:
        from safetensors import safe_open

        probes = {
            "model.diffusion_model.input_blocks.0.0.weight": ("unet", "conv_in.weight"),
            "model.diffusion_model.out.2.weight": ("unet", "conv_out.weight"),
            "first_stage_model.decoder.conv_in.weight": ("vae", "decoder.conv_in.weight"),
            "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (
                "text_encoder",
                "embeddings.token_embedding.weight",
            ),
        }
        with safe_open(str(path), framework="pt") as ckpt:
            keys = set(ckpt.keys())
            for ckpt_key, (sub, key) in probes.items():
                if ckpt_key not in keys:
                    return False
                files = sorted((folder / sub).glob("*.safetensors"))
                if not files:
                    return False
                with safe_open(str(files[0]), framework="pt") as part:
                    part_keys = set(part.keys())
                    name = key if key in part_keys else f"text_model.{key}"
                    if name not in part_keys:
                        return False
                    if part.get_slice(name).get_shape() != ckpt.get_slice(ckpt_key).get_shape():
                        return False
        return True
    except Exception:
        return False


def _config_shapes(folder: Path) -> dict[str, int]:
    """The widths a checkpoint must have to fit the folder's architecture (from its JSON configs)."""
    unet = json.loads((folder / "unet" / "config.json").read_text(encoding="utf-8"))
    text = json.loads((folder / "text_encoder" / "config.json").read_text(encoding="utf-8"))
    return {
        "first UNet convolution width": unet["block_out_channels"][0],
        "cross-attention width": unet["cross_attention_dim"],
        "text encoder width": text["hidden_size"],
    }


_TEXT_EMBEDDING_KEYS = (
    "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",  # SD 1.x
    "cond_stage_model.model.token_embedding.weight",  # SD 2.x (OpenCLIP)
    "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight",  # SDXL's first encoder
)


def _checkpoint_shapes(path: Path) -> dict[str, int]:
    from safetensors import safe_open

    found = {}
    with safe_open(str(path), framework="pt") as ckpt:
        keys = list(ckpt.keys())
        conv_in = "model.diffusion_model.input_blocks.0.0.weight"
        if conv_in in keys:
            found["first UNet convolution width"] = ckpt.get_slice(conv_in).get_shape()[0]
        to_k = sorted(k for k in keys if k.startswith("model.diffusion_model.") and k.endswith("attn2.to_k.weight"))
        if to_k:
            found["cross-attention width"] = ckpt.get_slice(to_k[0]).get_shape()[-1]
        for key in _TEXT_EMBEDDING_KEYS:
            if key in keys:
                found["text encoder width"] = ckpt.get_slice(key).get_shape()[-1]
                break
    return found


def _check_checkpoint_fits(path: Path, folder: Path, what: str) -> None:
    """A one-line refusal, before diffusers builds anything, when the checkpoint's widths are not the config's."""
    try:
        expected, found = _config_shapes(folder), _checkpoint_shapes(path)
    except Exception:  # noqa: BLE001 - leave the detailed complaint to diffusers
        return
    for name, width in expected.items():
        if name in found and found[name] != width:
            raise ModelLoadError(
                f"{path.name} does not fit {what}: its {name} is {found[name]}, the config's is {width}; pass a "
                "diffusers folder of the checkpoint's own architecture as the model config (config= / --model-config DIR)"
            )


def _single_file_scheduler(config_dir: Path, detected: families.CheckpointFamily):
    """The config's scheduler, switched to v-prediction / zero terminal SNR when the checkpoint's keys say so."""
    if not (detected.explicit_v_prediction or detected.zero_terminal_snr):
        return None
    import diffusers

    scheduler_config = json.loads((config_dir / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    scheduler_class = getattr(diffusers, scheduler_config.get("_class_name", ""), None) or diffusers.EulerDiscreteScheduler
    overrides = {"prediction_type": "v_prediction"} if detected.explicit_v_prediction else {}
    if detected.zero_terminal_snr:
        # Zero terminal SNR (Lin et al. 2024): rescaled betas and "trailing" timesteps, as diffusers documents.
        overrides.update(rescale_betas_zero_snr=True, timestep_spacing="trailing")
    return scheduler_class.from_config(scheduler_config, **overrides)


def _load_single_file(path: Path, config: str | os.PathLike | None) -> StableDiffusionPipeline:
    """Load a checkpoint with ``config`` (a diffusers folder), else the shipped config of its family; never online."""
    detected = families.family_of_checkpoint(path)
    if config is None and _checkpoint_matches_folder(path, EMBEDDED_MODEL_DIR):
        config = EMBEDDED_MODEL_DIR  # e.g. a single-file export of the embedded model
    if config is None:
        config_dir = model_configs.config_folder(families.DEFAULT_CONFIGS[detected.family])
        what = f"the shipped {families.label(detected.family)} architecture config"
    else:
        config_dir = Path(config).expanduser()
        if not config_dir.is_dir():
            raise ModelLoadError(f"model config folder not found: {config_dir}")
        what = f"the model config {config_dir}"
    class_name = _check_folder(config_dir, str(config_dir))
    if (class_name in SDXL_PIPELINE_CLASSES) != (detected.architecture == families.SDXL):
        raise ModelLoadError(
            f"{path.name} is an {families.label(detected.family)} checkpoint but {what} is a {class_name}; pass a "
            "diffusers folder of the checkpoint's own architecture as the model config (config= / --model-config DIR)"
        )
    _check_checkpoint_fits(path, config_dir, what)
    pipeline_class, base_kwargs = _pipeline_class(class_name)
    kwargs = dict(base_kwargs, config=str(config_dir), local_files_only=True)
    scheduler = _single_file_scheduler(config_dir, detected)
    if scheduler is not None:
        kwargs["scheduler"] = scheduler
    try:
        return pipeline_class.from_single_file(str(path), **kwargs)
    except Exception as e:
        raise ModelLoadError(
            f"could not load the checkpoint {path.name} with {what}: {first_line(e)}; if its architecture differs, pass "
            "a diffusers folder of the same architecture as the model config (config= / --model-config DIR)"
        ) from e


def _error_chain(error: BaseException) -> list[BaseException]:
    chain, seen = [], set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _is_network_error(error: BaseException) -> bool:
    import socket

    name = type(error).__name__
    return isinstance(error, (socket.gaierror, ConnectionError, TimeoutError)) or any(
        word in name for word in ("ConnectError", "ConnectionError", "Timeout", "NetworkError")
    )


def _load_hub(model_id: str) -> StableDiffusionPipeline:
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    offline = hf_offline()
    try:
        return StableDiffusionPipeline.from_pretrained(
            model_id, local_files_only=offline, use_safetensors=True, **_COMMON_KWARGS
        )
    except Exception as e:
        chain = _error_chain(e)
        fix = (
            f"download it with `hf download {model_id}` (formerly huggingface-cli download) "
            "or pass a local diffusers folder or .safetensors file"
        )
        if offline:
            raise ModelLoadError(
                f"model {model_id!r} is not a local file or folder and is not in the Hugging Face cache "
                f"(offline: HF_HUB_OFFLINE is set); {fix}"
            ) from e
        if any(isinstance(c, GatedRepoError) for c in chain):
            raise ModelLoadError(
                f"model {model_id!r} is gated on the Hugging Face Hub: run `hf auth login` and accept its licence, or {fix}"
            ) from e
        if any(isinstance(c, RepositoryNotFoundError) for c in chain):
            raise ModelLoadError(
                f"no model {model_id!r} on the Hugging Face Hub and no such local file or folder; check the name or pass a local path"
            ) from e
        if any(_is_network_error(c) for c in chain):
            raise ModelLoadError(
                f"could not reach the Hugging Face Hub for {model_id!r}, and it is not in the local cache; {fix}"
            ) from e
        message = first_line(e)
        raise ModelLoadError(f"could not load {model_id!r} from the Hugging Face Hub ({message}); {fix}") from e


def _resolve_and_load(model, config) -> tuple[StableDiffusionPipeline, str, str, str]:
    """Returns (pipeline in fp32 on CPU, display name, source, kind)."""
    if model is None or (isinstance(model, str) and not model.strip()):
        if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
            raise ModelLoadError(
                f"the embedded base model is missing ({EMBEDDED_MODEL_DIR}); restore assets/base-model/ from the "
                "repository, or pass a model: a local diffusers folder, a .safetensors checkpoint or a Hugging Face id"
            )
        pipe = _load_folder(EMBEDDED_MODEL_DIR, f"the embedded base model ({EMBEDDED_MODEL_DIR})")
        return pipe, EMBEDDED_MODEL_NAME, str(EMBEDDED_MODEL_DIR), "embedded"

    text = os.fspath(model).strip()
    path = Path(text).expanduser()
    if path.is_dir():
        kind = "embedded" if path.resolve() == EMBEDDED_MODEL_DIR.resolve() else "folder"  # its presets, by path too
        return _load_folder(path, str(path)), path.resolve().name, str(path.resolve()), kind
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise ModelLoadError(
                f"refusing to load {path.name}: {suffix} files are Python pickles, and unpickling can run arbitrary code. "
                "Convert it to .safetensors with a tool you trust, or use a .safetensors / diffusers version of the model"
            )
        if suffix != ".safetensors":
            raise ModelLoadError(
                f"unsupported model file {path.name}: expected a .safetensors checkpoint, a diffusers folder or a Hugging Face id"
            )
        return _load_single_file(path, config), path.stem, str(path.resolve()), "single_file"
    if _looks_like_path(text):
        raise ModelLoadError(f"no such model file or folder: {text}")
    return _load_hub(text), text, text, "hub"


def load_pipeline(
    model: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    attention: str = "auto",
    *,
    config: str | os.PathLike | None = None,
    progress: bool = True,
) -> StableDiffusionPipeline:
    """Load a Stable Diffusion pipeline ready to generate.

    ``model``: ``None`` (embedded model), a diffusers folder, a single-file ``.safetensors``
    checkpoint or a Hugging Face id.  ``config``: diffusers folder with the same architecture, used
    to configure a single-file checkpoint (default: the embedded model when the checkpoint's shapes
    match it, else the config folder shipped for the checkpoint's family; never the network).  ``device``/``dtype``: see
    :func:`resolve_device` / :func:`resolve_dtype`.  ``attention``: ``auto``/``sdpa`` (PyTorch SDPA),
    ``xformers`` (CUDA only, falls back to SDPA) or ``classic``.  ``progress=False`` silences loading
    and denoising progress bars.  Raises :class:`ModelLoadError` with a one-line message.

    The safety checker is disabled.  The result carries ``pipe.share_info`` (:class:`ModelInfo`);
    for a single-file checkpoint that includes A1111's hash of the file, which reads it once more.
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    attention_choice(attention)  # an unknown name fails before the (slow) load

    with _progress_bars(progress):
        pipe, name, source, kind = _resolve_and_load(model, config)

    # Fingerprint the full-precision weights before any cast, so bf16 loads report the same
    # fingerprint as fp32 and fp16 ones (see fingerprint.model_fingerprint).
    fingerprint = model_fingerprint(pipe)
    # Libraries saved before fp16 rounding record the fp32 fingerprint, which a cast loses.
    legacy = legacy_fingerprint(pipe) if torch_dtype != torch.float32 else None
    try:
        # .to(dtype=float32) on a float32 pipeline is a no-op that still logs a warning: skip it.
        pipe.to(dev) if torch_dtype == torch.float32 else pipe.to(dev, torch_dtype)
    except Exception as e:  # out of memory, broken driver...
        raise ModelLoadError(f"could not move the model to {dev} as {torch_dtype}: {first_line(e)}") from e
    if torch_dtype == torch.bfloat16:
        remember_fingerprint(pipe, fingerprint)
    if legacy is not None:
        remember_legacy_fingerprint(pipe, fingerprint, legacy)
    used_attention = configure_attention(pipe, attention, dev)
    pipe.set_progress_bar_config(disable=not progress)
    pipe._share_base_scheduler_config = dict(pipe.scheduler.config)
    pipe.share_info = ModelInfo(
        name=name,
        source=source,
        kind=kind,
        fingerprint=fingerprint,
        device=str(dev),
        dtype=str(torch_dtype).removeprefix("torch."),
        attention=used_attention,
        a1111_hash=a1111_model_hash(source) if kind == "single_file" else None,
        family=families.family_of_pipeline(pipe),
    )
    return pipe


def model_info(pipe) -> ModelInfo:
    """``pipe.share_info`` for pipelines from :func:`load_pipeline`; a best-effort description otherwise."""
    info = getattr(pipe, "share_info", None)
    if isinstance(info, ModelInfo):
        return info
    name = getattr(pipe, "name_or_path", None) or "unknown"
    return ModelInfo(
        name=Path(str(name)).name or str(name),
        source=str(name),
        kind="unknown",
        fingerprint=model_fingerprint(pipe),
        device=str(pipe.device),
        dtype=str(pipe.unet.dtype).removeprefix("torch."),
        attention="unknown",
        family=families.family_of_pipeline(pipe),
    )


