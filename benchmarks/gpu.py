"""GPU benchmark, prepared for a lent GPU: SD1.5 at 512×512 and SDXL at 1024×1024, fp16 (issues #21, #18).

    python -m benchmarks.gpu [--family sd15|sdxl] [--steps N] [--rounds N] [--sampling-steps N] [--out DIR]

Results go to runs/gpu/ (gpu.md, gpu.json) unless --out says otherwise. It needs CUDA and stops at
once without it (exit 1). On one H200 each family should take about 2-3 minutes, imports included;
both are sized to stay well under 8 (SDXL with fewer steps and rounds: it costs about 4× SD1.5).

The pipeline is the family's architecture with random weights, built on the GPU in fp16 from the
config folder Share Studio ships (benchmarks/random_pipeline.py); speed and memory do not depend on
the weights. SDXL's VAE, which overflows in fp16, encodes in float32 (latent_cache.encoding_vae)
and its pipeline decodes in float32 (force_upcast), as with a real SDXL checkpoint.

  training    seconds per optimizer step, peak CUDA memory and trainable parameters of a Share
              style (train_style) and of a PEFT LoRA of the same rank on the same targets
              (benchmarks.continual.add_lora, train_lora), both in the one loop training.fit with
              the family's checkpoint "quick" preset (SD1.5: rank 4, batch 4; SDXL: rank 4, batch 1,
              gradient checkpointing), fp16 with a gradient scaler, trainable parameters in fp32,
              8 training images of random pixels, encoded once beforehand into a latent cache that
              both read (so that a peak is the training's, not the VAE's); the first WARMUP_STEPS
              steps are not timed.
  generation  seconds per image at the native size (generate_images, the pipeline's scheduler,
              classifier-free guidance) of the base UNet, of the Share UNet with no style active
              and with the trained style active (unfused, as the app generates), interleaved round
              by round after one warm-up image each.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.output import add_output_option, write_results

#: --family -> the shipped config folder (share_diffusion/configs/) and the name in the report.
FAMILIES = {"sd15": ("sd15", "SD1.5"), "sdxl": ("sdxl-base", "SDXL base")}
#: Training steps and images timed per generation condition when not given, sized so that each
#: family's run stays well under 8 minutes on one H200.
DEFAULTS = {"sd15": dict(steps=30, rounds=5), "sdxl": dict(steps=20, rounds=3)}
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
    """A progress callback for training.fit: the elapsed seconds at the end of each step, and the
    process's CPU seconds (all threads; for a CPU benchmark on a machine that runs other work)."""

    def __init__(self):
        self.elapsed: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, progress) -> None:
        self.elapsed.append(progress.elapsed)
        self.cpu.append(time.process_time())

    @staticmethod
    def per_step(times: list[float], warmup: int) -> float:
        return (times[-1] - times[warmup - 1]) / (len(times) - warmup)


def measure_training(train, device: torch.device, warmup: int = WARMUP_STEPS) -> tuple[dict, object]:
    """Run `train(progress)`; its seconds per step after `warmup` steps, and peak memory over the
    memory already held before it (the pipeline's weights). Returns (figures, what train returned)."""
    from benchmarks.perf import peak_memory, reset_peak

    reset_peak(device)
    held = peak_memory(device)
    times = StepTimes()
    trained = train(times)
    peak = peak_memory(device)
    seconds, cpu_seconds = times.per_step(times.elapsed, warmup), times.per_step(times.cpu, warmup)
    return dict(seconds_per_step=seconds, cpu_seconds_per_step=cpu_seconds, peak_gib=peak, held_before_gib=held), trained


def trainable_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)


def compare_training(pipe, images, config, warmup: int = WARMUP_STEPS) -> tuple[dict, torch.nn.Module]:
    """A Share style (train_style) against a PEFT LoRA of the same rank on the same targets, both
    trained by training.fit on the same batches: {"share": figures, "lora": figures}, and the UNet
    copy that holds the merged style.

    The images are encoded once beforehand into a latent cache that both trainings read, so that
    each peak is its training's own, not the VAE's.
    """
    from benchmarks.continual import add_lora, train_lora
    from share_diffusion import share
    from share_diffusion.latent_cache import encode_images_cached
    from share_diffusion.training import copy_sharing_weights, train_style, training_unet

    device = pipe.device
    training = {}
    with tempfile.TemporaryDirectory(prefix="share-benchmark-latents-") as cache:
        config = replace(config, latent_cache=cache)
        encode_images_cached(pipe, images, Path(cache))
        unet = training_unet(pipe)
        share.inject_share_layers(unet, share.ShareConfig(rank=config.rank))
        print(f"training a Share style, {config.steps} steps ...", flush=True)
        training["share"], styled_unet = measure_training(
            lambda progress: train_style(pipe, unet, images, STYLE, STYLE, config, progress), device, warmup
        )
        training["share"]["trainable_parameters"] = trainable_parameters(styled_unet)  # the style's B and A
        share.finish_style_training(styled_unet)

        print(f"training a PEFT LoRA, {config.steps} steps ...", flush=True)
        lora_unet = copy_sharing_weights(pipe.unet)
        parameters = add_lora(lora_unet, config.rank)
        for parameter in parameters:
            parameter.data = parameter.data.float()  # trainable parameters in fp32, as Share's are
        training["lora"], _ = measure_training(
            lambda progress: train_lora(pipe, lora_unet, parameters, images, STYLE, config, progress), device, warmup
        )
        training["lora"]["trainable_parameters"] = sum(p.numel() for p in parameters)
    del lora_unet, parameters
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return training, styled_unet


def compare_generation(pipe, styled_unet, rounds: int, sampling_steps: int) -> dict:
    """Seconds per image of the base UNet and of `styled_unet` with no style and with STYLE active."""
    from benchmarks.perf import Clock, median
    from share_diffusion import share
    from share_diffusion.generation import generate_images
    from share_diffusion.training import with_trigger

    styled = type(pipe)(**{**pipe.components, "unet": styled_unet})
    styled.set_progress_bar_config(disable=True)
    conditions = {"base": (pipe, None), "no style": (styled, None), "style": (styled, {STYLE: 1.0})}
    prompt = with_trigger(PROMPT, STYLE)
    clock = Clock(pipe.device)

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
    return {name: dict(seconds_per_image=median(t), samples=t) for name, t in times.items()}


def run_benchmark(pipe, family: str, steps: int, rounds: int, sampling_steps: int) -> dict:
    """Training and generation on `pipe` (of --family `family`) with its family's quick checkpoint
    preset, on `pipe`'s device and in its dtype; the figures, settings and environment."""
    import diffusers
    import peft

    from share_diffusion.families import family_of_pipeline
    from share_diffusion.generation import native_size
    from share_diffusion.training import training_config

    resolution = native_size(pipe)[0]
    # "auto": the model's own type, so fp16 on the GPU (with a gradient scaler), float32 on a CPU
    config = training_config("quick", "checkpoint", family_of_pipeline(pipe), steps=steps, mixed_precision="auto",
                             strength_previews=0)  # fmt: skip
    training, styled_unet = compare_training(pipe, random_images(TRAINING_IMAGES, resolution), config)
    generation = compare_generation(pipe, styled_unet, rounds, sampling_steps)
    cuda = pipe.device.type == "cuda"
    return dict(
        training=training,
        generation=generation,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        environment=dict(
            gpu=torch.cuda.get_device_name(pipe.device) if cuda else f"no GPU: CPU ({platform.machine()})",
            torch=torch.__version__, cuda=torch.version.cuda, diffusers=diffusers.__version__, peft=peft.__version__,
        ),  # fmt: skip
        settings=dict(
            family=family, resolution=resolution, dtype=str(pipe.unet.dtype).removeprefix("torch."), steps=config.steps,
            batch_size=config.batch_size, gradient_checkpointing=config.gradient_checkpointing, rank=config.rank,
            rounds=rounds, sampling_steps=sampling_steps,
        ),  # fmt: skip
    )


def gib(value: float | None) -> str:
    return "n/a (no GPU)" if value is None else f"{value:.2f}"


def markdown_report(results: dict) -> str:
    settings, environment, training, generation = results["settings"], results["environment"], results["training"], results["generation"]
    lines = [
        "| method | trainable parameters | s/step | peak memory (GiB) | held before: weights (GiB) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in (("share", "Share style"), ("lora", "PEFT LoRA")):
        t = training[name]
        lines.append(
            f"| {label}, rank {settings['rank']} | {t['trainable_parameters']:,} | {t['seconds_per_step']:.3f} "
            f"| {gib(t['peak_gib'])} | {gib(t['held_before_gib'])} |"
        )
    ours, lora = training["share"], training["lora"]
    peak_ratio = f"**{ours['peak_gib'] / lora['peak_gib']:.3f}**" if ours["peak_gib"] else ""
    lines.append(
        f"| **Share / LoRA** | **{ours['trainable_parameters'] / lora['trainable_parameters']:.3f}** "
        f"| **{ours['seconds_per_step'] / lora['seconds_per_step']:.3f}** | {peak_ratio} | |"
    )
    base = generation["base"]["seconds_per_image"]
    rows = ["| UNet | s/image (median) | vs base |", "|---|---:|---:|"]
    for name, g in generation.items():
        rows.append(f"| {name} | {g['seconds_per_image']:.3f} | {g['seconds_per_image'] / base:.3f} |")
    side, half = settings["resolution"], settings["dtype"] == "float16"
    checkpointing = ", gradient checkpointing" if settings["gradient_checkpointing"] else ""
    return "\n\n".join(
        [
            f"`{results['command']}`",
            f"Date {results['date']}; {environment['gpu']}, torch {environment['torch']} (CUDA {environment['cuda']}), "
            f"diffusers {environment['diffusers']}, peft {environment['peft']}; wall time {results['seconds_total']:.0f} s.",
            f"{FAMILIES[settings['family']][1]} architecture with random weights (benchmarks/random_pipeline.py), "
            f"{side}×{side}, {settings['dtype']}.",
            "## Training",
            f"training.fit for both: {settings['steps']} steps, the first {WARMUP_STEPS} not timed; batch "
            f"{settings['batch_size']}{checkpointing}, rank {settings['rank']} on every UNet attention projection, "
            f"{'fp16 with a gradient scaler' if half else settings['dtype']}, trainable parameters in fp32, "
            f"{TRAINING_IMAGES} images, their latents encoded once beforehand. Peak: torch.cuda.max_memory_allocated "
            "over each training.",
            "\n".join(lines),
            "## Generation",
            f"generate_images, {side}×{side}, {settings['sampling_steps']} steps, classifier-free guidance, batch 1; "
            f"median of {settings['rounds']} images per UNet after one warm-up, interleaved. \"no style\" and "
            "\"style\" are the Share UNet the app generates with (the style unfused).",
            "\n".join(rows),
        ]
    ) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", choices=FAMILIES, default="sd15", help="sd15 (512 px) or sdxl (1024 px)")
    defaults = {key: ", ".join(f"{family} {d[key]}" for family, d in DEFAULTS.items()) for key in ("steps", "rounds")}
    parser.add_argument("--steps", type=int, help=f"training steps per method, more than the {WARMUP_STEPS} not timed "
                        f"(default: {defaults['steps']})")  # fmt: skip
    parser.add_argument("--rounds", type=int, help=f"images timed per generation condition (default: {defaults['rounds']})")
    parser.add_argument("--sampling-steps", type=int, default=30, help="denoising steps per image")
    add_output_option(parser, "gpu")
    args = parser.parse_args(argv)
    steps = args.steps or DEFAULTS[args.family]["steps"]
    rounds = args.rounds or DEFAULTS[args.family]["rounds"]
    if steps <= WARMUP_STEPS:
        parser.error(f"--steps must be more than the {WARMUP_STEPS} warm-up steps")
    require_cuda()

    from benchmarks.perf import quiet_libraries
    from benchmarks.random_pipeline import random_pipeline

    started = time.perf_counter()
    quiet_libraries()  # random weights give NaN images, and numpy says so for each
    command = "python -m benchmarks.gpu" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(command, flush=True)
    pipe = random_pipeline(FAMILIES[args.family][0], "cuda", torch.float16)
    results = run_benchmark(pipe, args.family, steps, rounds, args.sampling_steps)
    results.update(command=command, seconds_total=time.perf_counter() - started)
    markdown = markdown_report(results)
    write_results(args.out, "gpu", markdown, results)
    print(markdown)


if __name__ == "__main__":
    main()
