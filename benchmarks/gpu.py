"""GPU benchmark, prepared for a lent GPU: SD1.5 at 512×512 in fp16 (issues #21 and #18).

    python -m benchmarks.gpu [--family sd15] [--steps 30] [--rounds 5] [--out DIR]

Results go to runs/gpu/ (gpu.md, gpu.json) unless --out says otherwise. It needs CUDA and stops at
once without it (exit 1). On one H200 it should take about 2 minutes, imports included; it is
sized to stay well under 8.

The pipeline is SD1.5 with random weights (benchmarks/sd15.py), built on the GPU in fp16; speed and
memory do not depend on the weights.

  training    seconds per optimizer step and peak CUDA memory of a Share style (train_style) and
              of a PEFT LoRA of the same rank on the same targets (benchmarks.continual.add_lora,
              train_lora), both in the one loop training.fit: the checkpoint "quick" preset (rank 4,
              batch 4), fp16 autocast with a gradient scaler, trainable parameters in fp32, 8
              training images of random pixels; the first WARMUP_STEPS steps are not timed.
  generation  seconds per 512×512 image (generate_images, the pipeline's PNDM, classifier-free
              guidance) of the base UNet, of the Share UNet with no style active and with the
              trained style active (unfused, as the app generates), interleaved round by round
              after one warm-up image each.

SDXL at 1024 px (--family sdxl) is not prepared yet (SDXL trains since issue #18 part 2; its
benchmark here is the next part of #18) and exits 2.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.output import add_output_option, write_results

FAMILIES = ("sd15", "sdxl")
SDXL_NOT_SUPPORTED = "benchmarks.gpu --family sdxl (1024 px): not prepared yet: the SDXL part of issue #18 still to do"
WARMUP_STEPS = 5
TRAINING_IMAGES = 8
STYLE = "gpubench"  # the trained style's id and trigger word
PROMPT = "a red circle on a blue background"


def require_cuda() -> None:
    """Stop at once, with the reason, where there is no CUDA device."""
    if not torch.cuda.is_available():
        raise SystemExit(
            f"benchmarks.gpu needs a CUDA GPU, and torch {torch.__version__} sees none "
            f"(torch.cuda.is_available() is False; CUDA build: {torch.version.cuda or 'none'}). Run it on a GPU machine."
        )


def random_images(count: int, side: int, seed: int = 0):
    """An ImageSet of `count` random-pixel `side`×`side` images (what they show does not matter here)."""
    from share_diffusion.images import ImageSet, TrainingImage

    rng = np.random.default_rng(seed)
    pixels = (rng.integers(0, 256, (side, side, 3), dtype=np.uint8) for _ in range(count))
    return ImageSet(images=[TrainingImage(Image.fromarray(p), Path(f"random{i}.png"), None) for i, p in enumerate(pixels)])


class StepTimes:
    """A progress callback for training.fit: the elapsed seconds at the end of each step."""

    def __init__(self):
        self.elapsed: list[float] = []

    def __call__(self, progress) -> None:
        self.elapsed.append(progress.elapsed)

    def seconds_per_step(self, warmup: int) -> float:
        return (self.elapsed[-1] - self.elapsed[warmup - 1]) / (len(self.elapsed) - warmup)


def measure_training(train, device: torch.device) -> tuple[dict, object]:
    """Run `train(progress)`; its seconds per step after the warm-up, and peak memory over the
    memory already held before it (the pipeline's weights). Returns (figures, what train returned)."""
    from benchmarks.perf import peak_memory, reset_peak

    reset_peak(device)
    held = peak_memory(device)
    times = StepTimes()
    trained = train(times)
    peak = peak_memory(device)
    return dict(seconds_per_step=times.seconds_per_step(WARMUP_STEPS), peak_gib=peak, held_before_gib=held), trained


def run_benchmark(pipe, images, config, rounds: int, sampling_steps: int) -> dict:
    """Share vs PEFT LoRA training, then generation with and without the trained style, on `pipe`'s device."""
    from diffusers import StableDiffusionPipeline

    from benchmarks.continual import add_lora, train_lora
    from benchmarks.perf import Clock, median
    from share_diffusion import share
    from share_diffusion.generation import generate_images
    from share_diffusion.training import copy_sharing_weights, train_style, training_unet, with_trigger

    device = pipe.device
    unet = training_unet(pipe)
    share.inject_share_layers(unet, share.ShareConfig(rank=config.rank))
    print(f"training a Share style, {config.steps} steps ...", flush=True)
    training = {}
    training["share"], styled_unet = measure_training(
        lambda progress: train_style(pipe, unet, images, STYLE, STYLE, config, progress), device
    )
    share.finish_style_training(styled_unet)

    print(f"training a PEFT LoRA, {config.steps} steps ...", flush=True)
    lora_unet = copy_sharing_weights(pipe.unet)
    parameters = add_lora(lora_unet, config.rank)
    for parameter in parameters:
        parameter.data = parameter.data.float()  # trainable parameters in fp32, as Share's are
    training["lora"], _ = measure_training(
        lambda progress: train_lora(pipe, lora_unet, parameters, images, STYLE, config, progress), device
    )
    del lora_unet, parameters
    if device.type == "cuda":
        torch.cuda.empty_cache()

    styled = StableDiffusionPipeline(**{**pipe.components, "unet": styled_unet})
    styled.set_progress_bar_config(disable=True)
    conditions = {"base": (pipe, None), "no style": (styled, None), "style": (styled, {STYLE: 1.0})}
    prompt = with_trigger(PROMPT, STYLE)
    clock = Clock(device)

    def seconds_per_image(name: str, seed: int) -> float:
        generator_pipe, styles = conditions[name]
        share.set_active_styles(styled_unet, styles)
        return clock(lambda: generate_images(generator_pipe, prompt, seed=seed, steps=sampling_steps))

    print(f"generating: {len(conditions)} conditions × {rounds} rounds ...", flush=True)
    names = list(conditions)
    for name in names:
        seconds_per_image(name, 0)  # warm-up
    times = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            times[name].append(seconds_per_image(name, r + 1))
    share.set_active_styles(styled_unet, None)
    return dict(training=training, generation={name: dict(seconds_per_image=median(t), samples=t) for name, t in times.items()})


def markdown_report(results: dict) -> str:
    settings, environment, training, generation = results["settings"], results["environment"], results["training"], results["generation"]
    lines = ["| method | s/step | peak memory (GiB) | held before: weights (GiB) |", "|---|---:|---:|---:|"]
    for name, label in (("share", "Share style"), ("lora", "PEFT LoRA")):
        t = training[name]
        lines.append(f"| {label}, rank {settings['rank']} | {t['seconds_per_step']:.3f} | {t['peak_gib']:.2f} | {t['held_before_gib']:.2f} |")
    ours, lora = training["share"], training["lora"]
    lines.append(
        f"| **Share / LoRA** | **{ours['seconds_per_step'] / lora['seconds_per_step']:.3f}** | "
        f"**{ours['peak_gib'] / lora['peak_gib']:.3f}** | |"
    )
    base = generation["base"]["seconds_per_image"]
    rows = ["| UNet | s/image (median) | vs base |", "|---|---:|---:|"]
    for name, g in generation.items():
        rows.append(f"| {name} | {g['seconds_per_image']:.3f} | {g['seconds_per_image'] / base:.3f} |")
    return "\n\n".join(
        [
            f"`{results['command']}`",
            f"Date {results['date']}; {environment['gpu']}, torch {environment['torch']} (CUDA {environment['cuda']}), "
            f"diffusers {environment['diffusers']}, peft {environment['peft']}; wall time {results['seconds_total']:.0f} s.",
            f"SD1.5 architecture with random weights (benchmarks/sd15.py), {settings['resolution']}×{settings['resolution']}, fp16.",
            "## Training",
            f"training.fit for both: {settings['steps']} steps, the first {WARMUP_STEPS} not timed; batch "
            f"{settings['batch_size']}, rank {settings['rank']} on every attention projection, fp16 autocast and gradient scaler, trainable "
            f"parameters in fp32, {TRAINING_IMAGES} images. Peak: torch.cuda.max_memory_allocated over the whole "
            "training (encoding the images included).",
            "\n".join(lines),
            "## Generation",
            f"generate_images, {settings['sampling_steps']} steps, classifier-free guidance, batch 1; median of "
            f"{settings['rounds']} images per UNet after one warm-up, interleaved. \"no style\" and \"style\" are the "
            "Share UNet the app generates with (the style unfused).",
            "\n".join(rows),
        ]
    ) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="sd15", help="sd15 (512 px); sdxl (1024 px) is not prepared yet")
    parser.add_argument("--steps", type=int, default=30, help=f"training steps per method (more than {WARMUP_STEPS}, which are not timed)")
    parser.add_argument("--rounds", type=int, default=5, help="images timed per generation condition")
    parser.add_argument("--sampling-steps", type=int, default=30, help="denoising steps per image")
    add_output_option(parser, "gpu")
    args = parser.parse_args(argv)
    if args.steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    # ---- SDXL at 1024 px: its place is here (the SDXL benchmark part of issue #18). ----
    if args.family == "sdxl":
        print(SDXL_NOT_SUPPORTED, file=sys.stderr)
        raise SystemExit(2)
    require_cuda()

    import time

    import diffusers
    import peft

    from benchmarks.perf import quiet_libraries
    from benchmarks.sd15 import sd15_pipeline
    from share_diffusion.generation import native_size
    from share_diffusion.training import training_config

    started = time.perf_counter()
    quiet_libraries()  # random weights give NaN images, and numpy says so for each
    command = "python -m benchmarks.gpu" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(command, flush=True)
    pipe = sd15_pipeline("cuda", torch.float16)
    resolution = native_size(pipe)[0]
    config = training_config("quick", "checkpoint", steps=args.steps, mixed_precision="fp16", strength_previews=0)
    results = run_benchmark(pipe, random_images(TRAINING_IMAGES, resolution), config, args.rounds, args.sampling_steps)
    results.update(
        command=command,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        environment=dict(
            gpu=torch.cuda.get_device_name(), torch=torch.__version__, cuda=torch.version.cuda,
            diffusers=diffusers.__version__, peft=peft.__version__,
        ),  # fmt: skip
        settings=dict(
            family=args.family, resolution=resolution, steps=config.steps, batch_size=config.batch_size,
            rank=config.rank, rounds=args.rounds, sampling_steps=args.sampling_steps,
        ),  # fmt: skip
        seconds_total=time.perf_counter() - started,
    )
    markdown = markdown_report(results)
    write_results(args.out, "gpu", markdown, results)
    print(markdown)


if __name__ == "__main__":
    main()
