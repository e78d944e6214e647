"""What identifies a base model: Share's weight fingerprint and A1111's checkpoint-file hash.

* :func:`model_fingerprint` identifies the *weights* Share adapts. A style library records it and
  refuses to load onto a model with another one.  It is computed from the weights rounded to
  float16, so the fp32 and fp16 copies of the same base model count as the same model: a library
  made on one loads on the other, as it would on CUDA, where both run as fp16 anyway.  A bf16 copy
  of a model has lost mantissa bits fp16 keeps, so it counts as a different model.
* :func:`legacy_fingerprint` is the fingerprint libraries saved before that recorded: the same
  weights hashed as float32.  Such libraries still load (see ``Studio._check_base_model``).
* :func:`a1111_model_hash` identifies a checkpoint *file* the way AUTOMATIC1111 does (its "Model
  hash", which Civitai looks models up by).  It exists only for single-file checkpoints.
"""

from __future__ import annotations

import hashlib
import os
import re

import torch

from .errors import ShareStudioError

#: Hex digits of the file's sha256 that A1111 writes as "Model hash" (its "shorthash").
A1111_HASH_DIGITS = 10
#: Hex digits of :func:`model_fingerprint`.
FINGERPRINT_DIGITS = 16

_UNET_ATTN = re.compile(r"^(?P<name>.*\.(?:to_q|to_k|to_v|to_out\.0))\.(?:base_layer\.)?weight$")
_TEXT_ATTN = re.compile(r"^(?P<name>.*\.self_attn\.(?:q_proj|k_proj|v_proj|out_proj))\.(?:base_layer\.)?weight$")
#: Dtypes whose weights round to float16 the same way their fp32 originals do.
_FP16_EXACT = (torch.float32, torch.float16)


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


def _fingerprint(items: list[tuple[str, torch.Tensor]], dtype: torch.dtype) -> str:
    """sha256 of names, shapes and CPU copies of the tensors in `dtype`: float16 now (fp32 -> fp16
    rounds to nearest even), float32 for the fingerprint libraries recorded before that."""
    digest = hashlib.sha256()
    for name, tensor in items:
        data = tensor.detach().to("cpu", dtype).contiguous()
        digest.update(name.encode("utf-8") + b"\0")
        digest.update(repr(tuple(data.shape)).encode("ascii") + b"\0")
        digest.update(data.numpy().tobytes())
    return digest.hexdigest()[:FINGERPRINT_DIGITS]


def _raw_token(items: list[tuple[str, torch.Tensor]]) -> str:
    digest = hashlib.sha256()
    for name, tensor in items:
        data = tensor.detach().to("cpu").contiguous()
        digest.update(f"{name}\0{tuple(data.shape)}\0{data.dtype}\0".encode())
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def model_fingerprint(pipe) -> str:
    """Short hex sha256 identifying the base model's weights (:data:`FINGERPRINT_DIGITS` hex digits).

    Hashes names, shapes and float16 CPU copies of the UNet attention projections and the text
    encoder's q/k/v/out projections in sorted-name order, so it depends neither on the device nor
    on whether the weights are stored or run as fp32 or fp16.  For a pipeline cast to bf16 after
    :func:`remember_fingerprint`, the fingerprint remembered before the cast is returned as long as
    the weights are unchanged.  Any weight change that survives rounding to fp16 changes it.
    """
    items = _fingerprint_tensors(pipe)
    if all(t.dtype in _FP16_EXACT for _, t in items):
        return _fingerprint(items, torch.float16)
    cache = getattr(pipe, "_share_fingerprint_cache", None)
    if cache is not None and cache[0] == _raw_token(items):
        return cache[1]
    return _fingerprint(items, torch.float16)


def remember_fingerprint(pipe, fingerprint: str) -> None:
    """Keep ``fingerprint`` (taken before a cast to bf16) as the answer of :func:`model_fingerprint`
    for as long as the pipeline's weights stay exactly as they are now."""
    pipe._share_fingerprint_cache = (_raw_token(_fingerprint_tensors(pipe)), fingerprint)


def legacy_fingerprint(pipe) -> str:
    """The fingerprint style libraries saved before fp16 rounding recorded (:data:`FINGERPRINT_DIGITS` digits).

    The same names, shapes and order as :func:`model_fingerprint`, with the weights hashed as
    float32, so it tells the fp32 and fp16 copies of a model apart.  It is slower than a lookup:
    compute it only when a library's fingerprint is not :func:`model_fingerprint`.  For a pipeline
    cast below fp32 after :func:`remember_legacy_fingerprint`, the value remembered before the cast
    is returned as long as :func:`model_fingerprint` is unchanged.
    """
    items = _fingerprint_tensors(pipe)
    if all(t.dtype == torch.float32 for _, t in items):
        return _fingerprint(items, torch.float32)
    remembered = getattr(pipe, "_share_legacy_fingerprint", None)
    if remembered is not None and remembered[0] == model_fingerprint(pipe):
        return remembered[1]
    return _fingerprint(items, torch.float32)


def remember_legacy_fingerprint(pipe, fingerprint: str, legacy: str) -> None:
    """Keep ``legacy`` (taken before a cast below fp32, which loses what it hashes) as the answer of
    :func:`legacy_fingerprint` for as long as :func:`model_fingerprint` stays ``fingerprint``."""
    pipe._share_legacy_fingerprint = (fingerprint, legacy)


def a1111_model_hash(path: str | os.PathLike) -> str:
    """AUTOMATIC1111's "Model hash" of a checkpoint file: the first 10 hex digits of its sha256.

    The sha256 is of the whole file, byte for byte (A1111's ``calculate_sha256``; the 10-digit
    prefix is its ``shorthash``), so two files with the same weights but a different header or
    dtype get different hashes, as they do in A1111 and on Civitai.
    """
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()[:A1111_HASH_DIGITS]
