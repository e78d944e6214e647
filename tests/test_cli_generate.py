"""Front ends: ``python -m share_diffusion generate``, ``launch.py`` and the Generate tab callback.

The CLI is run as a real subprocess where the process boundary matters (exit codes, stderr,
no traceback); other error paths call ``cli.main`` in-process to keep the suite fast.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from share_diffusion import cli
from share_diffusion.errors import ModelLoadError
from share_diffusion.fingerprint import model_fingerprint
from share_diffusion.png_metadata import read_png_metadata

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout
    )


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_help_lists_subcommands():
    result = _run("-m", "share_diffusion", "--help", timeout=60)
    assert result.returncode == 0
    assert "generate" in result.stdout and "COMMAND" in result.stdout
    sub = _run("-m", "share_diffusion", "generate", "--help", timeout=60)
    assert sub.returncode == 0
    for option in ("--prompt", "--negative", "--seed", "--steps", "--guidance", "--width", "--height",
                   "--scheduler", "--num-images", "--model", "--out", "--debug"):
        assert option in sub.stdout


def test_cli_generate_writes_pngs_with_metadata(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "renders" / "cat.png"
    result = _run(
        "-m", "share_diffusion", "generate", "--prompt", "the cat", "--negative", "blurry",
        "--seed", "11", "--steps", "2", "--guidance", "5", "--scheduler", "euler_a",
        "--num-images", "2", "--model", str(tiny_pipeline_dir), "--out", str(out),
    )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == ""  # library chatter stays off stderr
    paths = [out.with_name("cat-0.png"), out.with_name("cat-1.png")]
    assert result.stdout.splitlines() == [f"saved {paths[0]} (seed 11)", f"saved {paths[1]} (seed 12)"]
    for i, path in enumerate(paths):
        meta = read_png_metadata(path)
        assert meta["prompt"] == "the cat" and meta["negative_prompt"] == "blurry"
        assert (meta["seed"], meta["steps"], meta["guidance"], meta["scheduler"]) == (11 + i, 2, 5.0, "euler_a")
        assert meta["model"] == tiny_pipeline_dir.name and len(meta["base_fingerprint"]) == 16
        assert "model_hash" not in meta  # a diffusers folder has no A1111 checkpoint-file hash
        with Image.open(path) as image:
            assert image.size == (64, 64)
            assert "Seed: %d" % (11 + i) in image.text["parameters"]


def test_cli_error_is_one_line_and_nonzero(tmp_path):
    result = _run(
        "-m", "share_diffusion", "generate", "--prompt", "x", "--model", "share-studio-tests/no-such-model",
        "--out", str(tmp_path / "x.png"), env={"HF_HUB_OFFLINE": "1"},
    )
    assert result.returncode != 0
    line = _one_error_line(result.stderr)
    assert line.startswith("share_diffusion: error: ") and "hf download" in line
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--prompt", "x", "--out", "{tmp}/x.jpg"], "--out must be a .png file"),
        (["--prompt", "x", "--out", "{tmp}/x.png", "--model", "{tmp}/missing"], "no such model file or folder"),
        (["--prompt", "x", "--out", "{tmp}/x.png", "--scheduler", "bogus"], "unknown scheduler"),
        (["--prompt", "x", "--out", "{tmp}/x.png", "--model", "{tmp}/m.ckpt"], "refusing to load m.ckpt"),
    ],
)
def test_cli_errors_in_process(argv, expected, tmp_path, capsys):
    (tmp_path / "m.ckpt").write_bytes(b"not really a pickle")
    code = cli.main(["generate", *[a.format(tmp=tmp_path) for a in argv]])
    assert code == 1
    captured = capsys.readouterr()
    line = _one_error_line(captured.err)
    assert line.startswith("share_diffusion: error: ") and expected in line


def test_cli_usage_error_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompt", "x"])
    assert exit_info.value.code == 2
    line = _one_error_line(capsys.readouterr().err)
    assert "--out" in line and "see --help" in line


def test_cli_debug_shows_the_real_exception(tmp_path):
    with pytest.raises(ModelLoadError):
        cli.main(["generate", "--debug", "--prompt", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])
    with pytest.raises(ModelLoadError):  # --debug before the command works too
        cli.main(["--debug", "generate", "--prompt", "x", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "x.png")])


def test_launch_refuses_a_taken_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        result = _run("launch.py", "--port", str(port), timeout=60)
    assert result.returncode != 0
    line = _one_error_line(result.stderr)
    assert f"port {port}" in line and "already in use" in line and "--port" in line


def test_launch_defaults_are_local_only():
    sys.path.insert(0, str(ROOT))
    try:
        import launch
    finally:
        sys.path.remove(str(ROOT))
    args = launch.build_parser().parse_args([])
    assert (args.host, args.port, args.share) == ("127.0.0.1", 7860, False)
    assert launch.DEFAULT_LIBRARY == ROOT / "styles" / "library.safetensors"


def test_generate_tab_callback_saves_pngs_with_metadata(tiny_pipe, tmp_path):
    gr = pytest.importorskip("gradio")
    from app.ui import build_app, run_generate

    demo = build_app(tiny_pipe, output_dir=tmp_path / "outputs")
    assert isinstance(demo, gr.Blocks)
    paths, used = run_generate(tiny_pipe, tmp_path / "outputs", "the cat", "", -1, 2, 4.0, "dpm++", 2.0)
    assert 0 <= used < 2**32 and len(paths) == 2
    meta = [read_png_metadata(p) for p in paths]
    assert [m["seed"] for m in meta] == [used, used + 1]
    assert meta[0]["scheduler"] == "dpm++" and meta[0]["base_fingerprint"] == model_fingerprint(tiny_pipe)
    # The same seed and settings redraw the same pictures, pixel for pixel (the same batch size,
    # since batched math may round a pixel level differently from a single image).
    again, used_again = run_generate(tiny_pipe, tmp_path / "again", "the cat", "", used, 2, 4.0, "dpm++", 2)
    assert used_again == used
    for first, second in zip(paths, again, strict=True):
        with Image.open(first) as a, Image.open(second) as b:
            assert a.size == (64, 64)
            assert np.array_equal(np.asarray(a), np.asarray(b))
    different, _ = run_generate(tiny_pipe, tmp_path / "other", "the cat", "", used + 2, 2, 4.0, "dpm++", 1)
    with Image.open(different[0]) as a, Image.open(paths[0]) as b:
        assert not np.array_equal(np.asarray(a), np.asarray(b))  # the comparison can tell images apart
