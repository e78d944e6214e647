"""Joint import benchmark: many LoRA adapters into one library in one merge, against one merge per
adapter and against lorashare 0.1.3 (PyPI), on SD1.5's attention shapes (issue #20).

    python -m benchmarks.joint_import [--quick] [--out DIR]

Results go to runs/joint_import/ (untracked) unless --out says otherwise. lorashare is not a
dependency of the project: `pip install lorashare==0.1.3` into the environment to measure it;
without it the report says "not measured: lorashare not installed".

Adapters: 10 of rank 16 on every one of SD1.5's 128 UNet attention projections (--quick: one
layer per distinct shape, 6 layers, each layer's time (best of 3) counted as many times as SD1.5
has layers of its shape, so that seconds are for the whole UNet either way), each B = S_B X + noise, A = S_A Y + noise around a shared
48-dim latent per layer and side (S, fixed per layer; X, Y random per adapter; 30% noise).
One thread. For each method and k, per adapter and layer, the relative ΔW error
‖B Aᵀ − B̂ Âᵀ‖/‖B Aᵀ‖, and the bytes of the result (fp32; basis + loadings, both methods store
the same shapes, so equal k is equal bytes):

- joint: `share.merge_styles`, one call per layer for all 10 adapters (what Studio.import_files does);
- sequential: `share.merge_style` ten times per layer (what an import did before);
- lorashare: `lorashare.compression` on the same adapters in PEFT layout (its PCA of each side's
  factors, eigendecomposition of the d×d covariance), timed without file I/O; its reconstruction's
  ΔW against the original. Its eigendecomposition does not depend on k, so it is timed at k = 32
  only and reused for the other k.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from benchmarks.merge import sd15_attention_shapes
from benchmarks.output import add_output_option, write_results
from share_diffusion.share import initialize, merge_style, merge_styles, relative_error

ADAPTERS = 10
RANK = 16
LATENT = 48
NOISE = 0.3
K = 32
K_SWEEP = (16, 32, 64, 128)
BYTES_PER_VALUE = 4  # float32, as the library stores


def adapters(shapes: list[tuple[int, int]], generator: torch.Generator) -> list[list[tuple[torch.Tensor, torch.Tensor]]]:
    """adapters[i][layer] = (B d_out×r, A d_in×r) around a shared 48-dim latent per layer and side."""
    latents = [(torch.linalg.qr(torch.randn(d_out, LATENT, generator=generator)).Q,
                torch.linalg.qr(torch.randn(d_in, LATENT, generator=generator)).Q) for d_out, d_in in shapes]
    result = []
    for _ in range(ADAPTERS):
        layers = []
        for (d_out, d_in), (shared_b, shared_a) in zip(shapes, latents):
            b = shared_b @ torch.randn(LATENT, RANK, generator=generator) / LATENT**0.5
            a = shared_a @ torch.randn(LATENT, RANK, generator=generator) / LATENT**0.5
            b = b + NOISE * torch.randn(d_out, RANK, generator=generator) / d_out**0.5
            a = a + NOISE * torch.randn(d_in, RANK, generator=generator) / d_in**0.5
            layers.append((b, a))
        result.append(layers)
    return result


def layer_bytes(d_out: int, d_in: int, k_b: int, k_a: int) -> int:
    """A layer's basis and the adapters' loadings (and scales)."""
    return BYTES_PER_VALUE * (d_out * k_b + d_in * k_a + ADAPTERS * (RANK * (k_b + k_a) + 1))


def summary(errors: list[float]) -> dict:
    return {"mean": sum(errors) / len(errors), "max": max(errors)}


REPEATS = 1  # best of; --quick: 3


def timed(fn):
    """(the best of REPEATS runs' seconds, the result)."""
    best, result = float("inf"), None
    for _ in range(REPEATS):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return best, result


def measured(shapes, styles, layers, seconds: float) -> dict:
    """Errors and bytes of merged layers, each (basis_b, basis_a, loadings_b, loadings_a, ...)."""
    errors, size = [], 0
    for n, ((d_out, d_in), (basis_b, basis_a, loadings_b, loadings_a, *_)) in enumerate(zip(shapes, layers)):
        size += layer_bytes(d_out, d_in, basis_b.shape[1], basis_a.shape[1])
        for i, style in enumerate(styles):
            errors.append(relative_error(*style[n], basis_b @ loadings_b[i], basis_a @ loadings_a[i]))
    return {"seconds": seconds, "bytes": size, "error": summary(errors)}


def ours_joint(shapes, weights, styles, k) -> dict:
    seconds, merges = 0.0, []
    for n, ((d_out, d_in), weight) in enumerate(zip(shapes, weights)):
        elapsed, merge = timed(lambda: merge_styles(*initialize(d_out, d_in), torch.zeros(0, dtype=torch.long),
                                                    [s[n] for s in styles], size_limit=k))
        seconds += weight * elapsed
        merges.append(merge)
    return measured(shapes, styles, merges, seconds)


def ours_sequential(shapes, weights, styles, k) -> dict:
    seconds, merges = 0.0, []
    for n, ((d_out, d_in), weight) in enumerate(zip(shapes, weights)):
        def merge_one_by_one():
            state = (*initialize(d_out, d_in), torch.zeros(0, dtype=torch.long))
            for style in styles:
                state = merge_style(*state, *style[n], size_limit=k)[:5]
            return state

        elapsed, state = timed(merge_one_by_one)
        seconds += weight * elapsed
        merges.append(state)
    return measured(shapes, styles, merges, seconds)


def lorashare_sweep(shapes, weights, styles, ks) -> dict[int, dict] | None:
    """lorashare's compression core on the same adapters, in PEFT layout (lora_A r×d_in, lora_B d_out×r),
    one layer at a time (its functions take any set of layers)."""
    try:
        from lorashare import compression
    except ImportError:
        return None
    peft = {f"adapter{i}": {f"base_model.model.layer{n}.lora_{side}.weight": tensor
                            for n, (b, a) in enumerate(style) for side, tensor in (("A", a.T.contiguous()), ("B", b))}
            for i, style in enumerate(styles)}
    seconds_at_k, eigenvectors = 0.0, {}
    for n, weight in enumerate(weights):
        layer = {name: {key: value for key, value in adapter.items() if f".layer{n}." in key} for name, adapter in peft.items()}

        def compress():
            combined = compression.combine_adapter_weights(layer)
            components, _, _ = compression.compute_shared_components(combined, num_components=K, device="cpu")
            return combined, [compression.compute_adapter_loadings(components, w) for w in layer.values()]

        elapsed, (combined, _) = timed(compress)
        seconds_at_k += weight * elapsed
        for group, group_weights in combined.items():  # once more, untimed, to cut at every k
            stacked = torch.cat([compression._orient_weight(w).float() for w in group_weights.values()], dim=1)
            eigenvectors[group] = compression.eigendecomposition(stacked, "cpu")["eigenvectors"]
    results = {}
    for k in ks:
        components = {group: vectors[:, :k].contiguous() for group, vectors in eigenvectors.items()}
        errors, size = [], 0
        for n, (d_out, d_in) in enumerate(shapes):
            k_b, k_a = components[f"layer{n}:B"].shape[1], components[f"layer{n}:A"].shape[1]
            size += layer_bytes(d_out, d_in, k_b, k_a)
        for i, (name, weights) in enumerate(peft.items()):
            rebuilt = compression.reconstruct_adapter_weights(components, compression.compute_adapter_loadings(components, weights))
            for n, (b, a) in enumerate(styles[i]):
                approx_b = rebuilt[f"base_model.model.layer{n}.lora_B.weight"]
                approx_a = rebuilt[f"base_model.model.layer{n}.lora_A.weight"].T
                errors.append(relative_error(b, a, approx_b, approx_a))
        results[k] = {"seconds": seconds_at_k if k == K else None, "bytes": size, "error": summary(errors)}
    return results


def cell(result: dict | None, key: str) -> str:
    if result is None:
        return "not measured: lorashare not installed"
    if key == "seconds":
        return "—" if result["seconds"] is None else f"{result['seconds']:.2f}"
    return f"{result['error']['mean']:.3f} / {result['error']['max']:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="one layer per distinct shape (6), not all 128")
    add_output_option(parser, "joint_import")
    args = parser.parse_args()
    global REPEATS
    REPEATS = 3 if args.quick else 1
    torch.set_num_threads(1)
    counts = sd15_attention_shapes()
    shapes = sorted(counts) if args.quick else [shape for shape in sorted(counts) for _ in range(counts[shape])]
    weights = [counts[shape] if args.quick else 1 for shape in shapes]  # seconds are for the whole UNet
    styles = adapters(shapes, torch.Generator().manual_seed(0))
    merge_style(*initialize(8, 8), torch.zeros(0, dtype=torch.long), torch.randn(8, 2), torch.randn(8, 2))  # warm-up

    rows = {}
    for k in K_SWEEP:
        rows[k] = {"joint": ours_joint(shapes, weights, styles, k),
                   "sequential": ours_sequential(shapes, weights, styles, k) if k == K else None}
        print(f"k={k}: joint {rows[k]['joint']['seconds']:.2f} s", flush=True)
    exact = ours_joint(shapes, weights, styles, None)  # no size limit: every adapter kept
    theirs = lorashare_sweep(shapes, weights, styles, K_SWEEP)
    try:
        from importlib.metadata import version

        lorashare_version = version("lorashare")
    except Exception:  # noqa: BLE001 - not installed
        lorashare_version = None

    command = "python -m benchmarks.joint_import" + (" --quick" if args.quick else "")
    at_k = rows[K]
    lines = [
        f"`{command}`",
        f"{ADAPTERS} rank-{RANK} adapters on {len(shapes)} SD1.5 attention layers ({'one per distinct shape' if args.quick else 'all of them'}), "
        f"around a shared {LATENT}-dim latent per layer and side plus {NOISE:.0%} noise; CPU, one thread, torch "
        f"{torch.__version__}, lorashare {lorashare_version or 'not installed'}. Seconds: for all "
        f"{sum(counts.values())} layers{' (each shape timed, best of 3, times its count)' if args.quick else ''}; lorashare's "
        "without file I/O. Error: relative ΔW error per adapter and layer, mean / max (over the layers run). Bytes: "
        "basis + loadings in float32 for the layers run (both store the same shapes).",
        f"**At k = {K}:**",
        "| method | seconds | error mean / max | MB |",
        "|---|---:|---:|---:|",
        f"| Share, joint import (one merge) | {at_k['joint']['seconds']:.2f} | {cell(at_k['joint'], 'error')} | {at_k['joint']['bytes'] / 1e6:.2f} |",
        f"| Share, one merge per adapter | {at_k['sequential']['seconds']:.2f} | {cell(at_k['sequential'], 'error')} | {at_k['sequential']['bytes'] / 1e6:.2f} |",
        f"| lorashare {lorashare_version or ''} | {cell(theirs and theirs[K], 'seconds')} | {cell(theirs and theirs[K], 'error')} | "
        f"{(theirs[K]['bytes'] / 1e6) if theirs else float('nan'):.2f} |",
    ]
    if theirs:
        speedup = theirs[K]["seconds"] / at_k["joint"]["seconds"]
        lines.append(f"\nJoint import is {speedup:.0f}× faster than lorashare at k = {K}.")
    lines += [
        "\n**Error at equal bytes** (each k is the same bytes for both):",
        "| k | MB | Share joint: error mean / max | lorashare: error mean / max |",
        "|---:|---:|---:|---:|",
    ]
    for k in K_SWEEP:
        lines.append(f"| {k} | {rows[k]['joint']['bytes'] / 1e6:.2f} | {cell(rows[k]['joint'], 'error')} | "
                     f"{cell(theirs and theirs[k], 'error')} |")
    lines.append(f"\nWithout a size limit (k grows to hold every adapter): {exact['bytes'] / 1e6:.2f} MB, error "
                 f"{cell(exact, 'error')}, {exact['seconds']:.2f} s; the {ADAPTERS} adapters as rank-{RANK} fp32 LoRA files: "
                 f"{sum(BYTES_PER_VALUE * ADAPTERS * RANK * (o + i) for o, i in shapes) / 1e6:.2f} MB.")
    markdown = "\n\n".join(lines[:2]) + "\n\n" + "\n".join(lines[2:]) + "\n"
    environment = dict(torch=torch.__version__, threads=torch.get_num_threads(), machine=platform.machine(),
                       python=platform.python_version(), lorashare=lorashare_version)
    write_results(args.out, "joint_import", markdown, dict(command=command, environment=environment, k=K,
                                                           ours={str(k): v for k, v in rows.items()}, exact=exact,
                                                           lorashare={str(k): v for k, v in (theirs or {}).items()}))
    print(markdown)


if __name__ == "__main__":
    main()
