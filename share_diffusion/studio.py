"""A pipeline with a style library attached: what the CLI and the app both drive.

`Studio` owns the pipeline's Share layers and the library file. Every change to the library
(train, import, remove, rename, undo) runs as one transaction: take the file lock, reload the file
if another process changed it, change, save atomically. If anything fails, or a training is
cancelled, the model and the file are exactly as they were. A merge that would cut styles can be
held instead (import_unless_drifting, train with hold_if_drifting): made in full, its most drifted
styles drawn, then rolled back the same way, for the user to confirm or drop.
"""

from __future__ import annotations

import copy
import hashlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

from . import share
from .drift import StyleDrift, allowance, check_budgets, merge_outcome, record_merge
from .images import ImageSet, load_training_images
from .library import (
    STORED_COMPONENTS,
    LibraryError,
    LibraryLock,
    StyleLibrary,
    check_style_name,
    check_trigger,
    default_trigger,
    estimated_lora_file_bytes,
    new_metadata,
    style_name_from,
    utc_now,
    write_atomically,
)
from .checkpoints import CheckpointMismatch, TrainingCheckpoint, training_digest
from .devices import distributed_state, launched_distributed, main_process_verdict
from .lora_interop import export_lora, read_lora_components, save_lora
from .errors import first_line
from .fingerprint import legacy_fingerprint, model_fingerprint
from .generation import generate_images
from .library import check_family
from .loading import model_info
from .latent_cache import encoding_vae
from .style_measure import Estimate, StyleMeasure, vae_round_trip
from .training import (TrainingConfig, TrainingProgress, aspect_buckets, copy_sharing_weights, train_style,
                       training_config, with_trigger)

DEFAULT_LIBRARY = Path(__file__).resolve().parent.parent / "styles" / "library.safetensors"
CLASH_POLICIES = ("rename", "replace", "skip", "error")
#: Seed of the previews of a style before and after a merge (DriftPreview).
PREVIEW_SEED = 0


@dataclass
class TrainResult:
    name: str
    errors_before: dict[str, float]  # earlier styles' reconstruction error before this merge
    errors_after: dict[str, float]  # ... and after it
    rejected: list = field(default_factory=list)  # images that could not be used, with reasons
    strength: Estimate | None = None  # how far previews moved toward the user's own images (style_measure)
    resumed_from: int | None = None  # the step an interrupted training was continued from
    #: a merge held back (hold_if_drifting): nothing was written, the training stays resumable
    held: MergeReport | None = None


@dataclass
class DriftPreview:
    """A style drawn as it is (before) and as a merge would leave it (after): its sample prompt,
    the same seed, the model's default steps and guidance (Studio.generate)."""

    drift: StyleDrift
    prompt: str
    seed: int = PREVIEW_SEED
    before: Image.Image | None = None
    after: Image.Image | None = None


@dataclass
class MergeReport:
    """What a merge did, or would do (Studio.check_import, a held training's TrainResult.held)."""

    names: list[str]  # the new styles
    drifts: list[StyleDrift]  # every style's error before and after (drift.py)
    basis_rank_before: int
    basis_rank_after: int
    bytes_before: int
    bytes_after: int | None  # None: not measured (a training's merge that is kept shows no report)
    #: per LoRA file: {"kept": {component: {kept, bound, layers_lost}}, "warnings": [...], "skipped_count"}
    #: (lora_interop.read_lora_components); a warning for each component that kept under 99.9% of its ΔW energy
    files: dict[str, dict] = field(default_factory=dict)
    committed: bool = True  # False: a dry run, nothing was written
    previews: list[DriftPreview] = field(default_factory=list)  # the most drifted earlier styles, worst first

    @property
    def drifting(self) -> list[StyleDrift]:
        """The styles the merge cuts (a size limit forces it; float rounding alone is no cut), the
        most drifted first."""
        return sorted((d for d in self.drifts if d.cut), key=lambda d: -d.after)

    @property
    def warnings(self) -> list[str]:
        return [f"{name}: {w}" for name, report in self.files.items() for w in report["warnings"]]

    def kept_lines(self) -> list[str]:
        """One line per LoRA file: the share of its ΔW energy kept, per component."""
        def kept(k: dict) -> str:
            return ("≤ " if k["bound"] else "") + f"{100 * k['kept']:.4g}%"
        return [f"{name}: kept " + ", ".join(f"{c} {kept(k)}" for c, k in report["kept"].items()) + " of its ΔW energy"
                for name, report in self.files.items()]


class _DryRun(Exception):
    """Raised inside a transaction to roll it back and hand out what it computed: `result`, with
    the `report` of its merge."""

    def __init__(self, report: MergeReport, result: object):
        super().__init__("dry run")
        self.report, self.result = report, result


class Studio:
    def __init__(self, pipe: StableDiffusionPipeline, library_path: str | os.PathLike = DEFAULT_LIBRARY,
                 model_id: str = "embedded", config: share.ShareConfig | None = None):
        self.pipe = pipe
        self.path = Path(library_path)
        self.model_id = model_id
        self.model_kind = model_info(pipe).kind  # picks the training presets (training.presets_for)
        self.family = model_info(pipe).family  # recorded in a new library, checked against an existing one
        self.fingerprint = model_fingerprint(pipe)
        self._legacy_fingerprint: str | None = None  # computed the first time a library needs it
        self._operation = threading.Lock()  # one library change at a time in this process
        self._merge_lock = threading.Lock()  # guards the pipeline's Share layers
        self._file_version = None
        if self.path.exists():
            self.library = StyleLibrary.load(self.path)
            self._check_base_model(self.library)
            self._file_version = self._current_file_version()
        else:
            config = config or share.ShareConfig(target_modules=share.UNET_LORA_MODULES)
            self.library = StyleLibrary(new_metadata(model_id, self.fingerprint, config, share.CLIP_LORA_MODULES,
                                                     family=self.family), {})
        self._attach()

    # --- the model side -------------------------------------------------------------------

    def _check_base_model(self, library: StyleLibrary, source: str | None = None) -> None:
        expected = library.meta["base_model"]
        check_family(library.meta, self.family, str(source or self.path))  # the clearer message first
        if expected["fingerprint"] == self.fingerprint:
            return
        # Libraries saved before the fingerprint rounded weights to fp16 record the fp32 one.
        if self._legacy_fingerprint is None:
            self._legacy_fingerprint = legacy_fingerprint(self.pipe)
        if expected["fingerprint"] != self._legacy_fingerprint:
            raise LibraryError(
                f"{source or self.path}: made for base model {expected['id']!r} "
                f"(fingerprint {expected['fingerprint']}), but the loaded model {self.model_id!r} has "
                f"fingerprint {self.fingerprint}; start Share Studio with --model {expected['id']}"
            )

    def _models(self) -> dict[str, torch.nn.Module]:
        """The pipeline's components that hold Share layers: the UNet, and each text encoder (SDXL
        has two) where it has layers of the library's targets."""
        models = {"unet": self.pipe.unet}
        for component in ("text_encoder", "text_encoder_2"):
            text_encoder = getattr(self.pipe, component, None)
            targets = tuple(self.library.meta["target_modules"][component])
            if text_encoder is not None and targets and (share.share_layers(text_encoder) or any(
                    share.adaptable(m) and share.matches(n, targets) for n, m in text_encoder.named_modules())):
                models[component] = text_encoder
        return models

    def _attach(self) -> None:
        """Put the library's Share state into the pipeline's UNet and text encoders, on Share layers
        of the library's targets (a rolled-back import may have added others). A layer the file
        lacks (a library from before it was adapted) starts empty, every style with ΔW = 0 in it."""
        style_ids = [record["id"] for record in self.library.styles]
        for component, model in self._models().items():
            share.remove_share_layers(model)
            share.inject_share_layers(model, self.library.share_config(component))
            layers = share.share_layers(model)
            state = dict(self.library.component_state(component))
            for name, layer in layers.items():
                if f"{name}.basis_a" not in state:
                    state |= empty_layer_state(name, layer, style_ids)
            try:
                share.load_share_state_dict(model, state)
            except (KeyError, RuntimeError) as error:
                raise LibraryError(f"{self.path}: does not fit this model's layers ({error})") from None
            for name, layer in layers.items():
                if layer.basis_a.shape[0] != layer.d_in or layer.basis_b.shape[0] != layer.d_out:
                    raise LibraryError(f"{self.path}: layer {component}.{name} has the wrong width for this model")
            share.set_active_styles(model, None)

    def _current_file_version(self) -> str | None:
        """A hash of the file's bytes: exact, where modification times and sizes can collide."""
        try:
            return hashlib.sha256(self.path.read_bytes()).hexdigest()
        except FileNotFoundError:
            return None

    # --- reading --------------------------------------------------------------------------

    @property
    def styles(self) -> list[dict]:
        return self.library.styles

    def style_names(self) -> list[str]:
        return [s["name"] for s in self.library.styles]

    def info(self) -> dict:
        count = len(self.library.styles)
        # The fair comparison: each style as a LoRA file of its own rank (fp16), not of rank 16.
        separate = sum(estimated_lora_file_bytes(self.library.state, rank=r["rank"]) for r in self.library.styles)
        return {
            "path": str(self.path),
            "base_model": self.library.meta["base_model"]["id"],
            "fingerprint": self.library.meta["base_model"]["fingerprint"],
            "family": self.library.meta["base_model"].get("family", "unknown"),  # absent in older libraries
            "styles": count,
            "basis_rank": self.library.basis_rank(),
            "drift_budget": self.library.meta["share"]["drift_budget"],
            "size_limit": self.library.meta["share"]["max_basis_rank"],
            "bytes_on_disk": self.path.stat().st_size if self.path.exists() else 0,
            "separate_lora_bytes": separate,
            "library_hash": self.library_hash(),
        }

    def library_hash(self) -> str:
        """The hash of the library as this process last loaded or saved it."""
        return self._file_version[:12] if self._file_version else "empty"

    def generate(self, prompt: str, style: str | None = None, strength: float = 1.0,
                 mix: dict[str, float] | None = None, add_trigger: bool = True, **options) -> tuple[list, dict]:
        """Images for a prompt with a style (or a mix {name: weight}); returns (images, metadata)."""
        weights = dict(mix or {})
        if style:
            weights[style] = strength
        records = {name: self.library.style(name) for name in weights}
        if add_trigger:
            for record in records.values():
                prompt = with_trigger(prompt, record["trigger"])
        with self._merge_lock:  # training runs on its own UNet copy: only its merge step blocks this
            for model in self._models().values():
                share.set_active_styles(model, {records[n]["id"]: w for n, w in weights.items()})
            try:
                images = generate_images(self.pipe, prompt, **options)
            finally:
                for model in self._models().values():
                    share.set_active_styles(model, None)
        metadata = {"prompt": prompt, "styles": weights, "library": self.path.name, "library_hash": self.library_hash()}
        return images, metadata

    # --- changing the library -------------------------------------------------------------

    def _transaction(self, change: Callable[[], object]):
        with self._operation, LibraryLock(self.path):
            if self._current_file_version() != self._file_version:
                self._reload()
            meta, state = copy.deepcopy(self.library.meta), dict(self.library.state)
            try:
                result = change()
                self.library.save(self.path)
            except BaseException:
                self.library = StyleLibrary(meta, state)
                with self._merge_lock:
                    self._attach()
                raise
            self._file_version = self._current_file_version()
            return result

    def _reload(self) -> None:
        if self.path.exists():
            library = StyleLibrary.load(self.path)
            self._check_base_model(library)
        else:
            library = StyleLibrary(new_metadata(self.model_id, self.fingerprint, self.library.share_config(),
                                                family=self.family), {})
        self.library = library
        with self._merge_lock:
            self._attach()

    def _merge(self, models: dict[str, torch.nn.Module], new: dict[str, tuple[dict, float]], new_records: list[dict],
               action: str) -> list[StyleDrift]:
        """Merge new styles {id: ({component: factors}, scale)} into `models` {component: model} in one
        step (one SVD per layer over all of them) and record every style's error (drift.py). A
        component a style lacks gets it with ΔW = 0. Budgets are the caller's (_keep_or_hold)."""
        meta = self.library.meta
        ids = share.style_ids(models["unet"]) + list(new)
        records = {r["id"]: r for r in [*meta["styles"], *new_records]}
        allowances = {i: allowance(records[i]) for i in ids}
        plans = {}
        for component, model in models.items():
            config = self.library.share_config(component)
            for layer in share.share_layers(model).values():
                layer.config = config  # the library's size limit, as set now
            plans[component] = share.plan_merge(model, {i: factors.get(component, {}) for i, (factors, _) in new.items()},
                                                allowances)
        outcome = merge_outcome(meta, ids, new_records, {f"{c}.{name}": m for c, plan in plans.items() for name, m in plan.items()})
        for component, model in models.items():
            share.apply_merge(model, plans[component], {i: scale for i, (_, scale) in new.items()})
        self.library.styles.extend(new_records)
        record_merge(meta, outcome, action, ",".join(new), self._basis_rank(models), utc_now())
        return outcome

    def _add_layers(self, models: dict[str, torch.nn.Module], styles: list[dict[str, dict]]) -> None:
        """Give a Share layer to every layer that one of the new styles ({component: factors}) uses
        and that has none yet (a LoCon's k×k convolutions): its whole name joins the library's
        targets, and it holds every earlier style with rank 0, which is what they were there."""
        new = {component: sorted({name for factors in styles for name, (b, _) in factors.get(component, {}).items()
                                  if b.shape[1]} - set(share.share_layers(model)))
               for component, model in models.items()}
        for component, names in new.items():
            self.library.meta["target_modules"][component].extend(names)
        if any(new.values()):
            self._attach()

    def _basis_rank(self, models: dict[str, torch.nn.Module] | None = None) -> int:
        layers = [layer for model in (models or self._models()).values() for layer in share.share_layers(model).values()]
        return max((layer.basis_a.shape[1] for layer in layers), default=0)

    def _capture(self) -> None:
        for component, model in self._models().items():
            self.library.set_component_state(component, share.share_state_dict(model))

    def _unique_name(self, name: str, taken: set[str] = frozenset()) -> str:
        candidate, number = name, 2
        while self.library.has_style(candidate) or candidate in taken:
            candidate = f"{name} ({number})"
            number += 1
        return candidate

    def _new_record(self, name: str, trigger: str, rank: int = 0, **details) -> dict:
        return {"id": self.library.new_style_id(), "name": name, "trigger": trigger, "created_at": utc_now(),
                "error": 0.0, "error_exact": True, "cuts": 0, "rank": rank,
                "drift_budget": self.library.meta["share"]["drift_budget"], "error_history": [], **details}

    def train(self, images: list, name: str, trigger: str | None = None, config: TrainingConfig | None = None,
              preset: str = "quick", progress: Callable[[TrainingProgress], None] | None = None,
              preview: Callable[[int, list], None] | None = None, cancel: threading.Event | None = None,
              resume: bool | None = None, hold_if_drifting: bool = False, previews: int = 0) -> TrainResult:
        """Learn a style from image files or folders and merge it into the library.

        An interrupted training of the same name (checkpoints.py) is continued when `resume` is
        True (and must exist), discarded when False, and continued when None if it was made with
        the same settings and images (else discarded). Under `accelerate launch`, every process
        trains its share of each batch and only the main one writes the library. With
        config.text_encoder_lr > 0 the adapted text encoders learn the style too, and every trained
        model's part is merged in the one merge step.

        With `hold_if_drifting`, a merge that would cut any style is held: nothing is written, the
        result's `held` report has up to `previews` of the most drifted earlier styles drawn before
        and after it, and the training's final checkpoint is kept. Training again with the same
        images and settings (resume=True, no hold) then merges it without a training step.
        """
        name = check_style_name(name)
        trigger = check_trigger(trigger) if trigger else default_trigger(name)
        config = config or training_config(preset, self.model_kind, self.family)
        buckets = aspect_buckets(self.pipe)  # each image in the bucket of its aspect ratio
        image_set = load_training_images(images, buckets.resolution, buckets=buckets)
        image_set.require_some()
        if self.library.has_style(name):
            raise LibraryError(f"a style named {name!r} exists; pick another name or remove it first")
        processes = distributed_state() if launched_distributed() else None
        checkpoint = self._checkpoint(name, image_set, trigger, config, resume, main=processes is None or processes.is_main_process)
        resumed_from = checkpoint.saved_step() if checkpoint.exists() else None
        if processes is not None and not processes.is_main_process:
            # The main process says whether it could open the library for the change; then all train.
            if (refusal := main_process_verdict()) is not None:
                raise LibraryError(f"the main process stopped: {refusal}")
            unet, text_encoders = self._training_copies(config)
            try:
                train_style(self.pipe, unet, image_set, "helper", trigger, config, cancel=cancel, checkpoint=checkpoint,
                            text_encoders=text_encoders)  # fmt: skip
            finally:
                processes.wait_for_everyone()  # until the main process has saved the library
            return TrainResult(name, {}, {}, image_set.rejected, resumed_from=resumed_from)
        started = False

        def change():
            nonlocal started
            if self.library.has_style(name):  # another process may have added it meanwhile
                raise LibraryError(f"a style named {name!r} exists; pick another name or remove it first")
            if processes is not None:
                main_process_verdict(None)
                started = True
            record = self._new_record(
                name, trigger, images=len(image_set.images), steps=config.steps, preset=preset,
                sample_prompt=with_trigger("", trigger), training={"learning_rate": config.learning_rate,
                                                                   "text_encoder_lr": config.text_encoder_lr,
                                                                   "rank": config.rank,
                                                                   "batch_size": config.batch_size, "seed": config.seed},
            )
            unet, text_encoders = self._training_copies(config)
            trained = {"unet": train_style(self.pipe, unet, image_set, record["id"], trigger, config, progress=progress,
                                           preview=preview, cancel=cancel, checkpoint=checkpoint, text_encoders=text_encoders),
                       **text_encoders}  # fmt: skip
            taken = {component: share.take_trained_style(model) for component, model in trained.items()}
            # Every trained layer has the same scale: alpha (the library's) over the rank (the config's).
            style_id, _, scale = taken["unet"]
            factors = {component: layer_factors for component, (_, layer_factors, _) in taken.items()}
            record["rank"] = max((b.shape[1] for part in factors.values() for b, _ in part.values()), default=0)
            sizes = self._sizes()
            with self._merge_lock:  # a model that did not train is the pipeline's own: it gets the style with ΔW = 0
                models = self._models()
                outcome = self._merge(models | trained, {style_id: (factors, scale)}, [record], "train")
                for component, model in trained.items():
                    share.load_share_state_dict(models[component], share.share_state_dict(model))
                    share.set_active_styles(models[component], None)
            before = {d.name: d.before for d in outcome if d.id != style_id}
            after = {d.name: d.after for d in outcome if d.id != style_id}
            self._capture()
            keep = not (hold_if_drifting and any(d.cut for d in outcome))
            report = self._merge_report([name], outcome, sizes, measure_size=not keep)
            return self._keep_or_hold(report, keep, previews, TrainResult(
                name, before, after, image_set.rejected, resumed_from=resumed_from, held=None if keep else report))

        try:
            result = self._merge_transaction(change)
        except BaseException as error:
            if processes is not None and not started:
                main_process_verdict(first_line(error))
            raise
        finally:
            if processes is not None and started:
                processes.wait_for_everyone()
        if result.held is not None:
            return result  # its checkpoint stays, to be merged later (resume=True)
        checkpoint.remove()
        if config.strength_previews:
            result.strength = self.style_strength(name, image_set, config.strength_previews)
        return result

    def _training_copies(self, config: TrainingConfig) -> tuple[torch.nn.Module, dict[str, torch.nn.Module]]:
        """Copies of the UNet and, when config.text_encoder_lr > 0, of the adapted text encoders, that
        share the frozen weights: a style trains on them while the pipeline keeps generating."""
        with self._merge_lock:
            models = self._models()
            text_encoders = {c: model for c, model in models.items() if c != "unet"} if config.text_encoder_lr > 0 else {}
            return copy_sharing_weights(models["unet"]), {c: copy_sharing_weights(m) for c, m in text_encoders.items()}

    def interrupted_training(self, name: str) -> int | None:
        """The step at which a training of style `name` was interrupted, if one can be resumed
        (a damaged checkpoint cannot: it is discarded by the next training of that name)."""
        checkpoint = TrainingCheckpoint(TrainingCheckpoint.folder_for(self.path, name), digest="")
        return checkpoint.saved_step() if checkpoint.exists() else None

    def _checkpoint(self, name: str, image_set: ImageSet, trigger: str, config: TrainingConfig, resume: bool | None,
                    main: bool) -> TrainingCheckpoint:  # fmt: skip
        model = f"{self.fingerprint} {self.pipe.unet.dtype} {self.pipe.scheduler.config.get('prediction_type')}"
        digest = training_digest(config, [(np.asarray(i.image), i.caption) for i in image_set.images], trigger, model)
        checkpoint = TrainingCheckpoint(TrainingCheckpoint.folder_for(self.path, name), digest)
        if resume and not checkpoint.matches():
            if not checkpoint.folder.exists():
                raise LibraryError(f"there is no interrupted training of {name!r} to resume")
            problem = "is damaged" if checkpoint.damaged() else "was made with other settings, images, captions or model"
            raise CheckpointMismatch(f"the interrupted training of {name!r} {problem}; train with the same ones, or start over (--restart)")
        discard = resume is False or (resume is None and not checkpoint.matches())
        if main and discard and checkpoint.folder.exists():
            checkpoint.remove()
        return checkpoint

    def style_strength(self, name: str, image_set: ImageSet, count: int = 8) -> Estimate:
        """The paired style strength of `count` previews: each training image's caption drawn with the
        style and without it (same seed), scored against that image through the VAE. 0 is the base
        model, 1 the user's own images (share_diffusion.style_measure)."""
        images = image_set.images[:count]
        captions = [image.caption or "" for image in images]
        styled = [self.generate(c, style=name, seed=i)[0][0] for i, c in enumerate(captions)]
        base = [self.generate(c, seed=i)[0][0] for i, c in enumerate(captions)]
        size = styled[0].size
        own = np.stack([np.asarray(i.image.convert("RGB").resize(size), dtype=np.float32) / 255 for i in images])
        with encoding_vae(self.pipe) as vae:
            references = vae_round_trip(vae, own)
        return StyleMeasure(base, references).strength(styled)

    def import_files(self, paths: list, on_clash: str = "rename") -> list[str]:
        """Merge style libraries and standard LoRA files into this library, all in one merge (one SVD
        per layer over every new style); returns the new names. A merge that would drift any style
        past its budget is refused (drift.DriftError) and the library is left as it was."""
        return self.import_with_report(paths, on_clash).names

    def import_with_report(self, paths: list, on_clash: str = "rename") -> MergeReport:
        """import_files, returning its MergeReport: with each LoRA file's kept energy and warnings."""
        return self._import(paths, on_clash, commit=lambda report: True)

    def check_import(self, paths: list, on_clash: str = "rename") -> MergeReport:
        """What import_files would do (names, every style's error after, basis rank and file size
        before and after), computed in full and then rolled back: nothing is written."""
        return self._import(paths, on_clash, commit=lambda report: False)

    def import_unless_drifting(self, paths: list, on_clash: str = "rename", previews: int = 0) -> MergeReport:
        """import_with_report if the merge adds styles and cuts none; else check_import (nothing is
        written, report.committed is False) with up to `previews` of the most drifted earlier styles
        drawn before and after the merge, for the user to confirm with import_files or to drop."""
        return self._import(paths, on_clash, commit=lambda report: bool(report.names) and not report.drifting,
                            previews=previews)

    def sample_prompt(self, name: str) -> str:
        """The prompt a style is shown with: the one it was learned with, else its trigger alone."""
        record = self.library.style(name)
        return record.get("sample_prompt") or with_trigger("", record["trigger"])

    def _draw(self, preview: DriftPreview) -> Image.Image:
        return self.generate(preview.prompt, style=preview.drift.name, add_trigger=False, seed=preview.seed)[0][0]

    def _sizes(self) -> tuple[int, int]:
        """The basis rank and the file's size in bytes, for a MergeReport's before."""
        return self.library.basis_rank(), self.path.stat().st_size if self.path.exists() else 0

    def _merge_report(self, names: list[str], drifts: list[StyleDrift], sizes: tuple[int, int],
                      files: dict | None = None, measure_size: bool = True) -> MergeReport:
        """The report of a merge just made in memory; `sizes`: _sizes() before it. Measuring the file
        size after it serializes the whole library once more, which a kept training skips."""
        size_after = len(self.library.to_bytes()) if measure_size else None
        return MergeReport(names, drifts, sizes[0], self.library.basis_rank(), sizes[1], size_after, files or {})

    def _keep_or_hold(self, report: MergeReport, keep: bool, previews: int, result):
        """The end of a merge's change (_merge_transaction): keep it and return `result`, unless a
        style drifts past its budget (drift.DriftError); or hold it, with up to `previews` of the
        most drifted earlier styles drawn in the merged state, and roll it back."""
        if keep:
            check_budgets(report.drifts, self.library.meta["share"]["max_basis_rank"])
            return result
        report.committed = False
        earlier = [d for d in report.drifting if d.name not in report.names]
        report.previews = [DriftPreview(d, self.sample_prompt(d.name)) for d in earlier[:previews]]
        for preview in report.previews:
            preview.after = self._draw(preview)
        raise _DryRun(report, result)

    def _merge_transaction(self, change: Callable[[], object]):
        """_transaction(change) for a change that ends in _keep_or_hold: a held merge returns its
        result, the previews drawn before it once the library is as it was again."""
        try:
            return self._transaction(change)
        except _DryRun as dry_run:
            for preview in dry_run.report.previews:
                preview.before = self._draw(preview)
            return dry_run.result

    def _import(self, paths: list, on_clash: str, commit: Callable[[MergeReport], bool],
                previews: int = 0) -> MergeReport:
        """The merge of `paths`, kept if commit(report), else rolled back (report.committed False)
        with `previews` of the most drifted earlier styles: the after images are drawn in the
        merged state before the rollback, the before images after it."""
        if on_clash not in CLASH_POLICIES:
            raise ValueError(f"on_clash must be one of {CLASH_POLICIES}")
        incoming, files = [], {}
        models = self._models()
        for path in map(Path, paths):
            if path.suffix != ".safetensors":
                raise LibraryError(f"{path.name}: only .safetensors files are imported (pickle files are never opened)")
            try:
                other = StyleLibrary.load(path)
            except LibraryError as error:
                if "not a Share Studio style library" not in str(error):
                    raise
                factors, info = read_lora_components(path, models)
                files[path.name] = {k: info[k] for k in ("kept", "warnings", "skipped_count")}
                name = style_name_from(path.stem)
                incoming.append((name, default_trigger(name), factors, {"imported": f"LoRA {path.name}"}))
                continue
            self._check_base_model(other, source=str(path))
            for record in other.styles:  # its drift so far comes along
                factors = {c: library_style_factors(other, record["id"], c) for c in models}
                kept = {k: record[k] for k in ("error", "error_exact", "cuts", "drift_budget")}
                incoming.append((record["name"], record["trigger"], factors, {"imported": f"library {path.name}", **kept}))

        def change():
            sizes = self._sizes()
            new, records, taken = {}, [], set()
            for name, trigger, factors, details in incoming:
                if self.library.has_style(name) or name in taken:
                    if on_clash == "error":
                        raise LibraryError(f"a style named {name!r} is already in the library")
                    if on_clash == "skip":
                        continue
                    if on_clash == "replace" and name not in taken:
                        self._remove(name)
                    else:
                        name = self._unique_name(name, taken)
                taken.add(name)
                rank = max((b.shape[1] for part in factors.values() for b, _ in part.values()), default=0)
                record = self._new_record(name, trigger, rank=rank, sample_prompt=with_trigger("", trigger))
                record.update(details)
                new[record["id"]] = (factors, 1.0)
                records.append(record)
            drifts = []
            if new:
                with self._merge_lock:
                    self._add_layers(models, [factors for factors, _ in new.values()])
                    drifts = self._merge(models, new, records, "import")
                    for model in models.values():
                        share.set_active_styles(model, None)
            self._capture()
            report = self._merge_report([r["name"] for r in records], drifts, sizes, files)
            return self._keep_or_hold(report, commit(report), previews, report)

        return self._merge_transaction(change)

    def _remove(self, name: str) -> None:
        record = self.library.style(name)
        with self._merge_lock:
            for model in self._models().values():
                share.remove_style(model, record["id"])
        self.library.styles.remove(record)
        self.library.meta["merges"].append({"number": len(self.library.meta["merges"]) + 1, "action": "remove",
                                            "style": record["id"], "at": utc_now(), "basis_rank": self._basis_rank()})
        self._capture()

    def remove(self, name: str) -> None:
        self._transaction(lambda: self._remove(name))

    def configure(self, drift_budget: float | None = None, size_limit: int | None | str = "keep",
                  style: str | None = None) -> None:
        """Set the drift budget (of new styles, or of one style's when `style` is given) and the
        size limit (basis directions per layer and side; None: no limit). The next merge obeys them."""
        if drift_budget is not None and not 0 <= drift_budget <= 1:
            raise LibraryError(f"a drift budget is a fraction from 0 to 1 (0.01 is 1%), not {drift_budget}")
        if size_limit not in ("keep", None) and (type(size_limit) is not int or size_limit < 1):
            raise LibraryError(f"a size limit is a number of basis directions, at least 1 (or none), not {size_limit!r}")

        def change():
            if style is not None and drift_budget is not None:
                self.library.style(style)["drift_budget"] = float(drift_budget)
            elif drift_budget is not None:
                self.library.meta["share"]["drift_budget"] = float(drift_budget)
            if size_limit != "keep":
                self.library.meta["share"]["max_basis_rank"] = size_limit

        self._transaction(change)

    def rename(self, name: str, new_name: str) -> None:
        new_name = check_style_name(new_name)

        def change():
            record = self.library.style(name)
            if new_name != name and self.library.has_style(new_name):
                raise LibraryError(f"a style named {new_name!r} already exists")
            record["name"] = new_name

        self._transaction(change)

    def undo_last_change(self) -> None:
        """Restore `<library>.bak`, the version before the last change (one level of undo)."""
        backup = self.path.with_name(self.path.name + ".bak")
        with self._operation, LibraryLock(self.path):
            if not backup.exists():
                raise LibraryError("there is nothing to undo")
            library = StyleLibrary.load(backup)
            self._check_base_model(library, source=str(backup))
            data = backup.read_bytes()
            write_atomically(self.path, data, keep_backup=False)
            backup.unlink()
            self.library = library
            with self._merge_lock:
                self._attach()
            self._file_version = self._current_file_version()

    def export_lora(self, name: str, out: str | os.PathLike, format: str = "kohya") -> Path:
        record = self.library.style(name)
        factors = {c: library_style_factors(self.library, record["id"], c) for c in STORED_COMPONENTS}
        conv_shapes = {layer_name: layer.weight.shape for model in self._models().values()
                       for layer_name, layer in share.share_layers(model).items() if layer.is_conv}
        state = export_lora(factors["unet"], factors["text_encoder"], format=format, factors_text_2=factors["text_encoder_2"],
                            unet_config=self.pipe.unet.config, conv_shapes=conv_shapes)
        out = Path(out)
        save_lora(out, state, metadata={"style": name, "trigger": record["trigger"],
                                        "base_model": self.library.meta["base_model"]["id"]})
        return out


def library_style_factors(library: StyleLibrary, style_id: str, component: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """layer -> (B, A) with ΔW = B Aᵀ for one style of a library file, scale folded into B."""
    state = library.component_state(component)
    factors = {}
    for key in state:
        if not key.endswith(".basis_a"):
            continue
        layer = key[: -len(".basis_a")]
        prefix = f"{layer}.styles.{style_id}."
        scale = float(state[prefix + "scale"])
        factors[layer] = (scale * state[f"{layer}.basis_b"] @ state[prefix + "loadings_b"],
                          state[f"{layer}.basis_a"] @ state[prefix + "loadings_a"])
    return factors


def empty_layer_state(name: str, layer: share.ShareLinear, style_ids: list[str]) -> dict[str, torch.Tensor]:
    """share_state_dict entries of a layer that holds no style yet: an empty basis (k = 0), and
    every style with rank 0 (ΔW = 0)."""
    state = {f"{name}.basis_a": torch.zeros(layer.d_in, 0), f"{name}.basis_b": torch.zeros(layer.d_out, 0)}
    for style_id in style_ids:
        state |= {f"{name}.styles.{style_id}.loadings_a": torch.zeros(0, 0),
                  f"{name}.styles.{style_id}.loadings_b": torch.zeros(0, 0),
                  f"{name}.styles.{style_id}.scale": torch.tensor(1.0)}
    return state
