"""Share: shared LoRA subspaces for continual style learning (arXiv 2602.06043).

Every adapted nn.Linear (weight W: d_out×d_in, y = x Wᵀ) carries one shared basis per side,
basis_a C_A (d_in×k_a) and basis_b C_B (d_out×k_b) with orthonormal columns, and for every
style s the loadings L_A[s] (k_a×r_s), L_B[s] (k_b×r_s) and a scalar scale_s:

    ΔW_s = scale_s · (C_B L_B[s]) (C_A L_A[s])ᵀ

The life of a style, one function each below:
  1. initialize    an empty layer has k = 0; the first style's merge creates the basis.
  2. expand        the basis is widened, for the training only, by the new style's own r
                   directions per side: its factors B (d_out×r) and A (d_in×r).
  3. train         only B and A learn, exactly as a LoRA's do (StyleInTraining).
  4. merge_styles  thin SVD of every style's canonical factors gives the new basis; k is the
                   smallest that keeps every style exact (to float rounding), or the size limit.
  5. reproject     every style's loadings become the least-squares projection onto it, and each
                   style's error is measured exactly (projection_errors, rounding_errors).

Several new styles (a joint import) merge in one step, with one SVD over all of them.
Each style keeps its own rank r_s: its loadings are zero past column r_s and are stored without.
Styles are identified by string ids without "." (they appear inside state-dict keys).

Model level (PEFT-tuner-like): ShareConfig -> inject_share_layers() wraps target nn.Linear and
nn.Conv2d modules in ShareLinear; the functions after it act on every ShareLinear of a model.

A convolution is a linear map on patches: its weight (d_out, c_in, k_h, k_w) is W (d_out×d_in),
d_in = c_in·k_h·k_w, flattened as torch stores it. So ΔW = C_B Mᵀ C_Aᵀ acts as a k×k convolution
with C_A as k_a filters (stride, padding as the base layer), then two 1×1 convolutions (M, C_B):
what a LoCon layer does with its down and up. A 1×1 convolution (proj_in/proj_out without
use_linear_projection) is a Linear on channels. A layer that a style does not touch holds it
with rank 0 (ΔW = 0); which layers a style uses is its own.
"""

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

#: What a trained style adapts (the presets' targets): the UNet's and CLIP's attention.
UNET_TARGET_MODULES = ("to_q", "to_k", "to_v", "to_out.0")
CLIP_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "out_proj")
#: Every layer kind a typical SD LoRA touches (kohya sd-scripts' defaults): the Share layers of a
#: library, so that an imported LoRA keeps all of it. proj_in/proj_out are 1×1 convolutions
#: unless the UNet uses linear projections.
UNET_LORA_MODULES = (*UNET_TARGET_MODULES, "proj_in", "proj_out", "ff.net.0.proj", "ff.net.2")
CLIP_LORA_MODULES = (*CLIP_TARGET_MODULES, "fc1", "fc2")

# A style mix: {style id: weight}, or one such dict per batch item.
StyleMix = dict[str, float] | list[dict[str, float]]


#: A merge step that moves a style's ΔW by at most this (relative) only rounds it: float32 keeps
#: about 7 digits. Without a size limit, k is the smallest that keeps every style within it.
EXACT = 1e-6
#: The default drift budget: the most relative ΔW error a merge may leave any style with.
DRIFT_BUDGET = 0.01


@dataclass
class ShareConfig:
    rank: int = 4  # r of a newly trained style
    alpha: float | None = None  # scale = alpha / rank; None means alpha = rank
    max_basis_rank: int | None = None  # the optional size limit on k per side; None: k grows as the styles need
    drift_budget: float = DRIFT_BUDGET  # ‖ΔW − ΔŴ‖/‖ΔW‖ a merge may leave any style with (checked by Studio)
    target_modules: tuple[str, ...] = UNET_TARGET_MODULES

    @property
    def scale(self) -> float:
        return (self.rank if self.alpha is None else self.alpha) / self.rank


# ---------------------------------------------------------------------------------------
# The method, on plain tensors
# ---------------------------------------------------------------------------------------


def initialize(d_out: int, d_in: int, device: torch.device | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """An empty layer: basis_b, basis_a with k = 0 and no styles' loadings (T = 0).

    There is no separate first step: merging the first style into this builds the basis.
    """
    state = dict(device=device, dtype=torch.float32)
    no_styles = torch.zeros(0, 0, 0, **state)
    return torch.zeros(d_out, 0, **state), torch.zeros(d_in, 0, **state), no_styles, no_styles.clone()


def canonical_factors(factors_b: Tensor, factors_a: Tensor) -> tuple[Tensor, Tensor]:
    """Balanced factors of ΔW = B Aᵀ from its thin SVD: B̃ = Q_b U √S, Ã = Q_a V √S.

    B̃ Ãᵀ = B Aᵀ, and B̃ B̃ᵀ = (ΔW ΔWᵀ)^½ depends on ΔW only, not on the gauge
    B -> B M, A -> A M⁻ᵀ. Batched over leading dimensions; width min(d_b, d_a, r).
    """
    q_b, r_b = torch.linalg.qr(factors_b)
    q_a, r_a = torch.linalg.qr(factors_a)
    u, s, vh = torch.linalg.svd(r_b @ r_a.mT, full_matrices=False)
    root = s.sqrt().unsqueeze(-2)
    return q_b @ u * root, q_a @ vh.mT * root


def batched_canonical_factors(factors: list[tuple[Tensor, Tensor]]) -> list[tuple[Tensor, Tensor]]:
    """canonical_factors of each (B, A), batched over those of one shape (many LoRAs share one)."""
    result: list = [None] * len(factors)
    groups: dict[tuple, list[int]] = {}
    for i, (b, a) in enumerate(factors):
        groups.setdefault((*b.shape, *a.shape), []).append(i)
    for indices in groups.values():
        canonical_b, canonical_a = canonical_factors(torch.stack([factors[i][0] for i in indices]),
                                                     torch.stack([factors[i][1] for i in indices]))
        for n, i in enumerate(indices):
            result[i] = canonical_b[n], canonical_a[n]
    return result


def pad_columns(matrix: Tensor, width: int) -> Tensor:
    return F.pad(matrix, (0, width - matrix.shape[-1]))


def stack_padded(loadings: list[Tensor], rows: int, width: int) -> Tensor:
    """Stack (k×r_s) loadings into (T, k, width), zero-padding the columns."""
    if not loadings:
        return torch.zeros(0, rows, width)
    return torch.stack([pad_columns(x, width) for x in loadings])


def subspace_coordinates(basis: Tensor, new_factors: list[Tensor]) -> tuple[tuple, Tensor, list[Tensor]]:
    """Q = orthonormal span of [basis, every new factor] (d×q); the basis and each new factor in
    Q coordinates (q×k, q×r_i): Qᵀ[basis, new factors] is the R of the QR.

    Returns Q as Householder reflectors (see in_space). This is the only step at width d, O(d q²):
    the rest of the merge works in these q coordinates, and nothing grows with T·d.
    """
    reflectors, tau = torch.geqrf(torch.cat([basis, *new_factors], dim=1))
    r = reflectors[: len(tau)].triu()
    basis_in_q, *new_in_q = r.split([basis.shape[1], *(f.shape[1] for f in new_factors)], dim=1)
    return (reflectors[:, : len(tau)], tau), basis_in_q, new_in_q


def in_space(q: tuple, coordinates: Tensor) -> Tensor:
    """Q · coordinates (d×k) for Q given as subspace_coordinates' reflectors, without forming Q."""
    reflectors, tau = q
    padded = F.pad(coordinates, (0, 0, 0, reflectors.shape[0] - coordinates.shape[0]))
    return torch.ormqr(reflectors, tau, padded)


def principal_directions(coordinates: Tensor, weights: Tensor | None = None) -> Tensor:
    """Every left singular vector (q×q, by falling σ) of all styles' factors stacked side by side.

    Each style enters with unit norm, so a quiet style is not drowned out by a loud one (and
    times its weight, when a size limit forces a cut). They come from the eigenvectors of the
    q×q Gram matrix: orthonormal and complete, so every style's factor lies in their span.
    """
    norms = coordinates.square().sum(dim=(1, 2), keepdim=True).sqrt()
    unit = coordinates / norms.clamp_min(torch.finfo(norms.dtype).tiny)
    if weights is not None:
        unit = unit * weights[:, None, None]
    styles, q, width = unit.shape
    stacked = unit.permute(1, 0, 2).reshape(q, styles * width)
    return torch.linalg.eigh(stacked @ stacked.mT).eigenvectors.flip(-1)


def squared_norm_of_product(x: Tensor, y: Tensor) -> Tensor:
    """‖X Yᵀ‖²_F = Σ (XᵀX) ∘ (YᵀY), from r×r Gram matrices; batched over leading dimensions."""
    return ((x.mT @ x) * (y.mT @ y)).sum(dim=(-2, -1))


def projection_errors(beta: Tensor, alpha: Tensor, k_b: int, k_a: int) -> Tensor:
    """Each style's relative error ‖ΔW − P_b ΔW P_a‖/‖ΔW‖ when the first k_b, k_a directions are kept.

    beta (T, m_b, w), alpha (T, m_a, w) are the styles' canonical factors in all the directions,
    B̃ = U_b β and Ã = U_a α. The residual splits into orthogonal parts, (I − P_b) ΔW and
    P_b ΔW (I − P_a), so ‖ΔW − ΔŴ‖² = ‖β[k_b:] αᵀ‖² + ‖β[:k_b] α[k_a:]ᵀ‖²: only what is
    dropped is summed, with no cancellation (float64: exact to ~1e-15).
    """
    dropped = squared_norm_of_product(beta[:, k_b:], alpha) + squared_norm_of_product(beta[:, :k_b], alpha[:, k_a:])
    total = squared_norm_of_product(beta, alpha)
    return (dropped / total.clamp_min(torch.finfo(total.dtype).tiny)).sqrt()


def basis_rank(beta: Tensor, alpha: Tensor, tolerance: float = EXACT, limit: int | None = None) -> int:
    """The smallest k (k_b = min(k, m_b), k_a = min(k, m_a)) at which every style's projection
    error is at most `tolerance`, up to `limit`: a binary search, since the error only falls as
    k grows. Above the limit, the limit (a cut)."""

    def exact(k: int) -> bool:
        return bool((projection_errors(beta, alpha, min(k, beta.shape[1]), min(k, alpha.shape[1])) <= tolerance).all())

    low, high = 0, max(beta.shape[1], alpha.shape[1])  # all directions: every error is 0
    if limit is not None and limit < high:
        if not exact(limit):
            return limit
        high = limit
    while low < high:
        k = (low + high) // 2
        if exact(k):
            high = k
        else:
            low = k + 1
    return low


def rounding_errors(basis_b: Tensor, basis_a: Tensor, loadings_b: Tensor, loadings_a: Tensor,
                    stored: tuple[Tensor, Tensor, Tensor, Tensor], norms: Tensor) -> Tensor:
    """A bound on how far storing (float32, columns past each rank zeroed) moves each style's ΔW,
    relative to `norms` (‖ΔW_s‖ before the merge).

    With C orthonormal, C' = C + E and L' = L + ΔL the stored values and K = L_b L_aᵀ:
        C'K'C'_aᵀ − C K C_aᵀ = C(K' − K)C_aᵀ + E_b K' C_aᵀ + C K' E_aᵀ + E_b K' E_aᵀ,
        K' − K = ΔL_b L'_aᵀ + L_b ΔL_aᵀ,
    so the change is at most ‖ΔL_b L'_aᵀ‖ + ‖L_b ΔL_aᵀ‖ + (‖E_b‖ + ‖E_a‖ + ‖E_b‖‖E_a‖)‖K'‖, ‖E‖₂ ≤ ‖E‖_F.
    """
    stored_basis_b, stored_basis_a, stored_b, stored_a = (t.to(basis_b.dtype) for t in stored)
    e_b = (stored_basis_b - basis_b).norm()
    e_a = (stored_basis_a - basis_a).norm()
    change = (
        squared_norm_of_product(stored_b - loadings_b, stored_a).sqrt()
        + squared_norm_of_product(loadings_b, stored_a - loadings_a).sqrt()
        + (e_b + e_a + e_b * e_a) * squared_norm_of_product(stored_b, stored_a).sqrt()
    )
    return change / norms.clamp_min(torch.finfo(norms.dtype).tiny)


def rank_mask(ranks: Tensor, width: int) -> Tensor:
    """(T, 1, width): 1 in each style's first r_s columns, 0 past them."""
    return (torch.arange(width, device=ranks.device) < ranks[:, None]).unsqueeze(1)


class Merge(NamedTuple):
    basis_b: Tensor  # (d_out, k_b)
    basis_a: Tensor  # (d_in, k_a)
    loadings_b: Tensor  # (T+n, k_b, w), the new styles last, zero past each style's rank
    loadings_a: Tensor  # (T+n, k_a, w)
    ranks: Tensor  # (T+n,) each style's own rank r_s
    step_errors: Tensor  # (T+n,) ‖ΔŴ_before − ΔŴ_after‖/‖ΔŴ_before‖ of the projection, exact (float64)
    rounding_errors: Tensor  # (T+n,) a bound on what float32 storage adds to it


@torch.no_grad()
def merge_styles(
    basis_b: Tensor,
    basis_a: Tensor,
    loadings_b: Tensor,
    loadings_a: Tensor,
    ranks: Tensor,
    new_factors: list[tuple[Tensor, Tensor]],
    size_limit: int | None = None,
    allowances: Tensor | None = None,
) -> Merge:
    """Merge new styles, each ΔW ∝ B (d_out×r) Aᵀ (d_in×r), into a basis in one step.

    loadings_* (T, k, w) hold the existing styles, zero past each one's rank (ranks, (T,)).
    The new basis comes from one thin SVD of all T+n styles' unit-norm canonical factors; no
    d×d matrix is formed. k is the smallest that keeps every style exact (step error ≤ EXACT).
    If that is above size_limit, k is the limit, and each style enters the SVD weighted by
    1/allowance (the step error it may still take, (T+n,)), so the styles with the least room
    keep their directions first; compare step_errors + rounding_errors with the allowances.
    The math runs in float64: O(d(k+Σr)²) for the one QR at width d, then only (k+Σr)-sized work
    (the directions from the eigenvectors of a (k+Σr)×(k+Σr) Gram matrix).
    """
    f64 = torch.float64
    q_b, basis_in_b, new_b = subspace_coordinates(basis_b.to(f64), [b.to(f64) for b, _ in new_factors])
    q_a, basis_in_a, new_a = subspace_coordinates(basis_a.to(f64), [a.to(f64) for _, a in new_factors])
    # canonical factors, of the old styles in basis coordinates and of the new ones in Q coordinates
    old_b, old_a = canonical_factors(loadings_b.to(f64), loadings_a.to(f64))
    new = batched_canonical_factors(list(zip(new_b, new_a)))
    ranks = torch.cat([ranks.to(torch.long).cpu(), torch.tensor([b.shape[1] for b, _ in new], dtype=torch.long)])
    width = max([loadings_b.shape[-1], *ranks.tolist()])
    coordinates_b = torch.stack([pad_columns(x, width) for x in [*(basis_in_b @ old_b), *(b for b, _ in new)]])
    coordinates_a = torch.stack([pad_columns(x, width) for x in [*(basis_in_a @ old_a), *(a for _, a in new)]])
    directions_b, directions_a = principal_directions(coordinates_b), principal_directions(coordinates_a)
    beta, alpha = directions_b.mT @ coordinates_b, directions_a.mT @ coordinates_a
    k = basis_rank(beta, alpha, limit=size_limit)
    cut = size_limit is not None and k == size_limit and k < max(beta.shape[1], alpha.shape[1])
    if cut and allowances is not None:  # keep first the directions of the styles that can lose least
        weights = 1 / allowances.to(f64).clamp_min(EXACT)
        directions_b, directions_a = principal_directions(coordinates_b, weights), principal_directions(coordinates_a, weights)
        beta, alpha = directions_b.mT @ coordinates_b, directions_a.mT @ coordinates_a
    k_b, k_a = min(k, beta.shape[1]), min(k, alpha.shape[1])
    step_errors = projection_errors(beta, alpha, k_b, k_a)
    new_basis_b, new_basis_a = in_space(q_b, directions_b[:, :k_b]), in_space(q_a, directions_a[:, :k_a])
    loadings = beta[:, :k_b], alpha[:, :k_a]  # L = Cᵀ B̃: the least-squares loadings
    mask = rank_mask(ranks, beta.shape[-1]).to(device=beta.device)
    dtype = basis_b.dtype
    stored = tuple(t.to(dtype).contiguous() for t in (new_basis_b, new_basis_a, loadings[0] * mask, loadings[1] * mask))
    norms = squared_norm_of_product(coordinates_b, coordinates_a).sqrt()
    rounding = rounding_errors(new_basis_b, new_basis_a, *loadings, stored, norms)
    return Merge(*stored, ranks, step_errors.float(), rounding.float())


def merge_style(basis_b, basis_a, loadings_b, loadings_a, ranks, new_factors_b, new_factors_a,
                size_limit: int | None = None, allowances: Tensor | None = None) -> Merge:
    """merge_styles with one new style (what a training ends with)."""
    return merge_styles(basis_b, basis_a, loadings_b, loadings_a, ranks, [(new_factors_b, new_factors_a)],
                        size_limit, allowances)


def relative_error(factors_b: Tensor, factors_a: Tensor, approx_b: Tensor, approx_a: Tensor) -> float:
    """‖B Aᵀ − B̂ Âᵀ‖_F / ‖B Aᵀ‖_F without forming either d_out×d_in product (float64, ~1e-8)."""
    factors_b, factors_a, approx_b, approx_a = (t.to(torch.float64) for t in (factors_b, factors_a, approx_b, approx_a))
    residual = squared_norm_of_product(torch.cat([factors_b, -approx_b], 1), torch.cat([factors_a, approx_a], 1))
    reference = squared_norm_of_product(factors_b, factors_a)
    return float((residual.clamp_min(0) / reference).sqrt()) if reference > 0 else 0.0


# ---------------------------------------------------------------------------------------
# The layer
# ---------------------------------------------------------------------------------------


class StyleInTraining(nn.Module):
    """The style being learned, as free factors beside the basis: ΔW = scale · B Aᵀ.

    B (d_out×r) starts at zero and A (d_in×r) as PEFT initialises lora_A (kaiming-uniform,
    bound 1/√d_in), so a training step moves ΔW exactly as far as a LoRA step does, at every
    layer width and whatever the library holds. merge_style then puts span(B), span(A) into
    the basis: the widening of step 2 is these r columns per side.

    Why not train loadings in a widened basis, B = [C_B, E_B] L_B with orthonormal columns:
    an Adam step moves every entry of L_B by about lr, so B moves by ~lr·√(k+φ) per column
    where a LoRA's B moves by ~lr·√d_out. That is 3-4× slower at d_out = 64-128 and 6-13× at
    SD1.5's 320-1280 (benchmarks/results/step_size.md).
    """

    def __init__(self, style: str, d_out: int, d_in: int, config: ShareConfig, device=None, generator=None):
        super().__init__()
        self.style = style
        self.scale = config.scale
        bound = d_in**-0.5
        factors_a = torch.empty(d_in, config.rank).uniform_(-bound, bound, generator=generator)
        self.factors_a = nn.Parameter(factors_a.to(device))
        self.factors_b = nn.Parameter(torch.zeros(d_out, config.rank, device=device))

    def factors(self) -> tuple[Tensor, Tensor]:
        """(B: d_out×r, A: d_in×r) with ΔW = scale · B Aᵀ."""
        return self.factors_b, self.factors_a


def adaptable(module: nn.Module) -> bool:
    """An nn.Linear, or an nn.Conv2d that is a linear map on patches (one group, zero padding)."""
    if isinstance(module, nn.Conv2d):
        return module.groups == 1 and module.padding_mode == "zeros"
    return isinstance(module, nn.Linear)


class ShareLinear(nn.Module):
    """nn.Linear (or nn.Conv2d) plus Share styles: y = base(x) + ((x C_A) M) C_Bᵀ, i.e. ΔW = C_B Mᵀ C_Aᵀ.

    M = Σ_s w_s·scale_s·L_A[s] L_B[s]ᵀ (k_a×k_b) is the active mix: a mix applies the
    weighted sum of full ΔW_s (no cross terms between styles), and switching styles only
    recomputes M. Loadings of all styles are stacked (styles, k, r_max); a lower-rank style
    is zero-padded, and zero columns add nothing to ΔW. For a convolution, x C_A is the
    convolution with C_A's columns as filters and M, C_B act on channels (module docstring).

    The Share state is float32 buffers kept out of the model's state_dict (see
    share_state_dict); adapter math is cast to the input's dtype. Inject after moving the
    model to its dtype: a later model.to(float16) would cast the Share state too.
    """

    def __init__(self, base_layer: nn.Linear | nn.Conv2d, config: ShareConfig):
        super().__init__()
        if not adaptable(base_layer):
            raise TypeError(f"Share adapts nn.Linear and ungrouped zero-padded nn.Conv2d, not {base_layer}")
        self.base_layer = base_layer
        self.config = config
        self.style_ids: list[str] = []
        self.active_styles: StyleMix | None = None
        self.fused = False
        self.unfused_weight: Tensor | None = None  # base_layer.weight as it was before fuse()
        self.style_in_training: StyleInTraining | None = None
        device = base_layer.weight.device
        basis_b, basis_a, loadings_b, loadings_a = initialize(self.d_out, self.d_in, device)
        self.register_buffer("basis_a", basis_a, persistent=False)
        self.register_buffer("basis_b", basis_b, persistent=False)
        self.register_buffer("loadings_a", loadings_a, persistent=False)
        self.register_buffer("loadings_b", loadings_b, persistent=False)
        self.register_buffer("scales", torch.zeros(0, device=device), persistent=False)
        self.register_buffer("ranks", torch.zeros(0, dtype=torch.long, device=device), persistent=False)
        self.register_buffer("mix", None, persistent=False)

    # diffusers' attention processors read attn.to_q.weight.dtype
    @property
    def weight(self) -> Tensor:
        return self.base_layer.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base_layer.bias

    @property
    def d_out(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def d_in(self) -> int:
        """in_features, or c_in·k_h·k_w of a convolution."""
        return self.base_layer.weight[0].numel()

    @property
    def is_conv(self) -> bool:
        return isinstance(self.base_layer, nn.Conv2d)

    def _adapter(self, x: Tensor, factors_a: Tensor, factors_b: Tensor, mix: Tensor | None = None) -> Tensor:
        """((x A) M) Bᵀ: on the last dimension of a Linear's input, on a convolution's patches."""
        a, b = factors_a.to(x.dtype), factors_b.mT.to(x.dtype)
        if self.is_conv:
            base = self.base_layer
            filters = a.mT.reshape(a.shape[1], *base.weight.shape[1:])
            hidden = F.conv2d(x, filters, None, base.stride, base.padding, base.dilation).movedim(-3, -1)
        else:
            hidden = x @ a
        if mix is not None and mix.dim() == 3:  # one mix per batch item
            if len(mix) != len(x):
                raise ValueError(f"{len(mix)} per-item style mixes for a batch of {len(x)}")
            per_item = hidden.reshape(len(x), -1, hidden.shape[-1])
            hidden = torch.bmm(per_item, mix).reshape(*hidden.shape[:-1], mix.shape[-1])
        elif mix is not None:
            hidden = hidden @ mix
        out = hidden @ b
        return out.movedim(-1, -3) if self.is_conv else out

    def forward(self, x: Tensor) -> Tensor:
        y = self.base_layer(x)
        if self.style_in_training is not None:
            # Only the new style, so what it learns stands on its own after the merge.
            factors_b, factors_a = self.style_in_training.factors()
            return y + self.style_in_training.scale * self._adapter(x, factors_a, factors_b)
        if self.fused or self.mix is None or self.mix.numel() == 0:  # numel 0: no style here (k = 0)
            return y
        return y + self._adapter(x, self.basis_a, self.basis_b, self.mix.to(x.dtype))

    def _require_idle(self) -> None:
        if self.fused:
            raise RuntimeError("unfuse() first: the fused weight holds the current mix")
        if self.style_in_training is not None:
            raise RuntimeError(f"style {self.style_in_training.style!r} is in training: finish or discard it")

    def _index(self, style: str) -> int:
        if style not in self.style_ids:
            raise KeyError(f"unknown style {style!r}; known: {self.style_ids}")
        return self.style_ids.index(style)

    # --- styles -------------------------------------------------------------------------

    def plan_merge(self, new: dict[str, tuple[Tensor, Tensor]], allowances: dict[str, float] | None = None) -> Merge:
        """The merge of new styles {id: (B, A)}, ΔW ∝ B Aᵀ (a trained style or an imported LoRA:
        B = lora_B.weight, A = lora_A.weightᵀ), computed without changing the layer. allowances:
        {id: the step error each style may still take}, which orders a cut (merge_styles)."""
        self._require_idle()
        for style in new:
            if not style or "." in style or style in self.style_ids:
                raise ValueError(f"style id {style!r} must be new, non-empty and without '.'")
        device = self.basis_a.device
        ids = [*self.style_ids, *new]
        weights = None if allowances is None else torch.tensor([allowances[s] for s in ids], dtype=torch.float64)
        return merge_styles(
            self.basis_b, self.basis_a, self.loadings_b, self.loadings_a, self.ranks,
            [(b.to(device), a.to(device)) for b, a in new.values()], self.config.max_basis_rank, weights,
        )  # fmt: skip

    def apply_merge(self, merge: Merge, scales: dict[str, float]) -> dict[str, float]:
        """Take a plan_merge result for the new styles {id: scale}; returns every style's step error
        (projection and float32 storage) relative to its ΔW before the merge."""
        self._require_idle()
        self.basis_b, self.basis_a = merge.basis_b, merge.basis_a
        self.loadings_b, self.loadings_a = merge.loadings_b, merge.loadings_a
        self.ranks = merge.ranks.to(self.scales.device)
        self.scales = torch.cat([self.scales, self.scales.new_tensor(list(scales.values()))])
        self.style_ids.extend(scales)
        self._refresh_mix()
        return dict(zip(self.style_ids, (merge.step_errors + merge.rounding_errors).tolist()))

    def add_style(self, style: str, factors_b: Tensor, factors_a: Tensor, scale: float = 1.0) -> dict[str, float]:
        """Merge one style with ΔW = scale · factors_b factors_aᵀ; returns every style's step error."""
        return self.apply_merge(self.plan_merge({style: (factors_b, factors_a)}), {style: scale})

    def remove_style(self, style: str) -> None:
        """Drop a style's loadings; the basis is unchanged. It also leaves the active mix."""
        self._require_idle()
        index = self._index(style)
        keep = [i for i in range(len(self.style_ids)) if i != index]
        self.loadings_b, self.loadings_a = self.loadings_b[keep], self.loadings_a[keep]
        self.scales, self.ranks = self.scales[keep], self.ranks[keep]
        self.style_ids.remove(style)
        mixes = self.active_styles if isinstance(self.active_styles, list) else [self.active_styles or {}]
        for mix in mixes:
            mix.pop(style, None)
        self._refresh_mix()

    def style_loadings(self, style: str) -> tuple[Tensor, Tensor, float]:
        """(L_B, L_A, scale) of one style, r_s columns each: its own rank, not the padded width."""
        i = self._index(style)
        rank = int(self.ranks[i])
        return self.loadings_b[i, :, :rank], self.loadings_a[i, :, :rank], float(self.scales[i])

    def style_factors(self, style: str) -> tuple[Tensor, Tensor]:
        """Full factors for export, scale folded into B: ΔW_s = B Aᵀ (B: d_out×r, A: d_in×r)."""
        loadings_b, loadings_a, scale = self.style_loadings(style)
        return scale * self.basis_b @ loadings_b, self.basis_a @ loadings_a

    def set_active_styles(self, styles: StyleMix | None) -> None:
        """{style: weight} for the whole batch, a list of them (one per batch item), or None."""
        if self.fused:
            raise RuntimeError("unfuse() first: the fused weight holds the current mix")
        for mix in styles if isinstance(styles, list) else [styles or {}]:
            for style in mix:
                self._index(style)
        self.active_styles = [dict(mix) for mix in styles] if isinstance(styles, list) else dict(styles or {})
        self._refresh_mix()

    def _refresh_mix(self) -> None:
        if not self.active_styles:
            self.mix = None
            return
        per_item = isinstance(self.active_styles, list)
        mixes = self.active_styles if per_item else [self.active_styles]
        weights = self.scales.new_zeros(len(mixes), len(self.style_ids))
        for n, mix in enumerate(mixes):
            for style, weight in mix.items():
                weights[n, self.style_ids.index(style)] = weight
        used = weights.any(0).nonzero().flatten()  # only active styles: switching cost stays flat as the library grows
        mix = torch.einsum("nt,tar,tbr->nab", (weights * self.scales)[:, used], self.loadings_a[used], self.loadings_b[used])
        self.mix = mix if per_item else mix[0]

    # --- training -----------------------------------------------------------------------

    def begin_training(self, style: str, generator: torch.Generator | None = None) -> list[nn.Parameter]:
        """Start a new style's free factors and return them, the only trainable parameters."""
        self._require_idle()
        if style in self.style_ids:
            raise ValueError(f"style {style!r} exists; remove it first to retrain")
        self.style_in_training = StyleInTraining(style, self.d_out, self.d_in, self.config, self.basis_a.device, generator)
        return list(self.style_in_training.parameters())

    def finish_training(self) -> dict[str, float]:
        """Merge the trained style into the basis; returns every style's relative error."""
        training = self.style_in_training
        if training is None:
            raise RuntimeError("no style in training")
        factors_b, factors_a = (factor.detach() for factor in training.factors())
        self.style_in_training = None
        return self.add_style(training.style, factors_b, factors_a, training.scale)

    def discard_training(self) -> None:
        self.style_in_training = None

    # --- fusing ---------------------------------------------------------------------------

    def _mix_delta(self) -> Tensor:
        return self.basis_b @ self.mix.mT @ self.basis_a.mT

    @torch.no_grad()
    def fuse(self) -> None:
        """Add the active mix's ΔW into base_layer.weight; forward then skips the adapter.

        The weight before is kept until unfuse: W + ΔW − ΔW is not W in floating point (in fp16
        the rounding error is visible), so unfuse restores the copy, bit for bit.
        """
        self._require_idle()
        if self.mix is not None:
            if self.mix.dim() == 3:
                raise RuntimeError("a per-item style mix cannot be fused")
            self.unfused_weight = self.base_layer.weight.detach().clone()
            self.base_layer.weight += self._mix_delta().reshape(self.weight.shape).to(self.weight.dtype)
        self.fused = True

    @torch.no_grad()
    def unfuse(self) -> None:
        if self.fused and self.mix is not None:
            self.base_layer.weight.copy_(self.unfused_weight)
            self.unfused_weight = None
        self.fused = False

    # --- state --------------------------------------------------------------------------

    def load_state(self, basis_b: Tensor, basis_a: Tensor, styles: dict[str, tuple[Tensor, Tensor, float]]) -> None:
        """Replace the whole Share state; styles maps id -> (L_B, L_A, scale), r_s columns each."""
        self._require_idle()
        state = dict(device=self.basis_a.device, dtype=torch.float32)
        self.basis_b, self.basis_a = basis_b.to(**state), basis_a.to(**state)
        styles = {style: (b.to(**state), a.to(**state), scale) for style, (b, a, scale) in styles.items()}
        width = max((loadings_b.shape[1] for loadings_b, _, _ in styles.values()), default=0)
        self.loadings_b = stack_padded([b for b, _, _ in styles.values()], basis_b.shape[1], width).to(**state)
        self.loadings_a = stack_padded([a for _, a, _ in styles.values()], basis_a.shape[1], width).to(**state)
        self.scales = torch.tensor([float(scale) for _, _, scale in styles.values()], **state)
        self.ranks = torch.tensor([b.shape[1] for b, _, _ in styles.values()], dtype=torch.long, device=state["device"])
        self.style_ids = list(styles)
        self.active_styles = None
        self._refresh_mix()


# ---------------------------------------------------------------------------------------
# Injection and model-level operations (every ShareLinear of a model at once)
# ---------------------------------------------------------------------------------------


def matches(name: str, modules: tuple[str, ...]) -> bool:
    """Whether a module name ends with one of `modules` (PEFT's target_modules rule)."""
    return any(name == t or name.endswith("." + t) for t in modules)


def inject_share_layers(model: nn.Module, config: ShareConfig) -> dict[str, ShareLinear]:
    """Wrap every nn.Linear or nn.Conv2d (see adaptable) whose name ends with a config.target_modules entry.

    UNet2DConditionModel: UNET_TARGET_MODULES or UNET_LORA_MODULES; CLIPTextModel: CLIP_…_MODULES.
    """
    if share_layers(model):
        raise RuntimeError("model already has Share layers")
    targets = [name for name, module in model.named_modules() if adaptable(module) and matches(name, config.target_modules)]
    if not targets:
        raise ValueError(f"no nn.Linear or nn.Conv2d matches {config.target_modules}")
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, ShareLinear(getattr(parent, child_name), config))
    return share_layers(model)


def share_layers(model: nn.Module) -> dict[str, ShareLinear]:
    return {name: module for name, module in model.named_modules() if isinstance(module, ShareLinear)}


def remove_share_layers(model: nn.Module) -> None:
    """Put the original nn.Linear modules back (unfusing first)."""
    for name, layer in share_layers(model).items():
        layer.unfuse()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)


def style_ids(model: nn.Module) -> list[str]:
    """Styles in merge order (every Share layer holds the same styles)."""
    layers = list(share_layers(model).values())
    return list(layers[0].style_ids) if layers else []


def set_active_styles(model: nn.Module, styles: StyleMix | None) -> None:
    for layer in share_layers(model).values():
        layer.set_active_styles(styles)


def plan_merge(model: nn.Module, styles: dict[str, dict[str, tuple[Tensor, Tensor]]],
               allowances: dict[str, float] | None = None) -> dict[str, Merge]:
    """Every layer's merge of new styles {id: {layer name: (B: d_out×r, A: d_in×r)}} in one step,
    without changing the model (ShareLinear.plan_merge). Layers a style lacks get it with ΔW = 0."""
    layers = share_layers(model)
    for factors in styles.values():
        unknown = set(factors) - set(layers)
        if unknown:
            raise KeyError(f"no Share layer named {sorted(unknown)[:3]}")
    plan = {}
    for name, layer in layers.items():
        empty = (layer.basis_b.new_zeros(layer.basis_b.shape[0], 0), layer.basis_a.new_zeros(layer.basis_a.shape[0], 0))
        plan[name] = layer.plan_merge({style: factors.get(name, empty) for style, factors in styles.items()}, allowances)
    return plan


def apply_merge(model: nn.Module, plan: dict[str, Merge], scales: dict[str, float]) -> dict[str, dict[str, float]]:
    """Take a plan_merge result for the new styles {id: scale}; returns layer name -> {style: step error}."""
    layers = share_layers(model)
    return {name: layers[name].apply_merge(merge, scales) for name, merge in plan.items()}


def add_style(
    model: nn.Module, style: str, factors: dict[str, tuple[Tensor, Tensor]], scale: float = 1.0
) -> dict[str, dict[str, float]]:
    """Import a style (e.g. a plain LoRA) given as layer name -> (B: d_out×r, A: d_in×r),
    ΔW = scale · B Aᵀ. Layers not in factors get the style with ΔW = 0.
    Returns layer name -> {style: step error}."""
    return apply_merge(model, plan_merge(model, {style: factors}), {style: scale})


def remove_style(model: nn.Module, style: str) -> None:
    for layer in share_layers(model).values():
        layer.remove_style(style)


def export_style(model: nn.Module, style: str) -> dict[str, tuple[Tensor, Tensor]]:
    """layer name -> (B, A) with ΔW = B Aᵀ (scale folded into B), e.g. to save as a LoRA."""
    return {name: layer.style_factors(style) for name, layer in share_layers(model).items()}


def begin_style_training(model: nn.Module, style: str, generator: torch.Generator | None = None,
                         modules: tuple[str, ...] | None = None) -> list[nn.Parameter]:
    """Freeze the whole model (it stays frozen afterwards), start the new style's factors on
    every Share layer whose name ends with one of `modules` (None: every one) and return them.
    The other layers get the style with ΔW = 0 when it is merged."""
    model.requires_grad_(False)
    layers = [layer for name, layer in share_layers(model).items() if modules is None or matches(name, modules)]
    if not layers:
        raise ValueError(f"no Share layer matches {modules}")
    return [p for layer in layers for p in layer.begin_training(style, generator)]


def finish_style_training(model: nn.Module) -> dict[str, dict[str, float]]:
    """Merge the trained style on every layer; returns layer name -> {style: step error}."""
    style, factors, scale = take_trained_style(model)
    return add_style(model, style, factors, scale)


def take_trained_style(model: nn.Module) -> tuple[str, dict[str, tuple[Tensor, Tensor]], float]:
    """The style in training as (id, {layer: (B, A)} of the layers that trained, scale), ending its
    training unmerged, so that the caller can plan_merge it and check the result first."""
    training = {name: layer.style_in_training for name, layer in share_layers(model).items()
                if layer.style_in_training is not None}
    if not training:
        raise RuntimeError("no style in training")
    factors = {name: tuple(f.detach() for f in t.factors()) for name, t in training.items()}
    first = next(iter(training.values()))
    discard_style_training(model)
    return first.style, factors, first.scale


def discard_style_training(model: nn.Module) -> None:
    """Drop the style in training; the Share state is exactly as before begin_style_training."""
    for layer in share_layers(model).values():
        layer.discard_training()


def fuse_share_layers(model: nn.Module) -> None:
    for layer in share_layers(model).values():
        layer.fuse()


def unfuse_share_layers(model: nn.Module) -> None:
    for layer in share_layers(model).values():
        layer.unfuse()


def share_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Plain tensors: '{layer}.basis_a|basis_b' and '{layer}.styles.{style}.loadings_a|loadings_b|scale'."""
    state = {}
    for name, layer in share_layers(model).items():
        state[f"{name}.basis_a"] = layer.basis_a.clone()
        state[f"{name}.basis_b"] = layer.basis_b.clone()
        for style in layer.style_ids:
            loadings_b, loadings_a, scale = layer.style_loadings(style)
            state[f"{name}.styles.{style}.loadings_a"] = loadings_a.clone()
            state[f"{name}.styles.{style}.loadings_b"] = loadings_b.clone()
            state[f"{name}.styles.{style}.scale"] = torch.tensor(scale)
    return state


def load_share_state_dict(model: nn.Module, state: dict[str, Tensor]) -> None:
    """Inverse of share_state_dict; style order follows the order of the keys."""
    layers = share_layers(model)
    styles: dict[str, dict[str, dict[str, Tensor]]] = {name: {} for name in layers}
    for key, value in state.items():
        if key.endswith((".basis_a", ".basis_b")):
            continue
        name, styles_word, style, field = key.rsplit(".", 3)
        if name not in layers or styles_word != "styles":
            raise KeyError(f"unexpected key {key!r}")
        styles[name].setdefault(style, {})[field] = value
    for name, layer in layers.items():
        layer.load_state(
            state[f"{name}.basis_b"],
            state[f"{name}.basis_a"],
            {s: (t["loadings_b"], t["loadings_a"], float(t["scale"])) for s, t in styles[name].items()},
        )
