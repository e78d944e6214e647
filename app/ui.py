"""Share Studio web UI (Gradio).

A thin layer: every callback only calls ``share_diffusion`` library functions
(:func:`share_diffusion.models.generate_images` etc.) and turns
:class:`~share_diffusion.models.ShareStudioError` into a ``gr.Error`` shown in the page.
:func:`build_app` assembles the tabs; each tab is built by its own ``_*_tab`` function
(Train and Library tabs are added next to Generate).
"""

from __future__ import annotations

import secrets
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from share_diffusion import models


def run_generate(
    pipe,
    output_dir: str | Path,
    prompt: str,
    negative: str = "",
    seed: int | float | None = -1,
    steps: int | float = 20,
    guidance: float = 4.0,
    scheduler: str | None = None,
    num_images: int | float = 1,
    progress: Callable[[int, int], None] | None = None,
) -> tuple[list[str], int]:
    """Generate and save PNGs (with metadata) into ``output_dir``; returns (paths, used seed).

    ``seed`` -1/None means random.  Gradio sliders and numbers deliver floats; they are
    converted here so the library functions get ints.
    """
    used_seed = models.resolve_seed(None if seed is None else int(seed))
    images = models.generate_images(
        pipe,
        prompt or "",
        negative_prompt=negative or "",
        seed=used_seed,
        steps=int(steps),
        guidance=float(guidance),
        num_images=int(num_images),
        scheduler=scheduler or None,
        progress=progress,
    )
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    paths = [Path(output_dir) / f"{stamp}-{used_seed + i}.png" for i in range(len(images))]
    saved = models.save_generated(
        pipe,
        images,
        paths,
        prompt=prompt or "",
        negative_prompt=negative or "",
        seed=used_seed,
        steps=int(steps),
        guidance=float(guidance),
        scheduler=scheduler or None,
    )
    return [str(p) for p in saved], used_seed


def _generate_tab(pipe, output_dir: Path) -> None:
    current = models.scheduler_name(pipe)
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", lines=2, placeholder="a lighthouse on a cliff at dusk")
            negative = gr.Textbox(label="Negative prompt", lines=1)
            generate = gr.Button("Generate", variant="primary")
            with gr.Row(equal_height=True):
                seed = gr.Number(label="Seed (-1 = random)", value=-1, precision=0, minimum=-1, min_width=120)
                used_seed = gr.Number(label="Used seed", value=None, precision=0, interactive=False, min_width=120)
            with gr.Row():
                random_seed = gr.Button("Random seed", size="sm", min_width=100)
                reuse_seed = gr.Button("Reuse used seed", size="sm", min_width=100)
            steps = gr.Slider(1, 100, value=20, step=1, label="Steps")
            guidance = gr.Slider(0.0, 20.0, value=4.0, step=0.5, label="Guidance (CFG scale)")
            scheduler = gr.Dropdown(
                choices=list(models.SCHEDULERS),
                value=current if current in models.SCHEDULERS else None,
                label="Scheduler",
            )
            num_images = gr.Slider(1, 8, value=1, step=1, label="Number of images")
        with gr.Column(scale=3):
            gallery = gr.Gallery(label="Images", columns=2, format="png", type="filepath")

    def on_generate(prompt, negative, seed, steps, guidance, scheduler, num_images, progress=gr.Progress()):
        try:
            return run_generate(
                pipe,
                output_dir,
                prompt,
                negative,
                seed,
                steps,
                guidance,
                scheduler,
                num_images,
                progress=lambda step, total: progress((step, total), desc="Denoising"),
            )
        except models.ShareStudioError as error:
            raise gr.Error(str(error)) from error

    inputs = [prompt, negative, seed, steps, guidance, scheduler, num_images]
    outputs = [gallery, used_seed]
    generate.click(on_generate, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id="generate", api_name="generate")
    prompt.submit(on_generate, inputs=inputs, outputs=outputs, concurrency_limit=1, concurrency_id="generate", api_visibility="private")
    random_seed.click(lambda: models.resolve_seed(None), outputs=seed, api_visibility="private")
    reuse_seed.click(lambda used: -1 if used is None else used, inputs=used_seed, outputs=seed, api_visibility="private")


def build_app(pipe, *, library_path: str | Path | None = None, output_dir: str | Path | None = None) -> gr.Blocks:
    """The Share Studio UI for a loaded pipeline.

    ``library_path``: the style library file (used by the Library/Train tabs).  ``output_dir``:
    where generated PNGs are written (default: a new temporary folder); the launcher must allow
    Gradio to serve it (``launch(allowed_paths=[...])``) if it is outside the temp dir.
    """
    output_dir = Path(output_dir) if output_dir else Path(tempfile.mkdtemp(prefix="share-studio-"))
    output_dir.mkdir(parents=True, exist_ok=True)
    info = models.model_info(pipe)
    with gr.Blocks(title="Share Studio") as demo:
        gr.Markdown(
            f"## Share Studio\nModel **{info.name}** · fingerprint `{info.fingerprint}` · "
            f"{info.device} {info.dtype} · attention {info.attention}"
        )
        with gr.Tabs():
            with gr.Tab("Generate", id="generate"):
                _generate_tab(pipe, output_dir)
    demo.share_output_dir = output_dir
    demo.share_library_path = Path(library_path) if library_path else None
    return demo
