"""Share Studio web UI (Gradio).

A thin layer: :func:`build_app` lays out the Generate, Train and Library tabs and wires their
events to the handlers of :class:`app.callbacks.StudioCallbacks`, which only call
``share_diffusion`` library functions and show :class:`~share_diffusion.errors.ShareStudioError`
(and bad-input ``ValueError``) as ``gr.Error`` messages in the page.

Concurrency: generation runs in its own queue (one at a time) and stays usable while a style
trains; training and every library change (rename, delete, undo, import) share one queue of
one, so they run one after another (the ``Studio`` also locks the library file).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import gradio as gr

from app.callbacks import (
    LIBRARY_HEADERS,
    LORA_FORMATS,
    NO_STYLE,
    NO_STYLE_LABEL,
    REJECTED_HEADERS,
    StudioCallbacks,
    run_generate,
)
from share_diffusion.generation import generation_defaults, native_size, resolve_seed
from share_diffusion.loading import model_info
from share_diffusion.schedulers import SCHEDULERS, scheduler_name
from share_diffusion.studio import CLASH_POLICIES, Studio

__all__ = ["build_app", "run_generate"]

LIBRARY_QUEUE = "library"  # training and library changes: one at a time
GENERATE_QUEUE = "generate"


def _style_choices(names: list[str], with_none: bool) -> list[tuple[str, str]]:
    return ([(NO_STYLE_LABEL, NO_STYLE)] if with_none else []) + [(n, n) for n in names]


def _generate_tab(cb: StudioCallbacks) -> dict:
    pipe = cb.pipe
    current = scheduler_name(pipe)
    names = cb.style_names()
    native_w, native_h = native_size(pipe)
    size_step = max(pipe.vae_scale_factor, native_w // 8)
    c: dict = {}
    with gr.Row():
        with gr.Column(scale=2):
            c["prompt"] = gr.Textbox(label="Prompt", lines=2, placeholder="a lighthouse on a cliff at dusk", elem_id="prompt")
            c["negative"] = gr.Textbox(label="Negative prompt", lines=1)
            c["generate"] = gr.Button("Generate", variant="primary", elem_id="generate-button")
            with gr.Row(equal_height=True):
                c["style"] = gr.Dropdown(choices=_style_choices(names, True), value=NO_STYLE, label="Style",
                                         elem_id="generate-style", scale=3)
                c["strength"] = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Strength", scale=2)
                c["refresh"] = gr.Button("↻", size="sm", min_width=40, scale=0, elem_id="refresh-styles")
            with gr.Row(equal_height=True):
                c["mix_style"] = gr.Dropdown(choices=_style_choices(names, True), value=NO_STYLE,
                                             label="Mix with a second style (optional)", elem_id="mix-style", scale=3)
                c["mix_weight"] = gr.Slider(0.0, 2.0, value=0.5, step=0.05, label="Its weight", scale=2)
            c["add_trigger"] = gr.Checkbox(value=True, label="Add the styles' trigger words to the prompt")
            with gr.Row(equal_height=True):
                c["seed"] = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, min_width=120)
                c["used_seed"] = gr.Number(label="Used seed", value=None, precision=0, interactive=False, min_width=120,
                                           elem_id="used-seed")
            with gr.Row():
                c["random_seed"] = gr.Button("Random seed", size="sm", min_width=100, elem_id="random-seed")
                c["reuse_seed"] = gr.Button("Reuse used seed", size="sm", min_width=100)
            defaults = generation_defaults(pipe)  # the family's
            c["steps"] = gr.Slider(1, 100, value=defaults.steps, step=1, label="Steps", elem_id="generate-steps")
            c["guidance"] = gr.Slider(0.0, 20.0, value=defaults.guidance, step=0.5, label="Guidance (CFG scale)")
            c["scheduler"] = gr.Dropdown(
                choices=list(SCHEDULERS),
                value=current if current in SCHEDULERS else None,
                label="Scheduler",
            )
            with gr.Row():
                c["width"] = gr.Slider(max(size_step, native_w // 2), native_w * 2, value=native_w, step=size_step,
                                       label="Width")
                c["height"] = gr.Slider(max(size_step, native_h // 2), native_h * 2, value=native_h, step=size_step,
                                        label="Height")
            c["num_images"] = gr.Slider(1, 8, value=1, step=1, label="Number of images")
        with gr.Column(scale=3):
            c["gallery"] = gr.Gallery(label="Images", columns=2, format="png", type="filepath", elem_id="generate-gallery",
                                      buttons=["download", "download_all", "fullscreen"])
            c["note"] = gr.Markdown(elem_id="generate-note")
            c["downloads"] = gr.File(label="Download the PNGs (with prompt, style, seed and library hash inside)",
                                     file_count="multiple", interactive=False, elem_id="generate-downloads")

    inputs = [c[k] for k in ("prompt", "negative", "style", "strength", "mix_style", "mix_weight", "add_trigger", "seed",
                             "steps", "guidance", "scheduler", "width", "height", "num_images")]
    outputs = [c["gallery"], c["used_seed"], c["downloads"], c["note"]]
    c["generate"].click(cb.generate, inputs=inputs, outputs=outputs, concurrency_limit=1,
                        concurrency_id=GENERATE_QUEUE, api_name="generate")
    c["prompt"].submit(cb.generate, inputs=inputs, outputs=outputs, concurrency_limit=1,
                       concurrency_id=GENERATE_QUEUE, api_visibility="private")
    c["random_seed"].click(lambda: resolve_seed(None), outputs=c["seed"], api_visibility="private")
    c["reuse_seed"].click(lambda used: -1 if used is None else used, inputs=c["used_seed"], outputs=c["seed"],
                          api_visibility="private")
    return c


def _train_tab(cb: StudioCallbacks) -> dict:
    c: dict = {}
    presets = cb.presets()
    quick = presets["quick"]
    with gr.Row():
        with gr.Column(scale=3):
            examples = cb.example_styles()
            if examples:
                gr.Markdown("**Try an example set** (12 images with captions), then press *Train*:")
                with gr.Row():
                    c["examples"] = {s: gr.Button(s, size="sm", min_width=80, elem_id=f"example-{s}") for s in examples}
            c["files"] = gr.File(label="Training images (drag and drop; a .txt with the same name is its caption)",
                                 file_count="multiple", file_types=["image", ".txt"], elem_id="train-files", height=180)
            c["summary"] = gr.Markdown("No images yet: drop some on the box above, or click an example style.",
                                       elem_id="upload-summary")
            c["thumbnails"] = gr.Gallery(label="Usable images", columns=6, height=220, object_fit="contain",
                                         elem_id="train-thumbnails", allow_preview=True)
            c["rejected"] = gr.Dataframe(headers=REJECTED_HEADERS, value=[], label="Rejected files", interactive=False,
                                         elem_id="rejected", max_height=160)
        with gr.Column(scale=2):
            with gr.Row():
                c["name"] = gr.Textbox(label="Style name", placeholder="Ink wash", elem_id="style-name")
                c["trigger"] = gr.Textbox(label="Trigger word (default: from the name)", placeholder="inkwash",
                                          elem_id="style-trigger")
            c["preset"] = gr.Radio(list(presets), value="quick", label="Preset",
                                   info=" · ".join(f"{n}: {p.steps} steps" for n, p in presets.items()))
            with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                with gr.Row():
                    c["steps"] = gr.Number(value=quick.steps, precision=0, minimum=1, label="Steps", elem_id="train-steps")
                    c["learning_rate"] = gr.Number(value=quick.learning_rate, minimum=0, label="Learning rate")
                    c["text_encoder_lr"] = gr.Number(value=quick.text_encoder_lr, minimum=0, elem_id="train-text-encoder-lr",
                                                     label="Text-encoder learning rate (0 = frozen)")
                with gr.Row():
                    c["rank"] = gr.Number(value=quick.rank, precision=0, minimum=1, label="Rank (per style)")
                    c["batch_size"] = gr.Number(value=quick.batch_size, precision=0, minimum=1, label="Batch size",
                                                elem_id="train-batch-size")
                with gr.Row():
                    c["preview_every"] = gr.Number(value=max(quick.steps // 5, 1), precision=0, minimum=0,
                                                   label="Preview every N steps (0 = none)", elem_id="train-preview-every")
                with gr.Row():
                    c["seed"] = gr.Number(value=quick.seed, precision=0, minimum=0, label="Seed", elem_id="train-seed")
                    c["flip"] = gr.Checkbox(value=quick.flip, label="Mirror images at random (off for text or handedness)",
                                            elem_id="train-flip")
            with gr.Row():
                c["train"] = gr.Button("Train", variant="primary", elem_id="train-button")
                c["cancel"] = gr.Button("Cancel", variant="stop", elem_id="cancel-button")
            c["status"] = gr.Markdown(elem_id="train-status")
            with gr.Row():  # a held merge (it would cut styles): shown by the Train button's handler
                c["confirm_merge"] = gr.Button("Confirm merge", variant="primary", visible=False, elem_id="confirm-merge")
                c["cancel_merge"] = gr.Button("Cancel merge", visible=False, elem_id="cancel-merge")
            c["cancel_note"] = gr.Markdown()
            c["previews"] = gr.Gallery(label="Previews while training", columns=4, fit_columns=False, height=200,
                                       elem_id="train-previews")
    gr.Markdown("**Earlier styles before → after the merge** (same prompt and seed), and their reconstruction errors:")
    with gr.Row():
        c["comparison"] = gr.Gallery(label="Before / after", columns=4, fit_columns=False, height=260,
                                         elem_id="train-comparison")
        c["errors"] = gr.Dataframe(headers=["style", "error before", "error after"], value=[], interactive=False,
                                   label="Reconstruction error of earlier styles", elem_id="train-errors")

    c["files"].change(cb.inspect_uploads, inputs=c["files"], outputs=[c["thumbnails"], c["rejected"], c["summary"]],
                      api_visibility="private")
    for style, button in c.get("examples", {}).items():
        button.click(lambda s=style: cb.load_example(s), outputs=[c["files"], c["name"], c["trigger"]],
                     api_visibility="private")
    c["preset"].change(cb.preset_defaults, inputs=c["preset"], outputs=[c["steps"], c["learning_rate"], c["rank"], c["text_encoder_lr"]],
                       api_visibility="private")
    c["cancel"].click(cb.cancel_training, outputs=c["cancel_note"], api_visibility="private")
    return c


def _library_tab(cb: StudioCallbacks) -> dict:
    c: dict = {}
    names = cb.style_names()
    c["facts"] = gr.Markdown(cb.library_facts(), elem_id="library-facts")
    c["table"] = gr.Dataframe(headers=LIBRARY_HEADERS, value=cb.library_rows(), interactive=False,
                              datatype=["html", "str", "str", "str", "str", "str", "str", "str", "str"],
                              label="Styles (click a row to select it)", elem_id="library-table", wrap=True)
    with gr.Row(equal_height=True):
        c["selected"] = gr.Dropdown(choices=_style_choices(names, False), value=names[-1] if names else None,
                                    label="Style", elem_id="library-style", scale=2)
        c["new_name"] = gr.Textbox(label="New name", scale=2, elem_id="new-name")
        c["rename"] = gr.Button("Rename", scale=1)
        c["remove"] = gr.Button("Delete", variant="stop", scale=1, elem_id="delete-button")
        c["undo"] = gr.Button("Undo last change", scale=1, elem_id="undo-button")
    c["status"] = gr.Markdown(elem_id="library-status")
    with gr.Row():
        with gr.Column():
            gr.Markdown("**Export the whole library** (one .safetensors file with every style)")
            c["export_library"] = gr.Button("Export library", elem_id="export-library")
            c["library_file"] = gr.File(label="Library file", interactive=False, elem_id="library-download")
        with gr.Column():
            gr.Markdown("**Export the selected style as a standard LoRA** (A1111/ComfyUI: kohya; diffusers: diffusers)")
            c["lora_format"] = gr.Radio(list(LORA_FORMATS), value="kohya", label="Format")
            c["export_lora"] = gr.Button("Export LoRA", elem_id="export-lora")
            c["lora_file"] = gr.File(label="LoRA file", interactive=False, elem_id="lora-download")
        with gr.Column():
            gr.Markdown("**Import** style libraries or LoRA files (.safetensors; pickles are never opened)")
            c["import_files"] = gr.File(label="Files to import", file_count="multiple", file_types=[".safetensors"],
                                        elem_id="import-files", height=120)
            c["on_clash"] = gr.Radio(list(CLASH_POLICIES), value="rename", label="When a name is taken")
            c["import"] = gr.Button("Import…", elem_id="import-button")
            with gr.Row():
                c["confirm_import"] = gr.Button("Confirm import", variant="primary", visible=False,
                                                elem_id="confirm-import")
                c["cancel_import"] = gr.Button("Cancel", visible=False, elem_id="cancel-import")
    c["import_check"] = gr.Markdown(elem_id="import-check")
    c["import_previews"] = gr.Gallery(label="Drifting styles before / after the import (same prompt and seed)",
                                      columns=4, fit_columns=False, height=260, format="png", visible=False,
                                      elem_id="import-previews")
    info = cb.studio.info() if cb.studio else {"drift_budget": 0.01, "size_limit": None}
    with gr.Row(equal_height=True):
        c["drift_budget"] = gr.Number(value=100 * info["drift_budget"], minimum=0, maximum=100, label="Drift budget of new "
                                      "styles (% of ΔW)", elem_id="drift-budget", scale=2)
        c["size_limit"] = gr.Number(value=info["size_limit"] or 0, minimum=0, precision=0, label="Size limit (basis "
                                    "directions per layer; 0 = none)", elem_id="size-limit", scale=2)
        c["save_settings"] = gr.Button("Save settings", scale=1, elem_id="save-settings")

    c["table"].select(cb.select_row, inputs=c["table"], outputs=c["selected"], api_visibility="private")
    c["export_library"].click(cb.export_library, outputs=c["library_file"], api_visibility="private")
    c["export_lora"].click(cb.export_lora, inputs=[c["selected"], c["lora_format"]], outputs=c["lora_file"],
                           api_visibility="private")
    return c


def build_app(pipe, *, library_path: str | Path | None = None, output_dir: str | Path | None = None,
              studio: Studio | None = None, work_dir: str | Path | None = None) -> gr.Blocks:
    """The Share Studio UI for a loaded pipeline.

    ``library_path``: the style library file (created on the first training or import); without it
    (and without ``studio``) the app only generates without styles.  ``output_dir``: where generated
    PNGs are written (default: a new temporary folder); the launcher must allow Gradio to serve it
    (``launch(allowed_paths=[...])``) if it is outside the temp dir.  ``work_dir``: scratch space for
    uploads, exports and samples (default: a new temporary folder).
    """
    output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="share-studio-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    if studio is None and library_path is not None:
        studio = Studio(pipe, library_path, model_id=model_info(pipe).name)
    cb = StudioCallbacks(pipe, studio, output_dir, work_dir=work_dir)
    info = model_info(pipe)
    with gr.Blocks(title="Share Studio") as demo:
        gr.Markdown(
            f"## Share Studio\nModel **{info.name}** ({info.family_label}) · fingerprint `{info.fingerprint}` · "
            f"{info.device} {info.dtype} · attention {info.attention}"
            + (f" · library `{studio.path}`" if studio else " · no style library (start with `--library PATH`)")
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate", elem_id="tab-generate"):
                gen = _generate_tab(cb)
            with gr.Tab("Train", id="train", elem_id="tab-train"):
                train = _train_tab(cb)
            with gr.Tab("Library", id="library", elem_id="tab-library"):
                lib = _library_tab(cb)

        # Everything that shows the library, refreshed after each change and on page load.
        selections = [gen["style"], gen["mix_style"], lib["selected"]]
        views = [*selections, lib["table"], lib["facts"]]

        def refresh(generate_style, mix_style, library_style):
            return cb.refresh_all(generate_style, mix_style, library_style)

        def refresh_with_samples(generate_style, mix_style, library_style):
            return cb.refresh_all(generate_style, mix_style, library_style, make_samples=True)

        def after(event):
            return event.then(refresh_with_samples, inputs=selections, outputs=views, api_visibility="private")

        gen["refresh"].click(cb.refresh_styles, inputs=selections, outputs=selections, api_visibility="private")
        train_inputs = [train[k] for k in ("files", "name", "trigger", "preset", "steps", "learning_rate", "rank", "batch_size",
                                           "preview_every", "seed", "flip", "text_encoder_lr")]
        train_outputs = [train[k] for k in ("status", "previews", "comparison", "errors", "confirm_merge", "cancel_merge")]
        after(train["train"].click(cb.train, inputs=train_inputs, outputs=train_outputs,
                                   concurrency_limit=1, concurrency_id=LIBRARY_QUEUE, api_name="train"))
        after(train["confirm_merge"].click(cb.confirm_merge, inputs=train_inputs, outputs=train_outputs, concurrency_limit=1,
                                           concurrency_id=LIBRARY_QUEUE, api_visibility="private"))
        train["cancel_merge"].click(cb.cancel_merge, inputs=train["name"], api_visibility="private",
                                    outputs=[train["status"], train["comparison"], train["confirm_merge"], train["cancel_merge"]])
        after(lib["rename"].click(cb.rename, inputs=[lib["selected"], lib["new_name"]], outputs=[lib["status"], lib["selected"]],
                                  concurrency_limit=1, concurrency_id=LIBRARY_QUEUE, api_visibility="private"))
        after(lib["remove"].click(cb.remove, inputs=lib["selected"], outputs=lib["status"],
                                  concurrency_limit=1, concurrency_id=LIBRARY_QUEUE, api_visibility="private"))
        after(lib["undo"].click(cb.undo, outputs=lib["status"],
                                concurrency_limit=1, concurrency_id=LIBRARY_QUEUE, api_visibility="private"))
        import_confirmation = [lib["import_check"], lib["import_previews"], lib["confirm_import"], lib["cancel_import"]]
        after(lib["import"].click(cb.start_import, inputs=[lib["import_files"], lib["on_clash"]],
                                  outputs=import_confirmation, concurrency_limit=1, concurrency_id=LIBRARY_QUEUE,
                                  api_visibility="private"))
        after(lib["confirm_import"].click(cb.import_files, inputs=[lib["import_files"], lib["on_clash"]],
                                          outputs=import_confirmation, concurrency_limit=1,
                                          concurrency_id=LIBRARY_QUEUE, api_visibility="private"))
        lib["cancel_import"].click(cb.cancel_import, outputs=import_confirmation, api_visibility="private")
        after(lib["save_settings"].click(cb.save_drift_settings, inputs=[lib["drift_budget"], lib["size_limit"]],
                                         outputs=lib["status"], concurrency_limit=1, concurrency_id=LIBRARY_QUEUE,
                                         api_visibility="private"))
        after(demo.load(refresh, inputs=selections, outputs=views, api_visibility="private"))

    demo.share_output_dir = output_dir
    demo.share_library_path = studio.path if studio else None
    demo.share_studio = studio
    demo.share_callbacks = cb
    return demo
