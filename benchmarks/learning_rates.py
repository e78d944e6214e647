"""The learning-rate sweep behind the embedded model's presets: each tuning style learned alone, by
Share and by a LoRA, at each learning rate, scored as in benchmarks/continual.py.

    python -m benchmarks.learning_rates [--quick] [--out runs/learning_rates]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace

import torch

from benchmarks.continual import (
    DEFAULT_MODEL,
    QUICK,
    QUICK_TRAINING,
    TUNING_STYLES,
    Evaluation,
    LoraMethod,
    Settings,
    ShareMethod,
    training_images,
)
from benchmarks.output import add_output_option
from share_diffusion.loading import load_pipeline

LEARNING_RATES = (1e-3, 2e-3, 4e-3)


def learning_rate_sweep(pipe, evaluation: Evaluation, settings: Settings, prompts: int, log, styles=TUNING_STYLES,
                        rates=LEARNING_RATES) -> dict:
    """S of each tuning style learned alone at each rate, with the closeness C of the same images
    (C falls again once a style overshoots its references, where S keeps rising)."""
    out: dict = {}
    for style in (s for s in styles if s in settings.styles):
        sets = {style: training_images(style, settings.images_per_style, settings.image_seed + settings.styles.index(style))}
        for rate in rates:
            tuned = replace(settings, training=replace(settings.training, learning_rate=rate))
            for method in (ShareMethod(pipe, tuned, sets), LoraMethod(pipe, tuned, sets)):
                method.learn(settings.styles.index(style), style)
                images = method.sample(evaluation, style, prompts)
                score = evaluation.score(f"{method.name}/{style}/lr {rate:g}", style, images)
                score["closeness"] = evaluation.measure(style, prompts).closeness(images).value
                out.setdefault(style, {}).setdefault(method.name, {})[rate] = score
                log(f"sweep {style} lr {rate:g} {method.name}: {score['value']:.2f} [{score['low']:.2f}, {score['high']:.2f}], C {score['closeness']:.2f}")
    return out


def markdown_report(results: dict, command: str) -> str:
    rates = results["learning_rates"]
    lines = [f"`{command}`", "", f"Total {results['seconds'] / 60:.1f} min.", "",
             f"## Learning-rate sweep (tuning styles, each learned alone; n = {results['sweep_prompts']})", "",
             "Each cell: the strength S [95% CI], then the closeness C of the same images.", "",
             "| style | method | " + " | ".join(f"lr {r:g}" for r in rates) + " |",
             "|---|---|" + "---:|" * len(rates)]  # fmt: skip
    for style, methods in results["sweep"].items():
        for name, scores in methods.items():
            cells = [f"{s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}], C {s['closeness']:.2f}" for s in scores.values()]
            lines.append(f"| {style} | {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep-prompts", type=int, default=32)
    parser.add_argument("--sweep-styles", default=",".join(TUNING_STYLES), help="tuning styles to sweep (comma-separated)")
    parser.add_argument("--learning-rates", default=",".join(map(str, LEARNING_RATES)), help="comma-separated")
    parser.add_argument("--seed", type=int, default=0, help="training seed (initial factors, batches, noise)")
    parser.add_argument("--threads", type=int, default=None)
    add_output_option(parser, "learning_rates")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = Settings()
    settings = replace(settings, training=replace(settings.training, seed=args.seed))
    if args.quick:
        settings = replace(settings, **QUICK, training=replace(settings.training, **QUICK_TRAINING))
        args.sweep_prompts = settings.prompts
    started = time.time()
    pipe = load_pipeline(args.model, device="cpu", progress=False)
    pipe.unet.requires_grad_(False)
    evaluation = Evaluation(pipe, replace(settings, prompts=args.sweep_prompts))
    rates = [float(rate) for rate in args.learning_rates.split(",")]
    results = {
        "settings": asdict(settings), "sweep_prompts": args.sweep_prompts, "learning_rates": rates,
        "sweep": learning_rate_sweep(pipe, evaluation, settings, args.sweep_prompts, print, args.sweep_styles.split(","), rates),
    }
    results["seconds"] = time.time() - started
    command = "python -m benchmarks.learning_rates " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_rates.json").write_text(json.dumps({"command": command, **results}, indent=1, default=str))
    (args.out / "learning_rates.md").write_text(markdown_report(results, command))
    print(f"wrote {args.out}/learning_rates.md")


if __name__ == "__main__":
    main()
