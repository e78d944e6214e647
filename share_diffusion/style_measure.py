"""How strongly generated images show a style, measured against references of that style.

No downloaded weights. An image (H×W×3 in [0, 1]) becomes three groups of features:
  colour    the mean and spread of each channel and a 4×4×4 RGB histogram;
  spectrum  the log power of the luminance spectrum in 11 half-octave radial × 4 orientation bins;
  texture   Gram matrices of two layers of a fixed, seeded, untrained CNN (style-transfer statistics).
Each group is centred and divided by its root-mean-square spread over the base images and the
references together (one number per group, so that no rarely-varying feature can dominate), and
by √(its size), so that the three groups count alike.

G are images made with the style, B the same prompts and seeds without it, and R the references:
each prompt's own image in the style, passed through the VAE so that it carries the generator's
artefacts too. Then

  paired strength  S = Σ_i ⟨f(g_i) − f(b_i), f(r_i) − f(b_i)⟩ / Σ_i ‖f(r_i) − f(b_i)‖²
                   how far the images moved from the base model's toward their references,
                   along the way from one to the other: 0 for the base model, 1 for the
                   references, above 1 for a style pushed past them (so it rises with a style's
                   weight), about 0 for images that moved elsewhere; a 95% interval by
                   bootstrap over i.
  closeness        C = 1 − Σ_i ‖f(g_i) − f(r_i)‖² / Σ_i ‖f(b_i) − f(r_i)‖²: how much closer to
                   the references the images came. 1 only at the references themselves, so it
                   falls again for a style pushed past them, and below 0 for images that moved
                   elsewhere. Reported next to S, never instead of it.
  distribution     1 − MMD²(G, R) / MMD²(B, R), unbiased MMD² under a Gaussian kernel (as KID).

S is not specific to a style: styles that share a tint, a texture or a dark border move images
along much of the same way, so another style's images score well above 0. StyleSpace tells the
known styles apart: with each style t's way d_{t,i} = f(r_{t,i}) − f(b_i),

  specific strength  S*_s = c_s,  c = argmin_c Σ_i ‖f(g_i) − f(b_i) − Σ_t c_t d_{t,i}‖²
                     the change written as one mix of all known styles, a weight per style shared
                     by all prompts: 1 for a style's references and 0 for any other style's,
                     whatever they share. By Frisch–Waugh–Lovell, S*_s is S measured along the part
                     of s's way that no other style's way explains.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

FEATURE_SIDE = 128  # larger images are area-averaged down to this side first
RADIAL_EDGES = tuple(2 ** (n / 2) for n in range(11))  # 1 to 32 cycles per image, half-octave bins; the last is open
ORIENTATIONS = 4
COLOUR_LEVELS = 4
BOOTSTRAP_RESAMPLES = 2000


@dataclass(frozen=True)
class Estimate:
    value: float
    low: float  # 95% bootstrap interval
    high: float
    count: int  # images (pairs) it rests on

    def __str__(self) -> str:
        return f"{self.value:.2f} [{self.low:.2f}, {self.high:.2f}] (n={self.count})"


def as_tensor(images) -> Tensor:
    """(N, H, W, 3) floats in [0, 1], or PIL images -> (N, 3, H', W') float32 at most FEATURE_SIDE."""
    if not isinstance(images, (np.ndarray, Tensor)):
        images = np.stack([np.asarray(image.convert("RGB"), dtype=np.float32) / 255 for image in images])
    pixels = torch.as_tensor(np.asarray(images, dtype=np.float32)).permute(0, 3, 1, 2)
    if max(pixels.shape[-2:]) > FEATURE_SIDE:
        pixels = F.interpolate(pixels, size=(FEATURE_SIDE, FEATURE_SIDE), mode="area")
    return pixels


def colour_features(pixels: Tensor) -> Tensor:
    """Per-channel mean and std, and the fraction of pixels in each cell of a 4×4×4 RGB grid."""
    flat = pixels.flatten(2)
    levels = (flat.clamp(0, 1) * COLOUR_LEVELS).long().clamp_max(COLOUR_LEVELS - 1)
    cell = (levels[:, 0] * COLOUR_LEVELS + levels[:, 1]) * COLOUR_LEVELS + levels[:, 2]
    histogram = F.one_hot(cell, COLOUR_LEVELS**3).float().mean(1)
    return torch.cat([flat.mean(2), flat.std(2), histogram], dim=1)


def spectrum_features(pixels: Tensor) -> Tensor:
    """log mean power of the luminance spectrum per (radius, orientation) bin, and log variance."""
    luminance = (pixels * torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)).sum(1)
    luminance = luminance - luminance.mean((1, 2), keepdim=True)
    power = torch.fft.fft2(luminance).abs().square() / luminance[0].numel()
    height, width = luminance.shape[-2:]
    fy = torch.fft.fftfreq(height).mul(height).view(-1, 1).expand(height, width)
    fx = torch.fft.fftfreq(width).mul(width).view(1, -1).expand(height, width)
    radius = (fx.square() + fy.square()).sqrt()
    angle = torch.atan2(fy, fx).remainder(torch.pi)
    radial = torch.bucketize(radius, torch.tensor(RADIAL_EDGES, dtype=radius.dtype), right=True) - 1
    orientation = (angle / torch.pi * ORIENTATIONS).long().clamp_max(ORIENTATIONS - 1)
    bins = torch.where(radial >= 0, radial * ORIENTATIONS + orientation, -1).flatten()
    count = len(RADIAL_EDGES) * ORIENTATIONS
    used = bins >= 0
    sums = power.flatten(1)[:, used] @ F.one_hot(bins[used], count).float()
    means = sums / F.one_hot(bins[used], count).float().sum(0).clamp_min(1)
    variance = power.flatten(1).sum(1, keepdim=True) / luminance[0].numel()
    return torch.log(torch.cat([means, variance], dim=1) + 1e-6)


class TextureNet(nn.Module):
    """Two random 3×3 convolutions (seed 0, never trained); their Gram matrices describe texture."""

    def __init__(self, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 16, 3, padding=1)
        for conv in (self.first, self.second):
            fan_in = conv.in_channels * 9
            conv.weight.data = torch.randn(conv.weight.shape, generator=generator) * (2 / fan_in) ** 0.5
            conv.bias.data.zero_()
        self.requires_grad_(False)

    @staticmethod
    def gram(activations: Tensor) -> Tensor:
        flat = activations.flatten(2)
        gram = flat @ flat.mT / flat.shape[-1]
        rows, cols = torch.triu_indices(gram.shape[-1], gram.shape[-1])
        return gram[:, rows, cols].sqrt()

    @torch.no_grad()
    def forward(self, pixels: Tensor) -> Tensor:
        first = F.relu(self.first(pixels * 2 - 1))
        second = F.relu(self.second(F.avg_pool2d(first, 2)))
        return torch.cat([self.gram(first), self.gram(second)], dim=1)


TEXTURE_NET = TextureNet()


def feature_groups(images, batch_size: int = 256) -> dict[str, Tensor]:
    pixels = as_tensor(images)
    groups: dict[str, list[Tensor]] = {"colour": [], "spectrum": [], "texture": []}
    for chunk in pixels.split(batch_size):
        groups["colour"].append(colour_features(chunk))
        groups["spectrum"].append(spectrum_features(chunk))
        groups["texture"].append(TEXTURE_NET(chunk))
    return {name: torch.cat(parts).double() for name, parts in groups.items()}


def bootstrap(statistic, count: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of statistic(indices) over resamples of range(count)."""
    low, high = bootstrap_rows(statistic, count, seed)
    return float(low), float(high)


class Embedding:
    """f: feature groups centred and scaled by their spread over the given sets of images, together."""

    def __init__(self, image_sets: list[dict[str, Tensor]]):
        self.centre, self.spread = {}, {}
        for name in image_sets[0]:
            pooled = torch.cat([groups[name] for groups in image_sets])
            self.centre[name] = pooled.mean(0)
            self.spread[name] = (pooled - self.centre[name]).square().mean().sqrt().clamp_min(1e-8)

    def __call__(self, groups: dict[str, Tensor]) -> Tensor:
        parts = [(groups[n] - self.centre[n]) / self.spread[n] / groups[n].shape[1] ** 0.5 for n in groups]
        return torch.cat(parts, dim=1)


def paired_feature_groups(base, *reference_sets) -> list[dict[str, Tensor]]:
    """Feature groups of the base images and of each reference set, one image per prompt in each."""
    sets = [feature_groups(images) for images in (base, *reference_sets)]
    if len({len(next(iter(groups.values()))) for groups in sets}) != 1:
        raise ValueError("one reference per base image: they are paired by prompt")
    return sets


class StyleMeasure:
    """Scores images against paired references, normalised by the base model's images.

    base[i] and references[i] belong to prompt i; so does images[i] in every score.
    """

    def __init__(self, base, references):
        base_groups, reference_groups = paired_feature_groups(base, references)
        self.embedding = Embedding([base_groups, reference_groups])
        self.base = self.embedding(base_groups)
        self.references = self.embedding(reference_groups)
        self.way = self.references - self.base  # f(r_i) − f(b_i)
        self.way_lengths = self.way.square().sum(1)

    def embed(self, images) -> Tensor:
        embedded = self.embedding(feature_groups(images))
        if len(embedded) != len(self.references):
            raise ValueError(f"{len(embedded)} images for {len(self.references)} prompts")
        return embedded

    def progress(self, embedded: Tensor) -> Tensor:
        """⟨f(g_i) − f(b_i), f(r_i) − f(b_i)⟩ per prompt i: the numerator of S."""
        return ((embedded - self.base) * self.way).sum(1)

    def strength(self, images) -> Estimate:
        """The paired strength S with its bootstrap interval over prompts."""
        progress = self.progress(self.embed(images))
        return self._estimate(lambda i: progress[i].sum(-1) / self.way_lengths[i].sum(-1), len(progress))

    def closeness(self, images) -> Estimate:
        """C: 1 − Σ‖f(g_i) − f(r_i)‖² / Σ‖f(b_i) − f(r_i)‖², with its bootstrap interval."""
        distances = (self.embed(images) - self.references).square().sum(1)
        return self._estimate(lambda i: 1 - distances[i].sum(-1) / self.way_lengths[i].sum(-1), len(distances))

    def strength_ratio(self, images, baseline_images) -> Estimate:
        """S(images) / S(baseline_images) on the same prompts, with a paired bootstrap interval."""
        mine, theirs = self.progress(self.embed(images)), self.progress(self.embed(baseline_images))
        return self._estimate(lambda i: mine[i].sum(-1) / theirs[i].sum(-1), len(mine))

    @staticmethod
    def _estimate(statistic, count: int) -> Estimate:
        """statistic(indices) on every prompt, with its 95% bootstrap interval over prompts."""
        return Estimate(float(statistic(torch.arange(count))), *bootstrap(statistic, count), count)

    def distribution_strength(self, images) -> float:
        """1 − MMD²(G, R) / MMD²(B, R) under a Gaussian kernel at the median distance of B ∪ R."""
        generated = self.embed(images)
        pooled = torch.cat([self.base, self.references])
        bandwidth = torch.cdist(pooled, pooled).median().square().clamp_min(1e-12)

        def mmd(x: Tensor, y: Tensor) -> Tensor:
            kernel = lambda a, b: torch.exp(-torch.cdist(a, b).square() / bandwidth)  # noqa: E731
            within = lambda k: (k.sum() - k.diagonal().sum()) / (len(k) * (len(k) - 1))  # noqa: E731
            return within(kernel(x, x)) + within(kernel(y, y)) - 2 * kernel(x, y).mean()

        return float(1 - mmd(generated, self.references) / mmd(self.base, self.references))


class StyleSpace:
    """Every known style's references in one space: the specific strength S*, style by style.

    base[i] and references[style][i] belong to prompt i; so does images[i].
    """

    def __init__(self, base, references: dict[str, object]):
        self.styles = list(references)
        base_groups, *reference_groups = paired_feature_groups(base, *references.values())
        self.embedding = Embedding([base_groups, *reference_groups])
        self.base = self.embedding(base_groups)
        self.ways = torch.stack([self.embedding(groups) - self.base for groups in reference_groups])  # d_{t,i}
        self.way_products = torch.einsum("sif,tif->ist", self.ways, self.ways)  # ⟨d_{s,i}, d_{t,i}⟩

    def progress(self, images) -> Tensor:
        """⟨f(g_i) − f(b_i), d_{t,i}⟩ per prompt i and style t, for the first len(images) prompts."""
        embedded = self.embedding(feature_groups(images))
        count = len(embedded)
        if count > len(self.base):
            raise ValueError(f"{count} images for {len(self.base)} prompts")
        return torch.einsum("if,tif->it", embedded - self.base[:count], self.ways[:, :count])

    def mix(self, progress: Tensor, indices: Tensor) -> Tensor:
        """c for the prompts in indices (…, n): the normal equations Σ_i ⟨d_i, d_iᵀ⟩ c = Σ_i ⟨g_i − b_i, d_i⟩."""
        products = self.way_products[indices].sum(-3)
        return torch.linalg.solve(products, progress[indices].sum(-2))

    def specific_strength(self, images) -> dict[str, Estimate]:
        """S*_s for every known style s, with 95% bootstrap intervals over prompts."""
        progress = self.progress(images)
        count = len(progress)
        everything = self.mix(progress, torch.arange(count))
        low, high = bootstrap_rows(lambda i: self.mix(progress, i), count)
        return {s: Estimate(float(everything[t]), float(low[t]), float(high[t]), count) for t, s in enumerate(self.styles)}

    def unique_fraction(self) -> dict[str, float]:
        """‖the part of d_s no other way explains‖² / ‖d_s‖²: how much of each style is its own."""
        products = self.way_products.sum(0)
        return {s: float(1 / (torch.linalg.inv(products)[t, t] * products[t, t])) for t, s in enumerate(self.styles)}


def bootstrap_rows(statistic, count: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """95% percentile intervals, element by element, of a vector statistic(indices)."""
    generator = torch.Generator().manual_seed(seed)
    values = statistic(torch.randint(0, count, (BOOTSTRAP_RESAMPLES, count), generator=generator))
    return values.quantile(0.025, dim=0), values.quantile(0.975, dim=0)


@torch.no_grad()
def vae_round_trip(vae, images: np.ndarray, batch_size: int = 16) -> np.ndarray:
    """Encode and decode (N, H, W, 3) images in [0, 1] with the posterior mean: the references
    then carry the same VAE artefacts as generated images."""
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.from_numpy(np.asarray(images[start : start + batch_size], dtype=np.float32))
        pixels = (pixels.permute(0, 3, 1, 2) * 2 - 1).to(vae.device, vae.dtype)
        decoded = vae.decode(vae.encode(pixels).latent_dist.mean).sample
        out.append(((decoded.float().clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out)
