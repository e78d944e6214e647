"""No style is ever silently degraded (issue #20): k grows as the styles need, a size limit that
would push a style past its drift budget refuses the merge, every reported error is measured
against the ΔW the style came with, each style keeps its own rank, an import of many files is one
merge, and an import or a training whose merge would cut styles can be held for the user to see
first. Real LoRA files and trainings on the embedded model; nothing mocked."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from share_diffusion import share
from share_diffusion.drift import DriftError
from share_diffusion.library import FORMAT_VERSION, StyleLibrary
from share_diffusion.loading import EMBEDDED_MODEL_DIR, load_pipeline
from share_diffusion.lora_interop import export_lora, read_lora, save_lora
from share_diffusion.share import ShareConfig, ShareLinear
from share_diffusion.studio import Studio, library_style_factors
from share_diffusion.training import TrainingConfig

ROOT = Path(__file__).resolve().parent.parent
MODEL = os.environ.get("SHARE_TEST_MODEL", str(EMBEDDED_MODEL_DIR))


def random_factors(d_out: int, d_in: int, rank: int, generator: torch.Generator):
    return torch.randn(d_out, rank, generator=generator), torch.randn(d_in, rank, generator=generator)


# --- the merge, on one layer ------------------------------------------------------------


def test_without_a_size_limit_k_grows_past_64_and_every_style_stays_exact():
    g = torch.Generator().manual_seed(0)
    layer = ShareLinear(torch.nn.Linear(90, 100), ShareConfig())
    originals = {}
    for i in range(20):  # 80 directions: past the old cap of 64
        originals[f"s{i}"] = random_factors(100, 90, 4, g)
        layer.add_style(f"s{i}", *originals[f"s{i}"])
    assert layer.basis_a.shape[1] == layer.basis_b.shape[1] == 80
    for style, (b, a) in originals.items():
        assert share.relative_error(b, a, *layer.style_factors(style)) <= 1e-6


def test_each_style_keeps_its_own_rank_through_merges_with_wider_styles():
    g = torch.Generator().manual_seed(1)
    layer = ShareLinear(torch.nn.Linear(40, 48), ShareConfig())
    ranks = {"narrow": 2, "wide": 8, "middle": 4, "widest": 12}
    for style, rank in ranks.items():
        layer.add_style(style, *random_factors(48, 40, rank, g))
    for style, rank in ranks.items():
        loadings_b, loadings_a, _ = layer.style_loadings(style)
        assert loadings_b.shape[1] == loadings_a.shape[1] == rank
    unet_like = torch.nn.Sequential()
    unet_like.add_module("to_q", layer)
    assert share.export_style(unet_like, "narrow")["to_q"][0].shape[1] == 2
    state = export_lora(share.export_style(unet_like, "narrow"), format="diffusers")
    assert {v.shape[0] for k, v in state.items() if k.endswith("lora_A.weight")} == {2}


def test_a_joint_merge_is_the_best_rank_k_basis_for_all_new_styles():
    g = torch.Generator().manual_seed(2)
    d_out, d_in, k = 64, 48, 12
    shared_b, shared_a = torch.randn(d_out, 8, generator=g), torch.randn(d_in, 8, generator=g)
    styles = [(shared_b @ torch.randn(8, 4, generator=g) + 0.3 * torch.randn(d_out, 4, generator=g),
               shared_a @ torch.randn(8, 4, generator=g) + 0.3 * torch.randn(d_in, 4, generator=g)) for _ in range(6)]
    empty = share.initialize(d_out, d_in)
    joint = share.merge_styles(*empty, torch.zeros(0, dtype=torch.long), styles, size_limit=k)

    def stacked(side: int) -> torch.Tensor:
        columns = []
        for b, a in styles:
            u, s, vh = torch.linalg.svd((b @ a.T).double(), full_matrices=False)
            canonical = (u if side == 0 else vh.T) * s.sqrt()
            columns.append(canonical / canonical.norm())
        return torch.cat(columns, dim=1)

    for basis, side in ((joint.basis_b, 0), (joint.basis_a, 1)):
        assert basis.shape[1] == k
        matrix = stacked(side)
        unexplained = float((matrix - basis.double() @ (basis.double().T @ matrix)).square().sum())
        best = float(torch.linalg.svdvals(matrix)[k:].square().sum())
        assert unexplained <= best + 1e-6 * float(matrix.square().sum())

    layer = ShareLinear(torch.nn.Linear(d_in, d_out), ShareConfig(max_basis_rank=k))
    for i, (b, a) in enumerate(styles):  # the same styles one merge at a time, under the same k
        layer.add_style(f"s{i}", b, a)
    sequential = [share.relative_error(b, a, *layer.style_factors(f"s{i}")) for i, (b, a) in enumerate(styles)]
    assert float(joint.step_errors.mean()) <= sum(sequential) / len(sequential)


# --- the library, on the embedded model -------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(MODEL, device="cpu", progress=False)


def lora_files(pipe, folder: Path, count: int, rank: int, seed: int, shared: int = 0) -> list[Path]:
    """`count` LoRA files of `rank` over every attention layer, alternately kohya and diffusers.
    With `shared` > 0 they lie near a shared subspace of that dimension (plus 30% noise), as
    styles of one model tend to; else they are unrelated."""
    layers = {n: getattr(m, "base_layer", m) for n, m in pipe.unet.named_modules()
              if share.matches(n, share.UNET_TARGET_MODULES) and isinstance(getattr(m, "base_layer", m), torch.nn.Linear)}
    g = torch.Generator().manual_seed(seed)
    sizes = {n: (m.out_features, m.in_features) for n, m in layers.items()}
    bases = {n: (torch.randn(o, shared, generator=g), torch.randn(i, shared, generator=g)) for n, (o, i) in sizes.items()}
    paths = []
    for number in range(count):
        factors = {}
        for name, (d_out, d_in) in sizes.items():
            b, a = random_factors(d_out, d_in, rank, g)
            if shared:
                b = bases[name][0] @ torch.randn(shared, rank, generator=g) + 0.3 * b
                a = bases[name][1] @ torch.randn(shared, rank, generator=g) + 0.3 * a
            factors[name] = (0.05 * b, 0.05 * a)
        state = export_lora(factors, format="kohya" if number % 2 else "diffusers")
        paths.append(save_lora(folder / f"lora-{seed}-{number:02d}.safetensors", state))
    return paths


def measured_error(studio: Studio, name: str, original: Path) -> float:
    """The exported ΔW against the original file, the largest relative error over the layers."""
    reference, _, _ = read_lora(original, studio.pipe.unet)
    exported = library_style_factors(studio.library, studio.library.style(name)["id"], "unet")
    return max(share.relative_error(b, a, *exported[layer]) for layer, (b, a) in reference.items())


def test_24_unrelated_rank_8_loras_import_in_one_merge_within_1_percent(pipe, tmp_path):
    """The done-when check of issue #20: every style within 1%, measured as the exported LoRA's ΔW
    against the original file, with its own rank, and the reported error never below that."""
    studio = Studio(pipe, tmp_path / "library.safetensors")
    paths = lora_files(pipe, tmp_path, 24, rank=8, seed=0)
    names = studio.import_files(paths)
    assert len(names) == 24 and len(studio.library.meta["merges"]) == 1  # one merge for all 24
    for path, name in zip(paths, names):
        record = studio.library.style(name)
        exported = studio.export_lora(name, tmp_path / f"exported-{name}.safetensors")
        back, _, info = read_lora(exported, pipe.unet)
        original, _, _ = read_lora(path, pipe.unet)
        error = max(share.relative_error(b, a, *back[layer]) for layer, (b, a) in original.items())
        assert error <= 0.01, name
        assert info["rank"] == record["rank"] == 8
        assert record["error_exact"] and record["error"] >= measured_error(studio, name, path)


def test_reported_errors_are_never_below_the_measured_ones_in_a_stream_that_cuts(pipe, tmp_path):
    """Sequential imports under a size limit: each merge cuts. Every style's reported error is at
    least what its exported ΔW measures against the original file, and equal to it (to float
    rounding) while the record says it is exact."""
    studio = Studio(pipe, tmp_path / "library.safetensors")
    studio.configure(drift_budget=1.0, size_limit=24)  # room to cut: the point is the bookkeeping
    paths = lora_files(pipe, tmp_path, 8, rank=4, seed=1, shared=6)
    imported = {}
    for path in paths:
        imported[studio.import_files([path])[0]] = path
        for name, original in imported.items():
            record, measured = studio.library.style(name), measured_error(studio, name, original)
            assert record["error"] >= measured, (name, record["error"], measured)
            if record["error_exact"]:
                assert record["error"] <= measured + 1e-5, (name, record["error"], measured)
    records = studio.library.styles
    assert any(r["cuts"] == 1 and r["error"] > 1e-3 for r in records), "the stream must cut styles"
    assert all(r["error_exact"] == (r["cuts"] <= 1) for r in records)


def test_a_merge_past_the_budget_under_a_size_limit_is_refused_and_writes_nothing(pipe, tmp_path):
    studio = Studio(pipe, tmp_path / "library.safetensors")
    paths = lora_files(pipe, tmp_path, 4, rank=8, seed=2)
    studio.import_files(paths[:2])
    studio.configure(size_limit=20)  # 16 directions used; two unrelated rank-8 styles need 32
    saved = studio.path.read_bytes()

    check = studio.check_import(paths[2:])
    assert check.names == ["lora-2-02", "lora-2-03"] and check.basis_rank_before == 16
    over = {d.name: d.after for d in check.drifts if d.over_budget}
    assert over and all(error > 0.01 for error in over.values())

    with pytest.raises(DriftError) as refused:
        studio.import_files(paths[2:])
    message = str(refused.value)
    assert "size limit of 20" in message and "nothing was merged" in message
    for name, error in over.items():
        assert f"{name!r} to {100 * error:.3g}%" in message
    assert studio.path.read_bytes() == saved and studio.style_names() == ["lora-2-00", "lora-2-01"]
    refused = subprocess.run([sys.executable, "-m", "share_diffusion", "import", "--library", str(studio.path), "--model",
                              MODEL, *map(str, paths[2:])], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and len(refused.stderr.strip().splitlines()) == 1
    assert "error: nothing was merged: under the size limit of 20" in refused.stderr
    assert studio.path.read_bytes() == saved

    studio.configure(size_limit=None)  # no limit: k grows, nothing drifts
    studio.import_files(paths[2:])
    assert studio.library.basis_rank() == 32
    assert all(r["error"] <= 1e-5 and r["error_exact"] for r in studio.library.styles)


def test_an_import_that_cuts_is_held_with_the_most_drifted_styles_drawn_before_and_after(pipe, tmp_path):
    """import_unless_drifting keeps a merge that cuts no style; one that cuts is rolled back, with
    the most drifted earlier styles (at most `previews`, worst first) drawn as the library draws
    them now and as the merge would leave them."""
    studio = Studio(pipe, tmp_path / "library.safetensors")
    studio.configure(drift_budget=1.0)  # room to cut: the point is the hold
    paths = lora_files(pipe, tmp_path, 3, rank=8, seed=5)
    kept = studio.import_unless_drifting(paths[:2], previews=1)
    assert kept.committed and kept.drifting == [] and kept.previews == []
    assert StyleLibrary.load(studio.path).basis_rank() == 16
    studio.configure(size_limit=20)  # the third style needs 8 directions more
    saved = studio.path.read_bytes()

    held = studio.import_unless_drifting(paths[2:], previews=1)
    assert not held.committed and held.names == ["lora-5-02"]
    earlier = [d for d in held.drifting if d.name != "lora-5-02"]
    assert len(earlier) == 2 and earlier[0].after >= earlier[1].after > share.EXACT
    [preview] = held.previews
    assert preview.drift == earlier[0] and preview.prompt == studio.sample_prompt(earlier[0].name)
    assert studio.path.read_bytes() == saved and studio.style_names() == ["lora-5-00", "lora-5-01"]
    now = studio.generate(preview.prompt, style=preview.drift.name, add_trigger=False, seed=preview.seed)[0][0]
    assert np.array_equal(np.asarray(now), np.asarray(preview.before))
    assert not np.array_equal(np.asarray(preview.before), np.asarray(preview.after))


def pictures(count: int = 4) -> list[Path]:
    return sorted((ROOT / "styles" / "examples" / "hatching").glob("*.png"))[:count]


TWO_STEPS = TrainingConfig(steps=2, batch_size=2, learning_rate=1e-2, strength_previews=0)


def studio_with_two_loras(pipe, folder: Path, name: str, drift_budget: float) -> Studio:
    """Two unrelated rank-8 LoRA styles (16 basis directions), then a size limit of 18: a rank-4
    training needs 4 more, so its merge cuts."""
    studio = Studio(pipe, folder / name)
    studio.configure(drift_budget=drift_budget)
    studio.import_files(lora_files(pipe, folder, 2, rank=8, seed=6))
    studio.configure(size_limit=18)
    return studio


def test_a_training_that_cuts_is_held_and_its_confirm_merges_it_without_a_step(pipe, tmp_path):
    """hold_if_drifting: the merge of a training that cuts is rolled back with the most drifted
    earlier style drawn before and after, its checkpoint kept; training it again with resume=True
    merges it at once (no step trains), the same style as a training never held, and the library
    then draws what the preview showed."""
    straight = studio_with_two_loras(pipe, tmp_path, "straight.safetensors", drift_budget=1.0)
    straight.train(pictures(), "Grain", config=TWO_STEPS)
    studio = studio_with_two_loras(pipe, tmp_path, "library.safetensors", drift_budget=1.0)
    saved = studio.path.read_bytes()

    result = studio.train(pictures(), "Grain", config=TWO_STEPS, hold_if_drifting=True, previews=1)
    held = result.held
    assert held is not None and not held.committed and held.names == ["Grain"]
    assert (held.basis_rank_before, held.basis_rank_after) == (16, 18) and held.bytes_before == len(saved)
    earlier = [d for d in held.drifting if d.name != "Grain"]
    assert earlier and earlier[0].after > share.EXACT and not any(d.over_budget for d in held.drifts)
    [preview] = held.previews
    assert preview.drift == earlier[0] and preview.prompt == studio.sample_prompt(earlier[0].name)
    assert studio.path.read_bytes() == saved and studio.style_names() == ["lora-6-00", "lora-6-01"]
    assert studio.interrupted_training("Grain") == TWO_STEPS.steps

    def drawn() -> np.ndarray:
        return np.asarray(studio.generate(preview.prompt, style=preview.drift.name, add_trigger=False, seed=preview.seed)[0][0])

    assert np.array_equal(drawn(), np.asarray(preview.before))
    assert not np.array_equal(np.asarray(preview.before), np.asarray(preview.after))

    steps = []
    confirmed = studio.train(pictures(), "Grain", config=TWO_STEPS, resume=True, progress=steps.append)
    assert steps == [] and confirmed.resumed_from == TWO_STEPS.steps and confirmed.held is None
    assert studio.interrupted_training("Grain") is None and np.array_equal(drawn(), np.asarray(preview.after))
    kept, reference = StyleLibrary.load(studio.path), StyleLibrary.load(straight.path)
    assert kept.style("Grain")["error"] == reference.style("Grain")["error"]
    for component in ("unet", "text_encoder"):
        ours = library_style_factors(kept, kept.style("Grain")["id"], component)
        theirs = library_style_factors(reference, reference.style("Grain")["id"], component)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[layer][i], theirs[layer][i]) for layer in ours for i in (0, 1))


def test_a_held_training_past_the_budget_is_refused_on_confirm_and_merges_once_the_limit_is_lifted(pipe, tmp_path):
    studio = studio_with_two_loras(pipe, tmp_path, "library.safetensors", drift_budget=0.01)
    saved = studio.path.read_bytes()
    held = studio.train(pictures(), "Grain", config=TWO_STEPS, hold_if_drifting=True).held
    assert held is not None and any(d.over_budget for d in held.drifts) and held.previews == []
    assert studio.path.read_bytes() == saved

    with pytest.raises(DriftError, match="nothing was merged: under the size limit of 18"):
        studio.train(pictures(), "Grain", config=TWO_STEPS, resume=True)
    assert studio.path.read_bytes() == saved and studio.style_names() == ["lora-6-00", "lora-6-01"]
    assert studio.interrupted_training("Grain") == TWO_STEPS.steps

    studio.configure(size_limit=None)
    steps = []
    assert studio.train(pictures(), "Grain", config=TWO_STEPS, resume=True, progress=steps.append).held is None
    assert steps == [] and StyleLibrary.load(studio.path).style("Grain")["cuts"] == 0


def test_budgets_and_errors_show_in_list_and_settings(pipe, tmp_path):
    studio = Studio(pipe, tmp_path / "library.safetensors")
    studio.import_files(lora_files(pipe, tmp_path, 2, rank=4, seed=3))
    studio.configure(drift_budget=0.05, style="lora-3-01")
    studio.configure(drift_budget=0.02, size_limit=64)

    def cli(*args):
        result = subprocess.run([sys.executable, "-m", "share_diffusion", *args], cwd=ROOT, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stderr
        return result.stdout

    listed = json.loads(cli("list", "--library", str(studio.path), "--json"))
    assert listed["drift_budget"] == 0.02 and listed["size_limit"] == 64
    styles = {s["name"]: s for s in listed["styles"]}
    assert styles["lora-3-00"]["drift_budget"] == 0.01 and styles["lora-3-01"]["drift_budget"] == 0.05
    assert all(s["rank"] == 4 and s["error_exact"] and s["error"] < 1e-5 for s in styles.values())
    text = cli("list", "--library", str(studio.path))
    assert "size limit k≤64" in text and "ΔW error" in text and "(budget 5%)" in text
    shown = cli("settings", "--library", str(studio.path), "--model", MODEL, "--size-limit", "none", "--drift-budget", "3%")
    assert "drift budget 3% for new styles, size limit none" in shown
    meta = StyleLibrary.load(studio.path).meta
    assert meta["share"]["max_basis_rank"] is None and meta["share"]["drift_budget"] == 0.03


def test_a_library_written_before_drift_budgets_still_loads(pipe, tmp_path):
    """A version-1 file, as version-1 code wrote it: it opens, its styles draw as before, a drifted
    style's recorded error stays a bound, and the next change writes version 2."""
    studio = Studio(pipe, tmp_path / "new.safetensors")
    paths = lora_files(pipe, tmp_path, 3, rank=4, seed=4)
    studio.import_files(paths[:2])
    library = StyleLibrary.load(studio.path)
    meta = library.meta
    meta["format_version"] = 1
    meta["share"] = {"rank": 4, "alpha": None, "max_basis_rank": 64, "energy_threshold": 0.999999999}
    for record, error in zip(meta["styles"], (3e-8, 0.25)):
        for key in ("error_exact", "cuts", "rank", "drift_budget"):
            del record[key]
        record["error"] = error
    old = tmp_path / "old.safetensors"
    old.write_bytes(library.to_bytes())

    reopened = Studio(pipe, old)
    first, second = reopened.styles
    assert first["error_exact"] and not second["error_exact"] and second["error"] == 0.25
    assert first["rank"] == second["rank"] == 4 and reopened.library.meta["share"]["max_basis_rank"] is None
    assert measured_error(reopened, "lora-4-00", paths[0]) <= 1e-5
    reopened.import_files(paths[2:])
    saved = StyleLibrary.load(old)
    assert saved.meta["format_version"] == FORMAT_VERSION and saved.style("lora-4-01")["error"] >= 0.25
    assert measured_error(reopened, "lora-4-00", paths[0]) <= 1e-5
