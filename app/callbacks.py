"""The Share Studio app's event handlers.

:class:`StudioCallbacks` holds what one running app shares between its tabs (the pipeline, the
:class:`~share_diffusion.studio.Studio` with its style library, a scratch folder) and has one
method per Gradio event.  The methods only call library functions (``Studio``,
``generation.generate_images``, ``images.load_training_images``...) and format their results for the
page; :mod:`app.ui` lays out the components and wires these methods to them.  Tests call the
methods directly.

Errors: every handler turns :class:`~share_diffusion.errors.ShareStudioError`, ``ValueError`` (bad
input) and ``OSError`` into a ``gr.Error`` whose text is the one-line message, never a traceback.
The library rolls back failed changes itself, so an error never loses a style.
"""

from __future__ import annotations

import base64
import functools
import html
import inspect
import io
import logging
import secrets
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import gradio as gr
from PIL import Image

from share_diffusion.drift import error_text, percent
from share_diffusion.errors import ShareStudioError, first_line
from share_diffusion.families import label as family_label
from share_diffusion.generation import generate_images, native_size, resolve_seed
from share_diffusion.images import IMAGE_EXTENSIONS, load_training_images
from share_diffusion.library import LibraryError, check_style_name, default_trigger, file_stem
from share_diffusion.loading import model_info
from share_diffusion.png_metadata import read_png_metadata, save_generated, save_png
from share_diffusion.studio import CLASH_POLICIES, DriftPreview, MergeReport, Studio
from share_diffusion.training import TrainingCancelled, TrainingProgress, presets_for, training_config
from share_diffusion.training_job import TrainingJob, TrainingPreview

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES_DIR = ROOT / "styles" / "examples"
#: Value of the "none" entry of the style dropdowns (no style name can be empty).
NO_STYLE = ""
NO_STYLE_LABEL = "none"
LORA_FORMATS = ("kohya", "diffusers")
#: Settings of the style samples (library thumbnails and before/after-merge previews).
SAMPLE_SEED = 0
SAMPLE_STEPS = 15
SAMPLE_GUIDANCE = 4.0
#: Earlier styles compared before/after a merge (the most recent ones; each costs two samples).
MAX_COMPARED_STYLES = 8
#: Styles listed in a held merge's drift report (the most drifted first).
MAX_REPORTED_STYLES = 30
#: Earlier styles drawn before and after a merge that would drift them (the most drifted; two images each).
MAX_PREVIEWED_STYLES = 4
LIBRARY_HEADERS = ["sample", "name", "trigger", "created", "images", "steps", "rank", "ΔW error (budget)", "source"]
REJECTED_HEADERS = ["file", "reason"]


# --------------------------------------------------------------------------------------
# errors -> gr.Error
# --------------------------------------------------------------------------------------
def _as_gradio_error(error: BaseException) -> gr.Error:
    if isinstance(error, gr.Error):
        return error
    if isinstance(error, (ShareStudioError, ValueError)):
        return gr.Error(str(error))
    if isinstance(error, OSError):
        return gr.Error(f"{error.strerror or error}{f': {error.filename}' if error.filename else ''}")
    logger.exception("unexpected error in a Share Studio callback")
    return gr.Error(f"unexpected error ({first_line(error)}); details are in the terminal")


def shown_errors(fn: Callable) -> Callable:
    """Show user-facing errors of a handler (function or generator) as a ``gr.Error`` message."""
    if inspect.isgeneratorfunction(fn):

        @functools.wraps(fn)
        def generator_wrapper(*args, **kwargs):
            try:
                yield from fn(*args, **kwargs)
            except GeneratorExit:
                raise
            except Exception as error:  # noqa: BLE001 - shown to the user
                raise _as_gradio_error(error) from error

        return generator_wrapper

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except Exception as error:  # noqa: BLE001 - shown to the user
            raise _as_gradio_error(error) from error

    return wrapper


# --------------------------------------------------------------------------------------
# formatting (UI only)
# --------------------------------------------------------------------------------------
def format_bytes(count: int) -> str:
    value = float(count)
    for unit in ("bytes", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{count} bytes"


def format_created(text: str | None) -> str:
    if not text:
        return "—"
    try:
        return datetime.fromisoformat(text).astimezone().strftime("%Y-%m-%d %H:%M")
    except ValueError:
        return text


def _markdown_cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _thumbnail_html(path: Path | None, alt: str, size: int = 64) -> str:
    """An inline <img> (a small data: URL, so the table needs no file serving) or a placeholder."""
    if path is None or not path.exists():
        return "…"
    with Image.open(path) as image:
        image = image.convert("RGB")
        image.thumbnail((size, size))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}" width="{size}" height="{size}">'


def _file_paths(files) -> list[Path]:
    """Paths of a gr.File value (paths, or file objects with a ``.name``)."""
    if isinstance(files, (str, Path)):
        files = [files]
    return [Path(f) if isinstance(f, (str, Path)) else Path(f.name) for f in files or [] if f]


def _number(value, kind):
    """A Gradio number field's value (float or None) as ``kind``; None when the field is empty."""
    if value is None or value == "":
        return None
    return kind(value)


def _no_import_confirmation() -> tuple[dict, dict, dict]:
    """Updates hiding the import confirmation: the previews gallery (emptied), Confirm and Cancel."""
    return gr.update(value=[], visible=False), *_no_confirmation()


def _no_confirmation() -> tuple[dict, dict]:
    """Updates hiding a held merge's Confirm and Cancel buttons."""
    return gr.update(visible=False), gr.update(visible=False)


def _confirmation(report: MergeReport) -> tuple[dict, dict]:
    """Updates showing a held merge's Confirm (only when every style stays within its budget) and Cancel."""
    return gr.update(visible=not any(d.over_budget for d in report.drifts)), gr.update(visible=True)


def _merge_sizes(report: MergeReport) -> str:
    return (f"basis rank k {report.basis_rank_before} → {report.basis_rank_after}, file "
            f"{format_bytes(report.bytes_before)} → {format_bytes(report.bytes_after)}")


def _held_merge(report: MergeReport, action: str) -> str:
    """A held merge (an "import" or a training's "merge"): whether it may be confirmed, and each
    style's ΔW error now and after it, the most drifted first."""
    over = [d for d in report.drifts if d.over_budget]
    drifting = f"{len(report.drifting)} style(s) would drift under the size limit"
    if over:
        verdict = (f"**Not possible under the size limit:** {drifting}, {len(over)} past their budget. "
                   "Raise the size limit or the budget (Library tab), or remove styles; **Cancel** to close.")
    else:
        verdict = f"{drifting}, each within its budget. **Confirm** to {action}, or **Cancel**; nothing is written until then."
    if report.previews:
        verdict += " Below: the most drifted earlier styles before and after it (same prompt and seed)."
    rows = [f"| style | ΔW error now | after the {action} | budget |", "|---|---:|---:|---:|"]
    for drift in sorted(report.drifts, key=lambda d: -d.after)[:MAX_REPORTED_STYLES]:
        now = "new" if drift.name in report.names else f"{drift.before:.1e}"
        after = ("" if drift.exact else "≤ ") + f"{drift.after:.1e}" + (" **over budget**" if drift.over_budget else "")
        rows.append(f"| {_markdown_cell(drift.name)} | {now} | {after} | {percent(drift.budget)} |")
    return "\n\n".join([verdict, "\n".join(rows)])


def choices_update(names: list[str], value: str | None, with_none: bool) -> dict:
    """A dropdown update listing ``names`` (plus "none") that keeps ``value`` when it still exists."""
    choices = ([(NO_STYLE_LABEL, NO_STYLE)] if with_none else []) + [(n, n) for n in names]
    if value not in names:
        value = NO_STYLE if with_none else (names[-1] if names else None)
    return gr.update(choices=choices, value=value)


# --------------------------------------------------------------------------------------
# generation (the Generate tab; also used without a style library)
# --------------------------------------------------------------------------------------
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
    *,
    studio: Studio | None = None,
    style: str | None = None,
    strength: float = 1.0,
    mix_style: str | None = None,
    mix_weight: float = 0.0,
    add_trigger: bool = True,
    width: int | float | None = None,
    height: int | float | None = None,
) -> tuple[list[str], int]:
    """Generate and save PNGs (with metadata) into ``output_dir``; returns (paths, used seed).

    ``seed`` -1/None means random.  With a ``style`` (and/or a second ``mix_style``) the images
    come from ``studio.generate`` and their PNG metadata also carries the styles, their weights
    and the library file's hash.  Gradio sliders and numbers deliver floats; they are converted
    here so the library functions get ints.
    """
    used_seed = resolve_seed(None if seed is None else int(seed))
    options = dict(
        negative_prompt=negative or "",
        seed=used_seed,
        steps=int(steps),
        guidance=float(guidance),
        width=None if width is None else int(width),
        height=None if height is None else int(height),
        num_images=int(num_images),
        scheduler=scheduler or None,
        progress=progress,
    )
    extra: dict = {}
    prompt = prompt or ""
    mix = {mix_style: float(mix_weight)} if mix_style else {}
    if style or mix:
        if studio is None:
            raise LibraryError("styles need a style library (start Share Studio with --library)")
        images, extra = studio.generate(prompt, style=style or None, strength=float(strength), mix=mix,
                                        add_trigger=bool(add_trigger), **options)
        prompt = extra.pop("prompt")
    else:
        images = generate_images(pipe, prompt, **options)
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    paths = [Path(output_dir) / f"{stamp}-{used_seed + i}.png" for i in range(len(images))]
    saved = save_generated(
        pipe,
        images,
        paths,
        prompt=prompt,
        negative_prompt=negative or "",
        seed=used_seed,
        steps=int(steps),
        guidance=float(guidance),
        scheduler=scheduler or None,
        **extra,
    )
    return [str(p) for p in saved], used_seed


# --------------------------------------------------------------------------------------
# the handlers
# --------------------------------------------------------------------------------------
class StudioCallbacks:
    """Event handlers of one app: a pipeline, its style library (``studio``; None = no library)."""

    def __init__(self, pipe, studio: Studio | None, output_dir: str | Path, work_dir: str | Path | None = None,
                 examples_dir: str | Path = EXAMPLES_DIR):
        self.pipe = pipe
        self.studio = studio
        self.output_dir = Path(output_dir)
        # Uploads staged for training, exports and samples: in the temp dir, which Gradio may serve.
        self.work_dir = Path(work_dir) if work_dir else Path(tempfile.mkdtemp(prefix="share-studio-work-"))
        self.examples_dir = Path(examples_dir)
        self._job: TrainingJob | None = None  # the running training
        self._samples_lock = threading.Lock()

    # --- helpers ---------------------------------------------------------------------------

    def _require_studio(self) -> Studio:
        if self.studio is None:
            raise LibraryError("no style library is open (start Share Studio with --library PATH)")
        return self.studio

    def _new_dir(self, kind: str) -> Path:
        folder = self.work_dir / kind / f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder.mkdir(parents=True)
        return folder

    def style_names(self) -> list[str]:
        return self.studio.style_names() if self.studio else []

    def resolution(self) -> int:
        return native_size(self.pipe)[0]

    def example_styles(self) -> list[str]:
        if not self.examples_dir.is_dir():
            return []
        return sorted(p.name for p in self.examples_dir.iterdir() if p.is_dir() and any(p.glob("*.png")))

    def stage_files(self, files: list | None) -> Path:
        """Copy uploaded files into one folder, so that kohya captions (``name.txt``) sit beside their
        images again (Gradio keeps every upload in its own folder)."""
        paths = _file_paths(files)
        if not paths:
            raise ValueError("add some images first: drop them on the upload box or click an example style")
        folder = self._new_dir("uploads")
        for path in paths:
            target = folder / path.name
            number = 2
            while target.exists():
                target = folder / f"{path.stem}-{number}{path.suffix}"
                number += 1
            shutil.copyfile(path, target)
        return folder

    def _sample_path(self, record: dict) -> Path:
        # ids can repeat after an undo, so the creation time is part of the key
        key = f"{record['id']}-{record.get('created_at', '')}".replace(":", "").replace("+", "p")
        return self.work_dir / "samples" / f"{key}.png"

    def render_sample(self, name: str, out: Path | None = None) -> Path:
        """A sample image of a style (fixed prompt and seed), saved with its PNG metadata."""
        studio = self._require_studio()
        record = studio.library.style(name)
        images, extra = studio.generate(studio.sample_prompt(name), style=name, add_trigger=False, seed=SAMPLE_SEED,
                                        steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE)
        out = out or self._sample_path(record)
        save_generated(self.pipe, images, [out], seed=SAMPLE_SEED, steps=SAMPLE_STEPS, guidance=SAMPLE_GUIDANCE,
                              **extra)
        return out

    # --- refreshing the views ---------------------------------------------------------------

    def refresh_styles(self, generate_style=None, mix_style=None, library_style=None) -> tuple:
        """Updates of the style dropdowns (Generate: style, mix; Library: the selected style)."""
        names = self.style_names()
        return (
            choices_update(names, generate_style, with_none=True),
            choices_update(names, mix_style, with_none=True),
            choices_update(names, library_style, with_none=False),
        )

    def library_rows(self, make_samples: bool = False) -> list[list]:
        """The Library tab's table; with ``make_samples`` missing sample images are rendered first."""
        rows = []
        if self.studio is None:
            return rows
        for record in list(self.studio.styles):
            sample = self._sample_path(record)
            if make_samples and not sample.exists():
                with self._samples_lock:
                    if not sample.exists():
                        try:
                            self.render_sample(record["name"], sample)
                        except LibraryError:  # renamed or removed meanwhile
                            continue
            rows.append([
                _thumbnail_html(sample, record["name"]),
                record["name"],
                record["trigger"],
                format_created(record.get("created_at")),
                record.get("images", "—"),
                record.get("steps", "—"),
                record["rank"],
                f"{error_text(record)} ({percent(record['drift_budget'])})",
                record.get("imported") or f"trained ({record.get('preset', '?')})",
            ])
        return rows

    def library_facts(self) -> str:
        if self.studio is None:
            return "No style library is open: start Share Studio with `--library PATH`."
        info = self.studio.info()
        count, separate, on_disk = info["styles"], info["separate_lora_bytes"], info["bytes_on_disk"]
        lines = [
            f"**Library file** `{info['path']}` · hash `{info['library_hash']}`",
            f"**Base model** {info['base_model']} ({family_label(info['family'])}, fingerprint `{info['fingerprint']}`)",
            f"**Styles** {count} · **shared basis rank k** {info['basis_rank']} · **size limit** "
            f"{info['size_limit'] or 'none'} · **drift budget of new styles** {percent(info['drift_budget'])}",
            f"**On disk** {format_bytes(on_disk)}",
        ]
        if count:
            ratio = f" ({separate / on_disk:.2f}× the library)" if on_disk else ""
            lines.append(f"**The {count} styles as separate LoRA files** at their own ranks (fp16) would take "
                         f"{format_bytes(separate)}{ratio}; the largest ΔW error of any style is "
                         f"{error_text(max(self.studio.styles, key=lambda r: r['error']))}")
        return "  \n".join(lines)

    @shown_errors
    def save_drift_settings(self, budget_percent, size_limit) -> str:
        """The Library tab's settings: the drift budget of new styles (%) and the size limit (0: none)."""
        studio = self._require_studio()
        budget = _number(budget_percent, float)
        limit = _number(size_limit, int)
        studio.configure(drift_budget=None if budget is None else budget / 100, size_limit=limit or None)
        info = studio.info()
        return (f"Saved: new styles get a drift budget of {percent(info['drift_budget'])}; size limit "
                f"{info['size_limit'] or 'none'}.")

    def refresh_all(self, generate_style=None, mix_style=None, library_style=None, make_samples: bool = False) -> tuple:
        """Everything that shows the library: 3 dropdowns, the table, the facts."""
        return (*self.refresh_styles(generate_style, mix_style, library_style),
                self.library_rows(make_samples=make_samples), self.library_facts())

    # --- Generate tab ----------------------------------------------------------------------

    @shown_errors
    def generate(self, prompt, negative, style, strength, mix_style, mix_weight, add_trigger, seed, steps, guidance,
                 scheduler, width, height, num_images, progress=gr.Progress()):
        """-> (gallery paths, used seed, the same paths for download, a line about what was made)"""
        paths, used = run_generate(
            self.pipe, self.output_dir, prompt, negative, seed, steps, guidance, scheduler, num_images,
            progress=lambda step, total: progress((step, total), desc="Denoising"),
            studio=self.studio, style=style or None, strength=strength, mix_style=mix_style or None,
            mix_weight=mix_weight, add_trigger=add_trigger, width=width, height=height,
        )
        meta = read_png_metadata(paths[0])
        styles = ", ".join(f"{n} × {w:g}" for n, w in meta.get("styles", {}).items()) or "none"
        note = f"Prompt used: *{_markdown_cell(meta.get('prompt', ''))}* · styles: {_markdown_cell(styles)} · seed {used}"
        if meta.get("library_hash"):
            note += f" · library `{meta['library_hash']}`"
        return paths, used, paths, note

    # --- Train tab -------------------------------------------------------------------------

    @shown_errors
    def inspect_uploads(self, files) -> tuple[list, list[list], str]:
        """-> (thumbnails of the usable images, rejected [file, reason] rows, a summary line)"""
        if not files:
            return [], [], "No images yet: drop some on the box above, or click an example style."
        folder = self.stage_files(files)
        image_set = load_training_images([folder], self.resolution())
        thumbnails = [(str(i.source), i.caption or i.source.name) for i in image_set.images]
        rejected = [[r.path.name, r.reason] for r in image_set.rejected]
        captions = sum(1 for i in image_set.images if i.caption)
        summary = f"{len(thumbnails)} usable image{'s' * (len(thumbnails) != 1)} ({captions} with captions)"
        if rejected:
            summary += f"; {len(rejected)} rejected (see the list)"
            gr.Warning(f"{len(rejected)} file(s) cannot be used for training; the list says why")
        return thumbnails, rejected, summary

    @shown_errors
    def load_example(self, style: str) -> tuple[list[str], str, str]:
        """-> (the example's files for the upload box, a free style name, its trigger)"""
        folder = self.examples_dir / style
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (*IMAGE_EXTENSIONS, ".txt"))
        if not files:
            raise ValueError(f"the example style {style!r} has no images")
        staged = self.stage_files(files)
        name, names, number = style.capitalize(), set(self.style_names()), 2
        base = name
        while name in names:
            name = f"{base} {number}"
            number += 1
        return sorted(str(p) for p in staged.iterdir()), name, default_trigger(style)

    def preset_defaults(self, preset: str) -> tuple:
        """The advanced fields for a preset: steps, learning rate, rank, text-encoder learning rate."""
        presets = self.presets()
        config = presets.get(preset) or presets["quick"]
        return config.steps, config.learning_rate, config.rank, config.text_encoder_lr

    def presets(self) -> dict:
        """The training presets of the loaded base model's kind and family."""
        info = model_info(self.pipe)
        return presets_for(info.kind, info.family)

    @shown_errors
    def train(self, files, name, trigger, preset, steps, learning_rate, rank, batch_size, preview_every,
              seed=0, flip=True, text_encoder_lr=0.0, progress=gr.Progress()) -> Iterator[tuple]:
        """Stream (status, live previews, before/after gallery, error rows, Confirm, Cancel) while a
        style trains. A merge that would cut styles is held: nothing is written, the status shows
        each style's error now and after it, the gallery the most drifted before and after, and the
        page waits for Confirm (confirm_merge; offered only within every budget) or Cancel (cancel_merge)."""
        yield from self._training(files, name, trigger, preset, steps, learning_rate, rank, batch_size, preview_every,
                                  seed, flip, text_encoder_lr, progress, merge_held=False)

    @shown_errors
    def confirm_merge(self, files, name, trigger, preset, steps, learning_rate, rank, batch_size, preview_every,
                      seed=0, flip=True, text_encoder_lr=0.0, progress=gr.Progress()) -> Iterator[tuple]:
        """Confirm: merge the held training (it resumes at its last step, so no step trains), with the
        same updates as train."""
        yield from self._training(files, name, trigger, preset, steps, learning_rate, rank, batch_size, preview_every,
                                  seed, flip, text_encoder_lr, progress, merge_held=True)

    def _training(self, files, name, trigger, preset, steps, learning_rate, rank, batch_size, preview_every, seed, flip,
                  text_encoder_lr, progress, merge_held: bool) -> Iterator[tuple]:
        studio = self._require_studio()
        name = check_style_name(name)
        if studio.library.has_style(name):
            raise LibraryError(f"a style named {name!r} exists; pick another name or delete it in the Library tab")
        folder = self.stage_files(files)
        config = training_config(
            preset or "quick",
            studio.model_kind,
            studio.family,
            steps=_number(steps, int),
            learning_rate=_number(learning_rate, float),
            rank=_number(rank, int),
            batch_size=_number(batch_size, int),
            preview_every=_number(preview_every, int) or 0,
            seed=_number(seed, int),
            flip=bool(flip),
            text_encoder_lr=_number(text_encoder_lr, float),
        )
        for label, value in (("steps", config.steps), ("rank", config.rank), ("batch size", config.batch_size)):
            if value < 1:
                raise ValueError(f"{label} must be at least 1")
        if not config.learning_rate > 0:
            raise ValueError("the learning rate must be above 0")

        job = TrainingJob(studio, [folder], name, trigger=trigger or None, config=config, preset=preset or "quick",
                          resume=True if merge_held else None, hold_if_drifting=not merge_held,
                          previews=MAX_PREVIEWED_STYLES)
        self._job = job
        try:
            yield from self._train(studio, job, name, config, progress)
        finally:
            job.stop()  # if the page went away mid-training: the training rolls back
            if self._job is job:
                self._job = None

    def _train(self, studio: Studio, job: TrainingJob, name: str, config, progress) -> Iterator[tuple]:
        hidden = _no_confirmation()
        # Earlier styles, before the merge: rendered now with the main pipeline (training uses a copy).
        compared = studio.style_names()[-MAX_COMPARED_STYLES:]
        comparison: list[tuple[str, str]] = []
        before_dir = self._new_dir("compare")
        for number, earlier in enumerate(compared, 1):
            progress((number - 1, len(compared)), desc="Rendering earlier styles before the merge")
            yield f"Rendering earlier styles before the merge ({number}/{len(compared)})…", [], comparison, [], *hidden
            if job.cancel_requested:
                gr.Warning("training cancelled before it started; the library is unchanged")
                yield "Cancelled before the training started; the library is unchanged.", [], comparison, [], *hidden
                return
            path = self.render_sample(earlier, before_dir / f"{number:02d}-before.png")
            comparison.append((str(path), f"{earlier} · before"))

        preview_dir = self._new_dir("previews")
        previews: list[tuple[str, str]] = []
        status = f"Training **{name}**: preparing the images…"
        job.start()
        yield status, previews, comparison, [], *hidden
        last_yield = 0.0
        for event in job.events():
            if isinstance(event, TrainingProgress):
                progress((event.step, event.total_steps), desc=event.describe())
                status = f"Training **{name}**: {event.describe()}"
                if event.step == event.total_steps:
                    status = f"Training **{name}**: merging it into the library…"
            else:
                paths = [preview_dir / f"step{event.step:05d}-{i}.png" for i in range(len(event.images))]
                for image, path in zip(event.images, paths):
                    save_png(image, path, {"style": name, "training_step": event.step, "seed": 0})
                previews = previews + [(str(p), f"step {event.step}") for p in paths]
            if isinstance(event, TrainingPreview) or time.monotonic() - last_yield > 0.5:
                last_yield = time.monotonic()
                yield status, previews, comparison, [], *hidden

        try:
            result = job.result()
        except TrainingCancelled as error:
            gr.Warning(str(error))
            yield f"Cancelled: {error}", previews, comparison, [], *hidden
            return
        except BaseException as error:  # noqa: BLE001 - shown on the page, then re-raised
            yield f"**{name}** was not learned: {first_line(error, with_type=False)}", previews, comparison, [], *hidden
            raise
        skipped = f" {len(result.rejected)} rejected file(s) were skipped (see the list)." if result.rejected else ""
        if result.held is not None:
            held = (f"Trained **{name}** ({config.steps} steps). Merging it ({_merge_sizes(result.held)}) would cut "
                    "styles, so nothing is written yet; its trained state is kept (training it again with the same "
                    f"images and settings merges it without another step).{skipped}")
            yield ("\n\n".join([held, _held_merge(result.held, "merge")]), previews,
                   self._preview_gallery(result.held.previews), [], *_confirmation(result.held))
            return

        # After the merge: the same samples again, and each earlier style's reconstruction error.
        sample = self.render_sample(name)
        previews = previews + [(str(sample), f"{name} · final sample")]
        after_dir = before_dir
        pairs = []
        for number, (before, earlier) in enumerate(zip(comparison, compared), 1):
            progress((number - 1, len(compared)), desc="Rendering earlier styles after the merge")
            path = self.render_sample(earlier, after_dir / f"{number:02d}-after.png")
            shutil.copyfile(path, self._sample_path(studio.library.style(earlier)))
            pairs += [before, (str(path), f"{earlier} · after")]
        errors = [[n, f"{result.errors_before[n]:.2e}", f"{result.errors_after[n]:.2e}"] for n in result.errors_before]
        gr.Info(f"Learned style {name!r}; the library is saved")
        strength = (f" Style strength {result.strength}: how far {result.strength.count} previews moved toward your "
                    f"images, where 0 is the base model and 1 your images." if result.strength else "")
        resumed = f" Continued the interrupted training from step {result.resumed_from}." if result.resumed_from is not None else ""
        yield (f"Learned **{name}** ({config.steps} steps).{resumed} It is in the style list of the Generate tab.{strength}{skipped}",
               previews, pairs, errors, *hidden)

    def cancel_merge(self, name) -> tuple[str, list, dict, dict]:
        """Cancel a held merge (it wrote nothing) -> (a line, the gallery emptied, Confirm and Cancel hidden)."""
        return (f"Merge cancelled: the library is unchanged. **{_markdown_cell(name)}** is kept as an interrupted "
                "training: training it again with the same images and settings continues it.", [], *_no_confirmation())

    def cancel_training(self) -> str:
        job = self._job
        if job is None:
            gr.Info("No training is running")
            return "No training is running."
        job.cancel()
        return ("Cancelling: the training stops at the next step and the library stays as it was. Training the same "
                "style again with the same settings and images continues from there…")

    # --- Library tab -------------------------------------------------------------------------

    @shown_errors
    def rename(self, name, new_name) -> tuple[str, dict]:
        studio = self._require_studio()
        if not name:
            raise ValueError("choose a style to rename")
        new_name = check_style_name(new_name)
        studio.rename(name, new_name)
        gr.Info(f"Renamed {name!r} to {new_name!r}")
        return f"Renamed **{name}** to **{new_name}**.", choices_update(self.style_names(), new_name, with_none=False)

    @shown_errors
    def remove(self, name) -> str:
        studio = self._require_studio()
        if not name:
            raise ValueError("choose a style to delete")
        studio.remove(name)
        gr.Info(f"Deleted {name!r} (Undo brings it back)")
        return f"Deleted **{name}**. *Undo last change* brings it back."

    @shown_errors
    def undo(self) -> str:
        self._require_studio().undo_last_change()
        gr.Info("Undone: the library is as it was before the last change")
        return "Undone: the library is as it was before the last change."

    @shown_errors
    def export_library(self) -> str:
        studio = self._require_studio()
        if not studio.path.exists():
            raise LibraryError("the library is empty; train or import a style first")
        out = self._new_dir("exports") / studio.path.name
        shutil.copyfile(studio.path, out)  # the file is replaced atomically, so this copy is whole
        return str(out)

    def _import_paths(self, files, on_clash) -> list[Path]:
        paths = _file_paths(files)
        if not paths:
            raise ValueError("choose style library or LoRA .safetensors files to import")
        if on_clash not in CLASH_POLICIES:
            raise ValueError(f"choose what to do with clashing names: {', '.join(CLASH_POLICIES)}")
        return paths

    @shown_errors
    def start_import(self, files, on_clash) -> tuple[str, dict, dict, dict]:
        """The Import button: imports at once when no style would drift; else shows what the merge
        would do, each of the most drifted earlier styles before and after it (same prompt and seed),
        and waits for Confirm (offered only when every style stays within budget) or Cancel; nothing is
        written until then -> (the report, the previews, the Confirm button, the Cancel button)."""
        studio = self._require_studio()
        report = studio.import_unless_drifting(self._import_paths(files, on_clash), on_clash=on_clash,
                                               previews=MAX_PREVIEWED_STYLES)
        if not report.names:
            return "Nothing to import: every style name is already in the library.", *_no_import_confirmation()
        numbers = _merge_sizes(report)
        kept = [_markdown_cell(line) for line in report.kept_lines()]
        kept += [f"**Warning:** {_markdown_cell(w)}" for w in report.warnings]  # under 99.9% of a LoRA's ΔW energy
        if report.committed:
            gr.Info(f"Imported {len(report.names)} style(s)")
            added = ", ".join(f"**{_markdown_cell(n)}**" for n in report.names)
            return "\n\n".join([f"Imported {added} in one merge ({numbers}); no style drifted.", *kept]), \
                *_no_import_confirmation()
        summary = f"Importing {len(report.names)} style(s) in one merge: {numbers}."
        return ("\n\n".join([summary, *kept, _held_merge(report, "import")]),
                gr.update(value=self._preview_gallery(report.previews), visible=bool(report.previews)),
                *_confirmation(report))

    def _preview_gallery(self, previews: list[DriftPreview]) -> list[tuple[str, str]]:
        """Each style's before and after images (saved as PNGs with their prompt and seed), captioned."""
        folder = self._new_dir("merge-previews")
        gallery = []
        for number, preview in enumerate(previews, 1):
            name, drift = preview.drift.name, ("" if preview.drift.exact else "≤ ") + percent(preview.drift.after)
            for when, image, caption in (("before", preview.before, f"{name} · before"),
                                         ("after", preview.after, f"{name} · after (drift {drift})")):
                metadata = {"prompt": preview.prompt, "seed": preview.seed, "styles": {name: 1.0},
                            "merge_preview": when}
                gallery.append((str(save_png(image, folder / f"{number:02d}-{when}.png", metadata)), caption))
        return gallery

    def cancel_import(self) -> tuple[str, dict, dict, dict]:
        """Cancel: drop the checked import (it wrote nothing) -> (a line, the previews and both buttons hidden)."""
        return "Import cancelled: the library is unchanged.", *_no_import_confirmation()

    @shown_errors
    def import_files(self, files, on_clash) -> tuple[str, dict, dict, dict]:
        """Confirm: the import itself -> (a line about it, the previews and both buttons hidden)."""
        studio = self._require_studio()
        added = studio.import_files(self._import_paths(files, on_clash), on_clash=on_clash)
        if not added:
            gr.Info("Nothing imported (every style name was already taken)")
            return "Nothing imported: every style name was already in the library.", *_no_import_confirmation()
        gr.Info(f"Imported {len(added)} style(s)")
        return f"Imported {', '.join(f'**{n}**' for n in added)} in one merge.", *_no_import_confirmation()

    @shown_errors
    def export_lora(self, name, format) -> str:
        studio = self._require_studio()
        if not name:
            raise ValueError("choose a style to export")
        if format not in LORA_FORMATS:
            raise ValueError(f"choose a LoRA format: {', '.join(LORA_FORMATS)}")
        out = self._new_dir("exports") / f"{file_stem(name)}-{format}-lora.safetensors"
        return str(studio.export_lora(name, out, format=format))

    @shown_errors
    def select_row(self, rows, evt: gr.SelectData) -> dict:
        """Clicking a table row selects that style for rename/delete/export."""
        index = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
        names = self.style_names()
        try:
            value = rows.iloc[index, 1] if hasattr(rows, "iloc") else rows[index][1]
        except (IndexError, KeyError, TypeError):
            return gr.skip()
        return gr.update(value=value) if value in names else gr.skip()
