"""Performance benchmark: Share vs plain LoRA (diffusers/PEFT) on the real SD1.5 UNet architecture.

    python -m benchmarks.perf [--quick] [--device cuda --dtype fp16] [--out DIR]

Results go to runs/perf/ (untracked) unless --out says otherwise; benchmarks/results/perf*.* are
the committed ones, copied there on purpose.

The UNet is UNet2DConditionModel(**SD15_UNET_CONFIG) (benchmarks/merge.py) with random weights:
860M parameters, nothing downloaded. Every figure that matters is a ratio of two things measured
side by side in the same run, on the same UNet object:

  merge      Share's merge vs the published eig merge, T = 10, 50, 100 (benchmarks/merge.py's
             bench_shape, called here with fewer repeats).
  switch     Share: set_active_styles between two styles with N styles in the library, fuse /
             unfuse, and a fused switch (unfuse, set, fuse), vs diffusers on the same style
             exported with export_lora(..., format="diffusers"): pipe.load_lora_weights from the
             in-memory state dict + set_adapters, set_adapters between loaded adapters,
             fuse_lora / unfuse_lora, and a fused switch (unfuse_lora, set_adapters, fuse_lora).
  denoise    one UNet call (batch 1 with CFG -> batch 2) of: the base UNet, a fused Share style,
             an unfused Share mix of 2 styles, and (reference) diffusers with 2 unfused LoRA
             adapters, interleaved round by round.
  train      one optimizer step (batch 1, MSE on the noise, AdamW) of a Share style in training
             (begin_style_training, all attention projections, rank 4) vs a PEFT LoRA of
             rank 16 on the same projections, interleaved step by step; trainable parameters.
  library    one Share library vs N separate LoRA files, N = 10 and 100 (merge.py's counting).

The Share library used for switching, denoising and training is synthetic (random orthonormal
bases, random rank-4 loadings) with the basis rank k that this run's merge benchmark reached at
T = N for each layer shape, so its tensors have the shapes a real library of N styles would have;
timings do not depend on the values. The extra diffusers adapters (beyond the two styles that are
switched) are copies of one exported style under other names.

Share, PEFT and the plain nn.Linear layers are kept side by side: the attention projections of the
one UNet are swapped between the three module sets (all wrap the same nn.Linear objects), so base,
Share and LoRA are measured on the very same weights, in alternation.
"""

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import textwrap
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import merge as merge_bench
from benchmarks.merge import SD15_UNET_CONFIG
from benchmarks.output import add_output_option
from share_diffusion import lora_interop, share

STYLE_RANK = 4
LORA_RANK = 16
LIBRARY_SIZES = (10, 100)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
NO_GPU = "not measured: no GPU"


# ---------------------------------------------------------------------------------------
# Small helpers
# ---------------------------------------------------------------------------------------


class Clock:
    def __init__(self, device: torch.device):
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def __call__(self, fn) -> float:
        self.sync()
        start = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - start


def put(model: nn.Module, modules: dict[str, nn.Module]) -> None:
    """Install modules at the given names (swap between plain / Share / PEFT projections)."""
    for name, module in modules.items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module)


def current(model: nn.Module, names) -> dict[str, nn.Module]:
    return {name: model.get_submodule(name) for name in names}


def fastest(samples: list[float]) -> float:
    return min(samples)


def median(samples: list[float]) -> float:
    ordered = sorted(samples)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def quiet_libraries() -> None:
    """diffusers/transformers chatter (e.g. a spurious 'missing keys' warning when an adapter is
    loaded from an in-memory dict: the weights do load) would drown the tables."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")


def log(message: str) -> None:
    print(message, flush=True)


# ---------------------------------------------------------------------------------------
# 1. Merge (benchmarks/merge.py, reduced repeats)
# ---------------------------------------------------------------------------------------


def run_merge(quick: bool, from_json: Path | None) -> dict:
    """Rows and summary of merge.py's benchmark, run now (or read from its last results)."""
    shapes = merge_bench.sd15_attention_shapes()
    if from_json is not None:
        saved = json.loads(from_json.read_text())
        rows, source = saved["layers"], f"read from {from_json} (`{saved['command']}`), not rerun"
    else:
        repeats_ours, repeats_eig = (3, 1) if quick else (5, 3)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # as benchmarks.merge: small LAPACK calls are steadier on one thread
        try:
            merge_bench.warm_up()
            rows = []
            for d_out, d_in in sorted(shapes):
                rows += merge_bench.bench_shape(d_out, d_in, share.ShareConfig(), repeats_ours, repeats_eig)
        finally:
            torch.set_num_threads(threads)
        source = (
            f"rerun now with benchmarks.merge.bench_shape, 1 torch thread as in benchmarks.merge (best of "
            f"{repeats_ours} ours, {repeats_eig} eig); per-shape results: benchmarks/results/merge.md"
        )
    summary, _ = merge_bench.summary_table(rows, shapes)
    return dict(source=source, shapes={f"{o}x{i}": n for (o, i), n in shapes.items()}, rows=rows, summary=summary)


def basis_ranks(rows: list[dict], styles: int) -> dict[tuple[int, int], tuple[int, int]]:
    """(d_out, d_in) -> (k_b, k_a) the merge benchmark reached at the style count nearest `styles`."""
    counts = sorted({row["styles"] for row in rows})
    nearest = min(counts, key=lambda t: abs(t - styles))
    return {(row["d_out"], row["d_in"]): (row["k_b"], row["k_a"]) for row in rows if row["styles"] == nearest}


# ---------------------------------------------------------------------------------------
# 2. Share library and switching
# ---------------------------------------------------------------------------------------


def style_name(i: int) -> str:
    return f"style{i:03d}"


def synthetic_library(layers: dict[str, share.ShareLinear], ranks, styles: int, generator) -> dict:
    """A share_state_dict of `styles` random rank-4 styles on random orthonormal bases of rank k."""
    state = {}
    for name, layer in layers.items():
        d_out, d_in = layer.base_layer.weight.shape
        k_b, k_a = ranks[(d_out, d_in)]
        state[f"{name}.basis_a"] = torch.linalg.qr(torch.randn(d_in, k_a, generator=generator)).Q
        state[f"{name}.basis_b"] = torch.linalg.qr(torch.randn(d_out, k_b, generator=generator)).Q
        for i in range(styles):
            prefix = f"{name}.styles.{style_name(i)}"
            state[f"{prefix}.loadings_a"] = torch.randn(k_a, STYLE_RANK, generator=generator) / k_a**0.5
            state[f"{prefix}.loadings_b"] = 0.1 * torch.randn(k_b, STYLE_RANK, generator=generator) / k_b**0.5
            state[f"{prefix}.scale"] = torch.tensor(1.0)
    return state


def share_switching(unet, clock: Clock, repeats: int) -> dict:
    a, b = style_name(0), style_name(1)
    share.set_active_styles(unet, {a: 1.0})
    switch = [clock(lambda s=(b if i % 2 == 0 else a): share.set_active_styles(unet, {s: 1.0})) for i in range(repeats)]
    mix = [clock(lambda: share.set_active_styles(unet, {a: 0.5, b: 0.5})) for _ in range(repeats)]
    fuse, unfuse, fused_switch = [], [], []
    share.set_active_styles(unet, {a: 1.0})
    for _ in range(max(3, repeats // 4)):
        fuse.append(clock(lambda: share.fuse_share_layers(unet)))
        unfuse.append(clock(lambda: share.unfuse_share_layers(unet)))
    share.fuse_share_layers(unet)
    for i in range(max(3, repeats // 4)):
        target = b if i % 2 == 0 else a

        def fused_step(target=target):
            share.unfuse_share_layers(unet)
            share.set_active_styles(unet, {target: 1.0})
            share.fuse_share_layers(unet)

        fused_switch.append(clock(fused_step))
    share.unfuse_share_layers(unet)
    share.set_active_styles(unet, None)
    return dict(switch=switch, mix=mix, fuse=fuse, unfuse=unfuse, fused_switch=fused_switch)


# ---------------------------------------------------------------------------------------
# 3. diffusers LoRA switching
# ---------------------------------------------------------------------------------------


def lora_pipeline(unet):
    """StableDiffusionPipeline around the SD1.5 UNet with a tiny text encoder and VAE (the LoRA
    has UNet keys only, so they are never touched); built in memory, no tokenizer needed."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline
    from transformers import CLIPTextConfig, CLIPTextModel

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            max_position_embeddings=77, projection_dim=32,
        )  # fmt: skip
    ).to(unet.device)
    return StableDiffusionPipeline(
        vae=AutoencoderKL().to(unet.device),
        text_encoder=text_encoder,
        tokenizer=None,
        unet=unet,
        scheduler=DDIMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def diffusers_loading(pipe, state_a: dict, clock: Clock, repeats: int) -> dict:
    """Switch to a style that is not loaded yet: load_lora_weights (in-memory dict) + set_adapters."""
    load = []
    for i in range(repeats):
        name = f"load{i}"

        def step(name=name):
            pipe.load_lora_weights(dict(state_a), adapter_name=name)
            pipe.set_adapters([name])

        load.append(clock(step))
        pipe.delete_adapters(name)
    return dict(load=load)


def diffusers_switching(pipe, clock: Clock, repeats: int) -> dict:
    a, b = style_name(0), style_name(1)
    pipe.set_adapters([a])
    switch = [clock(lambda s=(b if i % 2 == 0 else a): pipe.set_adapters([s])) for i in range(repeats)]
    mix = [clock(lambda: pipe.set_adapters([a, b], adapter_weights=[0.5, 0.5])) for _ in range(repeats)]
    fuse, unfuse, fused_switch = [], [], []
    pipe.set_adapters([a])
    for _ in range(max(3, repeats // 4)):
        fuse.append(clock(lambda: pipe.fuse_lora(components=["unet"], adapter_names=[a])))
        unfuse.append(clock(lambda: pipe.unfuse_lora(components=["unet"])))
    pipe.fuse_lora(components=["unet"], adapter_names=[a])
    for i in range(max(3, repeats // 4)):
        target = b if i % 2 == 0 else a

        def fused_step(target=target):
            pipe.unfuse_lora(components=["unet"])
            pipe.set_adapters([target])
            pipe.fuse_lora(components=["unet"], adapter_names=[target])

        fused_switch.append(clock(fused_step))
    pipe.unfuse_lora(components=["unet"])
    return dict(switch=switch, mix=mix, fuse=fuse, unfuse=unfuse, fused_switch=fused_switch)


# ---------------------------------------------------------------------------------------
# 4. Denoising step and 5. training step
# ---------------------------------------------------------------------------------------


def peak_memory(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def denoise(unet, conditions: dict, latent: int, rounds: int, clock: Clock, device, dtype) -> dict:
    """UNet calls at batch 2 (CFG), conditions interleaved; rotated order each round."""
    generator = torch.Generator().manual_seed(1)
    sample = torch.randn(2, 4, latent, latent, generator=generator).to(device, dtype)
    context = torch.randn(2, 77, SD15_UNET_CONFIG["cross_attention_dim"], generator=generator).to(device, dtype)
    timestep = torch.tensor([500, 500], device=device)
    names = list(conditions)
    times = {name: [] for name in names}
    memory = {name: None for name in names}

    def call(name: str) -> float:
        enter, leave = conditions[name]
        enter()
        reset_peak(device)
        with torch.inference_mode():
            seconds = clock(lambda: unet(sample, timestep, context))
        memory[name] = peak_memory(device)
        leave()
        return seconds

    log(f"  denoise warm-up ({names[0]}) ...")
    call(names[0])
    for r in range(rounds):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(call(name))
            log(f"  denoise round {r + 1}/{rounds} {name}: {times[name][-1]:.2f} s")
    return dict(times=times, peak_gib=memory)


def train(unet, methods: dict, latent: int, steps: int, clock: Clock, device, dtype) -> dict:
    """Optimizer steps (batch 1) of each method, interleaved; the first step of each is warm-up."""
    generator = torch.Generator().manual_seed(2)
    latents = torch.randn(1, 4, latent, latent, generator=generator).to(device)
    noise = torch.randn(1, 4, latent, latent, generator=generator).to(device)
    context = torch.randn(1, 77, SD15_UNET_CONFIG["cross_attention_dim"], generator=generator).to(device)
    timestep = torch.tensor([500], device=device)
    autocast = dtype != torch.float32
    times = {name: [] for name in methods}
    memory = {name: None for name in methods}

    def step(name: str) -> float:
        enter, optimizer = methods[name]
        enter()
        reset_peak(device)

        def one_step():
            with torch.autocast(device.type, dtype=dtype, enabled=autocast):
                prediction = unet((latents + noise).to(unet.dtype), timestep, context.to(unet.dtype)).sample
            loss = F.mse_loss(prediction.float(), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = clock(one_step)
        memory[name] = peak_memory(device)
        return seconds

    names = list(methods)
    for name in names:
        log(f"  train warm-up {name}: {step(name):.2f} s")
    for i in range(steps):
        for name in names if i % 2 == 0 else names[::-1]:
            times[name].append(step(name))
            log(f"  train step {i + 1}/{steps} {name}: {times[name][-1]:.2f} s")
    return dict(times=times, peak_gib=memory)


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def ms(seconds: float) -> str:
    value = seconds * 1e3
    return f"{value:.3f}" if value < 1 else f"{value:.2f}" if value < 10 else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def ratio(x: float) -> str:
    return f"{x:.3g}x" if x < 100 else f"{x:,.0f}x"


def merge_table(merge: dict) -> str:
    lines = [
        "| T styles | merge ours (ms) | merge eig (ms) | eig / ours | error ours mean / max | error eig mean / max |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for e in merge["summary"]:
        lines.append(
            f"| {e['styles']} | {e['ms_ours']:.1f} | {e['ms_eig']:.0f} | {ratio(e['ms_eig'] / e['ms_ours'])} "
            f"| {e['error_ours_mean']:.3f} / {e['error_ours_max']:.3f} | {e['error_eig_mean']:.3f} / {e['error_eig_max']:.3f} |"
        )
    return "\n".join(lines)


SWITCH_ROWS = (
    ("switch between two loaded styles", "switch", "set_active_styles", "set_adapters"),
    ("set a 50/50 mix of two styles", "mix", "set_active_styles", "set_adapters(weights)"),
    ("fuse the active style", "fuse", "fuse_share_layers", "fuse_lora"),
    ("unfuse", "unfuse", "unfuse_share_layers", "unfuse_lora"),
    ("switch a fused style (unfuse, set, fuse)", "fused_switch", "unfuse+set+fuse", "unfuse_lora+set_adapters+fuse_lora"),
)


def switch_table(switching: dict) -> tuple[str, list[dict]]:
    lines = [
        "| operation | N styles loaded | Share (ms) | diffusers LoRA (ms) | diffusers / Share |",
        "|---|---:|---:|---:|---:|",
    ]
    entries = []
    for n, both in switching.items():
        ours, theirs = both["share"], both.get("diffusers")
        for label, key, _, _ in SWITCH_ROWS:
            a = median(ours[key])
            b = median(theirs[key]) if theirs else None
            entries.append(dict(operation=key, styles=int(n), share_s=a, diffusers_s=b, ratio=b / a if b else None))
            theirs_text = f"{ms(b)} | {ratio(b / a)}" if b else "not run (see above) | –"
            lines.append(f"| {label} | {n} | {ms(a)} | {theirs_text} |")
    return "\n".join(lines), entries


def build_report(results: dict) -> tuple[str, dict]:
    env, settings = results["environment"], results["settings"]
    ratios = {}
    parts = [
        f"`{results['command']}`",
        f"Date {results['date']}; torch {env['torch']}, diffusers {env['diffusers']}, peft {env['peft']}; "
        f"device {env['device']} ({env['cpu']}), dtype {settings['dtype']}, torch threads: {env['threads']}; "
        f"wall time {results['seconds_total']:.0f} s "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in results['phase_seconds'].items())}). {env['cpu_note']}",
        f"Model: `UNet2DConditionModel(**SD15_UNET_CONFIG)` (benchmarks/merge.py), random weights, "
        f"{env['unet_parameters'] / 1e6:.0f}M parameters, {env['attention_layers']} attention projections "
        "(to_q, to_k, to_v, to_out.0). Every ratio compares two things measured side by side in this run; "
        "absolute CPU times are shown for scale only.",
    ]

    merge = results["merge"]
    parts += ["## Merge: Share vs the published eig merge", f"Source: {merge['source']}.", merge_table(merge)]
    for e in merge["summary"]:
        ratios[f"merge T={e['styles']}: eig / Share time"] = e["ms_eig"] / e["ms_ours"]

    table, entries = switch_table(results["switching"])
    load = results["loading"]
    share_switch = median(results["switching"][str(LIBRARY_SIZES[0])]["share"]["switch"])
    parts += [
        "## Style switch latency",
        "Share: `set_active_styles` recomputes one k×k mix per layer; fuse adds C_B M C_Aᵀ to each weight. "
        "diffusers 0.42.1: `StableDiffusionPipeline` (the SD1.5 UNet plus a tiny text encoder/VAE, built in "
        "memory) with the same styles exported by `export_lora(..., format=\"diffusers\")` (rank "
        f"{STYLE_RANK}, UNet keys only) and loaded with `pipe.load_lora_weights(state_dict, adapter_name=...)`; "
        "switching is `pipe.set_adapters`, fusing `pipe.fuse_lora(components=['unet'], adapter_names=[style])`. "
        f"Medians of {settings['switch_repeats']} switches (fuse/unfuse: {max(3, settings['switch_repeats'] // 4)}). "
        f"diffusers was run with up to {settings['lora_max_styles']} adapters loaded"
        f"{' (--quick: loading 100 adapters one by one takes minutes, each load slower than the last)' if settings['lora_max_styles'] < LIBRARY_SIZES[-1] else ''}; "
        "adapters beyond the two that are switched are copies of one exported style under other names.",
        table,
        f"Switching to a style that is **not loaded** in diffusers (`load_lora_weights` from the in-memory "
        f"state dict + `set_adapters`, 2 adapters loaded): {ms(median(load['load']))} ms (median of {len(load['load'])}), "
        f"{ratio(median(load['load']) / share_switch)} a Share switch with {LIBRARY_SIZES[0]} styles loaded "
        "(a Share library always holds all its styles).",
    ]
    for e in entries:
        if e["ratio"] and e["operation"] in ("switch", "fused_switch"):
            ratios[f"{e['operation'].replace('_', ' ')}, N={e['styles']}: diffusers / Share"] = e["ratio"]
    ratios["load a style + set_adapters / Share switch"] = median(load["load"]) / share_switch

    den = results["denoise"]
    base = fastest(den["times"]["base"])
    lines = [
        "| UNet call | time (s, best of rounds) | vs base | peak memory (GiB) |",
        "|---|---:|---:|---:|",
    ]
    labels = dict(
        base="base UNet (plain nn.Linear)",
        share_fused="Share, 1 style fused",
        share_mix="Share, unfused mix of 2 styles",
        lora_mix="diffusers LoRA, 2 adapters unfused (reference)",
    )
    for name, samples in den["times"].items():
        memory = den["peak_gib"][name]
        lines.append(
            f"| {labels[name]} | {fastest(samples):.2f} | {fastest(samples) / base:.3f} | "
            f"{f'{memory:.2f}' if memory is not None else NO_GPU} |"
        )
        if name != "base":
            ratios[f"denoise {name.replace('_', ' ')} / base"] = fastest(samples) / base
    parts += [
        "## Denoising step",
        f"One UNet call at {settings['denoise_latent']}×{settings['denoise_latent']} latents "
        f"({settings['denoise_latent'] * 8} px), batch 1 with classifier-free guidance (batch 2), "
        f"{settings['dtype']}, torch.inference_mode; the conditions are interleaved, {settings['rounds']} round(s) "
        "after one warm-up call, order rotated each round. Share library: "
        f"{LIBRARY_SIZES[-1]} styles.",
        "\n".join(lines),
    ]

    tr = results["train"]
    share_step, lora_step = fastest(tr["times"]["share"]), fastest(tr["times"]["lora"])
    params = results["trainable_parameters"]
    lines = [
        "| method | trainable parameters | step time (s, best) | peak memory (GiB) |",
        "|---|---:|---:|---:|",
        f"| Share, rank {STYLE_RANK} (library of {LIBRARY_SIZES[-1]} styles; the same for any library) | {params['share']:,} | "
        f"{share_step:.2f} | {tr['peak_gib']['share'] if tr['peak_gib']['share'] is not None else NO_GPU} |",
        f"| PEFT LoRA, rank {LORA_RANK} | {params['lora']:,} | {lora_step:.2f} | "
        f"{tr['peak_gib']['lora'] if tr['peak_gib']['lora'] is not None else NO_GPU} |",
        f"| **Share / LoRA** | **{params['share'] / params['lora']:.3f}** | **{share_step / lora_step:.3f}** | |",
    ]
    ratios["train step Share / LoRA r16"] = share_step / lora_step
    ratios["trainable params Share / LoRA r16"] = params["share"] / params["lora"]
    parts += [
        "## Training step",
        f"One optimizer step: batch 1, {settings['train_latent']}×{settings['train_latent']} latents, forward + "
        f"MSE + backward + AdamW, {settings['dtype']}"
        f"{' autocast' if settings['dtype'] != 'fp32' else ''}; same targets (all {env['attention_layers']} "
        f"attention projections) for both; base frozen. Share: `begin_style_training` (trains the new "
        f"style's rank-{STYLE_RANK} factors). LoRA: `unet.add_adapter(LoraConfig(r={LORA_RANK}, lora_alpha={LORA_RANK}))`. "
        f"Steps interleaved, {settings['train_steps']} timed per method after one warm-up each.",
        "\n".join(lines),
    ]

    lines = [
        "| N styles | Share library (MB) | N rank-16 LoRA files (MB) | LoRAs / Share | N rank-4 LoRA exports (MB) | exports / Share |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for e in results["library"]:
        lines.append(
            f"| {e['styles']} | {e['share_bytes'] / 1e6:.2f} | {e['lora16_bytes'] / 1e6:.1f} | "
            f"{ratio(e['lora16_bytes'] / e['share_bytes'])} | {e['lora4_bytes'] / 1e6:.1f} | "
            f"{ratio(e['lora4_bytes'] / e['share_bytes'])} |"
        )
        ratios[f"library N={e['styles']}: rank-16 LoRA files / Share"] = e["lora16_bytes"] / e["share_bytes"]
    parts += [
        "## Library size",
        "fp16 tensors, no file headers, all attention projections of the UNet; the Share basis ranks k are the "
        "ones the merge benchmark reached at T = N (benchmarks.merge.library_bytes). Rank-4 exports: the same "
        "styles written as standard LoRA files (export_lora).",
        "\n".join(lines),
    ]

    gpu = results["gpu"]
    parts += [
        "## GPU (512×512, fp16)",
        gpu
        if isinstance(gpu, str)
        else f"Absolute times above are on {env['device']} with {settings['dtype']}; peak memory in the tables.",
    ]
    parts += ["## Ratios (perf.png)", "\n".join(f"- {name}: {value:.3g}" for name, value in ratios.items())]
    return "\n\n".join(parts) + "\n", ratios


def plot(ratios: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names, values = list(ratios), list(ratios.values())
    fig, ax = plt.subplots(figsize=(9, 0.38 * len(names) + 1.4))
    def color(name: str, value: float) -> str:
        if name.startswith("denoise"):
            return "tab:gray"  # overhead against the base UNet, 1 = none
        favourable = value >= 1 if "/ Share" in name else value <= 1
        return "tab:green" if favourable else "tab:red"

    ax.barh(range(len(names)), values, color=[color(n, v) for n, v in zip(names, values)])
    ax.set_xscale("log")
    ax.axvline(1, color="black", linewidth=0.8)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    ax.invert_yaxis()
    for i, v in enumerate(values):
        ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    ax.set_xlabel("ratio, log scale (green: in Share's favour, red: against, gray: vs the base UNet, 1 = no overhead)", fontsize=8)
    ax.set_title("\n".join(textwrap.wrap(title, 110)), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer repeats/rounds/steps (under 10 min on 2 CPU cores)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="fp32 (default on CPU), fp16 (default on CUDA), bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's default)")
    parser.add_argument("--denoise-latent", type=int, default=64, help="latent side of the denoising step (64 = 512 px)")
    parser.add_argument("--train-latent", type=int, default=64, help="latent side of the training step")
    parser.add_argument("--rounds", type=int, default=None, help="denoising rounds (quick 3, else 5)")
    parser.add_argument("--train-steps", type=int, default=None, help="timed training steps per method (quick 2, else 5)")
    parser.add_argument("--switch-repeats", type=int, default=None, help="switches timed (quick 20, else 50)")
    parser.add_argument(
        "--lora-max-styles", type=int, default=None,
        help="most diffusers adapters loaded for the switch test (quick 10, else 100: loading 100 takes minutes)",
    )  # fmt: skip
    parser.add_argument("--no-lora-denoise", action="store_true", help="skip the diffusers LoRA reference in the denoising step")
    parser.add_argument("--merge-from", type=Path, default=None, help="read merge rows from a merge.json instead of rerunning")
    add_output_option(parser, "perf")
    args = parser.parse_args()

    started = time.perf_counter()
    quiet_libraries()
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = args.rounds or (3 if args.quick else 5)
    train_steps = args.train_steps or (2 if args.quick else 5)
    switch_repeats = args.switch_repeats or (20 if args.quick else 50)
    lora_max_styles = args.lora_max_styles or (LIBRARY_SIZES[0] if args.quick else LIBRARY_SIZES[-1])
    clock = Clock(device)
    command = "python -m benchmarks.perf" + "".join(f" {a}" for a in sys.argv[1:])
    log(f"{command}: torch threads {torch.get_num_threads()}, {device}, {dtype}")

    phases, mark = {}, [time.perf_counter()]

    def phase_done(name: str) -> None:
        now = time.perf_counter()
        phases[name] = now - mark[0]
        mark[0] = now
        log(f"[{name}: {phases[name]:.0f} s]")

    # 1. merge
    log("merge benchmark ...")
    merge = run_merge(args.quick, args.merge_from)
    phase_done("merge")

    # the UNet, and its three sets of attention projections
    log("building the SD1.5 UNet ...")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET_CONFIG).eval().to(device, dtype)
    unet.requires_grad_(False)
    unet_parameters = sum(p.numel() for p in unet.parameters())
    config = share.ShareConfig(rank=STYLE_RANK)
    share_mods = share.inject_share_layers(unet, config)
    names = list(share_mods)
    plain_mods = {name: layer.base_layer for name, layer in share_mods.items()}
    phase_done("build UNet")

    # 2. Share switching with N styles; library sizes
    generator = torch.Generator().manual_seed(0)
    switching, library = {}, []
    shapes = Counter(tuple(layer.base_layer.weight.shape) for layer in share_mods.values())
    for n in LIBRARY_SIZES:
        ranks = basis_ranks(merge["rows"], n)
        share.load_share_state_dict(unet, synthetic_library(share_mods, ranks, n, generator))
        log(f"Share switching, {n} styles ...")
        switching[str(n)] = dict(share=share_switching(unet, clock, switch_repeats))
        share_bytes = sum(
            count * merge_bench.library_bytes(d_out, d_in, *ranks[(d_out, d_in)], n) for (d_out, d_in), count in shapes.items()
        )
        per_style = {r: sum(count * 2 * r * (d_out + d_in) for (d_out, d_in), count in shapes.items()) for r in (4, 16)}
        library.append(dict(styles=n, share_bytes=share_bytes, lora16_bytes=n * per_style[16], lora4_bytes=n * per_style[4]))
    # the library of max(LIBRARY_SIZES) styles stays loaded from here on
    state_a = lora_interop.export_lora(share.export_style(unet, style_name(0)), format="diffusers")
    state_b = lora_interop.export_lora(share.export_style(unet, style_name(1)), format="diffusers")
    phase_done("Share switching")

    # 3. diffusers switching on the plain layers
    put(unet, plain_mods)
    pipe = lora_pipeline(unet)
    log("diffusers loading ...")
    pipe.load_lora_weights(dict(state_a), adapter_name=style_name(0))
    pipe.load_lora_weights(dict(state_b), adapter_name=style_name(1))
    loading = diffusers_loading(pipe, state_a, clock, max(3, switch_repeats // 4))
    loaded = 2
    for n in (n for n in LIBRARY_SIZES if n <= lora_max_styles):
        for i in range(loaded, n):  # further styles: copies of style A under other names
            pipe.load_lora_weights(dict(state_a), adapter_name=style_name(i))
        loaded = n
        log(f"diffusers switching, {n} adapters ...")
        switching[str(n)]["diffusers"] = diffusers_switching(pipe, clock, switch_repeats)
    pipe.set_adapters([style_name(0), style_name(1)], adapter_weights=[0.5, 0.5])
    peft_mods = current(unet, names)
    phase_done("diffusers switching")

    # 4. denoising
    a, b = style_name(0), style_name(1)

    def enter_fused():
        put(unet, share_mods)
        share.set_active_styles(unet, {a: 1.0})
        share.fuse_share_layers(unet)

    def leave_fused():
        share.unfuse_share_layers(unet)
        share.set_active_styles(unet, None)

    def enter_mix():
        put(unet, share_mods)
        share.set_active_styles(unet, {a: 0.5, b: 0.5})

    nothing = lambda: None  # noqa: E731
    conditions = dict(
        base=(lambda: put(unet, plain_mods), nothing),
        share_fused=(enter_fused, leave_fused),
        share_mix=(enter_mix, lambda: share.set_active_styles(unet, None)),
    )
    if not args.no_lora_denoise:
        conditions["lora_mix"] = (lambda: put(unet, peft_mods), nothing)
    log(f"denoising at {args.denoise_latent}x{args.denoise_latent}, batch 2 ...")
    denoising = denoise(unet, conditions, args.denoise_latent, rounds, clock, device, dtype)
    phase_done("denoising")

    # 5. training: drop the diffusers adapters, then Share in training vs a fresh rank-16 LoRA
    put(unet, peft_mods)
    pipe.unload_lora_weights()
    assert all(type(m) is nn.Linear for m in current(unet, names).values())
    del pipe
    put(unet, share_mods)
    share_params = share.begin_style_training(unet, "training", torch.Generator().manual_seed(3))
    for p in share_params:
        p.data = p.data.float()
    put(unet, plain_mods)
    from peft import LoraConfig

    unet.add_adapter(
        LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian", target_modules=list(share.UNET_TARGET_MODULES)),
        adapter_name="lora16",
    )
    lora_params = [p for p in unet.parameters() if p.requires_grad]
    for p in lora_params:
        p.data = p.data.float()  # trainable parameters in fp32 for both methods
    lora_mods = current(unet, names)
    methods = dict(
        share=(lambda: put(unet, share_mods), torch.optim.AdamW(share_params, lr=1e-4)),
        lora=(lambda: put(unet, lora_mods), torch.optim.AdamW(lora_params, lr=1e-4)),
    )
    log(f"training at {args.train_latent}x{args.train_latent}, batch 1 ...")
    training = train(unet, methods, args.train_latent, train_steps, clock, device, dtype)
    phase_done("training")
    params = dict(
        share=sum(p.numel() for p in share_params),
        lora=sum(p.numel() for p in lora_params),
    )

    import diffusers
    import peft

    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    environment = dict(
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        peft=peft.__version__,
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        device=str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
        cpu=cpu,
        machine=platform.machine(),
        python=platform.python_version(),
        unet_parameters=unet_parameters,
        attention_layers=len(names),
        load_average_at_end=load,
        cpu_note="",
    )
    settings = dict(
        quick=args.quick,
        dtype=[k for k, v in DTYPES.items() if v == dtype][0],
        denoise_latent=args.denoise_latent,
        train_latent=args.train_latent,
        rounds=rounds,
        train_steps=train_steps,
        switch_repeats=switch_repeats,
        lora_max_styles=lora_max_styles,
    )
    results = dict(
        command=command,
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        environment=environment,
        settings=settings,
        merge=merge,
        switching=switching,
        loading=loading,
        denoise=denoising,
        train=training,
        trainable_parameters=params,
        library=library,
        gpu=NO_GPU if device.type != "cuda" else "measured",
        seconds_total=time.perf_counter() - started,
        phase_seconds=phases,
    )
    if load is not None:
        environment["cpu_note"] = (
            f"1-minute load average at the end: {load:.1f} on {os.cpu_count()} cores"
            + (" (the CPU was shared with other work: absolute times are inflated; ratios were measured side by side)" if load > (os.cpu_count() or 1) + 0.5 else "")
            + "."
        )
    markdown, ratios = build_report(results)
    results["ratios"] = ratios
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "perf.md").write_text(markdown)
    (args.out / "perf.json").write_text(json.dumps(results, indent=1) + "\n")
    plot(ratios, args.out / "perf.png", f"{command} — {environment['device']}, {settings['dtype']}, {environment['threads']} threads")
    print(markdown)


if __name__ == "__main__":
    main()
