"""The merge of the paper's published code, kept as a baseline for share_diffusion.share.merge_style.

As in the original (Share repository, utils.get_eigenvectors / eigendecomposition /
calculate_eigenflux), per side:
  * every style's factor is stacked side by side (d × Σr), in float32, as given (no canonical form,
    no per-style normalisation);
  * the stack is centred by its row mean and the d×d covariance is decomposed with the general
    torch.linalg.eig; eigenvalues are sorted by real part and the top-k eigenvectors form the basis;
  * loadings are projections of the *uncentred* factors onto that basis.
"""

import torch
from torch import Tensor


def eig_basis(stacked_factors: Tensor, num_components: int) -> Tensor:
    """Top eigenvectors (d×num_components) of the centred d×d covariance of the stacked factors."""
    centred = stacked_factors - stacked_factors.mean(dim=1, keepdim=True)
    covariance = centred @ centred.T
    eigenvalues, eigenvectors = torch.linalg.eig(covariance)
    order = eigenvalues.real.argsort(descending=True)
    return eigenvectors.real[:, order[:num_components]]


def eig_merge(
    factors_b: list[Tensor], factors_a: list[Tensor], num_components: int
) -> tuple[Tensor, Tensor, list[Tensor], list[Tensor]]:
    """Bases (d_out×k, d_in×k) and per-style loadings (k×r) for styles ΔW_s ∝ B_s A_sᵀ."""
    basis_b = eig_basis(torch.cat(factors_b, dim=1).float(), num_components)
    basis_a = eig_basis(torch.cat(factors_a, dim=1).float(), num_components)
    loadings_b = [basis_b.T @ b.float() for b in factors_b]
    loadings_a = [basis_a.T @ a.float() for a in factors_a]
    return basis_b, basis_a, loadings_b, loadings_a
