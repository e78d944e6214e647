"""Known drift on every style: does the measure score a drifted library lower? (issue #16)

    python -m benchmarks.known_drift [--factors FILE] [--prompts 32] [--threads N] [--out DIR]

The continual benchmark's 8 styles as trained (benchmarks.drift_bytes --trained keeps them in
trained_factors.safetensors; trained here if the file is missing) are merged in order into an
exact library and into libraries whose basis is capped at k ≤ 4 and k ≤ 8, which drift every
style by a known amount (relative ΔW error, reported). Each style is drawn from each library on
the same prompts and seeds as the continual benchmark, and scored with S and S* (benchmarks/
specificity.py); exact − capped is a paired difference with its 95% bootstrap interval. The
continual run checked this on the two tuning styles only; here it is every style.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np

from benchmarks.continual import DEFAULT_MODEL, Evaluation, Settings, capped_library, library_drift
from benchmarks.drift_bytes import trained_layers
from benchmarks.output import RUNS, parse_run_options, save_run
from benchmarks.specificity import Scores
from share_diffusion.loading import load_pipeline

CAPS = (4, 8)


def run(settings: Settings, factors_path: Path, prompts: int, caps=CAPS, model=DEFAULT_MODEL, log=print) -> dict:
    started = time.time()
    pipe = load_pipeline(str(model), device="cpu", progress=False)
    pipe.unet.requires_grad_(False)
    layers = trained_layers(factors_path)
    styles = list(settings.styles)
    trained = [{layer: per_style[t] for layer, (_, per_style) in layers.items()} for t in range(len(styles))]
    ids = [f"s{t + 1}" for t in range(len(styles))]
    evaluation = Evaluation(pipe, replace(settings, prompts=prompts), log)
    saved = {"base": evaluation.base, **{f"references/{s}": r for s, r in evaluation.references.items()}}
    drift: dict = {}
    for cap in (None, *caps):
        label = "exact" if cap is None else f"cap {cap}"
        unet = capped_library(pipe.unet, trained, cap, settings.training.rank)
        drift[label] = dict(zip(styles, library_drift(unet, trained, ids)))
        for style, style_id in zip(styles, ids):
            saved[f"{label}/{style}"] = evaluation.sample(unet, evaluation.prompts(style, prompts), [{style_id: 1.0}] * prompts)
        log(f"{label}: sampled, largest drift {max(drift[label].values()):.2e} | {time.time() - started:.0f} s")
    scores = Scores({key: (images * 255).round().astype(np.uint8) for key, images in saved.items()})
    results: dict = {"styles": styles, "prompts": prompts, "drift": drift, "score": {}, "exact_minus_capped": {}}
    for style in styles:
        exact = scores.images(f"exact/{style}")
        results["score"][style] = {label: {n: asdict(e) for n, e in scores.score(scores.images(f"{label}/{style}"), style).items()}
                                   for label in drift}  # fmt: skip
        results["exact_minus_capped"][style] = {
            f"cap {cap}": {n: asdict(e) for n, e in scores.difference(exact, scores.images(f"cap {cap}/{style}"), style).items()}
            for cap in caps
        }
    results["seconds"] = time.time() - started
    return results


def markdown_report(results: dict, command: str) -> str:
    caps = list(next(iter(results["exact_minus_capped"].values())))
    cell = lambda e: f"{e['value']:.2f} [{e['low']:.2f}, {e['high']:.2f}]"  # noqa: E731
    lines = [
        f"`{command}`", "",
        f"Total {results['seconds'] / 60:.1f} min. n = {results['prompts']} prompts per cell (the continual benchmark's "
        "captions and seeds). Drift: the style's largest relative ΔW error over layers in that library. "
        "S / S*: exact library − capped library, paired on the same prompts, 95% bootstrap.", "",
        "| style | exact: S / S* | " + " | ".join(f"{c}: drift; exact − capped, S / S*" for c in caps) + " |",
        "|---|---|" + "---|" * len(caps),
    ]  # fmt: skip
    for style in results["styles"]:
        exact = results["score"][style]["exact"]
        row = [f"{exact['S']['value']:.2f} / {exact['S*']['value']:.2f}"]
        for cap in caps:
            difference = results["exact_minus_capped"][style][cap]
            row.append(f"{results['drift'][cap][style]:.2f}; {cell(difference['S'])} / {cell(difference['S*'])}")
        lines.append(f"| {style} | " + " | ".join(row) + " |")
    for name in ("S", "S*"):
        lower = sum(results["exact_minus_capped"][s][c][name]["low"] > 0 for s in results["styles"] for c in caps)
        lines.append("")
        lines.append(f"{name}: the capped library scores lower, its interval above 0, in {lower} of "
                     f"{len(results['styles']) * len(caps)} (style, cap) cases.")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--factors", type=Path, default=RUNS / "drift_bytes_trained" / "trained_factors.safetensors",
                        help="the trained styles (benchmarks.drift_bytes --trained writes them; trained here if missing)")
    parser.add_argument("--prompts", type=int, default=32)
    args = parse_run_options(parser, "known_drift", argv)
    results = run(Settings(), args.factors, args.prompts)
    save_run(args.out, "known_drift", argv, markdown_report, results)


if __name__ == "__main__":
    main()
