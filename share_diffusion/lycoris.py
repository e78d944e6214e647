"""LyCORIS layers as plain LoRA factors: LoHa and LoKr by a truncated SVD of their ΔW, LoCon's
CP/Tucker middle exactly.

Key names and scales are LyCORIS's (lycoris/modules/loha.py, lokr.py, locon.py) as the loaders
that apply its files read them (A1111's network_hada.py and network_lokr.py, ComfyUI's
weight_adapter). With r the rank and alpha/r = 1 when a file has no alpha:

  LoHa  ΔW = (hada_w1_a hada_w1_b) ∘ (hada_w2_a hada_w2_b) · alpha/r, r = rows of hada_w1_b.
        With hada_t1/hada_t2 (a convolution's Tucker core, r×r×k_h×k_w) each factor is
        w[p, q, …] = Σ_ij t[i, j, …] w_a[i, p] w_b[j, q].
  LoKr  ΔW = w1 ⊗ w2 · alpha/r, w1 = lokr_w1 or lokr_w1_a lokr_w1_b, w2 = lokr_w2 or
        lokr_w2_a lokr_w2_b (or their Tucker core lokr_t2); r = rows of lokr_w2_b, else of
        lokr_w1_b; both w1 and w2 full: scale 1.
  LoCon lora_mid (a CP/Tucker core, r×r×k_h×k_w) between lora_down (r×c_in×1×1) and lora_up:
        it folds into lora_down, lora_down'[n, j, …] = Σ_m lora_mid[n, m, …] lora_down[m, j], exactly.

ΔW of a convolution is d_out × (c_in·k_h·k_w), as torch flattens its weight; for LoKr that is
w1 ⊗ (w2 flattened the same way). A LoHa or LoKr ΔW is not a product of its factors' rank (a
Hadamard product of two rank-r matrices has rank up to r², a Kronecker product the product of the
ranks), so it is reduced: the smallest rank whose truncated SVD keeps KEPT_ENERGY of ‖ΔW‖²_F, at
most a limit. ΔW is never formed: it is an exact product P Qᵀ,

  (U₁V₁ᵀ) ∘ (U₂V₂ᵀ) = (U₁ ⊙ U₂)(V₁ ⊙ V₂)ᵀ    (⊙ the row-wise Kronecker product, width r₁r₂)
  (U₁V₁ᵀ) ⊗ (U₂V₂ᵀ) = (U₁ ⊗ U₂)(V₁ ⊗ V₂)ᵀ    (a full w: w·Iᵀ or I·(wᵀ)ᵀ, the thinner)

and its SVD comes from share.canonical_factors (QR of P and Q, SVD of the small core): seconds for
an SD1.5 LoHa, where an SVD of every dense ΔW takes minutes.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from . import share
from .errors import first_line

#: A LoHa or LoKr layer keeps the smallest rank that holds this share of its ‖ΔW‖²_F.
KEPT_ENERGY = 0.99
#: The most rank a reduced layer gets (a plain LoRA of rank 128 is already a large one).
MAX_RANK = 128


class LycorisError(ValueError):
    """A LyCORIS layer whose tensors are missing or do not fit together."""


def kind(parts: dict[str, Tensor]) -> str | None:
    """"LoHa" or "LoKr" for a layer's tensors {hada_w1_a: …, alpha: …}; None for any other layer."""
    if any(p.startswith("hada_") for p in parts):
        return "LoHa"
    if any(p.startswith("lokr_") for p in parts):
        return "LoKr"
    return None


def _require(parts: dict[str, Tensor], *names: str) -> list[Tensor]:
    missing = [n for n in names if n not in parts]
    if missing:
        raise LycorisError(f"lacks {', '.join(missing)}")
    return [parts[n].double() for n in names]


def _pair(parts: dict[str, Tensor], prefix: str, core: str | None = None) -> tuple[Tensor, Tensor]:
    """(U, V) with prefix_a · prefix_b = U Vᵀ (a convolution's prefix_b flattened), through the
    Tucker core when the layer has one: w[p, (q, …)] = Σ_i a[i, p] (Σ_j core[i, j, …] b[j, q])."""
    factor_a, factor_b = _require(parts, f"{prefix}_a", f"{prefix}_b")
    if core in parts:
        left, right = factor_a.mT, torch.einsum("ij...,jq->iq...", parts[core].double(), factor_b).flatten(1)
    else:
        left, right = factor_a, factor_b.flatten(1)
    if left.shape[1] != right.shape[0]:
        raise LycorisError(f"has a {prefix}_a of rank {left.shape[1]} and a {prefix}_b of rank {right.shape[0]}")
    return left, right.mT


def _full(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(U, V) with w = U Vᵀ for a full w (a convolution's flattened): w·Iᵀ or I·(wᵀ)ᵀ, the thinner."""
    weight = weight.double().flatten(1)
    rows, columns = weight.shape
    if columns <= rows:
        return weight, torch.eye(columns, dtype=weight.dtype)
    return torch.eye(rows, dtype=weight.dtype), weight.mT


def _rowwise_kron(x: Tensor, y: Tensor) -> Tensor:
    return (x[:, :, None] * y[:, None, :]).flatten(1)


def _scale(parts: dict[str, Tensor], rank: int | None) -> float:
    return float(parts["alpha"]) / rank if "alpha" in parts and rank else 1.0


def loha_product(parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(P, Q) with ΔW = (w1_a w1_b) ∘ (w2_a w2_b) · alpha/r = P Qᵀ (float64)."""
    (u1, v1), (u2, v2) = _pair(parts, "hada_w1", "hada_t1"), _pair(parts, "hada_w2", "hada_t2")
    if (len(u1), len(v1)) != (len(u2), len(v2)):
        raise LycorisError(f"multiplies a {(len(u1), len(v1))} by a {(len(u2), len(v2))} product")
    return _rowwise_kron(u1, u2) * _scale(parts, parts["hada_w1_b"].shape[0]), _rowwise_kron(v1, v2)


def lokr_product(parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(P, Q) with ΔW = w1 ⊗ w2 · alpha/r = P Qᵀ (float64)."""
    u1, v1 = _full(parts["lokr_w1"]) if "lokr_w1" in parts else _pair(parts, "lokr_w1")
    u2, v2 = _full(parts["lokr_w2"]) if "lokr_w2" in parts else _pair(parts, "lokr_w2", "lokr_t2")
    decomposed = [f"lokr_{w}_b" for w in ("w2", "w1") if f"lokr_{w}" not in parts]
    scale = _scale(parts, parts[decomposed[0]].shape[0] if decomposed else None)
    u1, v1, u2, v2 = (x.contiguous() for x in (u1, v1, u2, v2))  # torch.kron views its inputs
    return torch.kron(u1, u2) * scale, torch.kron(v1, v2)


def product(parts: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
    """(P, Q) with a LoHa or LoKr layer's ΔW = P Qᵀ (d_out × d_in; see kind)."""
    try:
        return loha_product(parts) if kind(parts) == "LoHa" else lokr_product(parts)
    except RuntimeError as error:  # a Tucker core that does not fit its factors
        raise LycorisError(f"has tensors whose shapes do not fit ({first_line(error)})") from None


def fold_mid(down: Tensor, mid: Tensor) -> Tensor:
    """LoCon's lora_down with its lora_mid folded in: (r, c_in, k_h, k_w), the same ΔW."""
    return torch.einsum("nm...,mj->nj...", mid, down.flatten(1))


class Reduction(NamedTuple):
    up: Tensor  # d_out × rank, float32
    down: Tensor  # rank × d_in, float32: ΔŴ = up · down
    rank: int
    needed: int  # the rank that keeps KEPT_ENERGY (above the limit, more than rank)
    lost: float  # ‖ΔW − ΔŴ‖²_F = the energy past the kept singular values


def reduce(left: Tensor, right: Tensor, max_rank: int = MAX_RANK) -> Reduction:
    """The truncated SVD of ΔW = left rightᵀ at the smallest rank that keeps KEPT_ENERGY of
    ‖ΔW‖², at most max_rank, as balanced factors U√S, V√S (canonical_factors: ‖U√S e_i‖² = σ_i)."""
    up, down = share.canonical_factors(left, right)
    energy = up.square().sum(0).square().cumsum(0)
    needed = int(torch.searchsorted(energy, KEPT_ENERGY * energy[-1])) + 1
    rank = min(needed, max_rank)
    return Reduction(up[:, :rank].float(), down[:, :rank].mT.float(), rank, needed, float(energy[-1] - energy[rank - 1]))
