"""The text-encoder learning rate of the embedded model's presets (issue #19): each tuning style
learned alone with the quick preset, its text encoder's attention learning too at each rate (0: the
UNet alone), scored with S and S* as in benchmarks/continual.py and benchmarks/specificity.py.

    python -m benchmarks.text_encoder_lr [--quick] [--rates 0,0.001,0.004] [--threads N] [--out DIR]

The rule, fixed before the run: the rate with the highest mean S over the tuning styles; the lower
one when two are within 0.02 (the rule that chose the UNet's rate, benchmarks/learning_rates.py).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace

import numpy as np
import torch

from benchmarks.continual import DEFAULT_MODEL, QUICK, QUICK_TRAINING, TUNING_STYLES, Evaluation, Settings, training_images
from benchmarks.output import parse_run_options, save_run
from share_diffusion import share
from share_diffusion.loading import load_pipeline
from share_diffusion.style_measure import StyleSpace
from share_diffusion.training import copy_sharing_weights, train_style

RATES = (0.0, 1e-3, 4e-3)
CLOSE = 0.02  # the rule's tie margin


def learn(pipe, settings: Settings, style: str, rate: float):
    """The style trained alone at the quick preset, its text encoder at `rate`: (unet, the text
    encoder that learned it, or None at rate 0)."""
    config = replace(settings.training_config(settings.styles.index(style)), text_encoder_lr=rate)
    models = {"unet": copy_sharing_weights(pipe.unet)}
    share.inject_share_layers(models["unet"], share.ShareConfig(rank=config.rank))
    if rate > 0:
        models["text_encoder"] = copy_sharing_weights(pipe.text_encoder)
        share.inject_share_layers(models["text_encoder"], share.ShareConfig(rank=config.rank, target_modules=share.CLIP_TARGET_MODULES))
    images = training_images(style, settings.images_per_style, settings.image_seed + settings.styles.index(style))
    train_style(pipe, models["unet"], images, "s1", style, config, text_encoders={c: m for c, m in models.items() if c != "unet"})
    for model in models.values():
        share.finish_style_training(model)
    return models["unet"], models.get("text_encoder")


def run(settings: Settings, model: str, rates: tuple[float, ...], prompts: int, log=print) -> dict:
    started = time.time()
    torch.manual_seed(0)
    pipe = load_pipeline(model, device="cpu", progress=False)
    pipe.unet.requires_grad_(False), pipe.text_encoder.requires_grad_(False)
    evaluation = Evaluation(pipe, settings, log)
    space = StyleSpace(evaluation.base[:prompts], {s: r[:prompts] for s, r in evaluation.references.items()})
    styles = [s for s in TUNING_STYLES if s in settings.styles]
    scores: dict = {}
    for style in styles:
        for rate in rates:
            start = time.time()
            unet, text_encoder = learn(pipe, settings, style, rate)
            seconds = time.time() - start
            images = evaluation.sample(unet, evaluation.prompts(style, prompts), [{"s1": 1.0}] * prompts, text_encoder=text_encoder)
            scores.setdefault(style, {})[rate] = {
                "S": evaluation.score(f"{style}/text encoder lr {rate:g}", style, images),
                "S*": asdict(space.specific_strength(images)[style]),
                "train_seconds": seconds,
            }
            log(f"{style} text-encoder lr {rate:g}: S {scores[style][rate]['S']['value']:.2f}, S* {scores[style][rate]['S*']['value']:.2f}, "
                f"{seconds:.0f} s | {time.time() - started:.0f} s")  # fmt: skip
    means = {rate: float(np.mean([scores[s][rate]["S"]["value"] for s in styles])) for rate in rates}
    best = max(means.values())
    chosen = min(rate for rate in rates if means[rate] >= best - CLOSE)
    return {"styles": styles, "rates": list(rates), "prompts": prompts, "scores": scores, "mean_S": means, "chosen": chosen,
            "unet_learning_rate": settings.training.learning_rate, "seconds": time.time() - started}  # fmt: skip


def markdown_report(results: dict, command: str) -> str:
    rates = results["rates"]
    lines = [
        f"`{command}`", "", f"Total {results['seconds'] / 60:.1f} min. Each tuning style learned alone with the quick preset "
        f"(UNet lr {results['unet_learning_rate']:g}), its text encoder's attention Share layers at each rate (0: frozen). "
        f"n = {results['prompts']} prompts per cell; S [95% CI] / S*.", "",
        "| style | " + " | ".join(f"text-encoder lr {r:g}" for r in rates) + " |", "|---|" + "---:|" * len(rates),
    ]  # fmt: skip
    for style, by_rate in results["scores"].items():
        cells = [f"{v['S']['value']:.2f} [{v['S']['low']:.2f}, {v['S']['high']:.2f}] / {v['S*']['value']:.2f}" for v in by_rate.values()]
        lines.append(f"| {style} | " + " | ".join(cells) + " |")
    lines.append("| **mean S** | " + " | ".join(f"**{results['mean_S'][r]:.2f}**" for r in rates) + " |")
    lines += ["", f"The rule (highest mean S, the lower rate within {CLOSE}) chooses **{results['chosen']:g}**."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--quick", action="store_true", help="30 steps, 8 prompts: a smoke run")
    parser.add_argument("--rates", default=",".join(map(str, RATES)), help="comma-separated text-encoder learning rates")
    parser.add_argument("--prompts", type=int, default=32)
    args = parse_run_options(parser, "text_encoder_lr", argv)
    settings, prompts = Settings(), args.prompts
    if args.quick:
        settings, prompts = replace(settings, **QUICK, training=replace(settings.training, **QUICK_TRAINING)), 8
    settings = replace(settings, prompts=prompts)
    results = run(settings, args.model, tuple(float(r) for r in args.rates.split(",")), prompts)
    save_run(args.out, "text_encoder_lr", argv, markdown_report, results)


if __name__ == "__main__":
    main()
