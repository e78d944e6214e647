"""Continual style learning benchmark: styles learned one after another, judged by a classifier.

    python -m benchmarks.continual [--quick]

The embedded base model (assets/base-model) learns 8 styles of the procedural world in sequence,
from 12 images each (`world.style_images`, captioned with their plain scenes, the style name as
trigger: `with_trigger(caption, style)`). After each step t, every style s learned so far is
sampled with that style active (4 world captions x 2 seeds, trigger appended), and the style
judge (benchmarks/judge.py, a small CNN trained on procedural renders, never on the generator)
says which fraction of the images is in style s: the accuracy matrix A[t, s].

Methods, all with the same training steps, learning rate, batch, rank and seeds:
  share       ours: Studio's flow. Train the new style on a copy of the UNet (train_style), merge it
              with finish_style_training (thin-SVD merge, analytic re-projection of earlier styles),
              load the merged Share state back; sample with per-item style mixes.
  share_eig   the same trained new-style factors each step (taken from `share` just before its
              merge), merged with the paper's published eig-of-covariance merge
              (benchmarks/eig_baseline.py) with the same basis rank k per layer as ours at that
              step, earlier styles re-read from the eig library itself. Only the merge differs
              (the new style was trained in ours' basis, not in the eig basis).
  lora        one independent PEFT LoRA per style (rank r on to_q/to_k/to_v/to_out.0), fresh for
              each style: the non-continual reference with N files. A style's LoRA never changes
              after its step, so its row entries are copies of A[s, s] (sampling is deterministic).
  naive_lora  one LoRA fine-tuned on style after style (new optimizer each style); every earlier
              style is sampled with the single current LoRA and its own trigger.

Also: content fidelity (world.read_scene of a generated image has the prompted shape's colour and
background as read from the reference render of that scene in that style), storage (the Share
library file with its basis vs N LoRA safetensors files, both float32), trainable parameters and
training time per style, and a sweep: the trained factors re-merged with other basis caps k (ours
and eig; the final library only) and, in the full run, Share retrained with other ranks r.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline

from benchmarks import judge as judge_module
from benchmarks.eig_baseline import eig_merge
from share_diffusion import share, world
from share_diffusion.fingerprint import model_fingerprint
from share_diffusion.images import ImageSet, TrainingImage
from share_diffusion.library import StyleLibrary, new_metadata
from share_diffusion.loading import load_pipeline
from share_diffusion.training import (
    StyleBatches,
    TrainingConfig,
    make_optimizer,
    mixed_precision_for,
    train_style,
    with_trigger,
)

RESULTS = Path(__file__).parent / "results"
DEFAULT_MODEL = Path(__file__).resolve().parent.parent / "assets" / "base-model"
METHODS = ("share", "share_eig", "lora", "naive_lora")
METHOD_NAMES = {
    "share": "Share (ours)",
    "share_eig": "Share + eig merge (published)",
    "lora": "Independent LoRA per style",
    "naive_lora": "One LoRA, fine-tuned in sequence",
}
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Settings:
    styles: tuple[str, ...] = judge_module.JUDGED_STYLES
    images_per_style: int = 12
    image_seed: int = 1000  # style t's training images: world.style_images(style, n, image_seed + t)
    steps: int = 300
    learning_rate: float = 2e-3
    rank: int = 4
    phi: int = 8
    batch_size: int = 8
    seed: int = 0  # style t trains with seed + t
    mixed_precision: str = "auto"  # training (TrainingConfig.mixed_precision)
    sampling_bf16: bool = True  # bf16 autocast while sampling, for every method alike
    max_basis_rank: int = 64
    eval_caption_seed: int = 2026
    eval_captions: int = 4
    eval_seeds: tuple[int, ...] = (0, 1)
    sampling_steps: int = 20
    guidance: float = 4.0
    generation_batch: int = 32
    sweep_caps: tuple[int, ...] = (4, 8, 16, 32, 64)
    sweep_ranks: tuple[int, ...] = ()  # Share retrained with these r (costs 8 trainings per r; --ranks)
    base_style_floor: bool = True  # sample every style's prompts on the base model (no style)

    def training_config(self, t: int, rank: int | None = None) -> TrainingConfig:
        return TrainingConfig(
            steps=self.steps, learning_rate=self.learning_rate, rank=rank or self.rank, phi=self.phi,
            batch_size=self.batch_size, seed=self.seed + t, mixed_precision=self.mixed_precision,
        )  # fmt: skip


# --quick: the same 8 styles, methods and evaluation, but 50 training steps instead of the "quick"
# preset's 300, 12 sampling steps instead of 20, and the cap sweep at k = 8, 16, 32 only.
QUICK = dict(steps=50, sampling_steps=12, sweep_caps=(8, 16, 32))


# ---------------------------------------------------------------------------------------
# Metrics (pure functions, tested on known numbers)
# ---------------------------------------------------------------------------------------


def final_average_accuracy(accuracy: np.ndarray) -> float:
    """Mean over styles of A[T, s] (the last row)."""
    return float(np.nanmean(accuracy[-1]))


def average_forgetting(accuracy: np.ndarray) -> float:
    """Mean over the styles learned before the last step of max_{s <= t < T} A[t, s] - A[T, s].

    accuracy is (T, T) with NaN where t < s (style s not learned yet at step t).
    """
    steps = accuracy.shape[0]
    if steps < 2:
        return 0.0
    drops = [np.nanmax(accuracy[s:-1, s]) - accuracy[-1, s] for s in range(steps - 1)]
    return float(np.mean(drops))


def average_incremental_accuracy(accuracy: np.ndarray) -> float:
    """Mean over steps t of the mean accuracy over styles learned so far."""
    return float(np.mean([np.nanmean(row) for row in accuracy]))


def content_matches(image: np.ndarray, reference: world.Reading) -> dict[str, bool]:
    reading = world.read_scene(image)
    return {
        "colour_and_background": reading.colour == reference.colour and reading.background == reference.background,
        "shape": reading.shape == reference.shape,
    }


# ---------------------------------------------------------------------------------------
# Data, prompts, sampling, judging
# ---------------------------------------------------------------------------------------


def evaluation_captions(count: int, seed: int) -> list[str]:
    """`count` world captions with distinct shapes (fixed by seed)."""
    rng = np.random.default_rng(seed)
    captions, shapes = [], set()
    while len(captions) < count:
        scene = world.sample_scene(rng)
        if scene.shape in shapes and len(shapes) < len(world.SHAPES):
            continue
        shapes.add(scene.shape)
        captions.append(scene.caption())
    return captions


def training_images(style: str, count: int, seed: int) -> ImageSet:
    return ImageSet(
        [TrainingImage(image, Path(f"{style}/{i:02d}.png"), caption) for i, (image, caption) in enumerate(world.style_images(style, count, seed))]
    )


@dataclass
class Prompts:
    prompts: list[str]
    seeds: list[int]
    references: list[world.Reading]  # what read_scene says of the reference render in the style


def style_prompts(style: str | None, captions: list[str], seeds: tuple[int, ...]) -> Prompts:
    """captions x seeds, with the style's trigger (the style name) appended; style None: plain."""
    prompts, all_seeds, references = [], [], []
    for n, caption in enumerate(captions):
        scene = world.parse_caption(caption)
        rng = np.random.default_rng(n)
        reference = world.render(scene) if style is None else world.render_styled(style, scene, rng)
        for seed in seeds:
            prompts.append(caption if style is None else with_trigger(caption, style))
            all_seeds.append(seed)
            references.append(world.read_scene(reference))
    return Prompts(prompts, all_seeds, references)


def copy_sharing_weights(module: torch.nn.Module) -> torch.nn.Module:
    """A deep copy that shares (does not copy) the parameters, like training.training_unet."""
    return copy.deepcopy(module, memo={id(p): p for p in module.parameters()})


@torch.no_grad()
def sample(pipe, unet, prompts: list[str], seeds: list[int], settings: Settings, mixes: list[dict] | None = None) -> np.ndarray:
    """(N, H, W, 3) float images in [0, 1]. mixes: one Share style mix per prompt (Share UNets)."""
    sampler = StableDiffusionPipeline(**{**pipe.components, "unet": unet, "requires_safety_checker": False})
    sampler.set_progress_bar_config(disable=True)
    out = []
    for start in range(0, len(prompts), settings.generation_batch):
        chunk = slice(start, start + settings.generation_batch)
        if mixes is not None:  # classifier-free guidance runs [unconditional; conditional]
            share.set_active_styles(unet, mixes[chunk] + mixes[chunk])
        try:
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.sampling_bf16):
                images = sampler(
                    prompt=prompts[chunk],
                    num_inference_steps=settings.sampling_steps,
                    guidance_scale=settings.guidance,
                    generator=[torch.Generator().manual_seed(s) for s in seeds[chunk]],
                    output_type="np",
                ).images
        finally:
            if mixes is not None:
                share.set_active_styles(unet, None)
        out.append(np.asarray(images, dtype=np.float32))
    return np.concatenate(out)


class Evaluator:
    """Samples a model on styles' prompts and scores the images (style judge + content)."""

    def __init__(self, pipe, judge, settings: Settings):
        self.pipe, self.judge, self.settings = pipe, judge, settings
        self.captions = evaluation_captions(settings.eval_captions, settings.eval_caption_seed)
        self.prompts = {s: style_prompts(s, self.captions, settings.eval_seeds) for s in settings.styles}
        self.plain = style_prompts(None, self.captions, settings.eval_seeds)
        self.images_sampled = 0
        self.seconds = 0.0

    def evaluate(self, unet, styles: list[str], mixes: dict[str, dict] | None = None, keep_images: bool = False) -> dict:
        """{style: {accuracy, predictions, content...}} for each style's prompts on `unet`.

        mixes: style -> Share mix (None: the UNet as it is, e.g. a LoRA)."""
        start = time.time()
        prompts, seeds, item_mixes = [], [], []
        for style in styles:
            prompts += self.prompts[style].prompts
            seeds += self.prompts[style].seeds
            if mixes is not None:
                item_mixes += [mixes[style]] * len(self.prompts[style].prompts)
        images = sample(self.pipe, unet, prompts, seeds, self.settings, item_mixes if mixes is not None else None)
        self.images_sampled += len(images)
        self.seconds += time.time() - start
        results, offset = {}, 0
        for style in styles:
            count = len(self.prompts[style].prompts)
            results[style] = self.score(images[offset : offset + count], style, self.prompts[style].references)
            if keep_images:
                results[style]["images"] = images[offset : offset + count]
            offset += count
        return results

    def score(self, images: np.ndarray, style: str | None, references: list[world.Reading]) -> dict:
        predicted = judge_module.classify(self.judge, images)
        target = style or judge_module.PLAIN
        matches = [content_matches(image, reference) for image, reference in zip(images, references)]
        return {
            "accuracy": float(np.mean([p == target for p in predicted])),
            "predictions": {c: predicted.count(c) for c in sorted(set(predicted))},
            "content": float(np.mean([m["colour_and_background"] for m in matches])),
            "shape": float(np.mean([m["shape"] for m in matches])),
        }

    def evaluate_plain(self, unet, keep_images: bool = False) -> dict:
        start = time.time()
        images = sample(self.pipe, unet, self.plain.prompts, self.plain.seeds, self.settings)
        self.images_sampled += len(images)
        self.seconds += time.time() - start
        result = self.score(images, None, self.plain.references)
        if keep_images:
            result["images"] = images
        return result


# ---------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------


def train_share_style(pipe, share_unet, images: ImageSet, style_id: str, trigger: str, config: TrainingConfig):
    """Studio's flow on `share_unet`: train on a copy, merge, load the state back.

    Returns (the new style's trained factors {layer: (B, A)} with ΔW = B Aᵀ, trainable parameter
    count, merge errors {layer: {style: error}}, seconds of training)."""
    start = time.time()
    trained = train_style(pipe, copy_sharing_weights(share_unet), images, style_id, trigger, config)
    seconds = time.time() - start
    factors, trainable = {}, 0
    with torch.no_grad():
        for name, layer in share.share_layers(trained).items():
            training = layer.style_in_training
            factors_b, factors_a = training.factors(layer.basis_b, layer.basis_a)
            factors[name] = (training.scale * factors_b.detach().clone(), factors_a.detach().clone())
            trainable += sum(p.numel() for p in training.parameters())
    errors = share.finish_style_training(trained)
    share.load_share_state_dict(share_unet, share.share_state_dict(trained))
    share.set_active_styles(share_unet, None)
    return factors, trainable, errors, seconds


def add_lora(unet, rank: int, adapter_name: str = "default"):
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights=True, target_modules=list(share.UNET_TARGET_MODULES)),
        adapter_name=adapter_name,
    )
    return [p for n, p in unet.named_parameters() if "lora_" in n]


def train_lora(pipe, unet, parameters: list, images: ImageSet, trigger: str, config: TrainingConfig) -> float:
    """train_style's loop (same loss, batches, noise, optimizer, clipping, autocast) for PEFT LoRA
    parameters of `unet`; returns seconds. Only `parameters` learn."""
    start = time.time()
    unet.requires_grad_(False)
    for p in parameters:
        p.requires_grad_(True)
    precision = mixed_precision_for(pipe.device, config.mixed_precision)
    autocast = torch.autocast(pipe.device.type, dtype=AUTOCAST_DTYPES.get(precision, torch.bfloat16), enabled=precision in AUTOCAST_DTYPES)
    generator = torch.Generator().manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    unet.train()
    optimizer = make_optimizer(parameters, config)
    batches = StyleBatches(pipe, images, trigger, config, rng, generator)
    for step in range(1, config.steps + 1):
        noisy, timesteps, context, target = batches.next(pipe.device)
        with autocast:
            prediction = unet(noisy, timesteps, encoder_hidden_states=context.to(noisy.dtype)).sample
        loss = F.mse_loss(prediction.float(), target)
        if not torch.isfinite(loss):
            raise RuntimeError(f"LoRA loss became {loss.item()} at step {step}")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    unet.eval()
    for p in parameters:
        p.requires_grad_(False)
    return time.time() - start


def lora_file_bytes(unet) -> int:
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save

    state = {k: v.detach().contiguous() for k, v in get_peft_model_state_dict(unet).items()}
    return len(save(state))


# ---------------------------------------------------------------------------------------
# Share libraries: bytes, drift, eig merges, re-merging with another cap
# ---------------------------------------------------------------------------------------


def library_file_bytes(share_unet, styles: list[str], fingerprint: str, config: share.ShareConfig) -> int:
    """Bytes of the Share Studio library file (share_diffusion.library format) holding these styles."""
    meta = new_metadata("embedded", fingerprint, config)
    meta["styles"] = [{"id": f"s{n + 1}", "name": style, "trigger": style} for n, style in enumerate(styles)]
    meta["next_style_number"] = len(styles) + 1
    state = {f"unet.{k}": v.detach().to(torch.float32).contiguous() for k, v in share.share_state_dict(share_unet).items()}
    return len(StyleLibrary(meta, state).to_bytes())


def library_drift(share_unet, trained: list[dict]) -> dict:
    """Relative error ‖ΔW_s − ΔŴ_s‖/‖ΔW_s‖ of every style in the UNet's library vs as trained,
    over all layers: mean and max."""
    errors = []
    for n, factors in enumerate(trained):
        stored = share.export_style(share_unet, f"s{n + 1}")
        for name, (b, a) in factors.items():
            errors.append(share.relative_error(b, a, *stored[name]))
    return {"mean": float(np.mean(errors)), "max": float(np.max(errors))} if errors else {"mean": 0.0, "max": 0.0}


def library_difference(unet, other, styles: int) -> float:
    """Largest relative difference of any style's ΔW on any layer between two Share UNets."""
    worst = 0.0
    for n in range(styles):
        mine, theirs = share.export_style(unet, f"s{n + 1}"), share.export_style(other, f"s{n + 1}")
        for name, (b, a) in theirs.items():
            worst = max(worst, share.relative_error(b, a, *mine[name]))
    return worst


def basis_ranks(share_unet) -> list[int]:
    return [max(layer.basis_a.shape[1], layer.basis_b.shape[1]) for layer in share.share_layers(share_unet).values()]


@torch.no_grad()
def eig_step(eig_unet, new_factors: dict, ranks: dict[str, int], style_id: str) -> None:
    """Merge a new style into the eig library held by eig_unet's Share layers: earlier styles as
    the eig library itself stores them, the new one as trained; k per layer from `ranks`."""
    for name, layer in share.share_layers(eig_unet).items():
        stored = [layer.style_factors(s) for s in layer.style_ids]  # scale folded into B
        ids = [*layer.style_ids, style_id]
        inputs = stored + [new_factors[name]]
        basis_b, basis_a, loadings_b, loadings_a = eig_merge([b for b, _ in inputs], [a for _, a in inputs], ranks[name])
        layer.load_state(basis_b, basis_a, {s: (lb, la, 1.0) for s, lb, la in zip(ids, loadings_b, loadings_a)})


def remerge(base_unet, trained: list[dict], config: share.ShareConfig, eig: bool) -> torch.nn.Module:
    """A fresh Share UNet with the trained styles merged in order, ours (capped by config) or eig
    (with ours' k per layer under that cap)."""
    ours = copy_sharing_weights(base_unet)
    share.inject_share_layers(ours, config)
    eig_unet = None
    if eig:
        eig_unet = copy_sharing_weights(base_unet)
        share.inject_share_layers(eig_unet, config)
    for n, factors in enumerate(trained):
        style_id = f"s{n + 1}"
        share.add_style(ours, style_id, factors)
        if eig:
            ranks = {name: max(layer.basis_a.shape[1], layer.basis_b.shape[1]) for name, layer in share.share_layers(ours).items()}
            eig_step(eig_unet, factors, ranks, style_id)
    return eig_unet if eig else ours


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------


def empty_matrix(n: int) -> np.ndarray:
    return np.full((n, n), np.nan)


def summarize(method: str, accuracy: np.ndarray, final: dict) -> dict:
    styles = list(final)
    return {
        "name": METHOD_NAMES.get(method, method),
        "accuracy_matrix": [[None if np.isnan(x) else float(x) for x in row] for row in accuracy],
        "final_average_accuracy": final_average_accuracy(accuracy),
        "average_forgetting": average_forgetting(accuracy),
        "average_incremental_accuracy": average_incremental_accuracy(accuracy),
        "content_fidelity": float(np.mean([final[s]["content"] for s in styles])),
        "shape_fidelity": float(np.mean([final[s]["shape"] for s in styles])),
        "final_per_style": {s: {k: v for k, v in final[s].items() if k != "images"} for s in styles},
    }


def run_benchmark(settings: Settings, model: str | os.PathLike, judge, log=print) -> dict:
    """Everything but the report; returns the results dict (plus "_samples" images for the plot)."""
    started = time.time()
    pipe = load_pipeline(str(model), device="cpu", progress=False)
    pipe.unet.requires_grad_(False)
    fingerprint = model_fingerprint(pipe)
    evaluator = Evaluator(pipe, judge, settings)
    styles = list(settings.styles)
    n = len(styles)
    sets = {s: training_images(s, settings.images_per_style, settings.image_seed + t) for t, s in enumerate(styles)}
    share_config = share.ShareConfig(rank=settings.rank, phi=settings.phi, max_basis_rank=settings.max_basis_rank)
    base_unet = pipe.unet
    results: dict = {"methods": {}, "timing": {}}
    samples: dict = {}

    # --- the base model: plain prompts, and every style's prompts without any style -------------
    plain = evaluator.evaluate_plain(base_unet, keep_images=True)
    samples["base"] = plain.pop("images")[:: len(settings.eval_seeds)]
    results["base_model"] = {"plain_prompts": plain}
    log(f"base model: judged plain {plain['accuracy']:.0%}, content {plain['content']:.0%}")
    if settings.base_style_floor:
        floor = evaluator.evaluate(base_unet, styles)
        results["base_model"]["style_prompts"] = floor
        log("base model, style prompts (no style): " + ", ".join(f"{s} {floor[s]['accuracy']:.0%}" for s in styles))

    # --- Share (ours) and Share + eig merge, step by step ----------------------------------------
    share_unet = copy_sharing_weights(base_unet)
    share.inject_share_layers(share_unet, share_config)
    eig_unet = copy_sharing_weights(base_unet)
    share.inject_share_layers(eig_unet, share_config)
    accuracy = {m: empty_matrix(n) for m in METHODS}
    trained_factors: list[dict] = []
    info = {m: {"train_seconds": [], "bytes": [], "trainable_parameters": [], "basis_rank_max": [], "drift": []} for m in METHODS}
    finals: dict = {}
    for t, style in enumerate(styles):
        style_id = f"s{t + 1}"
        factors, trainable, _, seconds = train_share_style(pipe, share_unet, sets[style], style_id, style, settings.training_config(t))
        trained_factors.append(factors)
        ranks = dict(zip(share.share_layers(share_unet), basis_ranks(share_unet)))
        start = time.time()
        eig_step(eig_unet, factors, ranks, style_id)
        eig_seconds = time.time() - start
        learned = styles[: t + 1]
        mixes = {s: {f"s{i + 1}": 1.0} for i, s in enumerate(learned)}
        last = t == n - 1
        for method, unet in (("share", share_unet), ("share_eig", eig_unet)):
            scores = evaluator.evaluate(unet, learned, mixes, keep_images=last)
            for i, s in enumerate(learned):
                accuracy[method][t, i] = scores[s]["accuracy"]
            if last:
                finals[method] = scores
            record = info[method]
            record["train_seconds"].append(seconds if method == "share" else 0.0)
            if method == "share_eig":
                record.setdefault("merge_seconds", []).append(eig_seconds)
            record["bytes"].append(library_file_bytes(unet, learned, fingerprint, share_config))
            record["trainable_parameters"].append(trainable)
            record["basis_rank_max"].append(max(basis_ranks(unet)))
            record["drift"].append(library_drift(unet, trained_factors))
        log(
            f"step {t + 1}/{n} {style}: share trained in {seconds:.0f}s; A[t] share "
            + " ".join(f"{x:.2f}" for x in accuracy["share"][t, : t + 1])
            + " | eig " + " ".join(f"{x:.2f}" for x in accuracy["share_eig"][t, : t + 1])
            + f" | drift share {info['share']['drift'][-1]['mean']:.3f} eig {info['share_eig']['drift'][-1]['mean']:.3f}"
            + f" | {time.time() - started:.0f}s"
        )
    stored_per_style = sum(
        layer.loadings_a[0].numel() + layer.loadings_b[0].numel() + 1 for layer in share.share_layers(share_unet).values()
    )

    # --- independent LoRA per style ---------------------------------------------------------------
    lora_bytes, lora_trainable = [], 0
    for t, style in enumerate(styles):
        unet = copy_sharing_weights(base_unet)
        parameters = add_lora(unet, settings.rank)
        lora_trainable = sum(p.numel() for p in parameters)
        info["lora"]["train_seconds"].append(train_lora(pipe, unet, parameters, sets[style], style, settings.training_config(t)))
        lora_bytes.append(lora_file_bytes(unet))
        info["lora"]["bytes"].append(sum(lora_bytes))
        info["lora"]["trainable_parameters"].append(lora_trainable)
        scores = evaluator.evaluate(unet, [style], keep_images=True)
        accuracy["lora"][t:, t] = scores[style]["accuracy"]  # this LoRA never changes again
        finals.setdefault("lora", {})[style] = scores[style]
        log(f"lora {t + 1}/{n} {style}: {info['lora']['train_seconds'][-1]:.0f}s, accuracy {scores[style]['accuracy']:.2f} | {time.time() - started:.0f}s")
        del unet

    # --- one LoRA fine-tuned style after style ----------------------------------------------------
    naive = copy_sharing_weights(base_unet)
    parameters = add_lora(naive, settings.rank)
    for t, style in enumerate(styles):
        info["naive_lora"]["train_seconds"].append(train_lora(pipe, naive, parameters, sets[style], style, settings.training_config(t)))
        info["naive_lora"]["bytes"].append(lora_file_bytes(naive))
        info["naive_lora"]["trainable_parameters"].append(sum(p.numel() for p in parameters))
        learned = styles[: t + 1]
        scores = evaluator.evaluate(naive, learned, keep_images=t == n - 1)
        for i, s in enumerate(learned):
            accuracy["naive_lora"][t, i] = scores[s]["accuracy"]
        if t == n - 1:
            finals["naive_lora"] = scores
        log(f"naive lora {t + 1}/{n} {style}: A[t] " + " ".join(f"{x:.2f}" for x in accuracy["naive_lora"][t, : t + 1]) + f" | {time.time() - started:.0f}s")
    del naive

    for method in METHODS:
        summary = summarize(method, accuracy[method], finals[method])
        record = info[method]
        summary.update(
            storage_bytes=record["bytes"][-1],
            storage_bytes_per_step=record["bytes"],
            trainable_parameters_per_style=record["trainable_parameters"][-1],
            train_seconds_per_style=record["train_seconds"],
            mean_train_seconds_per_style=float(np.mean(record["train_seconds"])),
        )
        if method in ("share", "share_eig"):
            summary.update(
                basis_rank_max_per_step=record["basis_rank_max"],
                drift_per_step=record["drift"],
                stored_parameters_per_style=stored_per_style,
            )
        if method == "share_eig":
            summary["merge_seconds_per_style"] = record["merge_seconds"]
            summary["trained_by"] = "share (the same new-style factors; only the merge differs)"
        if method == "lora":
            summary["stored_parameters_per_style"] = lora_trainable
            summary["file_bytes_per_style"] = lora_bytes
        if method == "naive_lora":
            summary["stored_parameters_per_style"] = lora_trainable
        results["methods"][method] = summary
        samples[method] = {s: finals[method][s]["images"][:: len(settings.eval_seeds)] for s in styles}

    # --- sweep: the trained factors re-merged with other caps k (final library only) --------------
    sweep = []
    for cap in settings.sweep_caps:
        config = replace(share_config, max_basis_rank=cap)
        for variant in ("share", "share_eig"):
            start = time.time()
            unet = remerge(base_unet, trained_factors, config, eig=variant == "share_eig")
            merge_seconds = time.time() - start
            main_unet = share_unet if variant == "share" else eig_unet
            difference = library_difference(unet, main_unet, len(styles))
            if difference < 1e-5:  # the very same library as the main run: same images, reuse them
                scores = finals[variant]
            else:
                scores = evaluator.evaluate(unet, styles, {s: {f"s{i + 1}": 1.0} for i, s in enumerate(styles)})
            entry = {
                "variant": variant, "cap": cap, "rank": settings.rank,
                "final_average_accuracy": float(np.mean([scores[s]["accuracy"] for s in styles])),
                "content_fidelity": float(np.mean([scores[s]["content"] for s in styles])),
                "storage_bytes": library_file_bytes(unet, styles, fingerprint, config),
                "basis_rank_max": max(basis_ranks(unet)),
                "drift": library_drift(unet, trained_factors),
                "merge_seconds": merge_seconds,
                "same_as_main_run": difference < 1e-5,
                "difference_from_main_run": difference,
                "per_style_accuracy": {s: scores[s]["accuracy"] for s in styles},
            }  # fmt: skip
            sweep.append(entry)
            log(f"sweep {variant} k<={cap}: accuracy {entry['final_average_accuracy']:.2f}, drift {entry['drift']['mean']:.3f}, {entry['storage_bytes'] / 1e3:.0f} kB | {time.time() - started:.0f}s")
            del unet

    # --- sweep: Share retrained with other ranks r (final library only) -------------------------
    for rank in settings.sweep_ranks:
        config = replace(share_config, rank=rank)
        unet = copy_sharing_weights(base_unet)
        share.inject_share_layers(unet, config)
        seconds = []
        for t, style in enumerate(styles):
            *_, spent = train_share_style(pipe, unet, sets[style], f"s{t + 1}", style, settings.training_config(t, rank=rank))
            seconds.append(spent)
        mixes = {s: {f"s{i + 1}": 1.0} for i, s in enumerate(styles)}
        scores = evaluator.evaluate(unet, styles, mixes)
        entry = {
            "variant": "share", "cap": settings.max_basis_rank, "rank": rank, "retrained": True,
            "final_average_accuracy": float(np.mean([scores[s]["accuracy"] for s in styles])),
            "content_fidelity": float(np.mean([scores[s]["content"] for s in styles])),
            "storage_bytes": library_file_bytes(unet, styles, fingerprint, config),
            "basis_rank_max": max(basis_ranks(unet)),
            "mean_train_seconds_per_style": float(np.mean(seconds)),
            "per_style_accuracy": {s: scores[s]["accuracy"] for s in styles},
        }  # fmt: skip
        sweep.append(entry)
        log(f"sweep share r={rank}: accuracy {entry['final_average_accuracy']:.2f}, {entry['storage_bytes'] / 1e3:.0f} kB | {time.time() - started:.0f}s")
        del unet

    results["sweep"] = sweep
    results["timing"] = {
        "total_seconds": time.time() - started,
        "sampling_seconds": evaluator.seconds,
        "images_sampled": evaluator.images_sampled,
    }
    results["evaluation"] = {"captions": evaluator.captions, "seeds": list(settings.eval_seeds)}
    results["_samples"] = samples
    return results


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def fmt_bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.0f} kB"


def matrix_table(matrix: list[list], styles: list[str]) -> str:
    lines = ["| after step | " + " | ".join(styles) + " |", "|---|" + "---:|" * len(styles)]
    for t, row in enumerate(matrix):
        cells = ["" if x is None else f"{x:.2f}" for x in row]
        lines.append(f"| {t + 1} {styles[t]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown_report(results: dict, settings: Settings, command: str, environment: dict, judge_report: dict, prefix: Path) -> str:
    styles = list(settings.styles)
    methods = results["methods"]
    base = results["base_model"]
    n = len(styles)
    lines = [
        f"`{command}`",
        "",
        f"Run {environment['date']} on {environment['machine']} ({environment['cpus']} CPU cores), torch "
        f"{environment['torch']}, {environment['threads']} torch threads (OMP_WAIT_POLICY {environment.get('omp_wait_policy', '(default)')}), training autocast: "
        f"{environment['training_precision']}, sampling autocast: {'bf16' if settings.sampling_bf16 else 'none'}. "
        f"Total {results['timing']['total_seconds'] / 60:.1f} min ({results['timing']['images_sampled']} images sampled "
        f"in {results['timing']['sampling_seconds'] / 60:.1f} min). Load average at the start / end: "
        f"{environment['load_start']} / {environment['load_end']}.",
        "",
        f"**Setup.** Base model `{environment['model']}`. {n} styles learned in this order: {', '.join(styles)}; "
        f"{settings.images_per_style} training images each (`world.style_images`, plain-scene captions + "
        f"`with_trigger(caption, style)`). Every method: {settings.steps} steps, batch {settings.batch_size}, "
        f"learning rate {settings.learning_rate:g}, rank r = {settings.rank} (Share: φ = {settings.phi}, "
        f"cap k ≤ {settings.max_basis_rank}), seed {settings.seed} + t for style t. Evaluation after every step: "
        f"{settings.eval_captions} world captions × {len(settings.eval_seeds)} seeds per learned style, trigger appended, "
        f"{settings.sampling_steps} DPM-Solver++ steps, guidance {settings.guidance:g}. Captions: "
        + "; ".join(f"“{c}”" for c in results["evaluation"]["captions"])
        + ".",
        "",
        f"**Judge** (`benchmarks/judge.py`): a 4-layer CNN trained on procedural renders only (classes: plain + "
        f"{len(judge_module.CLASSES) - 1} styles, {judge_report['training_images']} images), held-out accuracy "
        f"{judge_report['held_out_accuracy_clean']:.1%} on clean renders, {judge_report['held_out_accuracy_augmented']:.1%} "
        f"with blur/noise/shift ({judge_report['held_out_images']} images){', cached weights' if judge_report.get('cached') else ''}. "
        "`invert` and `checker` are not used: part of their images are indistinguishable from plain scenes "
        f"(see judge.py). On the base model, plain prompts are judged plain {base['plain_prompts']['accuracy']:.0%} of the time.",
        "",
        "## Results",
        "",
        "| method | final avg accuracy | avg forgetting | avg incremental accuracy | content fidelity (colour + background) "
        "| shape read back | storage (all styles) | trainable params / style | stored params / style | train s / style |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in METHODS:
        m = methods[method]
        train = f"{m['mean_train_seconds_per_style']:.0f}" if method != "share_eig" else "(share's)"
        lines.append(
            f"| {m['name']} | {m['final_average_accuracy']:.2f} | {m['average_forgetting']:.2f} "
            f"| {m['average_incremental_accuracy']:.2f} | {m['content_fidelity']:.2f} | {m['shape_fidelity']:.2f} "
            f"| {fmt_bytes(m['storage_bytes'])} | {m['trainable_parameters_per_style']:,} | {m['stored_parameters_per_style']:,} | {train} |"
        )
    plain = base["plain_prompts"]
    floor = base.get("style_prompts")
    if floor:
        above = [s for s in styles if floor[s]["accuracy"] > 0]
        if above:
            index = lines.index("## Results")
            lines[index:index] = [
                "**Floor.** Without any style, the base model's images for the prompts of "
                + ", ".join(f"{s} ({floor[s]['accuracy']:.2f})" for s in above)
                + " are already judged in that style: accuracy up to that level is not evidence of learning.",
                "",
            ]
    floor_text = f"{np.mean([floor[s]['accuracy'] for s in styles]):.2f}" if floor else "—"
    if floor:
        lines.append(
            f"| Base model, no style (style prompts) | {floor_text} | | | {np.mean([floor[s]['content'] for s in styles]):.2f} "
            f"| {np.mean([floor[s]['shape'] for s in styles]):.2f} | 0 | | | |"
        )
    lines.append(f"| Base model, plain prompts | (plain: {plain['accuracy']:.2f}) | | | {plain['content']:.2f} | {plain['shape']:.2f} | 0 | | | |")
    lines += [
        "",
        "*Final avg accuracy*: mean over styles of A[T, s], the fraction of style s's images the judge calls style s "
        "after the last step. *Avg forgetting*: mean over the first T−1 styles of max_{t<T} A[t, s] − A[T, s]. "
        "*Content fidelity*: fraction of the final images whose `world.read_scene` colour and background equal those "
        "read from the reference render of the prompted scene in that style (for the base model: the plain render). "
        "*Storage*: the Share Studio library file (float32, basis counted, JSON header included) vs the sum of the "
        "LoRA safetensors files (float32, PEFT keys). *Trainable params / style*: Share trains its loadings and the φ "
        "new basis directions per side; it stores only the loadings (k × r per side and layer) once merged. "
        "The eig row reuses Share's trained factors (no training of its own) and has the same k per layer, hence "
        "the same storage; its per-style merge costs "
        f"{np.mean(methods['share_eig']['merge_seconds_per_style']):.2f} s.",
        "",
        "Share's library drift (‖ΔW_s − ΔŴ_s‖/‖ΔW_s‖ vs the style as trained, mean over styles and layers) after each "
        "step: ours " + ", ".join(f"{d['mean']:.3f}" for d in methods["share"]["drift_per_step"])
        + "; eig " + ", ".join(f"{d['mean']:.3f}" for d in methods["share_eig"]["drift_per_step"])
        + ". Basis rank k (widest layer) after each step: "
        + ", ".join(str(k) for k in methods["share"]["basis_rank_max_per_step"]) + ".",
        "",
        "## Accuracy matrices A[t, s]",
        "",
    ]
    for method in METHODS:
        lines += [f"**{methods[method]['name']}**", "", matrix_table(methods[method]["accuracy_matrix"], styles), ""]
    if floor:
        lines += [
            "Base model without any style, style prompts (judge accuracy per style, the floor): "
            + ", ".join(f"{s} {floor[s]['accuracy']:.2f}" for s in styles) + ".",
            "",
        ]
    lines += ["What the judge says of the final images (counts per predicted class, per style):", ""]
    lines += ["| method | " + " | ".join(styles) + " |", "|---|" + "---|" * n]
    for method in METHODS:
        cells = [
            ", ".join(f"{c} {k}" for c, k in methods[method]["final_per_style"][s]["predictions"].items()) for s in styles
        ]
        lines.append(f"| {methods[method]['name']} | " + " | ".join(cells) + " |")
    lines += ["", "## Sweep: storage vs quality", ""]
    sweep = results["sweep"]
    if sweep:
        lines += [
            "Cap sweep: the same trained factors (from the Share run) merged again in order with cap k "
            "(ours and eig, eig with ours' k per layer), the final library only. Rank sweep (when listed): Share "
            "retrained from scratch with rank r. Drift: as above, final library. Where the re-merged library equals "
            "the main run's final library (every style's ΔW within 1e-5), its images are the main run's and are not "
            "sampled again.",
            "",
            "| merge | cap k | r | k reached | final avg accuracy | content fidelity | drift mean / max | library bytes |",
            "|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for e in sweep:
            drift = f"{e['drift']['mean']:.3f} / {e['drift']['max']:.3f}" if "drift" in e else "(retrained)"
            name = "ours" if e["variant"] == "share" else "eig"
            if e.get("same_as_main_run"):
                name += " (= main run's library)"
            lines.append(
                f"| {name}{' (retrained)' if e.get('retrained') else ''} | {e['cap']} | {e['rank']} | {e['basis_rank_max']} "
                f"| {e['final_average_accuracy']:.2f} | {e['content_fidelity']:.2f} | {drift} | {fmt_bytes(e['storage_bytes'])} |"
            )
        if not settings.sweep_ranks:
            lines += ["", f"The rank r was not swept in this run (each r costs {n} more trainings; `--ranks 2,8` adds it)."]
    else:
        lines.append("No sweep in this run.")
    lines += [
        "",
        f"Plots: `{prefix.name}_accuracy.png` (accuracy matrices), `{prefix.name}_tradeoff.png` (storage vs final accuracy), "
        f"`{prefix.name}_samples.png` (one final image per style and caption, seed 0).",
    ]
    return "\n".join(lines) + "\n"


def plot(results: dict, settings: Settings, prefix: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    styles = list(settings.styles)
    methods = results["methods"]
    figure, axes = plt.subplots(2, 2, figsize=(9.5, 9.5))
    for axis, method in zip(axes.flat, METHODS):
        matrix = np.array([[np.nan if x is None else x for x in row] for row in methods[method]["accuracy_matrix"]])
        axis.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
        for t in range(len(styles)):
            for s in range(t + 1):
                if not np.isnan(matrix[t, s]):
                    axis.text(s, t, f"{matrix[t, s]:.2f}", ha="center", va="center", fontsize=7, color="w" if matrix[t, s] < 0.6 else "k")
        axis.set_xticks(range(len(styles)), styles, rotation=60, fontsize=7)
        axis.set_yticks(range(len(styles)), [f"{t + 1}" for t in range(len(styles))], fontsize=7)
        axis.set_xlabel("style s")
        axis.set_ylabel("after step t")
        m = methods[method]
        axis.set_title(f"{m['name']}\navg {m['final_average_accuracy']:.2f}, forgetting {m['average_forgetting']:.2f}", fontsize=9)
    figure.tight_layout()
    figure.savefig(f"{prefix}_accuracy.png", dpi=110, bbox_inches="tight")
    plt.close(figure)

    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    markers = {"share": "o", "share_eig": "s", "lora": "^", "naive_lora": "v"}
    for method in METHODS:
        m = methods[method]
        axis.scatter(m["storage_bytes"], m["final_average_accuracy"], marker=markers[method], s=60, label=m["name"], zorder=3)
    for variant, label in (("share", "ours, cap sweep"), ("share_eig", "eig, cap sweep")):
        points = sorted((e["storage_bytes"], e["final_average_accuracy"], e["cap"]) for e in results["sweep"] if e["variant"] == variant and not e.get("retrained"))
        if points:
            axis.plot([p[0] for p in points], [p[1] for p in points], "--", marker=markers[variant], alpha=0.6, label=label)
            labels: dict = {}
            for x, y, cap in points:
                labels.setdefault((x, y), []).append(str(cap))
            for (x, y), caps in labels.items():
                axis.annotate("k≤" + "/".join(caps), (x, y), fontsize=7, xytext=(3, 3 if variant == "share" else -9), textcoords="offset points")
    retrained = [e for e in results["sweep"] if e.get("retrained")]
    for e in retrained:
        axis.scatter(e["storage_bytes"], e["final_average_accuracy"], marker="D", color="k", s=30)
        axis.annotate(f"ours r={e['rank']}", (e["storage_bytes"], e["final_average_accuracy"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    axis.set_xscale("log")
    axis.set_xlabel("storage for all styles (bytes, float32)")
    axis.set_ylabel("final average judge accuracy")
    axis.set_ylim(-0.03, 1.03)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7)
    axis.set_title(f"{len(styles)} styles: storage vs quality")
    figure.tight_layout()
    figure.savefig(f"{prefix}_tradeoff.png", dpi=110, bbox_inches="tight")
    plt.close(figure)

    samples = results.get("_samples")
    if samples:
        rows = [(methods[m]["name"], m) for m in METHODS]
        figure, axes = plt.subplots(len(rows) + 1, len(styles), figsize=(2.3 * len(styles), 0.75 * (len(rows) + 1) + 0.6))
        for c, style in enumerate(styles):
            for r, (label, method) in enumerate(rows, start=1):
                axis = axes[r, c]
                axis.imshow(np.concatenate(list(samples[method][style]), axis=1))
                axis.set_xticks([])
                axis.set_yticks([])
                if r == 1:
                    axis.set_title(style, fontsize=8)
                if c == 0:
                    axis.set_ylabel(label, fontsize=6, rotation=0, ha="right", va="center")
            axes[0, c].axis("off")
        axes[0, 0].axis("on")
        axes[0, 0].imshow(np.concatenate(list(samples["base"]), axis=1))
        axes[0, 0].set_xticks([])
        axes[0, 0].set_yticks([])
        axes[0, 0].set_ylabel("base model,\nplain prompts", fontsize=6, rotation=0, ha="right", va="center")
        figure.tight_layout()
        figure.savefig(f"{prefix}_samples.png", dpi=100, bbox_inches="tight")
        plt.close(figure)


def write_report(results: dict, settings: Settings, command: str, environment: dict, judge_report: dict, prefix: Path) -> str:
    prefix.parent.mkdir(parents=True, exist_ok=True)
    markdown = markdown_report(results, settings, command, environment, judge_report, prefix)
    Path(f"{prefix}.md").write_text(markdown)
    public = {k: v for k, v in results.items() if not k.startswith("_")}
    payload = dict(command=command, environment=environment, settings=asdict(settings), judge=judge_report, **public)
    Path(f"{prefix}.json").write_text(json.dumps(payload, indent=1) + "\n")
    plot(results, settings, prefix)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"fewer training and sampling steps, cap sweep only ({QUICK})")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--steps", type=int, default=None, help="training steps per style (overrides)")
    parser.add_argument("--styles", type=int, default=None, help="use the first N judged styles")
    parser.add_argument("--no-sweep", action="store_true")
    parser.add_argument("--ranks", type=str, default="", help="also retrain Share with these ranks, e.g. 2,8 (8 trainings each)")
    parser.add_argument("--out", type=Path, default=None, help="output prefix (default benchmarks/results/continual[_quick])")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings(**(QUICK if args.quick else {}))
    if args.steps:
        settings = replace(settings, steps=args.steps)
    if args.styles:
        settings = replace(settings, styles=settings.styles[: args.styles])
    if args.ranks:
        settings = replace(settings, sweep_ranks=tuple(int(r) for r in args.ranks.split(",")))
    if args.no_sweep:
        settings = replace(settings, sweep_caps=(), sweep_ranks=())
    prefix = args.out or RESULTS / ("continual_quick" if args.quick else "continual")
    command = "python -m benchmarks.continual" + (" " + " ".join(argv if argv is not None else sys.argv[1:])).rstrip()
    environment = dict(
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=f"{platform.machine()} {platform.processor() or ''}".strip(),
        cpus=os.cpu_count(),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        training_precision=mixed_precision_for(torch.device("cpu"), settings.mixed_precision),
        python=platform.python_version(),
        model=str(args.model),
        load_start=" ".join(f"{x:.1f}" for x in os.getloadavg()),
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(default)"),
    )
    judge, judge_report = judge_module.load_or_train_judge()
    results = run_benchmark(settings, args.model, judge)
    environment["load_end"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    print(write_report(results, settings, command, environment, judge_report, prefix))


if __name__ == "__main__":
    main()
