"""Drift against library bytes: what a size limit saves, and what it costs each style (issue #20).

    python -m benchmarks.drift_bytes [--quick | --trained] [--out DIR]

Results go to runs/drift_bytes/ (untracked) unless --out says otherwise.

The synthetic stream of benchmarks/merge.py (rank-4 styles near a shared 16-dim subspace, 30%
noise, loudness varied 10× either way), one layer per distinct SD1.5 attention shape, merged one
style at a time with `share.merge_style` under each size limit (none: k grows as the styles need,
which is what a library does by default). At T = 10, 50, 100, 200 styles: the library's bytes
over all 128 UNet attention layers (float32, as it is stored: basis, loadings at each style's own
rank, scales), the bytes of the same T styles exported as rank-4 float32 LoRA files (the fair
baseline: the same styles, not rank-16 files), and each style's drift, ‖ΔW − ΔŴ‖/‖ΔW‖ against
the style as it was given, mean and max over styles and layers. Here the merges never refuse (no
budget), to draw the whole curve; a library with the default 1% budget would refuse every merge
whose row shows a max drift above 1%.

The last column is what exact errors would cost if the library kept each cut style's reference
factors (rank 4, float32, every layer) to measure later errors against: the library does not;
it keeps no more than four small fields per style in its metadata (share_diffusion/drift.py).

--trained does the same with real styles: the continual benchmark's 8 styles trained with the
embedded model's quick preset (about 25 min on one thread, kept in <out>/trained_factors.safetensors
for the next run), on every Share layer of the embedded UNet, at T = 2, 4, 8 and size limits none,
16, 8, 4 (its layers are 64 to 128 wide): drift_bytes_trained.md.
"""

from __future__ import annotations

import argparse
import platform
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from benchmarks.merge import STYLE_RANK, sd15_attention_shapes, style_stream
from benchmarks.output import add_output_option, write_results
from share_diffusion.share import EXACT, initialize, merge_style, relative_error

STYLE_COUNTS = (10, 50, 100, 200)
SIZE_LIMITS = (None, 256, 128, 64, 32)
TRAINED_COUNTS = (2, 4, 8)
TRAINED_SIZE_LIMITS = (None, 16, 8, 4)
BYTES_PER_VALUE = 4  # float32


def layer_bytes(d_out: int, d_in: int, k_b: int, k_a: int, styles: int) -> int:
    return BYTES_PER_VALUE * (d_out * k_b + d_in * k_a + styles * (STYLE_RANK * (k_b + k_a) + 1))


def merge_stream(styles: list[tuple[torch.Tensor, torch.Tensor]], limit: int | None, counts: tuple[int, ...]) -> list[dict]:
    """One layer's styles (B: d_out×r, A: d_in×r) merged one at a time under `limit`; at each count
    in `counts`, the basis widths and every style's drift so far."""
    d_out, d_in = styles[0][0].shape[0], styles[0][1].shape[0]
    state = (*initialize(d_out, d_in), torch.zeros(0, dtype=torch.long))
    rows = []
    for t, (b, a) in enumerate(styles, start=1):
        state = merge_style(*state, b, a, size_limit=limit)[:5]
        if t in counts:
            basis_b, basis_a, loadings_b, loadings_a, _ = state
            drift = [relative_error(b, a, basis_b @ l_b, basis_a @ l_a) for (b, a), l_b, l_a in zip(styles, loadings_b, loadings_a)]
            rows.append(dict(d_out=d_out, d_in=d_in, styles=t, k_b=basis_b.shape[1], k_a=basis_a.shape[1], drift=drift))
    return rows


def synthetic_layers(shapes: Counter, count: int) -> dict[str, tuple[int, list]]:
    """One layer per distinct shape, with merge.py's stream: {shape: (layers of that shape, styles)}."""
    layers = {}
    for d_out, d_in in sorted(shapes):
        generator = torch.Generator().manual_seed(d_out * 10_000 + d_in)
        layers[f"{d_out}x{d_in}"] = (shapes[(d_out, d_in)], list(style_stream(d_out, d_in, count, generator)))
    return layers


def trained_layers(factors_path: Path) -> dict[str, tuple[int, list]]:
    """The continual benchmark's styles as trained, every Share layer of the embedded UNet:
    {layer: (1, styles)}. Trained once (benchmarks.continual's ShareMethod, the quick preset, in
    its style order) and kept in `factors_path`."""
    if not factors_path.exists():
        from benchmarks.continual import DEFAULT_MODEL, Settings, ShareMethod, training_images
        from share_diffusion.loading import load_pipeline

        settings = Settings()
        pipe = load_pipeline(str(DEFAULT_MODEL), device="cpu", progress=False)
        pipe.unet.requires_grad_(False)
        sets = {s: training_images(s, settings.images_per_style, settings.image_seed + t) for t, s in enumerate(settings.styles)}
        method = ShareMethod(pipe, settings, sets)
        for t, style in enumerate(settings.styles):
            method.learn(t, style)
            print(f"trained {style}", flush=True)
        factors_path.parent.mkdir(parents=True, exist_ok=True)
        save_file({f"{t}.{layer}.{side}": tensor.contiguous() for t, trained in enumerate(method.trained)
                   for layer, pair in trained.items() for side, tensor in zip("BA", pair)}, factors_path)  # fmt: skip
    saved = load_file(factors_path)
    count = 1 + max(int(key.split(".", 1)[0]) for key in saved)
    names = sorted({key.split(".", 1)[1][:-2] for key in saved})
    return {name: (1, [(saved[f"{t}.{name}.B"], saved[f"{t}.{name}.A"]) for t in range(count)]) for name in names}


def drift_table(layers: dict[str, tuple[int, list]], limits: tuple, counts: tuple[int, ...]) -> list[dict]:
    """Per size limit and count T: library and rank-r file bytes over every layer, drift over styles and layers."""
    table = []
    for limit in limits:
        rows = {name: merge_stream(styles, limit, counts) for name, (_, styles) in layers.items()}
        for t in counts:
            at_t = [(layers[name][0], row) for name, layer_rows in rows.items() for row in layer_rows if row["styles"] == t]
            drift = [e for _, row in at_t for e in row["drift"]]
            cut = sum(any(row["drift"][i] > EXACT for _, row in at_t) for i in range(t))  # styles cut in some layer
            library = sum(n * layer_bytes(r["d_out"], r["d_in"], r["k_b"], r["k_a"], t) for n, r in at_t)
            loras = sum(n * t * BYTES_PER_VALUE * STYLE_RANK * (r["d_out"] + r["d_in"]) for n, r in at_t)
            table.append(dict(size_limit=limit, styles=t, k_max=max(max(r["k_b"], r["k_a"]) for _, r in at_t),
                              library_bytes=library, lora_bytes=loras, drift_mean=sum(drift) / len(drift),
                              drift_max=max(drift), cut_styles=cut, reference_bytes=cut * loras // t))
            print(f"limit {limit} T={t}: {library / 1e6:.2f} MB, drift {table[-1]['drift_mean']:.4f}", flush=True)
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 10 and 50 only, size limits none, 64, 32")
    parser.add_argument("--trained", action="store_true", help="the continual benchmark's 8 trained styles instead (embedded UNet)")
    add_output_option(parser, "drift_bytes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.trained:
        layers = trained_layers(args.out / "trained_factors.safetensors")
        counts, limits = TRAINED_COUNTS, TRAINED_SIZE_LIMITS
        source = ("The continual benchmark's 8 styles as trained with the embedded quick preset (rank 4; its style order), "
                  f"every one of the embedded UNet's {len(layers)} Share layers")  # fmt: skip
    else:
        counts = STYLE_COUNTS[:2] if args.quick else STYLE_COUNTS
        limits = (None, 64, 32) if args.quick else SIZE_LIMITS
        shapes = sd15_attention_shapes()
        layers = synthetic_layers(shapes, max(counts))
        source = (f"Rank-{STYLE_RANK} styles near a shared 16-dim subspace + 30% noise (benchmarks/merge.py's stream), one "
                  f"layer per distinct SD1.5 attention shape, counted over all {sum(shapes.values())} UNet attention layers")
    table = drift_table(layers, limits, counts)

    command = "python -m benchmarks.drift_bytes" + (" --quick" if args.quick else "") + (" --trained" if args.trained else "")
    lines = [
        f"`{command}`",
        f"CPU, one thread, torch {torch.__version__}. {source}; merged one at a time; bytes in float32; LoRA files: "
        f"the same styles as rank-{STYLE_RANK} float32 exports. Drift: relative ΔW error "
        "against each style as given, over styles and layers. Merges never refuse here; with the default 1% budget, "
        "every row whose max drift is above 1% would have been refused.",
        "| T styles | size limit | largest k | library (MB) | T rank-4 LoRA files (MB) | LoRAs / library "
        "| drift mean | drift max | within 1% | cut styles | their reference factors (MB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|:---:|---:|---:|",
    ]
    for row in sorted(table, key=lambda r: (r["styles"], -(r["size_limit"] or 10**9))):
        lines.append(
            f"| {row['styles']} | {row['size_limit'] or 'none'} | {row['k_max']} | {row['library_bytes'] / 1e6:.2f} "
            f"| {row['lora_bytes'] / 1e6:.2f} | {row['lora_bytes'] / row['library_bytes']:.2f}× | {row['drift_mean']:.2e} "
            f"| {row['drift_max']:.2e} | {'yes' if row['drift_max'] <= 0.01 else 'no'} | {row['cut_styles']} "
            f"| {row['reference_bytes'] / 1e6:.2f} |"
        )
    markdown = "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n"
    environment = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                       python=platform.python_version())
    write_results(args.out, "drift_bytes_trained" if args.trained else "drift_bytes", markdown,
                  dict(command=command, environment=environment, rows=table))
    print(markdown)


if __name__ == "__main__":
    main()
