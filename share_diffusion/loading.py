"""Turning a model reference into a ready ``StableDiffusionPipeline``.

This is the one place that loads a base model; the CLI, the Gradio app and the tests all go
through :func:`load_pipeline`.  A model reference is one of

* ``None``: the embedded base model shipped in ``assets/base-model/``;
* a local diffusers folder (with ``model_index.json``);
* a single-file ``.safetensors`` checkpoint (original SD / A1111 layout);
* a Hugging Face Hub id, resolved through the normal HF cache.

Pickle-based checkpoints (``.ckpt``, ``.pt``, ``.bin``...) are refused without being opened.
Failures, including the Hub's (offline, gated, missing, unreachable), are raised as a
:class:`~share_diffusion.errors.ModelLoadError` whose one-line message says how to fix them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

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
SUPPORTED_PIPELINE_CLASSES = frozenset({"StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"})


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
        raise ModelLoadError(f"{label}: unreadable model_index.json ({first_line(e)})") from e
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
        message = first_line(e)
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

        message = first_line(e)
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
    to configure a single-file checkpoint offline (default: the embedded model when the checkpoint's
    shapes match it, else diffusers' own hub lookup).  ``device``/``dtype``: see
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


