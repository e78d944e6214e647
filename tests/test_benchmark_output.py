"""Benchmark runs write to an untracked folder by default, never over the committed results."""

import argparse
from pathlib import Path

from benchmarks.output import RUNS, add_output_option

ROOT = Path(__file__).resolve().parent.parent


def test_the_default_output_folder_is_under_the_ignored_runs_folder():
    parser = argparse.ArgumentParser()
    add_output_option(parser, "perf")
    out = parser.parse_args([]).out
    assert out == ROOT / "runs" / "perf" and out.parent == RUNS
    assert "/runs/" in (ROOT / ".gitignore").read_text().splitlines()
    assert parser.parse_args(["--out", "benchmarks/results"]).out == Path("benchmarks/results")
