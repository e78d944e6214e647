"""Continual style learning, judged by the style measure (share_diffusion.style_measure).

    python -m benchmarks.continual [--quick] [--out runs/continual]

The embedded base model learns styles one after another, 12 images each (`world.style_images`,
plain-scene captions, the style name as trigger), every method with the same preset, seeds and
batches. Which styles do what was fixed before the run:
  tuning     sepia, halftone: the only styles anything was ever chosen on (the preset, the measure);
  reporting  neon, pointillism, mosaic (demo-world styles) and cyanotype, vignette, duotone, which
             no part of the embedded model ever saw (world.UNSEEN_STYLES).

Evaluation: 64 world captions, each with its own seed, the trigger appended. References: each
caption rendered in the style and passed through the VAE. Base: the base model on the same
captions (no trigger) and seeds. Score: the paired strength S (how far the images moved from the
base model's toward the references; 0 = base, 1 = references) with its bootstrap 95% interval.
Sampling is fp32 (batch-invariant up to float rounding). Every scored image is saved to
images.npz next to the report, so a revised measure can re-score a run without re-training.

Methods (a `Method` learns a style and samples the styles learned so far):
  share       ours: Studio's flow (train_style on a copy, finish_style_training, load back).
  lora        one independent PEFT LoRA per style, same targets, rank, data, seed and initial A.
  share_eig   Share's trained factors merged by the paper's eig merge (benchmarks/eig_baseline.py)
              at ours' k per layer: only the merge differs.
  sequential  one PEFT LoRA fine-tuned on every style in turn (a new optimizer per style): what
              forgetting looks like without a library.

The measure is validated in the same run, before its numbers are used (section "validation"):
a strength sweep, capped libraries with known drift, images of other styles, the base model with
other seeds and with the style prompts, and references re-rendered from other scenes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from benchmarks.eig_baseline import eig_merge
from benchmarks.output import add_output_option
from share_diffusion import share, world
from share_diffusion.images import ImageSet, TrainingImage
from share_diffusion.loading import load_pipeline
from share_diffusion.style_measure import StyleMeasure, vae_round_trip
from share_diffusion.training import TrainingConfig, TrainingProgress, copy_sharing_weights, fit, train_style, with_trigger

DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "base-model"
TUNING_STYLES = ("sepia", "halftone")
REPORTING_STYLES = ("neon", "pointillism", "mosaic", "cyanotype", "vignette", "duotone")


@dataclass
class Settings:
    styles: tuple[str, ...] = TUNING_STYLES + REPORTING_STYLES
    images_per_style: int = 12
    image_seed: int = 1000  # style t's training images: world.style_images(style, n, image_seed + t)
    training: TrainingConfig = field(default_factory=TrainingConfig)  # the quick preset
    max_basis_rank: int = 64
    prompts: int = 64  # headline cells: every method's final images of every style
    caption_seed: int = 2026
    sampling_steps: int = 10
    guidance: float = 4.0
    generation_batch: int = 32
    diagonal_prompts: int = 16  # image-space forgetting: right after learning vs at the end
    eig_prompts: int = 16
    validation_prompts: int = 32
    strengths: tuple[float, ...] = (0.25, 0.5, 1.5)
    caps: tuple[int, ...] = (4, 8)

    def training_config(self, t: int) -> TrainingConfig:
        return replace(self.training, seed=self.training.seed + t)


QUICK = dict(styles=("sepia", "halftone", "cyanotype"), prompts=16, diagonal_prompts=8, eig_prompts=8,
             validation_prompts=8, sampling_steps=8, strengths=(0.5,), caps=(4,))  # fmt: skip
QUICK_TRAINING = dict(steps=30)


# ---------------------------------------------------------------------------------------
# Prompts, references, sampling
# ---------------------------------------------------------------------------------------


def evaluation_captions(count: int, seed: int) -> list[str]:
    """`count` distinct world captions (fixed by seed)."""
    rng = np.random.default_rng(seed)
    captions: list[str] = []
    while len(captions) < count:
        caption = world.sample_scene(rng).caption()
        if caption not in captions:
            captions.append(caption)
    return captions


def reference_renders(style: str, captions: list[str], jitter_seed: int | None = None) -> np.ndarray:
    """Each caption rendered in the style; with jitter_seed, from another scene that fits it."""
    out = []
    for i, caption in enumerate(captions):
        scene = world.parse_caption(caption)
        if jitter_seed is not None:
            other = world.sample_scene(np.random.default_rng(jitter_seed + i))
            scene = replace(scene, size=other.size, jitter=other.jitter)
        out.append(world.render_styled(style, scene, np.random.default_rng(i)))
    return np.stack(out)


def training_images(style: str, count: int, seed: int) -> ImageSet:
    return ImageSet(
        [TrainingImage(image, Path(f"{style}/{i:02d}.png"), caption) for i, (image, caption) in enumerate(world.style_images(style, count, seed))]
    )


@torch.no_grad()
def sample(pipe, unet, prompts: list[str], seeds: list[int], settings: Settings, mixes: list[dict] | None = None,
           text_encoder=None) -> np.ndarray:  # fmt: skip
    """(N, H, W, 3) float images in [0, 1], fp32. mixes: one Share style mix per prompt, in the UNet
    and, when given, in a text encoder with Share layers (which encodes each prompt once)."""
    text_encoder = text_encoder or pipe.text_encoder
    sampler = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "text_encoder": text_encoder, "requires_safety_checker": False})
    sampler.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), settings.generation_batch):
        chunk = slice(start, start + settings.generation_batch)
        if mixes is not None:  # classifier-free guidance runs [unconditional; conditional]
            share.set_active_styles(unet, mixes[chunk] + mixes[chunk])
            share.set_active_styles(text_encoder, mixes[chunk])
        try:
            images = sampler(
                prompt=prompts[chunk], num_inference_steps=settings.sampling_steps, guidance_scale=settings.guidance,
                generator=[torch.Generator().manual_seed(s) for s in seeds[chunk]], output_type="np",
            ).images  # fmt: skip
        finally:
            if mixes is not None:
                share.set_active_styles(unet, None)
                share.set_active_styles(text_encoder, None)
        out.append(np.asarray(images, dtype=np.float32))
    return np.concatenate(out)


class Evaluation:
    """The prompts, base images, references and measures of every style."""

    def __init__(self, pipe, settings: Settings, log=print):
        self.pipe, self.settings = pipe, settings
        self.captions = evaluation_captions(settings.prompts, settings.caption_seed)
        self.seeds = list(range(settings.prompts))
        self.images_sampled, self.seconds = 0, 0.0
        self.base = self.sample(pipe.unet, self.captions)
        self.references = {s: vae_round_trip(pipe.vae, reference_renders(s, self.captions)) for s in settings.styles}
        self.measures: dict[tuple[str, int], StyleMeasure] = {}
        self.scored: dict[str, np.ndarray] = {"base": self.base, **{f"references/{s}": r for s, r in self.references.items()}}
        log(f"evaluation: {len(self.captions)} prompts, base sampled, references of {len(settings.styles)} styles")

    def prompts(self, style: str, count: int) -> list[str]:
        return [with_trigger(caption, style) for caption in self.captions[:count]]

    def sample(self, unet, prompts: list[str], mixes: list[dict] | None = None, seeds: list[int] | None = None,
               text_encoder=None) -> np.ndarray:  # fmt: skip
        start = time.time()
        images = sample(self.pipe, unet, prompts, seeds or self.seeds[: len(prompts)], self.settings, mixes, text_encoder)
        self.images_sampled += len(images)
        self.seconds += time.time() - start
        return images

    def measure(self, style: str, count: int) -> StyleMeasure:
        """The measure of `style` on the first `count` prompts."""
        if (style, count) not in self.measures:
            self.measures[style, count] = StyleMeasure(self.base[:count], self.references[style][:count])
        return self.measures[style, count]

    def score(self, label: str, style: str, images: np.ndarray, against: str | None = None) -> dict:
        """S of images of `style` (the first len(images) prompts) against `against`'s references;
        the images are kept under `label` for images.npz."""
        self.scored.setdefault(label, images)
        return asdict(self.measure(against or style, len(images)).strength(images))


# ---------------------------------------------------------------------------------------
# Methods
# ---------------------------------------------------------------------------------------


class Method:
    """A way of learning styles in sequence: learn(t, style) then sample(styles learned so far)."""

    name = ""

    def __init__(self, pipe, settings: Settings, sets: dict[str, ImageSet]):
        self.pipe, self.settings, self.sets = pipe, settings, sets
        self.train_seconds: list[float] = []

    def learn(self, t: int, style: str) -> None:
        raise NotImplementedError

    def sample(self, evaluation: Evaluation, style: str, count: int) -> np.ndarray:
        raise NotImplementedError


class ShareMethod(Method):
    name = "Share (ours)"

    def __init__(self, pipe, settings, sets):
        super().__init__(pipe, settings, sets)
        self.config = share.ShareConfig(rank=settings.training.rank, max_basis_rank=settings.max_basis_rank)
        self.unet = copy_sharing_weights(pipe.unet)
        share.inject_share_layers(self.unet, self.config)
        self.ids: dict[str, str] = {}
        self.trained: list[dict] = []  # each style's factors as trained, ΔW = B Aᵀ

    def learn(self, t, style):
        start = time.time()
        trained = train_style(self.pipe, copy_sharing_weights(self.unet), self.sets[style], f"s{t + 1}", style, self.settings.training_config(t))
        self.train_seconds.append(time.time() - start)
        self.trained.append(trained_factors(trained))
        share.finish_style_training(trained)
        share.load_share_state_dict(self.unet, share.share_state_dict(trained))
        self.ids[style] = f"s{t + 1}"

    def sample(self, evaluation, style, count, weight: float = 1.0):
        return evaluation.sample(self.unet, evaluation.prompts(style, count), [{self.ids[style]: weight}] * count)


def trained_factors(unet) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The style in training's factors per layer, scale folded into B."""
    factors = {}
    for name, layer in share.share_layers(unet).items():
        training = layer.style_in_training
        factors_b, factors_a = training.factors()
        factors[name] = (training.scale * factors_b.detach().clone(), factors_a.detach().clone())
    return factors


class EigMethod(Method):
    """Share's trained factors, merged by the published eig merge at ours' k per layer."""

    name = "Share + eig merge (published)"

    def __init__(self, pipe, settings, sets, ours: ShareMethod):
        super().__init__(pipe, settings, sets)
        self.ours = ours
        self.unet = copy_sharing_weights(pipe.unet)
        share.inject_share_layers(self.unet, ours.config)

    def learn(self, t, style):
        ranks = {n: max(l.basis_a.shape[1], l.basis_b.shape[1]) for n, l in share.share_layers(self.ours.unet).items()}
        eig_step(self.unet, self.ours.trained[t], ranks, f"s{t + 1}")

    def sample(self, evaluation, style, count):
        return evaluation.sample(self.unet, evaluation.prompts(style, count), [{self.ours.ids[style]: 1.0}] * count)


@torch.no_grad()
def eig_step(eig_unet, new_factors: dict, ranks: dict[str, int], style_id: str) -> None:
    """Merge a new style into the eig library: earlier styles as the eig library stores them."""
    for name, layer in share.share_layers(eig_unet).items():
        stored = [layer.style_factors(s) for s in layer.style_ids]  # scale folded into B
        ids = [*layer.style_ids, style_id]
        inputs = stored + [new_factors[name]]
        basis_b, basis_a, loadings_b, loadings_a = eig_merge([b for b, _ in inputs], [a for _, a in inputs], ranks[name])
        layer.load_state(basis_b, basis_a, {s: (lb, la, 1.0) for s, lb, la in zip(ids, loadings_b, loadings_a)})


class LoraMethod(Method):
    """One PEFT LoRA per style, started from the same A as Share's training of that style."""

    name = "Independent LoRA per style"

    def __init__(self, pipe, settings, sets):
        super().__init__(pipe, settings, sets)
        self.unets: dict[str, torch.nn.Module] = {}

    def learn(self, t, style):
        config = self.settings.training_config(t)
        unet = copy_sharing_weights(self.pipe.unet)
        parameters = add_lora(unet, config.rank)
        start_like_share(unet, self.pipe.unet, config)
        self.train_seconds.append(train_lora(self.pipe, unet, parameters, self.sets[style], style, config))
        self.unets[style] = unet

    def sample(self, evaluation, style, count):
        return evaluation.sample(self.unets[style], evaluation.prompts(style, count))


class SequentialLoraMethod(LoraMethod):
    """One PEFT LoRA fine-tuned on every style in turn, with a new optimizer per style; its first
    style is trained exactly as the independent LoRA's."""

    name = "One LoRA fine-tuned in sequence"

    def learn(self, t, style):
        if t == 0:
            super().learn(t, style)
            self.unet = self.unets.pop(style)
            return
        parameters = [p for n, p in self.unet.named_parameters() if "lora_" in n]
        self.train_seconds.append(train_lora(self.pipe, self.unet, parameters, self.sets[style], style, self.settings.training_config(t)))

    def sample(self, evaluation, style, count):
        return evaluation.sample(self.unet, evaluation.prompts(style, count))


@torch.no_grad()
def start_like_share(lora_unet, base_unet, config: TrainingConfig) -> None:
    """Set every lora_A to the A that train_style draws for the same seed (lora_B is zero in both)."""
    probe = copy_sharing_weights(base_unet)
    share.inject_share_layers(probe, share.ShareConfig(rank=config.rank))
    share.begin_style_training(probe, "probe", torch.Generator().manual_seed(config.seed))
    for name, layer in share.share_layers(probe).items():
        lora_a = lora_unet.get_submodule(name).lora_A["default"]
        lora_a.weight.copy_(layer.style_in_training.factors_a.T)


def add_lora(unet, rank: int) -> list[torch.nn.Parameter]:
    """A PEFT LoRA of `rank` on Share's targets (every attention projection) of `unet`; its parameters."""
    from peft import LoraConfig

    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=list(share.UNET_TARGET_MODULES)))
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def train_lora(pipe, unet, parameters: list, images: ImageSet, trigger: str, config: TrainingConfig,
               progress: Callable[[TrainingProgress], None] | None = None) -> float:  # fmt: skip
    """train_style's loop (training.fit) for PEFT LoRA parameters of `unet`; returns seconds."""
    start = time.time()
    unet.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    fit(pipe, unet, parameters, images, trigger, config, progress)
    unet.requires_grad_(False)
    return time.time() - start


# ---------------------------------------------------------------------------------------
# Weight space: drift and capped libraries
# ---------------------------------------------------------------------------------------


def library_drift(unet, trained: list[dict], ids: list[str]) -> list[float]:
    """Per style: the largest relative error ‖ΔW − ΔŴ‖/‖ΔW‖ over layers, stored vs as trained."""
    drifts = []
    for factors, style_id in zip(trained, ids):
        stored = share.export_style(unet, style_id)
        drifts.append(max(share.relative_error(b, a, *stored[name]) for name, (b, a) in factors.items()))
    return drifts


def capped_library(base_unet, trained: list[dict], cap: int, rank: int):
    """The trained styles merged in order into a library whose basis is capped at k ≤ cap."""
    unet = copy_sharing_weights(base_unet)
    share.inject_share_layers(unet, share.ShareConfig(rank=rank, max_basis_rank=cap))
    for n, factors in enumerate(trained):
        share.add_style(unet, f"s{n + 1}", factors)
    return unet


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


def run_benchmark(settings: Settings, model, log=print) -> dict:
    started = time.time()
    torch.manual_seed(0)
    pipe = load_pipeline(str(model), device="cpu", progress=False)
    pipe.unet.requires_grad_(False)
    styles = list(settings.styles)
    sets = {s: training_images(s, settings.images_per_style, settings.image_seed + t) for t, s in enumerate(styles)}
    evaluation = Evaluation(pipe, settings, log)
    ours = ShareMethod(pipe, settings, sets)
    methods = {
        "share": ours, "share_eig": EigMethod(pipe, settings, sets, ours), "lora": LoraMethod(pipe, settings, sets),
        "sequential_lora": SequentialLoraMethod(pipe, settings, sets),
    }  # fmt: skip
    results: dict = {"styles": styles, "tuning_styles": list(TUNING_STYLES), "methods": {}}

    diagonal: dict = {m: {} for m in methods}
    for t, style in enumerate(styles):
        for key, method in methods.items():
            method.learn(t, style)
            count = settings.diagonal_prompts if key != "lora" else 0
            if count:
                diagonal[key][style] = evaluation.score(f"{key}/after_learning/{style}", style, method.sample(evaluation, style, count))
        drift = library_drift(ours.unet, ours.trained, [ours.ids[s] for s in styles[: t + 1]])
        log(f"step {t + 1}/{len(styles)} {style}: share S {diagonal['share'][style]['value']:.2f}, "
            f"max drift {max(drift):.1e} | {time.time() - started:.0f}s")  # fmt: skip

    final_images: dict = {}
    for key, method in methods.items():
        count = settings.eig_prompts if key == "share_eig" else settings.prompts
        final_images[key] = {s: method.sample(evaluation, s, count) for s in styles}
        final = {s: evaluation.score(f"{key}/{s}", s, final_images[key][s]) for s in styles}
        entry = {"name": method.name, "final": final, "train_seconds": method.train_seconds}
        if key != "lora":
            entry["after_learning"] = diagonal[key]
            first = {s: final_images[key][s][: settings.diagonal_prompts] for s in styles}
            entry["forgetting"] = {s: diagonal[key][s]["value"] - evaluation.score(f"{key}/{s}", s, first[s])["value"] for s in styles}
        if key in ("share", "share_eig"):
            entry["drift"] = dict(zip(styles, library_drift(method.unet, ours.trained, [ours.ids[s] for s in styles])))
        results["methods"][key] = entry
        log(f"{key} final: " + ", ".join(f"{s} {final[s]['value']:.2f}" for s in styles) + f" | {time.time() - started:.0f}s")

    results["ratio"] = {
        s: asdict(evaluation.measure(s, settings.prompts).strength_ratio(final_images["share"][s], final_images["lora"][s])) for s in styles
    }
    results["validation"] = validate(pipe, evaluation, ours, final_images, settings, log)
    results["plasticity"] = plasticity(pipe, ours, styles[0], settings)
    results["timing"] = {"total_seconds": time.time() - started, "sampling_seconds": evaluation.seconds, "images_sampled": evaluation.images_sampled}
    results["evaluation"] = {"captions": evaluation.captions, "seeds": evaluation.seeds}
    results["_samples"] = {k: {s: v[s][:4] for s in styles} for k, v in final_images.items()} | {"base": evaluation.base[:4]}
    results["_images"] = evaluation.scored
    return results


def validate(pipe, evaluation: Evaluation, ours: ShareMethod, final_images: dict, settings: Settings, log) -> dict:
    """Known cases the measure must order correctly, on the tuning styles (and every style pair)."""
    styles, count = list(settings.styles), settings.validation_prompts
    checked = [s for s in TUNING_STYLES if s in styles]
    out: dict = {"strength_sweep": {}, "closeness_sweep": {}, "distribution_sweep": {}, "capped": {}}
    for style in checked:
        measure = evaluation.measure(style, count)
        images = {0.0: evaluation.base[:count], 1.0: final_images["share"][style][:count]}
        for weight in settings.strengths:
            images[weight] = ours.sample(evaluation, style, count, weight)
            evaluation.scored[f"validation/{style}/weight {weight:g}"] = images[weight]
        images = dict(sorted(images.items()))
        out["strength_sweep"][style] = {w: measure.strength(x).value for w, x in images.items()}
        out["closeness_sweep"][style] = {w: measure.closeness(x).value for w, x in images.items()}
        out["distribution_sweep"][style] = {w: measure.distribution_strength(x) for w, x in images.items()}
        for cap in settings.caps:
            unet = capped_library(pipe.unet, ours.trained, cap, settings.training.rank)
            capped = evaluation.sample(unet, evaluation.prompts(style, count), [{ours.ids[style]: 1.0}] * count)
            drift = library_drift(unet, ours.trained, [ours.ids[style]])[0]
            score = evaluation.score(f"validation/{style}/cap {cap}", style, capped)["value"]
            out["capped"].setdefault(style, {})[cap] = {"score": score, "drift": drift}
        log(f"validation {style}: sweep {out['strength_sweep'][style]}, capped {out['capped'][style]}")
    out["other_styles"] = {
        judged: {made: evaluation.score(f"lora/{made}", made, final_images["lora"][made], against=judged)["value"] for made in styles} for judged in styles
    }
    out["identified"] = {made: max(styles, key=lambda judged: out["other_styles"][judged][made]) for made in styles}
    other_seeds = evaluation.sample(pipe.unet, evaluation.captions, seeds=[1000 + i for i in range(len(evaluation.captions))])
    out["base_other_seeds"] = {s: evaluation.score("validation/base other seeds", s, other_seeds)["value"] for s in styles}
    out["base_style_prompts"] = {
        s: evaluation.score(f"validation/{s}/base", s, evaluation.sample(pipe.unet, evaluation.prompts(s, count)))["value"] for s in checked
    }
    out["references_rerendered"] = {
        s: evaluation.score(f"validation/{s}/references rerendered", s, vae_round_trip(pipe.vae, reference_renders(s, evaluation.captions, jitter_seed=5000)))["value"]
        for s in styles
    }
    return out


def plasticity(pipe, ours: ShareMethod, style: str, settings: Settings) -> dict:
    """The first style trained again, with its own seed and data, into the full library: does
    what it learns depend on what the library holds?"""
    config = settings.training_config(0)
    trained = train_style(pipe, copy_sharing_weights(ours.unet), ours.sets[style], "again", style, config)
    again = trained_factors(trained)
    first = ours.trained[0]
    difference = max(share.relative_error(*first[n], *again[n]) for n in first)
    share.finish_style_training(trained)
    drift = library_drift(trained, [again], ["again"])[0]
    return {"style": style, "library_size": len(ours.trained), "trained_factor_difference": difference, "merge_drift": drift}


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def estimate_text(e: dict) -> str:
    return f"{e['value']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"


def markdown_report(results: dict, settings: Settings, command: str, environment: dict) -> str:
    styles = results["styles"]
    methods = results["methods"]
    v = results["validation"]
    tag = lambda s: f"{s} (tuning)" if s in TUNING_STYLES else s  # noqa: E731
    lines = [
        f"`{command}`", "",
        f"Run {environment['date']} on {environment['machine']} ({environment['cpus']} CPU cores), torch {environment['torch']}, "
        f"{environment['threads']} threads, fp32 training and sampling. Total {results['timing']['total_seconds'] / 60:.1f} min "
        f"({results['timing']['images_sampled']} images sampled in {results['timing']['sampling_seconds'] / 60:.1f} min).", "",
        f"Preset: {settings.training.steps} steps, lr {settings.training.learning_rate:g}, rank {settings.training.rank}, batch "
        f"{settings.training.batch_size}, noise offset {settings.training.noise_offset}; {settings.images_per_style} images per style. "
        f"Sampling: {settings.sampling_steps} DPM-Solver++ steps, guidance {settings.guidance}. Score: paired strength S "
        f"(0 = base model, 1 = the references), bootstrap 95% interval over prompts, n = {settings.prompts} per cell "
        f"(eig: {settings.eig_prompts}).", "",
        "## Validation of the measure (before it judges)", "",
        "| check | style | result |", "|---|---|---|",
    ]  # fmt: skip
    for s, sweep in v["strength_sweep"].items():
        weights = ", ".join(f"{w:g}" for w in sweep)
        lines.append(f"| strength sweep w = {weights}: S | {s} | {', '.join(f'{x:.2f}' for x in sweep.values())} |")
        lines.append(f"| the same images: closeness C | {s} | {', '.join(f'{x:.2f}' for x in v['closeness_sweep'][s].values())} |")
        lines.append(f"| the same images: distribution (MMD) | {s} | {', '.join(f'{x:.2f}' for x in v['distribution_sweep'][s].values())} |")
    for s, caps in v["capped"].items():
        exact = v["strength_sweep"][s][1.0]
        lines.append(f"| capped libraries (drift) vs exact | {s} | " + ", ".join(f"k ≤ {c}: {x['score']:.2f} (drift {x['drift']:.2f})" for c, x in caps.items()) + f"; exact: {exact:.2f} |")
    for s, x in v["base_style_prompts"].items():
        lines.append(f"| base model, style prompts | {s} | {x:.2f} |")
    lines.append("| base model, other seeds | all | " + ", ".join(f"{s} {x:.2f}" for s, x in v["base_other_seeds"].items()) + " |")
    lines.append("| references re-rendered from other scenes | all | " + ", ".join(f"{s} {x:.2f}" for s, x in v["references_rerendered"].items()) + " |")
    off_diagonal = [v["other_styles"][j][m] for j in styles for m in styles if j != m]
    right = sum(v["identified"][m] == m for m in styles)
    lines.append(f"| another style's images | all pairs | mean {np.mean(off_diagonal):.2f}, median {np.median(off_diagonal):.2f}, "
                 f"highest {max(off_diagonal):.2f}; each style's images score highest on its own references for {right} of {len(styles)} |")  # fmt: skip
    lines += ["", "Images of each style (rows, the LoRA's) scored against each style's references (columns):", "",
              "| made \\ judged | " + " | ".join(styles) + " |", "|---|" + "---:|" * len(styles)]  # fmt: skip
    for made in styles:
        lines.append(f"| {made} | " + " | ".join(f"{v['other_styles'][judged][made]:.2f}" for judged in styles) + " |")
    lines += ["", "## Style strength at the end (n per cell as above)", "",
              "| style | " + " | ".join(m["name"] for m in methods.values()) + " | Share / LoRA (paired 95% CI) |",
              "|---|" + "---:|" * (len(methods) + 1)]  # fmt: skip
    for s in styles:
        cells = [estimate_text(m["final"][s]) for m in methods.values()]
        lines.append(f"| {tag(s)} | " + " | ".join(cells) + f" | {estimate_text(results['ratio'][s])} |")
    mean = {k: np.mean([m["final"][s]["value"] for s in styles]) for k, m in methods.items()}
    lines.append("| **mean** | " + " | ".join(f"**{mean[k]:.2f}**" for k in methods) + " | |")
    lines += ["", "## Forgetting", "",
              "| method | weight space: max drift per style | image space: S right after learning − S at the end (n = "
              f"{settings.diagonal_prompts}) |", "|---|---|---|"]  # fmt: skip
    for key in ("share", "share_eig", "sequential_lora"):
        m = methods[key]
        drift = ", ".join(f"{s} {m['drift'][s]:.1e}" for s in styles) if "drift" in m else "— (one LoRA holds every style)"
        lines.append(f"| {m['name']} | {drift} | " + ", ".join(f"{s} {m['forgetting'][s]:+.2f}" for s in styles) + " |")
    p = results["plasticity"]
    lines += ["", f"**Plasticity.** {p['style']} trained again with the same seed and data into the library of "
              f"{p['library_size']} styles: its trained factors differ from the first time by {p['trained_factor_difference']:.1e} "
              f"(relative ΔW), and the merge keeps it to {p['merge_drift']:.1e}.", ""]  # fmt: skip
    lines.append("Training seconds per style: " + ", ".join(f"{m['name']} {np.mean(m['train_seconds']):.0f}" for m in methods.values() if m["train_seconds"]))
    return "\n".join(lines) + "\n"


def save_samples(samples: dict, styles: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ["base", *[k for k in samples if k != "base"]]
    fig, axes = plt.subplots(len(rows), len(styles), figsize=(3.2 * len(styles), 1.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, style in enumerate(styles):
            images = samples[row] if row == "base" else samples[row][style]
            axes[r, c].imshow(np.concatenate(list(images[:4]), 1))
            axes[r, c].set_xticks([]), axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(style, fontsize=8)
            if c == 0:
                axes[r, c].set_ylabel(row, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--quick", action="store_true", help="3 styles, 30 steps, few prompts: a smoke run")
    parser.add_argument("--styles", default=None, help="comma-separated styles to learn, in order (default: all 8)")
    parser.add_argument("--validation-prompts", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None)
    add_output_option(parser, "continual")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings()
    if args.quick:
        settings = replace(settings, **QUICK, training=replace(settings.training, **QUICK_TRAINING))
    if args.styles:
        settings = replace(settings, styles=tuple(args.styles.split(",")))
    if args.validation_prompts:
        settings = replace(settings, validation_prompts=args.validation_prompts)
    args.out.mkdir(parents=True, exist_ok=True)
    results = run_benchmark(settings, args.model)
    samples = results.pop("_samples")
    images = results.pop("_images")
    environment = {
        "date": datetime.date.today().isoformat(), "machine": platform.machine(), "cpus": os.cpu_count(),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }  # fmt: skip
    command = "python -m benchmarks.continual " + " ".join(sys.argv[1:])
    (args.out / "continual.json").write_text(json.dumps({"command": command, "environment": environment, "settings": asdict(settings), **results}, indent=1, default=str))
    (args.out / "continual.md").write_text(markdown_report(results, settings, command, environment))
    save_samples(samples, results["styles"], args.out / "continual_samples.png")
    np.savez_compressed(args.out / "images.npz", **{k: (v * 255).round().astype(np.uint8) for k, v in images.items()})
    print(f"wrote {args.out}/continual.md")


if __name__ == "__main__":
    main()
