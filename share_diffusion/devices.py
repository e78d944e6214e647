"""Where and how a pipeline computes: the device, the dtype and the attention backend.

Defaults: CUDA, else Apple MPS, else the CPU; float16 on CUDA and float32 elsewhere; PyTorch
SDPA attention, with xformers only on request, on CUDA, when it imports. Under `accelerate
launch`, each process takes its own GPU, or the CPU when there is none.
"""

from __future__ import annotations

import logging
import os

import torch

from .errors import ModelLoadError, first_line

logger = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "sdpa", "xformers", "classic")

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


def distributed_state():
    """This process's place in an `accelerate launch` run: one process of one otherwise. Without
    CUDA the processes run on the CPU and talk over gloo (accelerate picks that only when told
    `cpu=True`)."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def launched_distributed() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def main_process_verdict(refusal: str | None = None) -> str | None:
    """The main process's `refusal` (None: go on), received by every process. A collective: every
    process calls it once, the main one with its verdict, so that none waits for the others alone."""
    from accelerate.utils import broadcast_object_list

    verdict = [refusal]
    broadcast_object_list(verdict, from_process=0)
    return verdict[0]


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``None``/``"auto"`` → this process's GPU under `accelerate launch`, else CUDA if available,
    else Apple MPS, else CPU.  Explicit devices are checked."""
    if device is None or (isinstance(device, str) and device.strip().lower() in ("", "auto")):
        if launched_distributed():
            return distributed_state().device
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


def attention_choice(attention: str | None) -> str:
    """The :data:`ATTENTION_BACKENDS` name ``attention`` asks for (``None``/``""``: ``"auto"``)."""
    choice = (attention or "auto").strip().lower()
    if choice not in ATTENTION_BACKENDS:
        raise ModelLoadError(f"unknown attention backend {attention!r}; choose one of: {', '.join(ATTENTION_BACKENDS)}")
    return choice


def configure_attention(pipe, attention: str, device: torch.device) -> str:
    """Give the UNet and VAE the requested attention processors; returns the backend in use.

    ``auto``/``sdpa``: PyTorch SDPA; ``xformers``: xformers when :func:`xformers_usable`, else SDPA;
    ``classic``: diffusers' plain attention.
    """
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    choice = attention_choice(attention)
    if choice == "xformers":
        if xformers_usable(device):
            try:
                pipe.enable_xformers_memory_efficient_attention()
                return "xformers"
            except Exception as e:  # version mismatch with torch/CUDA: fall back, it is only a speed-up
                logger.warning("xformers could not be enabled (%s); using PyTorch SDPA", first_line(e))
        else:
            logger.warning("xformers needs CUDA and an importable xformers package; using PyTorch SDPA")
        choice = "sdpa"
    processor = AttnProcessor() if choice == "classic" else AttnProcessor2_0()
    for module in (pipe.unet, pipe.vae):
        module.set_attn_processor(processor)
    return "classic" if choice == "classic" else "sdpa"


