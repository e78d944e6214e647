"""Memory benchmark: does peak memory of training grow with the training set? (issue #21)

    python -m benchmarks.memory [--quick] [--threads N] [--out DIR]

Results go to runs/memory/ (memory.md, memory.json) unless --out says otherwise.

Each case is its own process (``python -m benchmarks.memory --case N``), so the peak resident set
it reports (``ru_maxrss``) is its own. A case builds the model on the CPU, loads N images from PNG
files (twice the training resolution, as users' images are larger) through load_training_images,
and trains a Share style for 2 steps with train_style (batch 1, fp32, no previews), which first
encodes every image through latent_cache.encode_images. The bar: 64 images peak at most 1.20 × 8.

  full     the SD1.5 architecture with random weights (benchmarks/random_pipeline.py), 256×256 images
  --quick  the embedded model (assets/base-model) at 64×64: checks that the benchmark runs, in
           seconds; it measures nothing about SD1.5
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from benchmarks.output import add_output_option, write_results

IMAGE_COUNTS = (8, 64)
BAR = 1.20  # issue #21: 64 images may raise peak memory by at most 20% over 8
RESOLUTION = {False: 256, True: 64}  # quick -> training resolution
TRIGGER = "memorybench"


def peak_rss_mib() -> float:
    """This process's peak resident set so far, in MiB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_images(folder: Path, count: int, side: int, seed: int = 0) -> None:
    """`count` PNG files of random pixels, `side` × `side`."""
    rng = np.random.default_rng(seed)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (side, side, 3), dtype=np.uint8)).save(folder / f"{i:03d}.png", compress_level=1)


def measure_case(image_folder: Path, count: int, quick: bool) -> dict:
    """Peak RSS after each phase of one training on the first `count` images of `image_folder`.

    Meant to run alone in its process (see run_case): the peaks are the process's.
    """
    import torch

    from share_diffusion import share
    from share_diffusion.images import load_training_images
    from share_diffusion.training import TrainingConfig, train_style, training_unet

    peaks, seconds = {"start": peak_rss_mib()}, {}
    mark = time.perf_counter()

    def phase_done(name: str) -> None:
        nonlocal mark
        peaks[name], seconds[name] = peak_rss_mib(), time.perf_counter() - mark
        mark = time.perf_counter()

    if quick:
        from share_diffusion.loading import load_pipeline

        pipe = load_pipeline(None, device="cpu", dtype="fp32", progress=False)
    else:
        from benchmarks.random_pipeline import random_pipeline

        pipe = random_pipeline("sd15", "cpu", torch.float32)
    phase_done("model")

    files = sorted(image_folder.glob("*.png"))[:count]
    images = load_training_images(files, resolution=RESOLUTION[quick]).require_some()
    phase_done("images")

    config = TrainingConfig(steps=2, batch_size=1, strength_previews=0, mixed_precision="no")
    unet = training_unet(pipe)
    share.inject_share_layers(unet, share.ShareConfig(rank=config.rank))
    train_style(pipe, unet, images, "memory", TRIGGER, config)
    phase_done("training")
    return dict(images=len(images.images), resolution=RESOLUTION[quick], peak_mib=peaks, seconds=seconds)


def run_case(image_folder: Path, count: int, quick: bool, threads: int | None = None) -> dict:
    """measure_case in a fresh process (``--case``), so that its peak is its own; returns its result."""
    command = [sys.executable, "-m", "benchmarks.memory", "--case", str(count), "--images", str(image_folder)]
    command += (["--quick"] if quick else []) + (["--threads", str(threads)] if threads else [])
    root = Path(__file__).resolve().parent.parent
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run(command, cwd=root, env=environment, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def markdown_report(results: dict) -> str:
    cases = results["cases"]
    lines = [
        "| images | after building the model (MiB) | after loading the images (MiB) | peak: + encoding + 2 steps (MiB) | seconds |",
        "|---:|---:|---:|---:|---:|",
    ]
    for case in cases:
        peak, seconds = case["peak_mib"], sum(case["seconds"].values())
        lines.append(f"| {case['images']} | {peak['model']:.0f} | {peak['images']:.0f} | {peak['training']:.0f} | {seconds:.0f} |")
    small, large = cases[0], cases[-1]
    growth = large["peak_mib"]["training"] - small["peak_mib"]["training"]
    ratio = results["ratio"]
    return "\n\n".join(
        [
            f"`{results['command']}`",
            f"Date {results['date']}; torch {results['environment']['torch']}, {results['environment']['threads']} "
            f"torch threads, {results['environment']['cpu_count']} cores, Python {results['environment']['python']}; "
            f"model: {results['model']}; {small['resolution']}×{small['resolution']} images, CPU, fp32.",
            "Peak resident set (ru_maxrss) of one process per case: build the model, load the images "
            "(load_training_images, from PNG files twice that size), train a Share style for 2 steps "
            "(train_style, batch 1, which first encodes every image with latent_cache.encode_images, 8 at a time).",
            "\n".join(lines),
            f"**Peak with {large['images']} images / with {small['images']}: {ratio:.3f}** (bar: at most {BAR:.2f}: "
            f"{'met' if ratio <= BAR else 'NOT met'}); {growth:+.0f} MiB in all, "
            f"{growth / (large['images'] - small['images']):+.2f} MiB per extra image.",
        ]
    ) + "\n"


def run_benchmark(command: str, quick: bool, threads: int | None = None, counts: tuple[int, ...] = IMAGE_COUNTS) -> dict:
    """Every case of `counts` in its own process, on one folder of images; the results for the report."""
    import torch

    with tempfile.TemporaryDirectory() as folder:
        write_images(Path(folder), max(counts), 2 * RESOLUTION[quick])
        cases = []
        for count in counts:
            cases.append(run_case(Path(folder), count, quick, threads))
            print(f"{count} images: peak {cases[-1]['peak_mib']['training']:.0f} MiB", flush=True)
    return dict(
        command=command,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        model="the embedded model (assets/base-model)" if quick else "SD1.5 architecture, random weights (benchmarks/random_pipeline.py)",
        environment=dict(
            torch=torch.__version__,
            threads=threads or torch.get_num_threads(),
            cpu_count=os.cpu_count(),
            python=platform.python_version(),
        ),
        cases=cases,
        ratio=cases[-1]["peak_mib"]["training"] / cases[0]["peak_mib"]["training"],
        bar=BAR,
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="the embedded model at 64×64 instead of SD1.5 at 256×256")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--case", type=int, default=None, help=argparse.SUPPRESS)  # one case, in this process
    parser.add_argument("--images", type=Path, default=None, help=argparse.SUPPRESS)  # its image folder
    add_output_option(parser, "memory")
    args = parser.parse_args(argv)
    if args.case is not None:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        print(json.dumps(measure_case(args.images, args.case, args.quick)))
        return

    command = "python -m benchmarks.memory" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(command, flush=True)
    results = run_benchmark(command, args.quick, args.threads)
    markdown = markdown_report(results)
    write_results(args.out, "memory", markdown, results)
    print(markdown)


if __name__ == "__main__":
    main()
