"""Drift against library bytes: what a size limit saves, and what it costs each style (issue #20).

    python -m benchmarks.drift_bytes [--quick] [--out DIR]

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
"""

from __future__ import annotations

import argparse
import platform

import torch

from benchmarks.merge import STYLE_RANK, sd15_attention_shapes, style_stream
from benchmarks.output import add_output_option, write_results
from share_diffusion.share import EXACT, initialize, merge_style, relative_error

STYLE_COUNTS = (10, 50, 100, 200)
SIZE_LIMITS = (None, 256, 128, 64, 32)
BYTES_PER_VALUE = 4  # float32


def layer_bytes(d_out: int, d_in: int, k_b: int, k_a: int, styles: int) -> int:
    return BYTES_PER_VALUE * (d_out * k_b + d_in * k_a + styles * (STYLE_RANK * (k_b + k_a) + 1))


def stream_shape(d_out: int, d_in: int, limit: int | None, counts: tuple[int, ...]) -> list[dict]:
    generator = torch.Generator().manual_seed(d_out * 10_000 + d_in)  # the same stream for every limit
    state = (*initialize(d_out, d_in), torch.zeros(0, dtype=torch.long))
    originals, rows = [], []
    for t, (b, a) in enumerate(style_stream(d_out, d_in, max(counts), generator), start=1):
        originals.append((b, a))
        state = merge_style(*state, b, a, size_limit=limit)[:5]
        if t in counts:
            basis_b, basis_a, loadings_b, loadings_a, _ = state
            drift = [relative_error(b, a, basis_b @ l_b, basis_a @ l_a)
                     for (b, a), l_b, l_a in zip(originals, loadings_b, loadings_a)]
            rows.append(dict(d_out=d_out, d_in=d_in, styles=t, k_b=basis_b.shape[1], k_a=basis_a.shape[1], drift=drift))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="T = 10 and 50 only, size limits none, 64, 32")
    add_output_option(parser, "drift_bytes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    counts = STYLE_COUNTS[:2] if args.quick else STYLE_COUNTS
    limits = (None, 64, 32) if args.quick else SIZE_LIMITS
    shapes = sd15_attention_shapes()
    table = []
    for limit in limits:
        rows = [row for d_out, d_in in sorted(shapes) for row in stream_shape(d_out, d_in, limit, counts)]
        for t in counts:
            at_t = [row for row in rows if row["styles"] == t]
            drift = [e for row in at_t for e in row["drift"]]
            cut = sum(any(row["drift"][i] > EXACT for row in at_t) for i in range(t))  # styles cut in some layer
            library = sum(shapes[(r["d_out"], r["d_in"])] * layer_bytes(r["d_out"], r["d_in"], r["k_b"], r["k_a"], t) for r in at_t)
            loras = sum(n * t * BYTES_PER_VALUE * STYLE_RANK * (d_out + d_in) for (d_out, d_in), n in shapes.items())
            table.append(dict(size_limit=limit, styles=t, k_max=max(max(r["k_b"], r["k_a"]) for r in at_t),
                              library_bytes=library, lora_bytes=loras, drift_mean=sum(drift) / len(drift),
                              drift_max=max(drift), cut_styles=cut, reference_bytes=cut * loras // t))
            print(f"limit {limit} T={t}: {library / 1e6:.1f} MB, drift {table[-1]['drift_mean']:.4f}", flush=True)

    command = "python -m benchmarks.drift_bytes" + (" --quick" if args.quick else "")
    lines = [
        f"`{command}`",
        f"CPU, one thread, torch {torch.__version__}. Rank-{STYLE_RANK} styles near a shared 16-dim subspace + 30% noise "
        f"(benchmarks/merge.py's stream), merged one at a time; bytes over all {sum(shapes.values())} UNet attention "
        f"layers in float32; LoRA files: the same styles as rank-{STYLE_RANK} float32 exports. Drift: relative ΔW error "
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
    write_results(args.out, "drift_bytes", markdown, dict(command=command, environment=environment, rows=table))
    print(markdown)


if __name__ == "__main__":
    main()
