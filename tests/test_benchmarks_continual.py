"""The continual benchmark: its metrics on known numbers, and a tiny run of the whole pipeline
(2 styles, 2 training steps, 2 sampling steps, the tiny random model, a tiny untrained-ish judge)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from benchmarks import continual, judge
from share_diffusion import world

NAN = math.nan


def test_forgetting_and_accuracy_on_known_numbers():
    accuracy = np.array(
        [
            [1.00, NAN, NAN],
            [0.50, 0.75, NAN],
            [0.25, 1.00, 0.50],
        ]
    )
    # style 0: best before the end 1.00, final 0.25 -> 0.75; style 1: best 0.75, final 1.00 -> -0.25
    assert continual.average_forgetting(accuracy) == pytest.approx((0.75 - 0.25) / 2)
    assert continual.final_average_accuracy(accuracy) == pytest.approx((0.25 + 1.0 + 0.5) / 3)
    assert continual.average_incremental_accuracy(accuracy) == pytest.approx((1.0 + 0.625 + 1.75 / 3) / 3)
    # improving later is negative forgetting (kept, not clipped to zero)
    assert continual.average_forgetting(np.array([[0.2, NAN], [0.9, 0.4]])) == pytest.approx(-0.7)
    # the best earlier step counts, not the first one
    assert continual.average_forgetting(np.array([[0.2, NAN, NAN], [0.9, 0.4, NAN], [0.3, 0.4, 1.0]])) == pytest.approx(
        ((0.9 - 0.3) + 0.0) / 2
    )
    assert continual.average_forgetting(np.array([[0.7]])) == 0.0


def test_content_matches_reads_colour_and_background():
    scene = world.parse_caption("a red circle on a blue background, in the center")
    reference = world.read_scene(world.render(scene))
    assert continual.content_matches(world.render(scene), reference)["colour_and_background"]
    assert continual.content_matches(world.render(scene), reference)["shape"]
    wrong = world.parse_caption("a yellow circle on a blue background, in the center")
    assert not continual.content_matches(world.render(wrong), reference)["colour_and_background"]
    inverted = world.render_styled("invert", scene, np.random.default_rng(0))
    assert not continual.content_matches(inverted, reference)["colour_and_background"]


def test_evaluation_captions_are_fixed_and_varied():
    captions = continual.evaluation_captions(4, seed=2026)
    assert captions == continual.evaluation_captions(4, seed=2026)
    assert len({world.parse_caption(c).shape for c in captions}) == 4


@pytest.fixture(scope="module")
def tiny_judge():
    settings = judge.JudgeSettings(per_class=4, held_out_per_class=2, epochs=1, batch_size=8, min_accuracy=0.0)
    model, report = judge.load_or_train_judge(settings, cache=None, log=lambda *_: None)
    return model, report


def test_judge_fails_loudly_under_the_bar():
    settings = judge.JudgeSettings(per_class=2, held_out_per_class=2, epochs=1, batch_size=4, min_accuracy=1.01)
    with pytest.raises(judge.JudgeTooWeak, match="before it judges anything"):
        judge.load_or_train_judge(settings, cache=None, log=lambda *_: None)


def test_tiny_run_of_the_whole_benchmark(tiny_pipeline_dir, tiny_judge, tmp_path):
    model, judge_report = tiny_judge
    settings = continual.Settings(
        styles=("sepia", "neon"), images_per_style=3, steps=2, batch_size=2, eval_captions=2, eval_seeds=(0,),
        sampling_steps=2, generation_batch=3, sweep_caps=(2, 64), sweep_ranks=(2,), base_style_floor=True,
    )  # fmt: skip
    results = continual.run_benchmark(settings, tiny_pipeline_dir, model, log=lambda *_: None)

    assert set(results["methods"]) == set(continual.METHODS)
    for method, summary in results["methods"].items():
        matrix = summary["accuracy_matrix"]
        assert len(matrix) == 2 and all(len(row) == 2 for row in matrix), method
        assert matrix[0][1] is None, method  # style 2 is not learned after step 1
        values = np.array([matrix[0][0], matrix[1][0], matrix[1][1]], dtype=float)
        assert np.all((values >= 0) & (values <= 1)), method
        assert summary["final_average_accuracy"] == pytest.approx((matrix[1][0] + matrix[1][1]) / 2)
        assert summary["average_forgetting"] == pytest.approx(matrix[0][0] - matrix[1][0])
        assert summary["storage_bytes"] > 0 and summary["trainable_parameters_per_style"] > 0
        assert 0 <= summary["content_fidelity"] <= 1
    # an independent LoRA never changes after its step
    assert results["methods"]["lora"]["accuracy_matrix"][1][0] == results["methods"]["lora"]["accuracy_matrix"][0][0]
    # Share's merge is lossless while k is under the cap; eig gets the same k
    share_summary, eig_summary = results["methods"]["share"], results["methods"]["share_eig"]
    assert share_summary["drift_per_step"][-1]["max"] < 1e-4
    assert share_summary["storage_bytes"] == eig_summary["storage_bytes"]
    assert share_summary["basis_rank_max_per_step"] == [4, 8]
    # two LoRA files take twice one file
    lora_files = results["methods"]["lora"]["file_bytes_per_style"]
    assert results["methods"]["lora"]["storage_bytes"] == sum(lora_files) == 2 * lora_files[0]
    assert results["methods"]["naive_lora"]["storage_bytes"] == lora_files[0]

    caps = {(e["variant"], e["cap"], e["rank"]): e for e in results["sweep"]}
    assert caps[("share", 64, 4)]["same_as_main_run"] and caps[("share", 64, 4)]["drift"]["max"] < 1e-4
    assert caps[("share", 2, 4)]["basis_rank_max"] == 2 and caps[("share", 2, 4)]["drift"]["mean"] > 0.01
    assert caps[("share", 2, 4)]["storage_bytes"] < share_summary["storage_bytes"]
    assert caps[("share", 64, 2)]["basis_rank_max"] == 4  # retrained with r = 2: two styles of rank 2

    prefix = tmp_path / "continual"
    environment = dict(date="today", machine="test", cpus=2, torch="x", threads=1, training_precision="no",
                       python="3", model="tiny", load_start="0", load_end="0")  # fmt: skip
    markdown = continual.write_report(results, settings, "python -m benchmarks.continual", environment, judge_report, prefix)
    assert markdown.startswith("`python -m benchmarks.continual`")
    saved = json.loads((tmp_path / "continual.json").read_text())
    assert saved["methods"]["share"]["accuracy_matrix"][0][1] is None
    for name in ("accuracy", "tradeoff", "samples"):
        assert (tmp_path / f"continual_{name}.png").stat().st_size > 1000
