"""Which style do the images show? The continual benchmark's images scored again, with S and S*.

S (style_measure.StyleMeasure) is how far images moved toward one style's references; S*
(style_measure.StyleSpace) is the same style's weight when the move is written as a mix of all
eight styles' ways, so what styles share counts for none of them. This reads the images a
continual run saved (`images.npz`) and trains nothing:

  python -m benchmarks.specificity --images runs/continual6/images.npz

Every check of the measure is scored both ways, with 95% bootstrap intervals over prompts; the
differences (a sweep's steps, exact against capped) are paired on the same prompts.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch

from benchmarks.continual import TUNING_STYLES
from benchmarks.output import add_output_option, save_run
from share_diffusion.style_measure import Estimate, StyleMeasure, StyleSpace, bootstrap_rows

class Scores:
    """S and S* of saved images on their first len(images) prompts, and paired differences."""

    def __init__(self, saved: dict[str, np.ndarray]):
        self.saved = saved
        self.styles = [k.split("/", 1)[1] for k in saved if k.startswith("references/")]
        self.base = self.images("base")
        self.space = StyleSpace(self.base, {s: self.images(f"references/{s}") for s in self.styles})
        self.measures: dict[tuple[str, int], StyleMeasure] = {}

    def images(self, key: str) -> np.ndarray:
        return self.saved[key].astype(np.float32) / 255

    def variants(self, style: str, kind: str) -> list[str]:
        """The weights ("weight") or caps ("cap") the run saved validation images of, in order."""
        prefix = f"validation/{style}/{kind} "
        return sorted((k.removeprefix(prefix) for k in self.saved if k.startswith(prefix)), key=float)

    def sweep(self, style: str) -> dict[str, np.ndarray]:
        """The strength sweep: the base model at w = 0, the final library's images at w = 1."""
        weighted = {w: self.images(f"validation/{style}/weight {w}") for w in self.variants(style, "weight")}
        count = len(next(iter(weighted.values())))
        weighted |= {"0": self.base[:count], "1": self.images(f"share/{style}")[:count]}
        return dict(sorted(weighted.items(), key=lambda item: float(item[0])))

    def statistics(self, images: np.ndarray, style: str):
        """S and S* of `style` as functions of resampled prompt indices."""
        count = len(images)
        if (style, count) not in self.measures:
            self.measures[style, count] = StyleMeasure(self.base[:count], self.images(f"references/{style}")[:count])
        measure, t = self.measures[style, count], self.styles.index(style)
        progress, lengths = measure.progress(measure.embed(images)), measure.way_lengths
        mixed = self.space.progress(images)
        return {
            "S": lambda i: progress[i].sum(-1) / lengths[i].sum(-1),
            "S*": lambda i: self.space.mix(mixed, i)[..., t],
        }

    def score(self, images: np.ndarray, style: str) -> dict[str, Estimate]:
        return {name: estimate(statistic, len(images)) for name, statistic in self.statistics(images, style).items()}

    def difference(self, first: np.ndarray, second: np.ndarray, style: str) -> dict[str, Estimate]:
        """score(first) − score(second) on the same prompts, with a paired interval."""
        a, b = self.statistics(first, style), self.statistics(second, style)
        return {name: estimate(lambda i, n=name: a[n](i) - b[n](i), len(first)) for name in a}

    def ratio(self, first: np.ndarray, second: np.ndarray, style: str) -> dict[str, Estimate]:
        """score(first) / score(second) on the same prompts, with a paired interval."""
        a, b = self.statistics(first, style), self.statistics(second, style)
        return {name: estimate(lambda i, n=name: a[n](i) / b[n](i), len(first)) for name in a}


BLENDS = (0.25, 0.5, 0.75, 1.0)


def nearest_style(space, style: str) -> str:
    """The style whose way points most nearly along `style`'s (cosine over all prompts)."""
    products, t = space.way_products.sum(0), space.styles.index(style)
    cosine = products[t] / (products.diagonal() * products[t, t]).sqrt()
    return max((s for s in space.styles if s != style), key=lambda s: float(cosine[space.styles.index(s)]))


def known_mixtures(scores: Scores) -> dict:
    """Pixel blends whose style is known, of each style's re-rendered references: with the base
    model's images (a from 0 to 1 of the style), and with the nearest style's (a of that style)."""
    out = {}
    for style in scores.styles:
        own = scores.images(f"validation/{style}/references rerendered")
        near = nearest_style(scores.space, style)
        other = scores.images(f"validation/{near}/references rerendered")
        blends = [(1 - a) * scores.base + a * own for a in (0.0, *BLENDS)]
        steps = [scores.difference(after, before, style) for before, after in zip(blends, blends[1:])]
        out[style] = {
            "from_base": {str(a): scores.score(blend, style) for a, blend in zip(BLENDS, blends[1:])},
            "smallest_step": {name: min((step[name] for step in steps), key=lambda e: e.value) for name in ("S", "S*")},
            "toward": near,
            "toward_nearest": {
                str(a): {"own": scores.score(blend, style)["S*"], "nearest": scores.score(blend, near)["S*"]}
                for a in BLENDS[:-1]
                for blend in [(1 - a) * own + a * other]
            },
        }
    return out


def estimate(statistic, count: int) -> Estimate:
    low, high = bootstrap_rows(statistic, count)
    return Estimate(float(statistic(torch.arange(count))), float(low), float(high), count)


def cross_scores(scores: Scores, key: str) -> dict[str, dict[str, dict[str, Estimate]]]:
    """made -> judged -> {S, S*}: every style's images (key.format(made)) against every style's references."""
    return {made: {judged: scores.score(scores.images(key.format(made)), judged) for judged in scores.styles} for made in scores.styles}


def off_diagonal(cross: dict, name: str) -> dict:
    values = [cross[m][j][name].value for m in cross for j in cross if m != j]
    own = sum(max(cross[m], key=lambda j: cross[m][j][name].value) == m for m in cross)
    return {"mean": float(np.mean(values)), "max": float(np.max(values)), "own_highest": own, "styles": len(cross)}


def run(saved: dict[str, np.ndarray]) -> dict:
    scores = Scores(saved)
    styles, tuning = scores.styles, [s for s in TUNING_STYLES if s in scores.styles]
    results: dict = {"styles": styles, "tuning_styles": tuning, "unique_fraction": scores.space.unique_fraction()}
    results["known_mixtures"] = known_mixtures(scores)
    sweeps = {s: scores.sweep(s) for s in tuning}
    results["sweep"] = {s: {w: scores.score(images, s) for w, images in sweep.items()} for s, sweep in sweeps.items()}
    results["sweep_steps"] = {
        s: {f"{a} -> {b}": scores.difference(sweep[b], sweep[a], s) for a, b in zip(sweep, list(sweep)[1:])} for s, sweep in sweeps.items()
    }
    results["exact_minus_capped"] = {
        s: {cap: scores.difference(sweeps[s]["1"], scores.images(f"validation/{s}/cap {cap}"), s) for cap in scores.variants(s, "cap")}
        for s in tuning
    }
    other_seeds = scores.images("validation/base other seeds")
    results["base_other_seeds"] = {s: scores.score(other_seeds, s) for s in styles}
    results["base_style_prompts"] = {s: scores.score(scores.images(f"validation/{s}/base"), s) for s in tuning}
    results["references_rerendered"] = cross_scores(scores, "validation/{}/references rerendered")
    results["lora_images"] = cross_scores(scores, "lora/{}")
    results["summary"] = {
        check: {name: off_diagonal(results[check], name) for name in ("S", "S*")} for check in ("references_rerendered", "lora_images")
    }
    methods = ("share", "lora", "sequential_lora")
    results["final"] = {m: {s: scores.score(scores.images(f"{m}/{s}"), s) for s in styles} for m in methods}
    results["ratio"] = {s: scores.ratio(scores.images(f"share/{s}"), scores.images(f"lora/{s}"), s) for s in styles}
    results["forgetting"] = {
        m: {s: scores.difference(after := scores.images(f"{m}/after_learning/{s}"), scores.images(f"{m}/{s}")[: len(after)], s) for s in styles}
        for m in ("share", "sequential_lora")
    }
    return results


def cell(estimates: dict[str, Estimate]) -> str:
    return " / ".join(f"{e.value:.2f} [{e.low:.2f}, {e.high:.2f}]" for e in estimates.values())


def markdown_report(results: dict, command: str) -> str:
    styles, tuning = results["styles"], results["tuning_styles"]
    count = lambda estimates: next(iter(estimates.values())).count  # noqa: E731
    lines = [
        f"`{command}`", "",
        "Each cell: S / S*, with 95% bootstrap intervals over prompts (n per row). S: movement toward the "
        "style's references (0 = base model, 1 = references). S*: the style's weight when the movement is "
        "written as a mix of all eight styles' ways. Differences and ratios are paired on the same prompts. "
        f"Tuning styles: {', '.join(tuning)}; the others only report.", "",
        "How much of each style's way no other style's explains (‖own part‖² / ‖way‖²): "
        + ", ".join(f"{s} {v:.2f}" for s, v in results["unique_fraction"].items()), "",
        "## Known mixtures: pixel blends of re-rendered references", "",
        "| style | base → style, a = " + ", ".join(map(str, BLENDS)) + ": S / S* | toward the nearest style, a = "
        + ", ".join(map(str, BLENDS[:-1])) + ": S* own / S* nearest | smallest step up in a, paired: S / S* |",
        "|---|---|---|---|",
    ]
    for s, mixture in results["known_mixtures"].items():
        from_base = ", ".join(f"{e['S'].value:.2f} / {e['S*'].value:.2f}" for e in mixture["from_base"].values())
        toward = ", ".join(f"{e['own'].value:.2f} / {e['nearest'].value:.2f}" for e in mixture["toward_nearest"].values())
        lines.append(f"| {s} | {from_base} | {mixture['toward']}: {toward} | {cell(mixture['smallest_step'])} |")
    lines += [
        "",
        "## Checks of the measure on generated images", "",
        "| check | style | n | S / S* |", "|---|---|---:|---|",
    ]
    for s in tuning:
        for w, e in results["sweep"][s].items():
            lines.append(f"| strength sweep, w = {w} | {s} | {count(e)} | {cell(e)} |")
        for step, e in results["sweep_steps"][s].items():
            lines.append(f"| sweep step w {step}, paired difference | {s} | {count(e)} | {cell(e)} |")
        for cap, e in results["exact_minus_capped"][s].items():
            lines.append(f"| exact library − library capped at k ≤ {cap}, paired | {s} | {count(e)} | {cell(e)} |")
    for s in tuning:
        e = results["base_style_prompts"][s]
        lines.append(f"| base model, the style's prompts | {s} | {count(e)} | {cell(e)} |")
    for s in styles:
        e = results["base_other_seeds"][s]
        lines.append(f"| base model, plain captions, other seeds | {s} | {count(e)} | {cell(e)} |")
    for s in styles:
        e = results["references_rerendered"][s][s]
        lines.append(f"| own references, re-rendered from other scenes | {s} | {count(e)} | {cell(e)} |")
    for check, label in (("references_rerendered", "other styles' re-rendered references"), ("lora_images", "other styles' images (the LoRA's)")):
        summary = results["summary"][check]
        lines.append(
            f"| {label} against a style's references: mean, max of {len(styles) * (len(styles) - 1)} pairs; own style highest | all | 64 | "
            + " / ".join(f"{v['mean']:.2f}, {v['max']:.2f}; {v['own_highest']} of {v['styles']}" for v in summary.values()) + " |"
        )
    lines += ["", "## Each style's images (rows, the LoRA's) against each style's references (columns): S*", "",
              "| made \\ judged | " + " | ".join(styles) + " |", "|---|" + "---:|" * len(styles)]  # fmt: skip
    for made in styles:
        lines.append(f"| {made} | " + " | ".join(f"{results['lora_images'][made][j]['S*'].value:.2f}" for j in styles) + " |")
    lines += ["", "## Style strength at the end, S*", "",
              "| style | Share (ours) | independent LoRA | one LoRA fine-tuned in sequence | Share / LoRA, paired |",
              "|---|---:|---:|---:|---:|"]  # fmt: skip
    for s in styles:
        final = {m: results["final"][m][s]["S*"] for m in results["final"]}
        lines.append(f"| {s} | " + " | ".join(str(e).rsplit(" (", 1)[0] for e in final.values()) + f" | {str(results['ratio'][s]['S*']).rsplit(' (', 1)[0]} |")
    means = {m: np.mean([results["final"][m][s]["S*"].value for s in styles]) for m in results["final"]}
    lines.append("| **mean** | " + " | ".join(f"**{v:.2f}**" for v in means.values()) + " | |")
    lines += ["", "## Forgetting in image space: the score right after learning − at the end, paired (the run's first prompts): S / S*", "",
              "| style | " + " | ".join(results["forgetting"]) + " |", "|---|" + "---|" * len(results["forgetting"])]  # fmt: skip
    for s in styles:
        lines.append(f"| {s} | " + " | ".join(cell(results["forgetting"][m][s]) for m in results["forgetting"]) + " |")
    return "\n".join(lines) + "\n"


def as_plain(value):
    """Estimates as dicts, for JSON."""
    if isinstance(value, Estimate):
        return {"value": value.value, "low": value.low, "high": value.high, "count": value.count}
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    return value


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=Path, required=True, help="images.npz of a continual run")
    add_output_option(parser, "specificity")
    args = parser.parse_args(argv)
    with np.load(args.images) as saved:
        results = run(dict(saved))
    save_run(args.out, "specificity", argv, lambda _, command: markdown_report(results, command), as_plain(results))


if __name__ == "__main__":
    main()
