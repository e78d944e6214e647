"""The style-library file: round trips, validation of damaged or hostile files, atomic writes, locks."""

import json
import os
import pickle
import struct
import subprocess
import sys

import pytest
import torch

from share_diffusion.library import (
    LibraryError,
    LibraryLock,
    LibraryLockedError,
    StyleLibrary,
    check_style_name,
    default_trigger,
    new_metadata,
)
from share_diffusion.share import ShareConfig


def make_library(styles=("s1", "s2"), d_in=8, d_out=6, k=3, r=2) -> StyleLibrary:
    meta = new_metadata("tiny", "abc123", ShareConfig())
    state = {"unet.block.to_q.basis_a": torch.randn(d_in, k), "unet.block.to_q.basis_b": torch.randn(d_out, k)}
    for n, style_id in enumerate(styles):
        meta["styles"].append({"id": style_id, "name": f"Style {n}", "trigger": f"style{n}", "error": 0.0, "error_history": [],
                               "drift_budget": 0.01, "error_exact": True, "cuts": 0, "rank": r})
        state[f"unet.block.to_q.styles.{style_id}.loadings_a"] = torch.randn(k, r)
        state[f"unet.block.to_q.styles.{style_id}.loadings_b"] = torch.randn(k, r)
        state[f"unet.block.to_q.styles.{style_id}.scale"] = torch.tensor(1.0)
    meta["next_style_number"] = len(styles) + 1
    return StyleLibrary(meta, state)


def test_round_trip(tmp_path):
    library = make_library()
    path = tmp_path / "lib.safetensors"
    library.save(path)
    loaded = StyleLibrary.load(path)
    assert loaded.meta == library.meta
    assert loaded.state.keys() == library.state.keys()
    for key in library.state:
        assert torch.equal(loaded.state[key], library.state[key])


def test_save_keeps_previous_version_as_backup(tmp_path):
    path = tmp_path / "lib.safetensors"
    first = make_library(styles=("s1",))
    first.save(path)
    make_library(styles=("s1", "s2")).save(path)
    assert len(StyleLibrary.load(path).styles) == 2
    assert len(StyleLibrary.load(tmp_path / "lib.safetensors.bak").styles) == 1
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def corrupt_cases(data: bytes) -> dict[str, bytes]:
    header_length = struct.unpack("<Q", data[:8])[0]
    flipped = bytearray(data)
    flipped[20] ^= 0xFF  # inside the JSON header
    return {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "truncated header": data[:12],
        "flipped header byte": bytes(flipped),
        "wrong header length": struct.pack("<Q", header_length + 1000) + data[8:],
        "huge header length": struct.pack("<Q", 2**40) + data[8:],
        "not safetensors": b"hello, this is a text file\n" * 10,
        "pickle": pickle.dumps({"weights": [1, 2, 3]}),
    }


@pytest.mark.parametrize("case", list(corrupt_cases(make_library().to_bytes())))
def test_damaged_files_give_clear_errors(tmp_path, case):
    data = corrupt_cases(make_library().to_bytes())[case]
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data)
    with pytest.raises(LibraryError) as error:
        StyleLibrary.load(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_pickle_is_never_unpickled(tmp_path):
    marker = tmp_path / "executed"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    path = tmp_path / "evil.safetensors"
    path.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(LibraryError, match="pickle"):
        StyleLibrary.load(path)
    assert not marker.exists()


def mutate_and_save(tmp_path, mutate) -> str:
    library = make_library()
    mutate(library)
    path = tmp_path / "lib.safetensors"
    path.write_bytes(library.to_bytes())
    with pytest.raises(LibraryError) as error:
        StyleLibrary.load(path)
    return str(error.value)


def test_shapes_disagreeing_with_metadata(tmp_path):
    def mutate(library):
        library.state["unet.block.to_q.styles.s1.loadings_a"] = torch.randn(5, 2)

    assert "shapes of style s1" in mutate_and_save(tmp_path, mutate)


def test_nan_and_inf_tensors(tmp_path):
    for bad in (float("nan"), float("inf")):

        def mutate(library):
            library.state["unet.block.to_q.basis_a"][0, 0] = bad

        assert "NaN or infinite" in mutate_and_save(tmp_path, mutate)


def test_unknown_format_version(tmp_path):
    assert "format version 99" in mutate_and_save(tmp_path, lambda lib: lib.meta.update(format_version=99))


def test_style_missing_its_tensors(tmp_path):
    def mutate(library):
        del library.state["unet.block.to_q.styles.s2.scale"]

    assert "lacks the tensors of style s2" in mutate_and_save(tmp_path, mutate)


@pytest.mark.parametrize("name", ["../../etc/passwd", "a\\b", "tab\there", "x" * 5000, "", "nul\x00"])
def test_hostile_style_names_in_files(tmp_path, name):
    message = mutate_and_save(tmp_path, lambda lib: lib.styles[0].update(name=name))
    assert "style name" in message


def test_style_names():
    assert check_style_name("  Ink Wash ✒ ") == "Ink Wash ✒"
    for bad in ["a/b", "x" * 65, "line\nbreak", ""]:
        with pytest.raises(LibraryError):
            check_style_name(bad)
    assert default_trigger("Ink Wash 2!") == "inkwash2"
    assert default_trigger("水墨") == "style"


def test_huge_metadata_header_is_refused_before_parsing(tmp_path):
    header = json.dumps({"__metadata__": {"share_studio": "x" * (17 * 1024 * 1024)}}).encode()
    path = tmp_path / "huge.safetensors"
    path.write_bytes(struct.pack("<Q", len(header)) + header)
    with pytest.raises(LibraryError, match="limit"):
        StyleLibrary.load(path)


def test_lock_refuses_a_second_process(tmp_path):
    path = tmp_path / "lib.safetensors"
    code = (
        "import sys, time; sys.path.insert(0, '.');"
        "from share_diffusion.library import LibraryLock;"
        f"lock = LibraryLock({str(path)!r}).__enter__(); print('locked', flush=True); time.sleep(30)"
    )
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(LibraryLockedError, match="another Share Studio process"):
            with LibraryLock(path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with LibraryLock(path):  # the dead holder's lock is taken over
        assert (tmp_path / "lib.safetensors.lock").read_text() == str(os.getpid())
    assert not (tmp_path / "lib.safetensors.lock").exists()
