"""Loading Stable Diffusion pipelines and generating images.

This is the one place that turns a *model reference* into a ready
``StableDiffusionPipeline``; the CLI, the Gradio app and the tests all go
through :func:`load_pipeline`.  A model reference is one of

* ``None``: the embedded base model shipped in ``assets/base-model/``;
* a local diffusers folder (with ``model_index.json``);
* a single-file ``.safetensors`` checkpoint (original SD / A1111 layout);
* a Hugging Face Hub id, resolved through the normal HF cache.

Pickle-based checkpoints (``.ckpt``, ``.pt``, ``.bin``...) are refused without
being opened.  Every user-facing failure is raised as a :class:`ShareStudioError`
subclass whose message is a single line; front ends print it without a
traceback.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import re
import secrets
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
)
from diffusers.utils import is_scipy_available
from PIL import Image, PngImagePlugin

logger = logging.getLogger(__name__)

#: The embedded default base model (a diffusers StableDiffusionPipeline folder).
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent.parent / "assets" / "base-model"
EMBEDDED_MODEL_NAME = "share-studio-base"

#: File types refused because loading them means unpickling, which can run arbitrary code.
PICKLE_SUFFIXES = frozenset({".ckpt", ".pt", ".pth", ".bin", ".pkl", ".pickle"})
#: Pipelines whose components StableDiffusionPipeline can load.
SUPPORTED_PIPELINE_CLASSES = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})
ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "classic")
#: Largest seed accepted (torch generators take 64-bit seeds; random seeds stay 32-bit like A1111).
MAX_SEED = 2**63 - 1
RANDOM_SEED_BITS = 32

# One pipeline call at a time per process: generation swaps the scheduler temporarily and
# later features (style adapters) mutate the pipeline too.  Reentrant so helpers can nest.
PIPELINE_LOCK = threading.RLock()


# --------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------
class ShareStudioError(Exception):
    """Base class of user-facing errors. ``str(error)`` is one line, shown without a traceback."""

    def __init__(self, message: str):
        super().__init__(_one_line(message))


class ModelLoadError(ShareStudioError):
    """The model reference could not be turned into a pipeline (missing, refused, offline...)."""


class GenerationError(ShareStudioError, ValueError):
    """Invalid generation parameters (size, steps, seed, scheduler name...)."""


def _one_line(text: object) -> str:
    return " ".join(str(text).split())


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0].strip()}" if text else type(error).__name__


# --------------------------------------------------------------------------------------
# schedulers
# --------------------------------------------------------------------------------------
#: Scheduler names accepted by :func:`set_scheduler` / ``generate_images(scheduler=...)``.
SCHEDULERS: dict[str, type] = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpm++": DPMSolverMultistepScheduler,
    "pndm": PNDMScheduler,
}
if is_scipy_available():  # diffusers exports a dummy LMSDiscreteScheduler without scipy
    from diffusers import LMSDiscreteScheduler

    SCHEDULERS["lms"] = LMSDiscreteScheduler

_SCHEDULER_ALIASES = {
    "euler a": "euler_a",
    "euler-a": "euler_a",
    "euler_ancestral": "euler_a",
    "dpmpp": "dpm++",
    "dpm++ 2m": "dpm++",
    "dpm++_2m": "dpm++",
    "dpmpp_2m": "dpm++",
    "dpmsolver++": "dpm++",
    "plms": "pndm",
}
# Names A1111 users know, for the "parameters" PNG chunk.
_A1111_SAMPLER_NAMES = {
    "ddim": "DDIM",
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpm++": "DPM++ 2M",
    "pndm": "PLMS",
    "lms": "LMS",
}


def canonical_scheduler_name(name: str) -> str:
    """Normalise a scheduler name or alias (``"Euler a"``, ``"dpmpp"``...) to a :data:`SCHEDULERS` key."""
    key = str(name).strip().lower()
    key = _SCHEDULER_ALIASES.get(key, key)
    if key not in SCHEDULERS:
        hint = " (lms needs scipy)" if key == "lms" else ""
        raise GenerationError(f"unknown scheduler {name!r}{hint}; choose one of: {', '.join(SCHEDULERS)}")
    return key


def scheduler_name(pipe) -> str:
    """The :data:`SCHEDULERS` name of the pipeline's current scheduler (class name if not one of ours)."""
    for name, cls in SCHEDULERS.items():
        if type(pipe.scheduler) is cls:
            return name
    return type(pipe.scheduler).__name__


def set_scheduler(pipe, name: str) -> str:
    """Replace ``pipe.scheduler`` by the named scheduler, configured from the model's own scheduler config.

    Returns the canonical name.  Switching back and forth never accumulates config drift because
    the new scheduler is always built from the config the model was loaded with.
    """
    key = canonical_scheduler_name(name)
    base_config = getattr(pipe, "_share_base_scheduler_config", None) or pipe.scheduler.config
    if type(pipe.scheduler) is not SCHEDULERS[key]:
        overrides = {}
        if key == "pndm":  # PLMS as SD/A1111 use it; PRK warm-up steps fail at small step counts
            overrides["skip_prk_steps"] = base_config.get("skip_prk_steps", True)
        pipe.scheduler = SCHEDULERS[key].from_config(base_config, **overrides)
    return key


# --------------------------------------------------------------------------------------
# device / dtype / attention
# --------------------------------------------------------------------------------------
_DTYPE_ALIASES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
    "fp32": torch.float32,
    "float32": torch.float32,
    "float": torch.float32,
    "full": torch.float32,
}


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` → CUDA if available, else Apple MPS, else CPU.  Explicit devices are checked."""
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ModelLoadError(f"unknown device {device!r} (use auto, cpu, cuda, cuda:N or mps)") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device!r} requested but CUDA is not available on this machine")
    if dev.type == "mps" and not _mps_available():
        raise ModelLoadError(f"device {device!r} requested but Apple MPS is not available on this machine")
    return dev


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Default: float16 on CUDA, float32 on MPS and CPU.  bfloat16 on request where supported."""
    if dtype is None or (isinstance(dtype, str) and dtype.strip().lower() in ("", "auto")):
        return torch.float16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        key = dtype.strip().lower().removeprefix("torch.")
        if key not in _DTYPE_ALIASES:
            raise ModelLoadError(f"unknown dtype {dtype!r} (use auto, fp32, fp16 or bf16)")
        dtype = _DTYPE_ALIASES[key]
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ModelLoadError(f"unsupported dtype {dtype} (use fp32, fp16 or bf16)")
    if dtype == torch.bfloat16 and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        logger.warning("bfloat16 is not supported by this GPU; using float16")
        return torch.float16
    if dtype == torch.float16 and device.type == "cpu":
        raise ModelLoadError("float16 is not supported on the CPU; use fp32 (default) or bf16")
    return dtype


def xformers_usable(device: torch.device) -> bool:
    """xformers is only used when it imports *and* the pipeline runs on CUDA."""
    if device.type != "cuda":
        return False
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build raising anything at import time
        return False
    return True


def _configure_attention(pipe, attention: str, device: torch.device) -> str:
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    choice = (attention or "auto").strip().lower()
    if choice not in ATTENTION_BACKENDS:
        raise ModelLoadError(f"unknown attention backend {attention!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")
    if choice == "xformers":
        if xformers_usable(device):
            try:
                pipe.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as e:  # version mismatch with torch/CUDA: fall back, it is only a speed-up
                logger.warning("xformers could not be enabled (%s); using PyTorch SDPA", _first_line(e))
        else:
            logger.warning("xformers needs CUDA and an importable xformers package; using PyTorch SDPA")
        choice = "sdpa"
    processor = AttnProcessor() if choice == "classic" else AttnProcessor2_0()
    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(processor)
    return "classic" if choice == "classic" else "sdpa"


# --------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelInfo:
    """What :func:`load_pipeline` loaded; stored as ``pipe.share_info``."""

    name: str  # short display name: folder/file stem, hub id, or "share-studio-base"
    source: str  # the resolved path or hub id
    kind: str  # "embedded" | "folder" | "single_file" | "hub" | "unknown"
    fingerprint: str
    device: str
    dtype: str
    attention: str


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


def _check_folder(folder: Path, label: str) -> None:
    index = folder / "model_index.json"
    if not index.is_file():
        files = sorted(p.name for p in folder.glob("*.safetensors"))
        hint = f"; to load the checkpoint inside it, pass the file: {folder / files[0]}" if len(files) == 1 else ""
        raise ModelLoadError(f"{label} is not a diffusers model folder (no model_index.json){hint}")
    try:
        class_name = json.loads(index.read_text(encoding="utf-8")).get("_class_name")
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{label}: unreadable model_index.json ({_first_line(e)})") from e
    if class_name not in SUPPORTED_PIPELINE_CLASSES:
        raise ModelLoadError(
            f"{label} is a {class_name} model; Share Studio supports Stable Diffusion 1.x/2.x pipelines (StableDiffusionPipeline)"
        )


def _load_folder(folder: Path, label: str) -> StableDiffusionPipeline:
    _check_folder(folder, label)
    try:
        return StableDiffusionPipeline.from_pretrained(
            str(folder), local_files_only=True, use_safetensors=True, **_COMMON_KWARGS
        )
    except Exception as e:
        message = _first_line(e)
        if "safetensors" in message.lower():
            raise ModelLoadError(
                f"{label} has no .safetensors weights (pickle .bin weights are refused because unpickling can run code; "
                f"re-save the model with safetensors): {message}"
            ) from e
        raise ModelLoadError(f"could not load the model folder {label}: {message}") from e


class _LazyCheckpoint(Mapping):
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


def _single_file_default_config(path: Path) -> str | None:
    """The hub repo diffusers would fetch the pipeline config from for this checkpoint (best effort)."""
    try:
        from diffusers.loaders.single_file_utils import DIFFUSERS_DEFAULT_PIPELINE_PATHS, infer_diffusers_model_type
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            model_type = infer_diffusers_model_type(_LazyCheckpoint(handle))
        return DIFFUSERS_DEFAULT_PIPELINE_PATHS[model_type]["pretrained_model_name_or_path"]
    except Exception:
        return None


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


def _cached_hub_config(repo: str | None) -> Path | None:
    """Local snapshot folder of ``repo``'s config files in the HF cache, or None (never goes online)."""
    if not repo:
        return None
    try:
        from huggingface_hub import snapshot_download

        folder = Path(
            snapshot_download(repo, local_files_only=True, allow_patterns=["*.json", "*.txt"])
        )
    except Exception:
        return None
    return folder if (folder / "model_index.json").is_file() else None


def _load_single_file(path: Path, config: str | os.PathLike | None) -> StableDiffusionPipeline:
    offline = hf_offline()
    kwargs = dict(_COMMON_KWARGS)
    if config is None and _checkpoint_matches_folder(path, EMBEDDED_MODEL_DIR):
        config = EMBEDDED_MODEL_DIR  # e.g. a single-file export of the embedded model
    if config is None and offline:
        # diffusers would retry *online* when the config is not cached: look in the cache ourselves.
        config = _cached_hub_config(_single_file_default_config(path))
        if config is None:
            repo = _single_file_default_config(path)
            raise ModelLoadError(
                f"cannot load {path.name} offline (HF_HUB_OFFLINE is set): it needs the diffusers config of its "
                f"architecture{f' ({repo})' if repo else ''}, which is not in the Hugging Face cache. Fix: "
                + (f"run `hf download {repo} --include '*.json' --include '*.txt'` once while online, or " if repo else "")
                + "pass a local diffusers folder of the same architecture as the model config (config= / --model-config)"
            )
    if config is not None:
        config_dir = Path(config).expanduser()
        if not config_dir.is_dir():
            raise ModelLoadError(f"model config folder not found: {config_dir}")
        _check_folder(config_dir, str(config_dir))
        kwargs.update(config=str(config_dir), local_files_only=True)
    else:
        kwargs.update(local_files_only=offline)
    try:
        return StableDiffusionPipeline.from_single_file(str(path), **kwargs)
    except Exception as e:
        from huggingface_hub.errors import LocalEntryNotFoundError

        message = _first_line(e)
        config_missing = any(
            isinstance(c, LocalEntryNotFoundError) or _is_network_error(c) for c in _error_chain(e)
        )
        if config is None and config_missing:
            repo = _single_file_default_config(path)
            where = "offline, and it is not in the Hugging Face cache" if offline else "it could not be fetched"
            download = f"run `hf download {repo} --include '*.json' --include '*.txt'` once while online, or " if repo else ""
            raise ModelLoadError(
                f"could not load {path.name}: diffusers needs the diffusers config of its architecture"
                f"{f' ({repo})' if repo else ''} and {where}. Fix: {download}pass a local diffusers folder of the same "
                f"architecture as the model config (config= / --model-config) ({message})"
            ) from e
        raise ModelLoadError(f"could not load the checkpoint {path.name}: {message}") from e


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
        message = _first_line(e)
        if len(message) > 200:
            message = message[:200] + "..."
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
        return _load_folder(path, str(path)), path.resolve().name, str(path.resolve()), "folder"
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
    to configure a single-file checkpoint offline (default: the embedded model when the checkpoint's
    shapes match it, else diffusers' own hub lookup).  ``device``/``dtype``: see
    :func:`resolve_device` / :func:`resolve_dtype`.  ``attention``: ``auto``/``sdpa`` (PyTorch SDPA),
    ``xformers`` (CUDA only, falls back to SDPA) or ``classic``.  ``progress=False`` silences loading
    and denoising progress bars.  Raises :class:`ModelLoadError` with a one-line message.

    The safety checker is disabled.  The result carries ``pipe.share_info`` (:class:`ModelInfo`).
    """
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    if (attention or "auto").strip().lower() not in ATTENTION_BACKENDS:
        raise ModelLoadError(f"unknown attention backend {attention!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")

    with _progress_bars(progress):
        pipe, name, source, kind = _resolve_and_load(model, config)

    # Fingerprint the full-precision weights before any cast, so fp16/bf16 loads report the
    # same fingerprint as fp32 ones (see model_fingerprint).
    fingerprint = _fingerprint_fp32(_fingerprint_tensors(pipe))
    try:
        # .to(dtype=float32) on a float32 pipeline is a no-op that still logs a warning: skip it.
        pipe.to(dev) if torch_dtype == torch.float32 else pipe.to(dev, torch_dtype)
    except Exception as e:  # out of memory, broken driver...
        raise ModelLoadError(f"could not move the model to {dev} as {torch_dtype}: {_first_line(e)}") from e
    if torch_dtype != torch.float32:
        pipe._share_fingerprint_cache = (_raw_token(_fingerprint_tensors(pipe)), fingerprint)
    used_attention = _configure_attention(pipe, attention, dev)
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
    )


# --------------------------------------------------------------------------------------
# fingerprint
# --------------------------------------------------------------------------------------
_UNET_ATTN = re.compile(r"^(?P<name>.*\.(?:to_q|to_k|to_v|to_out\.0))\.(?:base_layer\.)?weight$")
_TEXT_ATTN = re.compile(r"^(?P<name>.*\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj))\.(?:base_layer\.)?weight$")


def _fingerprint_tensors(pipe) -> list[tuple[str, torch.Tensor]]:
    """UNet to_q/to_k/to_v/to_out.0 and text-encoder q/k/v/out_proj weights, sorted by canonical name.

    Names are canonical: PEFT's ``.base_layer`` wrapper and transformers' old ``text_model.``
    prefix are removed, and LoRA parameters are not included, so attaching (unfused) adapters
    does not change the fingerprint.
    """
    items: dict[str, torch.Tensor] = {}
    for prefix, module, pattern in (("unet.", pipe.unet, _UNET_ATTN), ("text_encoder.", pipe.text_encoder, _TEXT_ATTN)):
        for name, param in module.named_parameters():
            m = pattern.match(name)
            if m:
                items[prefix + m["name"].removeprefix("text_model.") + ".weight"] = param
    if not items:
        raise ShareStudioError("cannot fingerprint this model: it has no attention projection weights")
    return sorted(items.items())


def _fingerprint_fp32(items: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in items:
        data = tensor.detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(repr(tuple(data.shape)).encode("ascii") + b"\0")
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:16]


def _raw_token(items: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in items:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tuple(data.shape)}\0{data.dtype}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(pipe) -> str:
    """Short hex sha256 identifying the base model's weights (16 hex digits).

    Hashes names, shapes and fp32 CPU copies of the UNet attention projections and the text
    encoder's q/k/v/out projections in sorted-name order, so it does not depend on the device.
    For a pipeline that :func:`load_pipeline` cast to fp16/bf16, the fingerprint of the
    full-precision weights taken at load time is returned as long as the weights are unchanged,
    so it does not depend on the dtype either; any weight change changes it.
    """
    items = _fingerprint_tensors(pipe)
    if all(t.dtype == torch.float32 for _, t in items):
        return _fingerprint_fp32(items)
    cache = getattr(pipe, "_share_fingerprint_cache", None)
    if cache is not None and cache[0] == _raw_token(items):
        return cache[1]
    return _fingerprint_fp32(items)


# --------------------------------------------------------------------------------------
# generation
# --------------------------------------------------------------------------------------
def native_size(pipe) -> tuple[int, int]:
    """(width, height) the model was trained at: UNet sample size × VAE scale factor."""
    size = pipe.unet.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    scale = pipe.vae_scale_factor
    return int(w) * scale, int(h) * scale


def resolve_seed(seed: int | None) -> int:
    """``None`` or a negative seed → a fresh random 32-bit seed; otherwise the seed itself (validated)."""
    if seed is None or (isinstance(seed, (int, float)) and seed < 0):
        return secrets.randbelow(2**RANDOM_SEED_BITS)
    return _check_seed(seed)


def _check_seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, float)) or seed != int(seed):
        raise GenerationError(f"seed must be a whole number, got {seed!r}")
    seed = int(seed)
    if not 0 <= seed <= MAX_SEED:
        raise GenerationError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    return seed


def _check_int(name: str, value, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise GenerationError(f"{name} must be a whole number, got {value!r}")
    if not low <= int(value) <= high:
        raise GenerationError(f"{name} must be between {low} and {high}, got {int(value)}")
    return int(value)


def generate_images(
    pipe,
    prompt: str,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    width: int | None = None,
    height: int | None = None,
    num_images: int = 1,
    scheduler: str | None = None,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> list[Image.Image]:
    """Generate ``num_images`` images; deterministic for a given seed.

    Image ``i`` uses seed ``seed + i`` (its own CPU ``torch.Generator``), so image 2 of a batch equals a
    single image generated with ``seed + 2``.  ``width``/``height`` default to :func:`native_size`
    and must be multiples of the VAE scale factor.  ``scheduler`` (a :data:`SCHEDULERS` name) is used for
    this call only.  ``progress(step, total)`` is called after each denoising step.
    """
    if not isinstance(prompt, str):
        raise GenerationError("prompt must be text")
    seed = _check_seed(seed)
    steps = _check_int("steps", steps, 1, 1000)
    num_images = _check_int("number of images", num_images, 1, 64)
    if seed + num_images - 1 > MAX_SEED:
        raise GenerationError(f"seed too large for {num_images} images")
    try:
        guidance = float(guidance)
    except (TypeError, ValueError) as e:
        raise GenerationError(f"guidance must be a number, got {guidance!r}") from e
    if not math.isfinite(guidance) or not 0 <= guidance <= 100:
        raise GenerationError(f"guidance must be between 0 and 100, got {guidance}")
    native_w, native_h = native_size(pipe)
    multiple = pipe.vae_scale_factor
    width = native_w if width is None else _check_int("width", width, multiple, 8192)
    height = native_h if height is None else _check_int("height", height, multiple, 8192)
    for name, value in (("width", width), ("height", height)):
        if value % multiple:
            raise GenerationError(f"{name} must be a multiple of {multiple}, got {value}")
    scheduler_key = canonical_scheduler_name(scheduler) if scheduler else None

    callback = None
    if progress is not None:

        def callback(_pipe, step, _timestep, kwargs):
            progress(step + 1, steps)
            return kwargs

    with PIPELINE_LOCK:
        original = pipe.scheduler
        try:
            if scheduler_key:
                set_scheduler(pipe, scheduler_key)
            generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)]
            with torch.inference_mode():
                result = pipe(
                    prompt=prompt,
                    negative_prompt=negative_prompt or None,
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    width=width,
                    height=height,
                    num_images_per_prompt=num_images,
                    generator=generators,
                    output_type="pil",
                    callback_on_step_end=callback,
                )
        finally:
            pipe.scheduler = original
    return list(result.images)


# --------------------------------------------------------------------------------------
# PNG metadata
# --------------------------------------------------------------------------------------
PNG_JSON_KEY = "share_studio"
PNG_A1111_KEY = "parameters"


def png_metadata(
    prompt: str,
    negative_prompt: str = "",
    seed: int = 0,
    steps: int = 20,
    guidance: float = 4.0,
    scheduler: str | None = None,
    model: str | None = None,
    width: int | None = None,
    height: int | None = None,
    model_hash: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """Metadata dict for :func:`save_png`.

    Keys match :func:`generate_images` arguments (``prompt``, ``negative_prompt``, ``seed``, ``steps``,
    ``guidance``, ``width``, ``height``, ``scheduler``) plus ``model``/``model_hash`` and any extra keys
    (e.g. ``style=``, ``library_hash=``); ``None`` values are dropped.  Values must be JSON-serialisable.
    """
    data: dict[str, Any] = {
        "prompt": prompt,
        "negative_prompt": negative_prompt or "",
        "seed": int(seed),
        "steps": int(steps),
        "guidance": float(guidance),
        "width": None if width is None else int(width),
        "height": None if height is None else int(height),
        "scheduler": scheduler,
        "model": model,
        "model_hash": model_hash,
    }
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def _a1111_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value) if isinstance(value, (list, dict)) else str(value)
    text = _one_line(text)
    # A1111 quotes values that would break its "Key: value, Key: value" line.
    return json.dumps(text) if any(c in text for c in ',:"') else text


def a1111_parameters(metadata: Mapping[str, Any]) -> str:
    """The AUTOMATIC1111-style "parameters" text: prompt, "Negative prompt:" line, "Key: value, ..." line."""
    lines = [str(metadata.get("prompt", ""))]
    if metadata.get("negative_prompt"):
        lines.append(f"Negative prompt: {metadata['negative_prompt']}")
    fields: list[tuple[str, Any]] = []
    if "steps" in metadata:
        fields.append(("Steps", metadata["steps"]))
    if metadata.get("scheduler"):
        fields.append(("Sampler", _A1111_SAMPLER_NAMES.get(metadata["scheduler"], metadata["scheduler"])))
    if "guidance" in metadata:
        fields.append(("CFG scale", metadata["guidance"]))
    if "seed" in metadata:
        fields.append(("Seed", metadata["seed"]))
    if metadata.get("width") and metadata.get("height"):
        fields.append(("Size", f"{metadata['width']}x{metadata['height']}"))
    if metadata.get("model_hash"):
        fields.append(("Model hash", metadata["model_hash"]))
    if metadata.get("model"):
        fields.append(("Model", metadata["model"]))
    known = {"prompt", "negative_prompt", "steps", "scheduler", "guidance", "seed", "width", "height", "model_hash", "model"}
    for key, value in metadata.items():
        if key not in known and value is not None:
            label = str(key).replace("_", " ")
            fields.append((label[:1].upper() + label[1:], value))
    lines.append(", ".join(f"{k}: {_a1111_value(v)}" for k, v in fields))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | os.PathLike, metadata: Mapping[str, Any]) -> Path:
    """Write ``image`` as PNG with a "parameters" (A1111) and a JSON "share_studio" text chunk.

    Creates parent folders; writes atomically (temporary file + rename).  Returns the path.
    """
    path = Path(path)
    try:
        payload = json.dumps(dict(metadata), ensure_ascii=False, sort_keys=False)
    except TypeError as e:
        raise ShareStudioError(f"PNG metadata must be JSON-serialisable: {e}") from e
    info = PngImagePlugin.PngInfo()
    info.add_text(PNG_A1111_KEY, a1111_parameters(metadata))  # becomes iTXt when not latin-1
    info.add_text(PNG_JSON_KEY, payload)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as handle:
            image.save(handle, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except OSError as e:
        raise ShareStudioError(f"cannot write {path}: {e.strerror or e}") from e
    finally:
        if tmp is not None and os.path.exists(tmp):
            with contextlib.suppress(OSError):
                os.unlink(tmp)
    return path


def read_png_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The "share_studio" metadata dict of a PNG written by :func:`save_png` (``{}`` if it has none).

    For other PNGs with only an A1111 "parameters" chunk, returns ``{"parameters": text}``.
    """
    with Image.open(path) as image:
        text = dict(getattr(image, "text", {}) or {})
    if PNG_JSON_KEY in text:
        try:
            data = json.loads(text[PNG_JSON_KEY])
            if isinstance(data, dict):
                return data
        except ValueError:
            pass
    if PNG_A1111_KEY in text:
        return {PNG_A1111_KEY: text[PNG_A1111_KEY]}
    return {}


def numbered_output_paths(out: str | os.PathLike, count: int) -> list[Path]:
    """``out`` itself for one image; ``out-0.png, out-1.png, ...`` for several."""
    out = Path(out)
    if count == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(count)]


def save_generated(
    pipe,
    images: list[Image.Image],
    paths: list[str | os.PathLike],
    *,
    prompt: str,
    negative_prompt: str = "",
    seed: int,
    steps: int,
    guidance: float,
    scheduler: str | None = None,
    **extra: Any,
) -> list[Path]:
    """Save the output of :func:`generate_images` with full PNG metadata.

    ``images[i]`` goes to ``paths[i]`` with seed ``seed + i``, its actual size, the scheduler
    (``None``: the model's own), the model's name and fingerprint, and any ``extra`` keys.
    """
    if len(images) != len(paths):
        raise ValueError("one path per image is needed")
    info = model_info(pipe)
    scheduler = canonical_scheduler_name(scheduler) if scheduler else scheduler_name(pipe)
    saved = []
    for i, (image, path) in enumerate(zip(images, paths)):
        metadata = png_metadata(
            prompt,
            negative_prompt=negative_prompt,
            seed=seed + i,
            steps=steps,
            guidance=guidance,
            scheduler=scheduler,
            model=info.name,
            width=image.width,
            height=image.height,
            model_hash=info.fingerprint,
            **extra,
        )
        saved.append(save_png(image, path, metadata))
    return saved
