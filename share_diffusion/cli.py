"""Command line interface: ``python -m share_diffusion <command> ...``.

Adding a command is one ``register_<name>(subparsers)`` function that builds its parser
and sets ``func=<handler>``, plus one entry in :data:`COMMANDS`.  Handlers take the parsed
``argparse.Namespace`` and return an exit code (``None`` means 0).

Every failure ends as one line on stderr (``share_diffusion: error: ...``) and a non-zero exit
code; ``--debug`` shows the traceback instead.  Heavy libraries (torch, diffusers) are
imported inside handlers so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

PROG = "share_diffusion"


class CommandError(Exception):
    """A user error detected by the CLI itself (bad option combination...)."""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line: ``share_diffusion generate: error: ... (see --help)``."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.exit(2, f"{self.prog}: error: {' '.join(message.split())} (see --help)\n")


def _debug_option(parser: argparse.ArgumentParser, *, default=False) -> None:
    parser.add_argument(
        "--debug",
        action="store_true",
        default=default,
        help="show full tracebacks and library warnings",
    )


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """--model, --model-config, --device, --dtype, --attention (shared by commands that load a model)."""
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="M",
        default=None,
        help="diffusers folder, single-file .safetensors checkpoint or Hugging Face id (default: the embedded model)",
    )
    group.add_argument(
        "--model-config",
        metavar="DIR",
        default=None,
        help="diffusers folder of the same architecture, to configure a single-file checkpoint offline",
    )
    group.add_argument("--device", default=None, help="auto (default), cpu, cuda, cuda:N or mps")
    group.add_argument("--dtype", default=None, help="auto (default: fp16 on CUDA, else fp32), fp32, fp16 or bf16")
    group.add_argument(
        "--attention", default="auto", help="auto/sdpa (PyTorch SDPA, default), xformers (CUDA only) or classic"
    )


def load_model_from_args(args: argparse.Namespace):
    """Load the pipeline selected by :func:`add_model_options` options."""
    from .loading import load_pipeline

    return load_pipeline(
        args.model,
        device=args.device,
        dtype=args.dtype,
        attention=args.attention,
        config=args.model_config,
        progress=_show_progress(args),
    )


def _show_progress(args: argparse.Namespace) -> bool:
    return not getattr(args, "quiet", False) and sys.stderr.isatty()


# --------------------------------------------------------------------------------------
# generate
# --------------------------------------------------------------------------------------
def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """Prompt/sampling options of ``generate`` (style options are added next to these)."""
    group = parser.add_argument_group("generation")
    group.add_argument("--prompt", "-p", required=True, metavar="TEXT", help="text prompt")
    group.add_argument("--negative", "-n", default="", metavar="TEXT", help="negative prompt")
    group.add_argument("--seed", "-s", type=int, default=-1, metavar="S", help="random seed; -1 (default) picks one at random")
    group.add_argument("--steps", type=int, default=None, metavar="N", help="denoising steps (default 20; SDXL 30)")
    group.add_argument("--guidance", "-g", type=float, default=None, metavar="G",
                       help="classifier-free guidance scale (default 4.0; SDXL 5.0)")
    group.add_argument("--width", "-W", type=int, default=None, metavar="W", help="image width (default: the model's native size)")
    group.add_argument("--height", "-H", type=int, default=None, metavar="H", help="image height (default: the model's native size)")
    group.add_argument(
        "--scheduler", default=None, metavar="NAME", help="ddim, euler, euler_a, dpm++, pndm, lms (default: the model's own)"
    )
    group.add_argument("--num-images", type=int, default=1, metavar="N", help="images to generate (default 1)")


def register_generate(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "generate",
        help="generate images from a prompt",
        description="Generate images and save them as PNG with the generation settings embedded "
        "(A1111 'parameters' and JSON 'share_studio' text chunks).",
    )
    add_generation_options(parser)
    parser.add_argument(
        "--out", "-o", required=True, metavar="FILE.png", help="output PNG; several images become FILE-0.png, FILE-1.png..."
    )
    add_model_options(parser)
    add_library_option(parser, required=False)
    group = parser.add_argument_group("styles")
    group.add_argument("--style", metavar="NAME", default=None, help="a style from --library")
    group.add_argument("--strength", type=float, default=1.0, metavar="W", help="weight of --style (default 1.0)")
    group.add_argument("--mix", nargs="+", default=[], metavar="NAME=W", help="several styles with weights, e.g. --mix ink=0.7 neon=0.3")
    group.add_argument("--no-trigger", action="store_true", help="do not append the styles' trigger words to the prompt")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_generate)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out must be a .png file, got {args.out!r}")
    if out.is_dir():
        raise CommandError(f"--out is a folder: {args.out!r}; give a file name like {out / 'image.png'}")

    from .generation import generate_images, generation_defaults, resolve_seed
    from .png_metadata import numbered_output_paths, save_generated
    from .schedulers import canonical_scheduler_name

    if args.scheduler:
        canonical_scheduler_name(args.scheduler)  # fail before the (slow) model load
    mix = parse_mix(args.mix)
    if (args.style or mix) and not args.library:
        raise CommandError("--style and --mix need --library")
    pipe = load_model_from_args(args)
    seed = resolve_seed(args.seed)
    defaults = generation_defaults(pipe)  # the family's, recorded in the PNG too
    options = dict(negative_prompt=args.negative, seed=seed, steps=defaults.steps if args.steps is None else args.steps,
                   guidance=defaults.guidance if args.guidance is None else args.guidance)
    extra = {}
    if args.style or mix:
        studio = open_studio(args, pipe)
        images, extra = studio.generate(
            args.prompt, style=args.style, strength=args.strength, mix=mix, add_trigger=not args.no_trigger,
            width=args.width, height=args.height, num_images=args.num_images, scheduler=args.scheduler, **options,
        )
        options["prompt"] = extra.pop("prompt")
    else:
        images = generate_images(
            pipe, args.prompt, width=args.width, height=args.height, num_images=args.num_images,
            scheduler=args.scheduler, **options,
        )
        options["prompt"] = args.prompt
    options["negative_prompt"] = options.pop("negative_prompt")
    paths = save_generated(
        pipe, images, numbered_output_paths(out, len(images)), scheduler=args.scheduler, **options, **extra
    )
    for i, path in enumerate(paths):
        print(f"saved {path} (seed {seed + i})")
    return 0


def parse_mix(items: list[str]) -> dict[str, float]:
    mix = {}
    for item in items:
        name, sep, weight = item.rpartition("=")
        try:
            mix[name] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise CommandError(f"--mix takes NAME=WEIGHT, got {item!r}")
    return mix


# --------------------------------------------------------------------------------------
# the style library: train, list, export-lora, import, remove, rename, undo
# --------------------------------------------------------------------------------------
def add_library_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    from .studio import DEFAULT_LIBRARY

    parser.add_argument(
        "--library", "-l", metavar="FILE", default=None if not required else str(DEFAULT_LIBRARY),
        help=f"style library file (default: {DEFAULT_LIBRARY.relative_to(Path.cwd()) if DEFAULT_LIBRARY.is_relative_to(Path.cwd()) else DEFAULT_LIBRARY})"
        if required else "style library file, for --style/--mix",
    )


def drift_budget(text: str) -> float:
    """A drift budget from "1%" or "0.01"."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a drift budget is like 1% or 0.01, not {text!r}") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"a drift budget is from 0% to 100%, not {text!r}")
    return value


def size_limit(text: str) -> int | None:
    """A size limit: a number of basis directions, or "none"."""
    if text.lower() == "none":
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a size limit is a number of basis directions (at least 1) or none, not {text!r}")
    return int(text)


def add_drift_options(parser: argparse.ArgumentParser, what: str) -> None:
    """--drift-budget and --size-limit: library settings, changed before the command merges."""
    group = parser.add_argument_group("drift")
    group.add_argument("--drift-budget", type=drift_budget, default=None, metavar="B",
                       help=f"the most relative ΔW error a merge may leave {what} with, e.g. 1%% or 0.01 "
                       "(default: the library's, 1%% for a new one)")
    group.add_argument("--size-limit", type=size_limit, default=argparse.SUPPRESS, metavar="K",
                       help="at most K basis directions per layer (or none, the default for a new library); a merge "
                       "that would drift a style past its budget under it is refused")


def apply_drift_options(studio, args: argparse.Namespace, style: str | None = None) -> None:
    """Set what --drift-budget and --size-limit say (a library change of its own), if anything."""
    limit = getattr(args, "size_limit", "keep")  # absent: keep the library's
    if args.drift_budget is not None or limit != "keep":
        studio.configure(drift_budget=args.drift_budget, size_limit=limit, style=style)


def open_studio(args: argparse.Namespace, pipe=None):
    from .loading import model_info
    from .studio import Studio

    pipe = pipe or load_model_from_args(args)
    return Studio(pipe, args.library, model_id=model_info(pipe).name)


def register_train(subparsers) -> argparse.ArgumentParser:
    from .training import LR_SCHEDULES, MIXED_PRECISIONS, PRESET_NAMES, PRESETS

    parser = subparsers.add_parser("train", help="learn a new style from a few images",
                                   description="Learn a style from images (files or folders; a .txt beside an image is "
                                   "its caption) and merge it into the library. Ctrl-C cancels and leaves the library unchanged; "
                                   "the training can then be resumed with --resume. Under `accelerate launch` the processes "
                                   "share each batch.")
    add_library_option(parser)
    parser.add_argument("--name", required=True, help="the style's name")
    parser.add_argument("--images", nargs="+", required=True, metavar="PATH", help="image files or folders")
    parser.add_argument("--trigger", default=None, help="trigger word (default: from the name)")
    parser.add_argument("--preset", choices=PRESET_NAMES, default="quick", help=" | ".join(
        f"{kind}: " + "; ".join(f"{n} {p.steps} steps, lr {p.learning_rate:g}, rank {p.rank}" for n, p in presets.items())
        for kind, presets in PRESETS.items()))
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--learning-rate", "--lr", type=float, default=None)
    parser.add_argument("--text-encoder-lr", type=float, default=None, metavar="LR",
                        help="the text encoder learns the style too, at this rate (kohya's --text_encoder_lr, "
                             "e.g. 5e-5 with --lr 1e-4); default 0: frozen")
    parser.add_argument("--rank", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--mixed-precision", choices=MIXED_PRECISIONS, default=None,
                        help="auto (default): the model's own type; no: float32 (needs --dtype fp32 for a half model)")
    parser.add_argument("--gradient-checkpointing", action="store_true", default=None, help="less memory, slower")
    parser.add_argument("--use-8bit-adam", action="store_true", default=None, help="needs bitsandbytes (CUDA)")
    parser.add_argument("--gradient-accumulation", type=int, default=None, metavar="N", help="batches per optimizer step")
    parser.add_argument("--min-snr-gamma", type=float, default=None, help="min-SNR-γ loss weighting, e.g. 5 (default off)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="linear learning-rate warm-up")
    parser.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None, help="after the warm-up (default constant)")
    parser.add_argument("--no-flip", dest="flip", action="store_false", default=None,
                        help="do not mirror training images (for styles with text or handedness)")
    parser.add_argument("--strength-previews", type=int, default=None, metavar="N",
                        help="afterwards, score N previews against your images (default 8; 0 skips)")
    parser.add_argument("--cache-latents", default=None, metavar="DIR",
                        help="keep the images' VAE latents in DIR and reuse them when a style is trained again")
    parser.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                        help="save a resumable checkpoint every N steps (default 100; 0: only when cancelled)")
    restart = parser.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true", help="continue the interrupted training of this style")
    restart.add_argument("--restart", action="store_true", help="discard an interrupted training of this style and start over")
    add_drift_options(parser, "this and later styles")
    add_model_options(parser)
    parser.set_defaults(func=cmd_train)
    return parser


def cmd_train(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from .devices import distributed_state, launched_distributed
    from .errors import ShareStudioError
    from .training import TrainingCancelled, TrainingProgress, training_config
    from .training_job import TrainingJob

    studio = open_studio(args)
    main_process = not launched_distributed() or distributed_state().is_main_process
    if main_process:  # under accelerate launch only the main process writes the library
        apply_drift_options(studio, args)
    interrupted = studio.interrupted_training(args.name)
    if interrupted is not None and not (args.resume or args.restart):
        raise ShareStudioError(f"a training of {args.name!r} was interrupted at step {interrupted}: "
                               "add --resume to continue it, or --restart to start over")
    config = training_config(
        args.preset, studio.model_kind, studio.family, steps=args.steps, learning_rate=args.learning_rate, rank=args.rank,
        batch_size=args.batch_size, seed=args.seed, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, use_8bit_adam=args.use_8bit_adam,
        strength_previews=args.strength_previews, gradient_accumulation=args.gradient_accumulation,
        min_snr_gamma=args.min_snr_gamma, warmup_steps=args.warmup_steps, lr_schedule=args.lr_schedule, flip=args.flip,
        checkpoint_every=args.checkpoint_every, latent_cache=args.cache_latents, text_encoder_lr=args.text_encoder_lr,
    )
    bar = tqdm(total=config.steps, desc=f"training {args.name}", unit="step", file=sys.stderr, disable=not main_process)
    job = TrainingJob(studio, args.images, args.name, trigger=args.trigger, config=config, preset=args.preset,
                      resume=bool(args.resume))
    # Ctrl-C only sets the cancel flag: the training stops at the next step and rolls back, instead of
    # being torn down half-way through a save. A handler, not KeyboardInterrupt: an exception raised
    # wherever the main thread happens to be (inside tqdm's write, a queue's wait) could be lost there.
    previous_handler = signal.signal(signal.SIGINT, lambda signum, frame: job.cancel())
    try:
        for event in job.start().events():
            if isinstance(event, TrainingProgress):
                bar.update(event.step - bar.n)
                bar.set_postfix(loss=f"{event.loss:.4f}")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    bar.close()
    try:
        result = job.result()
    except TrainingCancelled as error:
        print(f"{PROG}: {error}", file=sys.stderr)
        return 130
    if not main_process:
        return 0
    if result.resumed_from is not None:
        print(f"resumed from step {result.resumed_from}")
    for rejected in result.rejected:
        print(f"skipped {rejected}", file=sys.stderr)
    print(f"learned style {result.name!r}; library saved to {args.library}")
    if result.strength is not None:
        print(f"style strength {result.strength} (0 = the base model, 1 = your own images)")
    for name in result.errors_before:
        print(f"  {name}: ΔW error {result.errors_before[name]:.2e} -> {result.errors_after[name]:.2e}")
    return 0


def register_list(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("list", help="list the styles of a library")
    add_library_option(parser)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.set_defaults(func=cmd_list)
    return parser


LIST_FIELDS = ("name", "trigger", "created_at", "images", "steps", "rank", "error", "error_exact", "drift_budget")


def cmd_list(args: argparse.Namespace) -> int:
    import json

    from .drift import error_text, percent
    from .families import label
    from .library import StyleLibrary, library_family

    path = Path(args.library)
    library = StyleLibrary.load(path)
    share = library.meta["share"]
    summary = {
        "library": str(path),
        "bytes": path.stat().st_size,
        "basis_rank": library.basis_rank(),
        "drift_budget": share["drift_budget"],
        "size_limit": share["max_basis_rank"],
        "base_model": {**library.meta["base_model"], "family": library_family(library.meta)},
        "styles": [{k: s.get(k) for k in LIST_FIELDS} for s in library.styles],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    limit = "no size limit" if share["max_basis_rank"] is None else f"size limit k≤{share['max_basis_rank']}"
    print(f"{path}: {len(library.styles)} styles, {summary['bytes']:,} bytes, basis rank k={summary['basis_rank']} "
          f"({limit}), base model {library.meta['base_model']['id']} ({label(summary['base_model']['family'])})")
    for style in summary["styles"]:
        print(f"  {style['name']:<24} trigger {style['trigger']:<16} rank {style['rank']:<3} created {style['created_at']}  "
              f"ΔW error {error_text(style)} (budget {percent(style['drift_budget'])})")
    return 0


def register_settings(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("settings", help="show or set a library's drift budget and size limit",
                                   description="The drift budget is the most relative ΔW error (‖ΔW − ΔŴ‖/‖ΔW‖) a merge may "
                                   "leave a style with; the size limit caps the basis directions per layer. Without a size "
                                   "limit no merge cuts any style. With one, a merge that would drift a style past its "
                                   "budget is refused, and nothing is written.")
    add_library_option(parser)
    parser.add_argument("--style", metavar="NAME", default=None, help="set --drift-budget for this style only")
    add_drift_options(parser, "each new style (or --style)")
    add_model_options(parser)
    parser.set_defaults(func=cmd_settings)
    return parser


def cmd_settings(args: argparse.Namespace) -> int:
    if args.style and args.drift_budget is None:
        raise CommandError("--style needs --drift-budget")
    from .drift import error_text, percent

    studio = open_studio(args)
    apply_drift_options(studio, args, style=args.style)
    info = studio.info()
    limit = "none" if info["size_limit"] is None else info["size_limit"]
    print(f"{args.library}: drift budget {percent(info['drift_budget'])} for new styles, size limit {limit}, "
          f"basis rank k={info['basis_rank']}")
    for record in studio.styles:
        print(f"  {record['name']:<24} ΔW error {error_text(record)}, budget {percent(record['drift_budget'])}")
    return 0


def register_export_lora(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("export-lora", help="save one style as a standard LoRA file")
    add_library_option(parser)
    parser.add_argument("--style", required=True, metavar="NAME")
    parser.add_argument("--out", "-o", required=True, metavar="FILE.safetensors")
    parser.add_argument("--format", choices=["kohya", "diffusers"], default="kohya",
                        help="kohya/A1111 (lora_unet_...) or diffusers/PEFT keys (default kohya)")
    add_model_options(parser)
    parser.set_defaults(func=cmd_export_lora)
    return parser


def cmd_export_lora(args: argparse.Namespace) -> int:
    if not args.out.endswith(".safetensors"):
        raise CommandError("--out must end with .safetensors")
    path = open_studio(args).export_lora(args.style, args.out, format=args.format)
    print(f"saved {path} ({args.format} format)")
    return 0


def register_import(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("import", help="merge style libraries or LoRA files into a library")
    add_library_option(parser)
    parser.add_argument("files", nargs="+", metavar="FILE", help="style-library or LoRA .safetensors files")
    parser.add_argument("--on-clash", choices=["rename", "replace", "skip", "error"], default="rename",
                        help="when a style name exists already (default: rename the newcomer)")
    add_drift_options(parser, "the imported and later styles")
    add_model_options(parser)
    parser.set_defaults(func=cmd_import)
    return parser


def cmd_import(args: argparse.Namespace) -> int:
    studio = open_studio(args)
    apply_drift_options(studio, args)
    report = studio.import_with_report(args.files, on_clash=args.on_clash)
    for line in report.kept_lines():
        print(line)
    for warning in report.warnings:  # a component that kept under 99.9% of its ΔW energy
        print(f"warning: {warning}", file=sys.stderr)
    print(f"imported {len(report.names)} styles in one merge: {', '.join(report.names) or 'none'}")
    return 0


def register_remove(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("remove", help="remove a style from a library")
    add_library_option(parser)
    parser.add_argument("--style", required=True, metavar="NAME")
    add_model_options(parser)
    parser.set_defaults(func=cmd_remove)
    return parser


def cmd_remove(args: argparse.Namespace) -> int:
    open_studio(args).remove(args.style)
    print(f"removed {args.style!r} (undo: python -m share_diffusion undo --library {args.library})")
    return 0


def register_rename(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("rename", help="rename a style")
    add_library_option(parser)
    parser.add_argument("--style", required=True, metavar="NAME")
    parser.add_argument("--to", required=True, metavar="NEW_NAME")
    add_model_options(parser)
    parser.set_defaults(func=cmd_rename)
    return parser


def cmd_rename(args: argparse.Namespace) -> int:
    open_studio(args).rename(args.style, args.to)
    print(f"renamed {args.style!r} to {args.to!r}")
    return 0


def register_undo(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("undo", help="restore the library as it was before its last change")
    add_library_option(parser)
    add_model_options(parser)
    parser.set_defaults(func=cmd_undo)
    return parser


def cmd_undo(args: argparse.Namespace) -> int:
    open_studio(args).undo_last_change()
    print(f"restored the previous version of {args.library}")
    return 0


# --------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------
#: Subcommand registrations, in --help order.  Add new commands here.
COMMANDS: list[Callable] = [
    register_generate, register_train, register_list, register_settings, register_export_lora, register_import,
    register_remove, register_rename, register_undo,
]


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog=PROG,
        description="Share Studio: teach a Stable Diffusion model new art styles with shared LoRA subspaces.",
    )
    _debug_option(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subparsers.required = True
    for register in COMMANDS:
        sub = register(subparsers)
        # Also accept --debug after the command; SUPPRESS keeps a top-level --debug from being reset.
        _debug_option(sub, default=argparse.SUPPRESS)
    return parser


def _quiet_libraries() -> None:
    """Keep library chatter (warnings, info logs) off stderr; errors are still reported by us."""
    import warnings

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    warnings.filterwarnings("ignore")


def format_error(error: BaseException) -> str:
    """One line describing ``error`` for the user."""
    from_models = type(error).__module__.startswith("share_diffusion")
    if isinstance(error, OSError) and not from_models:
        reason = error.strerror or str(error)
        target = error.filename
        text = f"{reason}: {target}" if target else reason
    elif isinstance(error, (CommandError,)) or from_models:
        text = str(error)
    else:
        text = f"{type(error).__name__}: {error} (run again with --debug for details)"
    return " ".join(text.split()) or type(error).__name__


def main(argv: list[str] | None = None) -> int:
    if "--debug" not in (sys.argv[1:] if argv is None else argv):
        _quiet_libraries()  # before build_parser, which imports the library
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    try:
        result = args.func(args)
        return 0 if result is None else int(result)
    except KeyboardInterrupt:
        if debug:
            raise
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # noqa: BLE001 - the top-level handler of the CLI
        if debug:
            raise
        print(f"{PROG}: error: {format_error(error)}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
