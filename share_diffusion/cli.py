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
    from . import models

    return models.load_pipeline(
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
    group.add_argument("--steps", type=int, default=20, metavar="N", help="denoising steps (default 20)")
    group.add_argument("--guidance", "-g", type=float, default=4.0, metavar="G", help="classifier-free guidance scale (default 4.0)")
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
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    parser.set_defaults(func=cmd_generate)
    return parser


def cmd_generate(args: argparse.Namespace) -> int:
    out = Path(args.out).expanduser()
    if out.suffix.lower() != ".png":
        raise CommandError(f"--out must be a .png file, got {args.out!r}")
    if out.is_dir():
        raise CommandError(f"--out is a folder: {args.out!r}; give a file name like {out / 'image.png'}")

    from . import models

    if args.scheduler:
        models.canonical_scheduler_name(args.scheduler)  # fail before the (slow) model load
    pipe = load_model_from_args(args)
    seed = models.resolve_seed(args.seed)
    images = models.generate_images(
        pipe,
        args.prompt,
        negative_prompt=args.negative,
        seed=seed,
        steps=args.steps,
        guidance=args.guidance,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
        scheduler=args.scheduler,
    )
    paths = models.save_generated(
        pipe,
        images,
        models.numbered_output_paths(out, len(images)),
        prompt=args.prompt,
        negative_prompt=args.negative,
        seed=seed,
        steps=args.steps,
        guidance=args.guidance,
        scheduler=args.scheduler,
    )
    for i, path in enumerate(paths):
        print(f"saved {path} (seed {seed + i})")
    return 0


# --------------------------------------------------------------------------------------
# parser and entry point
# --------------------------------------------------------------------------------------
#: Subcommand registrations, in --help order.  Add new commands here.
COMMANDS: list[Callable] = [register_generate]


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
    parser = build_parser()
    args = parser.parse_args(argv)
    debug = bool(getattr(args, "debug", False))
    if not debug:
        _quiet_libraries()
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
