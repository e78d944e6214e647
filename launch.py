#!/usr/bin/env python
"""Start the Share Studio web app on this computer.

    python launch.py [--model M] [--library PATH] [--host 127.0.0.1] [--port 7860] [--share]

Binds 127.0.0.1 by default (only this computer can open it); a public Gradio share link is
created only with --share.  Errors are one line on stderr and a non-zero exit (--debug for
tracebacks).  The port is checked before the model is loaded, so a busy port fails at once.
"""

from __future__ import annotations

import argparse
import errno
import os
import socket
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
if str(ROOT) not in sys.path:  # run from any folder
    sys.path.insert(0, str(ROOT))

from share_diffusion.cli import _Parser, add_model_options, format_error  # noqa: E402  (argparse only; fast)

PROG = "launch.py"
DEFAULT_LIBRARY = ROOT / "styles" / "library.safetensors"


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Start the Share Studio web app.")
    parser.add_argument(
        "--library",
        metavar="PATH",
        default=None,
        help=f"style library file (default: {DEFAULT_LIBRARY.relative_to(ROOT)} in the Share Studio folder)",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this computer only)")
    parser.add_argument("--port", type=int, default=7860, help="port (default 7860)")
    parser.add_argument("--share", action="store_true", help="also create a public Gradio share link (off by default)")
    parser.add_argument("--outputs", metavar="DIR", default=None, help="folder for generated images (default: a temp folder)")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks and library warnings")
    add_model_options(parser)
    return parser


def port_problem(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served (one line), or None when it is free."""
    if not 0 < port < 65536:
        return f"invalid port {port} (use 1-65535)"
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        return f"cannot use host {host!r}: {e.strerror}"
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        # Same option uvicorn uses, so a port in TIME_WAIT is not reported as busy.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return f"port {port} on {host} is already in use (another Share Studio or program?); stop it or choose another port with --port"
            if e.errno == errno.EACCES:
                return f"no permission to use port {port} on {host}; choose a port above 1024 with --port"
            return f"cannot bind {host}:{port}: {e.strerror or e}"
    return None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.debug:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")  # local app: no phoning home

    problem = port_problem(args.host, args.port)
    if problem:
        print(f"{PROG}: error: {problem}", file=sys.stderr)
        return 1
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"{PROG}: note: listening on {args.host}: other computers on your network can open Share Studio")

    try:
        from share_diffusion.loading import load_pipeline

        from app.ui import build_app

        library = Path(args.library).expanduser() if args.library else DEFAULT_LIBRARY
        pipe = load_pipeline(
            args.model,
            device=args.device,
            dtype=args.dtype,
            attention=args.attention,
            config=args.model_config,
        )
        demo = build_app(pipe, library_path=library, output_dir=args.outputs)
        demo.launch(
            server_name=args.host,
            server_port=args.port,
            share=bool(args.share),
            inbrowser=False,
            show_error=True,
            allowed_paths=[str(demo.share_output_dir)],
        )
    except KeyboardInterrupt:
        return 130
    except Exception as error:  # noqa: BLE001 - top-level handler
        if args.debug:
            raise
        print(f"{PROG}: error: {format_error(error)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
