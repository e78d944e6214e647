"""CPU benchmark on the full SDXL base architecture with random weights: training, merge, bytes (issue #18).

    python -m benchmarks.sdxl [--quick] [--threads N] [--out DIR]

Results go to runs/sdxl/ (sdxl.md, sdxl.json) unless --out says otherwise. The pipeline is SDXL
base built from the config folder Share Studio ships (benchmarks/random_pipeline.py), in float32
on the CPU: about 3.5 billion parameters, 14 GB. What is measured does not depend on the weights.

  training  one optimizer step of a Share style (train_style, rank 4) and of a PEFT LoRA of the
            same rank on the same targets, every UNet attention projection (benchmarks.gpu's
            compare_training: both in training.fit, on the same batches), with SDXL's quick preset
            (batch 1, gradient checkpointing), float32, at 512×512 (--quick: 128×128); two steps
            each, the first not timed. The time ratios (wall and CPU time; on a machine that
            runs other work, use --threads 1 and read CPU time) and the trainable parameters.
  merge     what a library does when a training ends (Studio._merge: share.plan_merge on every
            Share layer of the UNet and both text encoders, a library's targets), with T = 10
            rank-4 styles on every UNet attention projection, each layer's from benchmarks/merge.py's
            stream (near a shared 16-dim subspace, 30% noise, loudness varied 10× either way); the
            10th merge is timed (best of 3; --quick: 1), then every style's drift is measured.
  bytes     the library as it is stored (float32: each layer's basis, each style's loadings at its
            own rank and its scale) against T LoRA files of the same styles, kohya files as
            export_lora writes them (float32), at rank 4 (the same rank: the fair baseline) and at
            rank 16, for T = 1, 10, 100. The basis ranks k and the drift at each T come from
            merging the same stream with merge_style on one layer of each distinct attention shape
            (benchmarks/drift_bytes.py, no size limit); the bytes are counted over every layer from
            the shapes. Tensor bytes only: safetensors headers are not counted.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import time
from collections import Counter

import torch

from benchmarks.drift_bytes import BYTES_PER_VALUE, layer_bytes, merge_stream, synthetic_layers
from benchmarks.merge import STYLE_RANK, best_time, style_stream
from benchmarks.output import add_output_option, write_results
from share_diffusion import share
from share_diffusion.lora_interop import DEFAULT_TARGETS, export_lora
from share_diffusion.training import copy_sharing_weights

CONFIG = "sdxl-base"
LORA_RANKS = (STYLE_RANK, 16)
STYLE_COUNTS = (1, 10, 100)
MERGED_STYLES = 10
TRAINING_STEPS = 2  # the first is not timed
TRAINING_IMAGES = 2
#: --quick -> the training images' side and how often the 10th merge is timed
RESOLUTION = {False: 512, True: 128}
MERGE_REPEATS = {False: 3, True: 1}

Shape = tuple[int, int]


# ---------------------------------------------------------------------------------------
# 1. Training step
# ---------------------------------------------------------------------------------------


def measure_training(pipe, resolution: int) -> dict:
    """benchmarks.gpu.compare_training for one timed step after one warm-up step, float32."""
    from benchmarks.gpu import compare_training, random_images
    from share_diffusion.families import family_of_pipeline
    from share_diffusion.training import training_config

    config = training_config("quick", "checkpoint", family_of_pipeline(pipe), steps=TRAINING_STEPS,
                             mixed_precision="no", strength_previews=0)  # fmt: skip
    if config.rank != STYLE_RANK:
        raise ValueError(f"the SDXL quick preset's rank is {config.rank}; this benchmark compares rank {STYLE_RANK}")
    training, _ = compare_training(pipe, random_images(TRAINING_IMAGES, resolution), config, warmup=1)
    return dict(
        training,
        resolution=resolution,
        batch_size=config.batch_size,
        gradient_checkpointing=config.gradient_checkpointing,
    )


# ---------------------------------------------------------------------------------------
# 2. Merge
# ---------------------------------------------------------------------------------------


def library_models(pipe) -> dict[str, torch.nn.Module]:
    """Copies of the UNet and both text encoders that share the pipeline's weights, with Share
    layers on a library's targets (lora_interop.DEFAULT_TARGETS, which Studio puts on a new library)."""
    models = {}
    for component, targets in DEFAULT_TARGETS.items():
        models[component] = copy_sharing_weights(getattr(pipe, component))
        share.inject_share_layers(models[component], share.ShareConfig(rank=STYLE_RANK, target_modules=targets))
    return models


def attention_layers(unet: torch.nn.Module) -> dict[str, share.ShareLinear]:
    """The Share layers a trained style uses: the UNet's attention projections."""
    return {name: layer for name, layer in share.share_layers(unet).items() if share.matches(name, share.UNET_TARGET_MODULES)}


def streamed_styles(unet: torch.nn.Module, count: int) -> list[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """`count` rank-4 styles {layer: (B, A)} on every attention projection, each layer's drawn from
    benchmarks/merge.py's stream with its own seed."""
    styles = [{} for _ in range(count)]
    for index, (name, layer) in enumerate(attention_layers(unet).items()):
        for style, factors in zip(styles, style_stream(layer.d_out, layer.d_in, count, torch.Generator().manual_seed(index))):
            style[name] = factors
    return styles


def merge_library(models: dict[str, torch.nn.Module], styles: list[dict], repeats: int) -> dict:
    """Merge `styles` one at a time into `models` as Studio._merge does (text encoders: rank 0);
    the last merge timed (best of `repeats`); its step errors and every style's drift after it."""
    for n, factors in enumerate(styles, start=1):
        style = f"s{n}"

        def plan():
            return {component: share.plan_merge(model, {style: factors if component == "unet" else {}})
                    for component, model in models.items()}  # fmt: skip

        seconds, plans = best_time(plan, repeats if n == len(styles) else 1)
        for component, model in models.items():
            share.apply_merge(model, plans[component], {style: 1.0})
    unet = models["unet"]
    drift = []
    for n, factors in enumerate(styles, start=1):
        stored = share.export_style(unet, f"s{n}")
        drift += [share.relative_error(b, a, *stored[name]) for name, (b, a) in factors.items()]
    step_errors = torch.cat([m.step_errors + m.rounding_errors for plan in plans.values() for m in plan.values()])
    return dict(
        styles=len(styles),
        seconds=seconds,
        share_layers={component: len(share.share_layers(model)) for component, model in models.items()},
        layers_with_styles=len(attention_layers(unet)),
        largest_k=max(max(layer.basis_b.shape[1], layer.basis_a.shape[1]) for layer in share.share_layers(unet).values()),
        step_error_max=float(step_errors.max()),
        drift_mean=sum(drift) / len(drift),
        drift_max=max(drift),
    )


# ---------------------------------------------------------------------------------------
# 3. Library bytes against LoRA files
# ---------------------------------------------------------------------------------------


def library_bytes(models: dict[str, torch.nn.Module], bases: dict[Shape, tuple[int, int]], styles: int) -> int:
    """The float32 bytes of share_state_dict over `models` holding `styles` rank-4 styles on every
    UNet attention projection, whose basis ranks are bases[(d_out, d_in)] = (k_b, k_a), and on no
    other layer (where each style keeps only its scale, at rank 0 with an empty basis)."""
    total = 0
    for component, model in models.items():
        attention = attention_layers(model) if component == "unet" else {}
        for name, layer in share.share_layers(model).items():
            if name in attention:
                total += layer_bytes(layer.d_out, layer.d_in, *bases[(layer.d_out, layer.d_in)], styles)
            else:
                total += BYTES_PER_VALUE * styles
    return total


def lora_file_bytes(unet: torch.nn.Module, factors: dict[str, tuple[torch.Tensor, torch.Tensor]], rank: int) -> int:
    """The tensor bytes of one style's kohya LoRA file at `rank`, as export_lora writes it (float32)."""
    state = export_lora(factors, unet_config=unet.config, rank=rank)
    return sum(t.numel() * t.element_size() for t in state.values())


def compare_bytes(models: dict[str, torch.nn.Module], factors: dict, counts: tuple[int, ...]) -> list[dict]:
    """Per T in `counts`: the library's bytes, T LoRA files' at each of LORA_RANKS (every file the
    size of `factors`' export) and the drift, from the stream merged on one layer per attention shape."""
    shapes = Counter((layer.d_out, layer.d_in) for layer in attention_layers(models["unet"]).values())
    streams = [row for _, styles in synthetic_layers(shapes, max(counts)).values() for row in merge_stream(styles, None, counts)]
    per_file = {rank: lora_file_bytes(models["unet"], factors, rank) for rank in LORA_RANKS}
    rows = []
    for t in counts:
        at_t = [row for row in streams if row["styles"] == t]
        drift = [e for row in at_t for e in row["drift"]]
        bases = {(row["d_out"], row["d_in"]): (row["k_b"], row["k_a"]) for row in at_t}
        rows.append(dict(
            styles=t,
            largest_k=max(max(k) for k in bases.values()),
            library_bytes=library_bytes(models, bases, t),
            lora_bytes={rank: t * size for rank, size in per_file.items()},
            drift_mean=sum(drift) / len(drift),
            drift_max=max(drift),
        ))  # fmt: skip
        print(f"T={t}: library {rows[-1]['library_bytes'] / 1e6:.1f} MB, drift max {rows[-1]['drift_max']:.1e}", flush=True)
    return rows


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def megabytes(n: int) -> str:
    return f"{n / 1e6:,.1f}"


def markdown_report(results: dict) -> str:
    environment, training, merge, table = results["environment"], results["training"], results["merge"], results["bytes"]
    ours, lora = training["share"], training["lora"]
    side = training["resolution"]
    parameters = ", ".join(f"{name} {count / 1e6:,.0f} M" for name, count in results["parameters"].items())
    phases = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in results["phase_seconds"].items())
    training_rows = [
        "| method | trainable parameters | s/step | CPU s/step |",
        "|---|---:|---:|---:|",
        *(f"| {label}, rank {STYLE_RANK} | {t['trainable_parameters']:,} | {t['seconds_per_step']:.1f} "
          f"| {t['cpu_seconds_per_step']:.1f} |" for label, t in (("Share style", ours), ("PEFT LoRA", lora))),
        f"| **Share / LoRA** | **{ours['trainable_parameters'] / lora['trainable_parameters']:.3f}** "
        f"| **{ours['seconds_per_step'] / lora['seconds_per_step']:.3f}** "
        f"| **{ours['cpu_seconds_per_step'] / lora['cpu_seconds_per_step']:.3f}** |",
    ]
    layers = merge["share_layers"]
    merge_rows = [
        "| Share layers: UNet, text_encoder, text_encoder_2 | with the styles | 10th merge (s) | largest k "
        "| its step error, max | drift of the 10 styles, mean / max |",
        "|---|---:|---:|---:|---:|---:|",
        f"| {layers['unet']}, {layers['text_encoder']}, {layers['text_encoder_2']} | {merge['layers_with_styles']} "
        f"| {merge['seconds']:.2f} | {merge['largest_k']} | {merge['step_error_max']:.1e} "
        f"| {merge['drift_mean']:.1e} / {merge['drift_max']:.1e} |",
    ]
    small, large = LORA_RANKS
    bytes_rows = [
        f"| T styles | largest k | library (MB) | T rank-{small} LoRA files (MB) | files / library "
        f"| T rank-{large} LoRA files (MB) | files / library | drift mean / max |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in table:
        library, files = row["library_bytes"], row["lora_bytes"]
        bytes_rows.append(
            f"| {row['styles']} | {row['largest_k']} | {megabytes(library)} | {megabytes(files[small])} "
            f"| {files[small] / library:.2f}× | {megabytes(files[large])} | {files[large] / library:.2f}× "
            f"| {row['drift_mean']:.1e} / {row['drift_max']:.1e} |"
        )
    drift_max = max([merge["drift_max"], *(row["drift_max"] for row in table)])
    exact = "within" if drift_max <= share.EXACT else "above"
    checkpointing = ", gradient checkpointing" if training["gradient_checkpointing"] else ""
    return "\n\n".join([
        f"`{results['command']}`",
        f"Date {results['date']}; CPU ({environment['machine']}, {environment['cpus']} cores), torch {environment['torch']}, "
        f"{environment['threads']} torch threads, diffusers {environment['diffusers']}, peft {environment['peft']}; wall "
        f"time {results['seconds_total']:.0f} s ({phases}); peak resident memory {results['peak_rss_mib'] / 1024:.1f} GiB.",
        f"SDXL base architecture with random weights (benchmarks/random_pipeline.py), float32: {parameters} parameters.",
        "## Training step",
        f"benchmarks.gpu.compare_training: training.fit for both on the same batches, {TRAINING_STEPS} steps each, the "
        f"first not timed; {side}×{side}, batch {training['batch_size']}{checkpointing}, float32, rank {STYLE_RANK} on "
        f"every UNet attention projection; {TRAINING_IMAGES} images of random pixels, their latents encoded beforehand. "
        "s/step: wall time; CPU s/step: the process's CPU time, summed over its threads. With one thread it is what "
        "the step costs however busy the machine is; with more, threads that wait for a descheduled one spin, and count.",
        "\n".join(training_rows),
        f"## Merge, T = {merge['styles']}",
        "share.plan_merge on every Share layer of the three models (a library's targets), as Studio merges a trained "
        f"style; rank-{STYLE_RANK} styles of benchmarks/merge.py's stream on the attention projections, rank 0 elsewhere. "
        f"Best of {results['merge_repeats']}. Drift: ‖ΔW − ΔŴ‖/‖ΔW‖ of each style and layer after the 10th merge, "
        "against the style as given.",
        "\n".join(merge_rows),
        "## Library bytes",
        "float32 tensors, no headers. Library: what share_state_dict stores on every Share layer of the three models "
        "(basis, each style's loadings at its rank and its scale), counted from the shapes. LoRA files: T kohya files of "
        "the same styles as export_lora writes them (float32; an fp16 file is half). k and drift: the stream merged with "
        "no size limit on one layer per attention shape.",
        "\n".join(bytes_rows),
        f"Every drift is {exact} float rounding ({share.EXACT:g}): the merges keep every style exactly while k can grow "
        f"(no size limit), largest drift {drift_max:.1e}.",
    ]) + "\n"  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help=f"train at {RESOLUTION[True]}×{RESOLUTION[True]}, time the "
                        "merge once: a smoke run (the same 14 GB model)")  # fmt: skip
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default; "
                        "1 on a machine that runs other work, so that CPU s/step stays what a step costs)")  # fmt: skip
    add_output_option(parser, "sdxl")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    import diffusers
    import peft

    from benchmarks.memory import peak_rss_mib
    from benchmarks.perf import quiet_libraries
    from benchmarks.random_pipeline import random_pipeline

    started = time.perf_counter()
    phase_seconds, mark = {}, started

    def phase_done(name: str) -> None:
        nonlocal mark
        phase_seconds[name], mark = time.perf_counter() - mark, time.perf_counter()
        print(f"{name}: {phase_seconds[name]:.0f} s", flush=True)

    quiet_libraries()
    command = "python -m benchmarks.sdxl" + "".join(f" {a}" for a in (sys.argv[1:] if argv is None else argv))
    print(command, flush=True)
    pipe = random_pipeline(CONFIG)
    phase_done("build")
    training = measure_training(pipe, RESOLUTION[args.quick])
    phase_done("training")
    models = library_models(pipe)
    styles = streamed_styles(models["unet"], MERGED_STYLES)
    merge = merge_library(models, styles, MERGE_REPEATS[args.quick])
    phase_done("merge")
    table = compare_bytes(models, styles[0], STYLE_COUNTS)
    phase_done("bytes")
    results = dict(
        command=command,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        environment=dict(
            machine=platform.machine(), cpus=os.cpu_count(), threads=torch.get_num_threads(), torch=torch.__version__,
            diffusers=diffusers.__version__, peft=peft.__version__, python=platform.python_version(),
        ),  # fmt: skip
        parameters={name: sum(p.numel() for p in getattr(pipe, name).parameters())
                    for name in ("unet", "text_encoder", "text_encoder_2", "vae")},  # fmt: skip
        training=training,
        merge=merge,
        merge_repeats=MERGE_REPEATS[args.quick],
        bytes=table,
        peak_rss_mib=peak_rss_mib(),
        phase_seconds=phase_seconds,
        seconds_total=time.perf_counter() - started,
    )
    markdown = markdown_report(results)
    write_results(args.out, "sdxl", markdown, results)
    print(markdown)


if __name__ == "__main__":
    main()
