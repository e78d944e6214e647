"""Where a benchmark run writes: an untracked folder under ``runs/``, never the committed results.

The results in ``benchmarks/results/`` are committed; a run only replaces them when someone copies
its output there on purpose (or passes ``--out benchmarks/results``).
"""

import argparse
import json
from pathlib import Path

RUNS = Path(__file__).resolve().parent.parent / "runs"


def run_dir(benchmark: str) -> Path:
    """The default output folder of a benchmark: ``runs/<benchmark>/`` (git ignores ``runs/``)."""
    return RUNS / benchmark


def add_output_option(parser: argparse.ArgumentParser, benchmark: str) -> None:
    """``--out DIR``, by default :func:`run_dir` of `benchmark`."""
    parser.add_argument(
        "--out", type=Path, default=run_dir(benchmark),
        help=f"results folder (default: runs/{benchmark}/, untracked; copy results into benchmarks/results/ on purpose)",
    )


def write_results(out: Path, benchmark: str, markdown: str, results: dict) -> None:
    """``<out>/<benchmark>.md`` (the report) and ``<out>/<benchmark>.json`` (everything measured)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{benchmark}.md").write_text(markdown)
    (out / f"{benchmark}.json").write_text(json.dumps(results, indent=1) + "\n")
