"""Where a benchmark run writes (an untracked folder under ``runs/``, never the committed
results), and the options every run shares.

The results in ``benchmarks/results/`` are committed; a run only replaces them when someone copies
its output there on purpose (or passes ``--out benchmarks/results``).
"""

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import torch

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


def save_run(out: Path, benchmark: str, argv: list[str] | None, report: Callable[[dict, str], str], results: dict) -> None:
    """write_results of a run of ``python -m benchmarks.<benchmark> <argv>`` (the command heads the
    report and the JSON), and say where."""
    command = f"python -m benchmarks.{benchmark} " + " ".join(sys.argv[1:] if argv is None else argv)
    write_results(out, benchmark, report(results, command), {"command": command, **results})
    print(f"wrote {out}/{benchmark}.md")


def parse_run_options(parser: argparse.ArgumentParser, benchmark: str, argv: list[str] | None) -> argparse.Namespace:
    """The options, with ``--out`` (add_output_option) and ``--threads N`` (torch's CPU threads, set here)."""
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    add_output_option(parser, benchmark)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    return args

