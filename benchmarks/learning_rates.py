"""The continual benchmark's two other parts: a learning-rate sweep per method on the tuning styles,
and one LoRA fine-tuned style after style (the forgetting baseline).

    python -m benchmarks.learning_rates [--quick] [--out runs/learning_rates]

Sweep: each tuning style learned alone, by Share and by a LoRA, at each learning rate; scored as in
benchmarks/continual.py on `sweep_prompts` prompts. Sequential LoRA: one PEFT LoRA trained on every
style in turn (a new optimizer per style); each style scored right after it was learned and at the
end, with its own trigger.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, replace

import numpy as np

from benchmarks.continual import (
    DEFAULT_MODEL,
    QUICK,
    QUICK_TRAINING,
    TUNING_STYLES,
    Evaluation,
    LoraMethod,
    Settings,
    ShareMethod,
    train_lora,
    training_images,
)
from benchmarks.output import add_output_option
from share_diffusion.loading import load_pipeline

LEARNING_RATES = (1e-3, 2e-3, 4e-3)


def learning_rate_sweep(pipe, evaluation: Evaluation, settings: Settings, prompts: int, log, styles=TUNING_STYLES) -> dict:
    out: dict = {}
    for style in (s for s in styles if s in settings.styles):
        sets = {style: training_images(style, settings.images_per_style, settings.image_seed + settings.styles.index(style))}
        for rate in LEARNING_RATES:
            tuned = replace(settings, training=replace(settings.training, learning_rate=rate))
            for method in (ShareMethod(pipe, tuned, sets), LoraMethod(pipe, tuned, sets)):
                method.learn(settings.styles.index(style), style)
                score = evaluation.score(style, method.sample(evaluation, style, prompts))
                out.setdefault(style, {}).setdefault(method.name, {})[rate] = score
                log(f"sweep {style} lr {rate:g} {method.name}: {score['value']:.2f} [{score['low']:.2f}, {score['high']:.2f}]")
    return out


def sequential_lora(pipe, evaluation: Evaluation, settings: Settings, diagonal_prompts: int, final_prompts: int, log) -> dict:
    """One LoRA trained on every style in turn; S right after each style and at the end."""
    styles = list(settings.styles)
    sets = {s: training_images(s, settings.images_per_style, settings.image_seed + t) for t, s in enumerate(styles)}
    method = LoraMethod(pipe, settings, sets)
    method.learn(0, styles[0])
    unet = method.unets[styles[0]]
    parameters = [p for n, p in unet.named_parameters() if "lora_" in n]
    after_learning = {styles[0]: evaluation.score(styles[0], evaluation.sample(unet, evaluation.prompts(styles[0], diagonal_prompts)))}
    for t, style in enumerate(styles[1:], start=1):
        train_lora(pipe, unet, parameters, sets[style], style, settings.training_config(t))
        after_learning[style] = evaluation.score(style, evaluation.sample(unet, evaluation.prompts(style, diagonal_prompts)))
        log(f"sequential lora {t + 1}/{len(styles)} {style}: {after_learning[style]['value']:.2f}")
    final_images = {s: evaluation.sample(unet, evaluation.prompts(s, final_prompts)) for s in styles}
    final = {s: evaluation.score(s, images) for s, images in final_images.items()}
    # the first prompts are the ones scored right after learning: same prompts, seeds and measure
    forgetting = {s: after_learning[s]["value"] - evaluation.score(s, final_images[s][:diagonal_prompts])["value"] for s in styles}
    return {"after_learning": after_learning, "final": final, "forgetting": forgetting}


def markdown_report(results: dict, command: str) -> str:
    lines = [f"`{command}`", "", f"Total {results['seconds'] / 60:.1f} min.", "",
             f"## Learning-rate sweep (tuning styles, each learned alone; n = {results['sweep_prompts']})", "",
             "| style | method | " + " | ".join(f"lr {r:g}" for r in LEARNING_RATES) + " |",
             "|---|---|" + "---:|" * len(LEARNING_RATES)]  # fmt: skip
    for style, methods in results["sweep"].items():
        for name, scores in methods.items():
            lines.append(f"| {style} | {name} | " + " | ".join(f"{s['value']:.2f} [{s['low']:.2f}, {s['high']:.2f}]" for s in scores.values()) + " |")
    seq = results.get("sequential_lora")
    if seq is None:
        return "\n".join(lines + ["", "One LoRA fine-tuned in sequence: not run (--no-sequential)."]) + "\n"
    lines += ["", f"## One LoRA fine-tuned in sequence (n = {results['final_prompts']} at the end, "
              f"{results['diagonal_prompts']} right after learning)", "",
              "| style | right after learning | at the end | forgetting |", "|---|---:|---:|---:|"]  # fmt: skip
    for s, final in seq["final"].items():
        after = seq["after_learning"][s]
        lines.append(f"| {s} | {after['value']:.2f} | {final['value']:.2f} [{final['low']:.2f}, {final['high']:.2f}] | {seq['forgetting'][s]:+.2f} |")
    lines.append(f"| **mean** | | **{np.mean([f['value'] for f in seq['final'].values()]):.2f}** | **{np.mean(list(seq['forgetting'].values())):+.2f}** |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL))
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sweep-prompts", type=int, default=32)
    parser.add_argument("--diagonal-prompts", type=int, default=16)
    parser.add_argument("--final-prompts", type=int, default=32)
    parser.add_argument("--sweep-styles", default=",".join(TUNING_STYLES), help="tuning styles to sweep (comma-separated)")
    parser.add_argument("--no-sequential", action="store_true", help="skip the sequentially fine-tuned LoRA")
    add_output_option(parser, "learning_rates")
    args = parser.parse_args(argv)
    settings = Settings()
    if args.quick:
        settings = replace(settings, **QUICK, training=replace(settings.training, **QUICK_TRAINING))
        args.sweep_prompts = args.diagonal_prompts = args.final_prompts = settings.prompts
    started = time.time()
    pipe = load_pipeline(args.model, device="cpu", progress=False)
    pipe.unet.requires_grad_(False)
    evaluation = Evaluation(pipe, replace(settings, prompts=max(args.sweep_prompts, args.final_prompts)))
    results = {
        "settings": asdict(settings), "sweep_prompts": args.sweep_prompts, "diagonal_prompts": args.diagonal_prompts,
        "final_prompts": args.final_prompts,
        "sweep": learning_rate_sweep(pipe, evaluation, settings, args.sweep_prompts, print, args.sweep_styles.split(",")),
    }  # fmt: skip
    if not args.no_sequential:
        results["sequential_lora"] = sequential_lora(pipe, evaluation, settings, args.diagonal_prompts, args.final_prompts, print)
    results["seconds"] = time.time() - started
    command = "python -m benchmarks.learning_rates " + " ".join(sys.argv[1:])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "learning_rates.json").write_text(json.dumps({"command": command, **results}, indent=1, default=str))
    (args.out / "learning_rates.md").write_text(markdown_report(results, command))
    print(f"wrote {args.out}/learning_rates.md")


if __name__ == "__main__":
    main()
