"""The web app's event handlers (app.callbacks.StudioCallbacks), called the way Gradio calls them.

The model is the embedded one unless SHARE_TEST_MODEL points elsewhere (same architecture, e.g. a
``python -m share_diffusion.pretrain --smoke`` output).
"""

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

gr = pytest.importorskip("gradio")

from app.callbacks import NO_STYLE, StudioCallbacks  # noqa: E402
from app.ui import build_app  # noqa: E402
from share_diffusion import share  # noqa: E402
from share_diffusion.drift import percent  # noqa: E402
from share_diffusion.generation import native_size  # noqa: E402
from share_diffusion.library import StyleLibrary  # noqa: E402
from share_diffusion.loading import EMBEDDED_MODEL_DIR, load_pipeline, model_info  # noqa: E402
from share_diffusion.lora_interop import export_lora, save_lora  # noqa: E402
from share_diffusion.png_metadata import read_png_metadata  # noqa: E402
from share_diffusion.studio import Studio  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "styles" / "examples"
MODEL = os.environ.get("SHARE_TEST_MODEL", str(EMBEDDED_MODEL_DIR))
# Advanced fields of the Train tab: steps, learning rate, rank, batch size, preview every.
FEW_STEPS = (4, 1e-2, 4, 2, 2)


@pytest.fixture(scope="module")
def pipe():
    return load_pipeline(MODEL, device="cpu", progress=False)


def make_callbacks(pipe, folder: Path, name: str = "library.safetensors") -> StudioCallbacks:
    studio = Studio(pipe, folder / name, model_id=model_info(pipe).name)  # (re)attaches its own Share state
    return StudioCallbacks(pipe, studio, folder / "outputs", work_dir=folder / "work")


@pytest.fixture
def cb(pipe, tmp_path):
    return make_callbacks(pipe, tmp_path)


def example_files(style: str, count: int = 4) -> list[str]:
    """The first images of an example set, each with its caption file."""
    images = sorted((EXAMPLES / style).glob("*.png"))[:count]
    return [str(p) for image in images for p in (image, image.with_suffix(".txt"))]


def train(cb: StudioCallbacks, files, name: str, trigger: str = "", settings=FEW_STEPS) -> list[tuple]:
    """Run the Train button's handler to the end; returns every update it streamed."""
    return list(cb.train(files, name, trigger, "quick", *settings))


def generate(cb: StudioCallbacks, style=NO_STYLE, mix_style=NO_STYLE, mix_weight=0.5, seed=5, strength=1.0):
    width, height = native_size(cb.pipe)
    return cb.generate("a red circle on a blue background", "", style, strength, mix_style, mix_weight, True, seed, 4, 4.0,
                       None, width, height, 1)


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"), dtype=np.float32)


def test_example_upload_train_and_generate_with_the_new_style(cb, tmp_path):
    files, name, trigger = cb.load_example("hatching")
    assert (name, trigger) == ("Hatching", "hatching") and len(files) == 24
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    thumbnails, rejected, summary = cb.inspect_uploads(files[:8] + [str(broken)])
    assert len(thumbnails) == 4 and thumbnails[0][1]  # captions from the .txt files
    assert [row[0] for row in rejected] == ["broken.png"] and rejected[0][1]
    assert summary.startswith("4 usable images (4 with captions); 1 rejected")

    updates = train(cb, files[:8] + [str(broken)], name, trigger)
    status, previews, comparison, errors, confirm, cancel = updates[-1]
    assert status.startswith("Learned **Hatching**") and comparison == [] and errors == []
    assert confirm["visible"] is False and cancel["visible"] is False  # nothing to confirm
    assert [caption for _, caption in previews] == ["step 2", "step 4", "Hatching · final sample"]
    assert any("step" in update[0] for update in updates[:-1])  # progress was streamed
    assert cb.studio.library.style("Hatching")["images"] == 4

    style, mix, selected = cb.refresh_styles(NO_STYLE, NO_STYLE, None)
    assert style["choices"] == [("none", NO_STYLE), ("Hatching", "Hatching")] and style["value"] == NO_STYLE
    assert mix["choices"] == style["choices"] and selected["value"] == "Hatching"

    paths, used, downloads, note = generate(cb, style="Hatching")
    assert used == 5 and downloads == paths and len(paths) == 1
    meta = read_png_metadata(paths[0])
    assert meta["prompt"] == "a red circle on a blue background, in hatching style"
    assert meta["styles"] == {"Hatching": 1.0} and meta["seed"] == 5
    assert meta["library_hash"] == cb.studio.library_hash() and "hatching style" in note
    plain, _, _, _ = generate(cb)
    assert "styles" not in read_png_metadata(plain[0])
    assert np.abs(pixels(plain[0]) - pixels(paths[0])).max() > 1  # the style changes the image


def test_second_style_shows_earlier_styles_before_and_after_the_merge(cb):
    train(cb, example_files("hatching"), "Hatching")
    _, _, comparison, errors, _, _ = train(cb, example_files("neon"), "Neon")[-1]
    assert [caption for _, caption in comparison] == ["Hatching · before", "Hatching · after"]
    before, after = (pixels(path) for path, _ in comparison)
    assert np.abs(before - after).max() <= 1.0  # same seed, and the merge kept Hatching
    assert [row[0] for row in errors] == ["Hatching"] and float(errors[0][2]) <= 1e-4

    paths, _, _, _ = generate(cb, style="Hatching", mix_style="Neon", mix_weight=0.5)
    assert read_png_metadata(paths[0])["styles"] == {"Neon": 0.5, "Hatching": 1.0}
    rows = cb.library_rows(make_samples=True)
    assert [row[1] for row in rows] == ["Hatching", "Neon"]
    assert all(row[0].startswith('<img src="data:image/png;base64,') for row in rows)
    images, steps, rank, error = rows[0][4:8]
    assert rows[0][2] == "hatching" and images == 4 and steps == 4 and rank == 4
    assert float(error.split(" (")[0]) <= 1e-4 and error.endswith("(1%)")  # exact to rounding, within the 1% budget
    facts = cb.library_facts()
    assert "**Styles** 2" in facts and "separate" in facts and cb.studio.library_hash() in facts


def test_rename_delete_and_undo_refresh_the_dropdowns(cb):
    train(cb, example_files("hatching"), "Hatching")
    rows = cb.library_rows()
    clicked = cb.select_row(rows, gr.SelectData(None, {"index": [0, 3], "value": rows[0][3], "selected": True}))
    assert clicked["value"] == "Hatching"  # clicking anywhere in a row selects its style
    message, selected = cb.rename("Hatching", "Crosshatch")
    assert "Crosshatch" in message and selected["value"] == "Crosshatch"
    style, mix, chosen, rows, facts = cb.refresh_all("Hatching", NO_STYLE, "Crosshatch")
    assert style["choices"] == [("none", NO_STYLE), ("Crosshatch", "Crosshatch")]
    assert style["value"] == NO_STYLE  # the old name is gone
    assert chosen["value"] == "Crosshatch" and [row[1] for row in rows] == ["Crosshatch"]

    assert "Deleted **Crosshatch**" in cb.remove("Crosshatch")
    assert cb.studio.style_names() == [] and cb.refresh_styles()[0]["choices"] == [("none", NO_STYLE)]
    cb.undo()
    assert cb.studio.style_names() == ["Crosshatch"]
    assert StyleLibrary.load(cb.studio.path).styles[0]["name"] == "Crosshatch"


def test_export_library_and_lora_then_import_them(cb, pipe, tmp_path):
    train(cb, example_files("hatching"), "Hatching")
    exported = Path(cb.export_library())
    assert exported.read_bytes() == cb.studio.path.read_bytes()
    assert StyleLibrary.load(exported).styles[0]["name"] == "Hatching"
    lora = Path(cb.export_lora("Hatching", "kohya"))
    assert lora.name == "Hatching-kohya-lora.safetensors" and lora.stat().st_size > 0

    other = make_callbacks(pipe, tmp_path, "other.safetensors")
    assert "**Hatching**" in other.import_files([str(exported)], "rename")[0]
    assert "**Hatching (2)**" in other.import_files([str(exported)], "rename")[0]
    assert "Nothing imported" in other.import_files([str(exported)], "skip")[0]
    assert "**Hatching-kohya-lora**" in other.import_files([str(lora)], "rename")[0]
    assert other.studio.style_names() == ["Hatching", "Hatching (2)", "Hatching-kohya-lora"]
    rows = other.library_rows()
    assert rows[0][8] == "library library.safetensors" and rows[2][8] == "LoRA Hatching-kohya-lora.safetensors"
    assert rows[2][6] == 4 and rows[2][7].endswith("(1%)")  # its own rank; its ΔW error and budget


def random_lora(pipe, path: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA file of random rank-`rank` factors over every Share layer of the UNet."""
    g = torch.Generator().manual_seed(seed)
    factors = {name: (0.05 * torch.randn(layer.d_out, rank, generator=g),
                      0.05 * torch.randn(layer.d_in, rank, generator=g))
               for name, layer in share.share_layers(pipe.unet).items()}
    return save_lora(path, export_lora(factors))


def test_an_import_that_drifts_nothing_is_done_at_once_without_previews(cb, tmp_path):
    first, second = (str(random_lora(cb.pipe, tmp_path / f"{name}.safetensors", seed))
                     for seed, name in enumerate(("First", "Second")))
    assert "Imported **First** in one merge (basis rank k 0 → 4" in cb.start_import([first], "rename")[0]
    report, previews, confirm, cancel = cb.start_import([second], "rename")
    assert report.startswith("Imported **Second** in one merge (basis rank k 4 → 8") and "no style drifted" in report
    assert previews == {"__type__": "update", "value": [], "visible": False}
    assert confirm["visible"] is False and cancel["visible"] is False
    assert [s["name"] for s in StyleLibrary.load(cb.studio.path).styles] == ["First", "Second"]
    saved = cb.studio.path.read_bytes()
    assert "Nothing to import" in cb.start_import([second], "skip")[0] and cb.studio.path.read_bytes() == saved


def test_an_import_that_drifts_a_style_shows_it_before_and_after_and_confirm_draws_the_after(cb, tmp_path):
    """Under a size limit the import would cut the earlier style (within its budget of 100%): the
    report shows it before and after, writes nothing, and Confirm makes the library draw the after."""
    first, second = (str(random_lora(cb.pipe, tmp_path / f"{name}.safetensors", seed))
                     for seed, name in enumerate(("First", "Second")))
    cb.save_drift_settings(100, 0)
    cb.start_import([first], "rename")
    cb.save_drift_settings(100, 5)  # 4 directions used; Second needs 4 more
    saved = cb.studio.path.read_bytes()
    report, previews, confirm, cancel = cb.start_import([second], "rename")
    assert "would drift under the size limit, each within its budget" in report and "**Confirm** to import" in report
    assert "| First | " in report and "| Second | new |" in report
    assert previews["visible"] is True and confirm["visible"] is True and cancel["visible"] is True
    (before, before_caption), (after, after_caption) = previews["value"]
    assert before_caption == "First · before" and after_caption.startswith("First · after (drift ")
    assert cb.studio.path.read_bytes() == saved and cb.studio.style_names() == ["First"]

    meta = read_png_metadata(after)
    assert meta["prompt"] == cb.studio.sample_prompt("First") and read_png_metadata(before)["seed"] == meta["seed"]

    def drawn() -> np.ndarray:
        image = cb.studio.generate(meta["prompt"], style="First", add_trigger=False, seed=meta["seed"])[0][0]
        return np.asarray(image, dtype=np.float32)

    assert np.abs(drawn() - pixels(before)).max() <= 1.0  # the library as it is
    assert np.abs(pixels(after) - pixels(before)).max() > 1.0  # the cut shows

    message, previews, confirm, cancel = cb.import_files([second], "rename")
    assert message == "Imported **Second** in one merge."
    assert previews["visible"] is False and confirm["visible"] is False and cancel["visible"] is False
    assert np.abs(drawn() - pixels(after)).max() <= 1.0  # the library now draws what the preview showed
    assert after_caption == f"First · after (drift {percent(cb.studio.library.style('First')['error'])})"


def test_cancelling_an_import_past_the_budget_leaves_the_library_file_byte_identical(cb, tmp_path):
    """Under a size limit that would push the earlier style past its 1% budget: the report says so,
    with the style before and after, offers no Confirm, and Cancel leaves every byte as it was."""
    first, second = (str(random_lora(cb.pipe, tmp_path / f"{name}.safetensors", seed))
                     for seed, name in enumerate(("First", "Second")))
    cb.start_import([first], "rename")
    assert "size limit 5" in cb.save_drift_settings(1, 5)
    saved = cb.studio.path.read_bytes()
    report, previews, confirm, cancel = cb.start_import([second], "rename")
    assert "Not possible under the size limit" in report and "**over budget**" in report
    assert confirm["visible"] is False and cancel["visible"] is True
    assert [caption.split(" (")[0] for _, caption in previews["value"]] == ["First · before", "First · after"]
    message, previews, confirm, cancel = cb.cancel_import()
    assert message == "Import cancelled: the library is unchanged."
    assert previews["value"] == [] and not (previews["visible"] or confirm["visible"] or cancel["visible"])
    assert cb.studio.path.read_bytes() == saved and cb.studio.style_names() == ["First"]


# Train-tab fields for a short training without preview images: steps, learning rate, rank, batch size, preview every.
TWO_STEPS = (2, 1e-2, 4, 2, 0)


def held_training(cb: StudioCallbacks, tmp_path: Path, budget_percent: float) -> tuple:
    """An imported rank-4 style, then a size limit of 5: training a rank-4 style would cut it. The
    Train button's last update, with the library file's bytes from before it."""
    first = str(random_lora(cb.pipe, tmp_path / "First.safetensors", seed=0))
    cb.save_drift_settings(budget_percent, 0)  # the budget of the styles made from now on
    cb.start_import([first], "rename")
    cb.save_drift_settings(budget_percent, 5)
    saved = cb.studio.path.read_bytes()
    return train(cb, example_files("neon"), "Neon", settings=TWO_STEPS)[-1], saved


def test_a_training_that_drifts_a_style_is_held_with_previews_and_confirm_merges_it(cb, tmp_path):
    (status, _, comparison, errors, confirm, cancel), saved = held_training(cb, tmp_path, budget_percent=100)
    assert status.startswith("Trained **Neon** (2 steps). Merging it (basis rank k 4 → 5") and "nothing is written" in status
    assert "each within its budget. **Confirm** to merge" in status
    assert "| First | " in status and "| Neon | new |" in status and "after the merge" in status
    assert [caption.split(" (")[0] for _, caption in comparison] == ["First · before", "First · after"] and errors == []
    assert confirm["visible"] is True and cancel["visible"] is True
    assert cb.studio.path.read_bytes() == saved and cb.studio.style_names() == ["First"]

    status, _, comparison, errors, confirm, cancel = list(cb.confirm_merge(example_files("neon"), "Neon", "", "quick",
                                                                           *TWO_STEPS))[-1]
    assert status.startswith("Learned **Neon** (2 steps). Continued the interrupted training from step 2.")
    assert [caption for _, caption in comparison] == ["First · before", "First · after"]
    assert [row[0] for row in errors] == ["First"] and float(errors[0][2]) > 1e-3  # the cut, now made
    assert confirm["visible"] is False and cancel["visible"] is False
    assert cb.studio.style_names() == ["First", "Neon"] and cb.studio.interrupted_training("Neon") is None


def test_cancelling_a_held_training_past_the_budget_leaves_the_library_file_byte_identical(cb, tmp_path):
    (status, _, comparison, _, confirm, cancel), saved = held_training(cb, tmp_path, budget_percent=1)
    assert "Not possible under the size limit" in status and "**over budget**" in status
    assert confirm["visible"] is False and cancel["visible"] is True and len(comparison) == 2
    message, comparison, confirm, cancel = cb.cancel_merge("Neon")
    assert message.startswith("Merge cancelled: the library is unchanged. **Neon** is kept as an interrupted training")
    assert comparison == [] and confirm["visible"] is False and cancel["visible"] is False
    assert cb.studio.path.read_bytes() == saved and cb.studio.style_names() == ["First"]
    assert cb.studio.interrupted_training("Neon") == 2


def test_errors_are_one_line_messages_and_change_nothing(cb, tmp_path):
    def error_of(call, *args):
        with pytest.raises(gr.Error) as caught:
            result = call(*args)
            if hasattr(result, "__next__"):
                list(result)
        message = str(caught.value)
        assert "Traceback" not in message and message
        return message

    assert "add some images" in error_of(cb.train, [], "Ink", "", "quick", *FEW_STEPS)
    assert "empty" in error_of(cb.train, example_files("neon"), "  ", "", "quick", *FEW_STEPS)
    assert "unknown preset" in error_of(cb.train, example_files("neon"), "Ink", "", "turbo", *FEW_STEPS)
    notes = tmp_path / "notes.md"
    notes.write_text("not an image")
    assert "No usable training images" in error_of(cb.train, [str(notes)], "Ink", "", "quick", *FEW_STEPS)
    assert "no style named 'Ink'" in error_of(generate, cb, "Ink")
    assert "the library is empty" in error_of(cb.export_library)
    assert "nothing to undo" in error_of(cb.undo)
    pickle = tmp_path / "style.ckpt"
    pickle.write_bytes(b"\x80\x04 not opened")
    assert "only .safetensors" in error_of(cb.import_files, [str(pickle)], "rename")
    assert not cb.studio.path.exists()

    train(cb, example_files("neon"), "Neon")
    saved = cb.studio.path.read_bytes()
    assert "exists" in error_of(cb.train, example_files("neon"), "Neon", "", "quick", *FEW_STEPS)
    assert "must be at least 1" in error_of(cb.train, example_files("neon"), "Ink", "", "quick", 0, 1e-2, 4, 2, 0)
    assert "the loss became" in error_of(cb.train, example_files("neon"), "Ink", "", "quick", 60, 1e12, 4, 2, 0)
    assert "path separator" in error_of(cb.rename, "Neon", "a/b")
    assert "choose a style" in error_of(cb.remove, NO_STYLE)
    assert "no style named 'Nope'" in error_of(cb.export_lora, "Nope", "kohya")
    assert cb.studio.path.read_bytes() == saved and cb.studio.style_names() == ["Neon"]

    without_library = StudioCallbacks(cb.pipe, None, tmp_path / "out2", work_dir=tmp_path / "work2")
    assert "--library" in error_of(without_library.train, example_files("neon"), "Ink", "", "quick", *FEW_STEPS)
    assert without_library.refresh_styles()[0]["choices"] == [("none", NO_STYLE)]


def test_cancel_stops_the_training_and_generation_stays_usable_meanwhile(cb):
    updates = cb.train(example_files("neon"), "Neon", "", "quick", 5000, 1e-3, 4, 2, 0)
    status = ""
    while "step" not in status:
        status = next(updates)[0]
    # The training now runs in its worker thread; the Generate tab still works.
    paths, _, _, _ = generate(cb)
    assert Path(paths[0]).exists() and cb._job is not None
    assert "Cancelling" in cb.cancel_training()
    final = list(updates)[-1][0]
    assert final.startswith("Cancelled") and "library is unchanged" in final
    assert not cb.studio.path.exists() and cb.studio.style_names() == []
    assert cb._job is None and cb.cancel_training() == "No training is running."


def test_closing_the_page_mid_training_cancels_it(cb):
    updates = cb.train(example_files("neon"), "Neon", "", "quick", 5000, 1e-3, 4, 2, 0)
    while "step" not in next(updates)[0]:
        pass
    worker = next(t for t in threading.enumerate() if t.name == "train-Neon")
    updates.close()  # what Gradio does when the browser goes away
    assert not worker.is_alive() and cb.studio.style_names() == []


def test_build_app_opens_the_library_and_lists_its_styles(pipe, tmp_path):
    first = make_callbacks(pipe, tmp_path)
    train(first, example_files("hatching"), "Hatching")
    demo = build_app(pipe, library_path=first.studio.path, output_dir=tmp_path / "out", work_dir=tmp_path / "work2")
    assert isinstance(demo, gr.Blocks)
    assert demo.share_studio.style_names() == ["Hatching"]
    assert demo.share_library_path == first.studio.path
    config = demo.get_config_file()
    dropdowns = [c for c in config["components"] if c["type"] == "dropdown" and c["props"].get("label") == "Style"]
    assert dropdowns and all(("Hatching", "Hatching") in map(tuple, d["props"]["choices"]) for d in dropdowns)
    events = {fn.api_name: fn for fn in demo.fns.values()}
    assert events["train"].concurrency_limit == 1 and events["generate"].concurrency_limit == 1
    assert events["train"].concurrency_id != events["generate"].concurrency_id  # generating while training


def test_launch_reports_a_damaged_library_in_one_line(tmp_path):
    damaged = tmp_path / "library.safetensors"
    damaged.write_bytes(b"\x00" * 100)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = subprocess.run([sys.executable, str(ROOT / "launch.py"), "--model", MODEL, "--library", str(damaged),
                             "--port", str(port)], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.startswith("launch.py:")]
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert len(lines) == 1 and str(damaged) in lines[0], result.stderr
    assert damaged.read_bytes() == b"\x00" * 100


def test_choosing_a_preset_fills_every_advanced_field_it_sets(cb):
    """Steps, learning rate, rank and the text-encoder learning rate of the embedded model's presets."""
    assert cb.preset_defaults("quick") == (300, 4e-3, 4, 1e-3)
    assert cb.preset_defaults("quality") == (1200, 1e-3, 8, 2.5e-4)
