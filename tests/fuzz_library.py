"""Hostile and damaged style-library files, made by mutating the bytes of valid ones.

Used by tests/test_reliability.py (a hypothesis test), and runnable by hand for a longer run:

    . .venv/bin/activate && OMP_NUM_THREADS=1 python -m tests.fuzz_library --cases 20000

Each case is one valid library file (a few shapes and style counts) with one or more mutations:
byte flips, truncations, inserted/deleted bytes, a wrong header length, edits of the safetensors
header JSON (tensor dtype / shape / offsets / names, the __metadata__ map) and edits of the
Share Studio metadata JSON (wrong types, missing keys, huge and negative numbers, NaN, deep
nesting, hostile strings). `check_case` then demands one of two outcomes:

* refused: `LibraryError` (a ValueError) with a one-line message naming the file; or
* accepted: a library the program can use: everything Studio and the CLI read from the metadata
  has the right type, a new style id cannot collide with an existing one, and it saves and
  reloads to the same bytes.

Anything else (another exception, a multi-line message, an accepted file that breaks later) is a
failure.
"""

from __future__ import annotations

import copy
import json
import math
import struct
import tempfile
from collections import Counter
from pathlib import Path

import torch
from hypothesis import strategies as st

from share_diffusion.library import LibraryError, StyleLibrary, new_metadata
from share_diffusion.share import ShareConfig

# Outcome counts of every case checked in this process, by mutation kind (for the report).
OUTCOMES: Counter = Counter()


# --------------------------------------------------------------------------------------
# valid libraries
# --------------------------------------------------------------------------------------
def make_library(styles: int = 2, layers: int = 2, d: int = 8, k: int = 3, r: int = 2, seed: int = 0,
                 text_encoder: bool = False) -> StyleLibrary:
    """A valid library with the same structure Studio writes (small tensors)."""
    generator = torch.Generator().manual_seed(seed)
    meta = new_metadata("tiny", f"fp{seed:04d}", ShareConfig(), ["q_proj"] if text_encoder else None)
    state = {}
    components = ("unet", "text_encoder") if text_encoder else ("unet",)
    for component in components:
        for layer in range(layers):
            prefix = f"{component}.down_blocks.{layer}.attn.to_q" if component == "unet" else f"{component}.layers.{layer}.q_proj"
            state[f"{prefix}.basis_a"] = torch.randn(d, k, generator=generator)
            state[f"{prefix}.basis_b"] = torch.randn(d + 2, k, generator=generator)
            for n in range(styles):
                state[f"{prefix}.styles.s{n + 1}.loadings_a"] = torch.randn(k, r, generator=generator)
                state[f"{prefix}.styles.s{n + 1}.loadings_b"] = torch.randn(k, r, generator=generator)
                state[f"{prefix}.styles.s{n + 1}.scale"] = torch.tensor(1.0 + n)
    for n in range(styles):
        meta["styles"].append({
            "id": f"s{n + 1}", "name": f"Style {n}", "trigger": f"style{n}", "created_at": "2026-01-01T00:00:00+00:00",
            "error": 0.01 * n, "error_history": [{"merge": 1, "step_error": 0.0, "mean_step_error": 0.0, "error": 0.0}],
            "images": 4, "steps": 6, "drift_budget": 0.01, "error_exact": n == 0, "cuts": min(n, 2), "rank": r,
        })
        meta["merges"].append({"number": n + 1, "action": "train", "style": f"s{n + 1}", "at": "2026-01-01T00:00:00+00:00",
                               "basis_rank": k})
    meta["next_style_number"] = styles + 1
    return StyleLibrary(meta, state)


BASES = [
    make_library(styles=2).to_bytes(),
    make_library(styles=0, layers=0).to_bytes(),
    make_library(styles=1, layers=1, d=4, k=1, r=1, seed=1).to_bytes(),
    make_library(styles=3, layers=2, seed=2, text_encoder=True).to_bytes(),
]


def split(data: bytes) -> tuple[dict, bytes]:
    """(header JSON, tensor data) of a valid safetensors file."""
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header_text: str | bytes, body: bytes, pad: bool = True) -> bytes:
    raw = header_text.encode() if isinstance(header_text, str) else header_text
    if pad:
        raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + body


# --------------------------------------------------------------------------------------
# mutations
# --------------------------------------------------------------------------------------
DEEP = "__DEEP_NESTING__"  # replaced by 100 000 nested brackets after json.dumps
HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 3, 2**31, 2**63, 2**64 + 1, 10**400, -(10**400), 1.5, -0.0, 1e308, 1e-320,
    math.nan, math.inf, -math.inf, "", "s1", "4", "0.5", "x" * 70, "../../etc/passwd", "a\x00b", "line\nbreak",
    "\u202eevil", [], {}, [1, 2], ["to_q", 5], {"a": 1}, [[]], DEEP,
]
JSON_LEAVES = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
JSON_VALUES = st.sampled_from(HOSTILE_VALUES) | st.recursive(
    JSON_LEAVES, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=6,
)


def paths_in(value, prefix=()) -> list[tuple]:
    """Every path (tuple of keys / indices) inside a JSON value, the root excluded."""
    found = []
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, child in items:
        found.append(prefix + (key,))
        found.extend(paths_in(child, prefix + (key,)))
    return found


def dumps(value) -> str:
    text = json.dumps(value)  # NaN and Infinity are written as such: json.loads reads them back
    return text.replace(json.dumps(DEEP), "[" * 100_000 + "]" * 100_000)


@st.composite
def json_edit(draw, document):
    """One edit of a JSON document: delete, replace with a hostile value, or add a key."""
    document = copy.deepcopy(document)
    paths = paths_in(document)
    ops = (["replace", "delete"] if paths else []) + (["add"] if isinstance(document, dict) else []) + ["replace_root"]
    op = draw(st.sampled_from(ops))
    if op == "replace_root":
        return draw(JSON_VALUES), op
    if op == "add":
        containers = [()] + [p for p in paths if isinstance(get(document, p), dict)]
        where = draw(st.sampled_from(containers))
        key = draw(st.sampled_from(["extra", "id", "name", "error", "styles", "fingerprint"]) | st.text(max_size=6))
        get(document, where)[key] = draw(JSON_VALUES)
        return document, op
    path = draw(st.sampled_from(paths))
    parent = get(document, path[:-1])
    if op == "delete":
        del parent[path[-1]]
    else:
        parent[path[-1]] = draw(JSON_VALUES)
    return document, op


def get(document, path):
    for key in path:
        document = document[key]
    return document


DTYPES = ["F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL", "F8_E4M3", "F8_E5M2", "C64", "XYZ", "", 5, None]


@st.composite
def tensor_edit(draw, header: dict) -> dict:
    """One edit of a tensor entry of the safetensors header."""
    header = copy.deepcopy(header)
    names = [k for k in header if k != "__metadata__"]
    if not names:
        header[draw(st.text(max_size=20))] = {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}
        return header
    name = draw(st.sampled_from(names))
    entry = header[name]
    well_formed = isinstance(entry, dict) and isinstance(entry.get("shape"), list) and all(
        type(n) is int for n in entry["shape"]) and isinstance(entry.get("data_offsets"), list) and len(
        entry["data_offsets"]) == 2 and all(type(n) is int for n in entry["data_offsets"])
    if not well_formed:  # an earlier edit broke it already
        header[name] = draw(JSON_VALUES)
        return header
    field = draw(st.sampled_from(["dtype", "shape", "shape_same_size", "offsets", "swap_offsets", "rename", "delete", "copy", "entry"]))
    if field == "dtype":
        entry["dtype"] = draw(st.sampled_from(DTYPES))
    elif field == "shape":
        entry["shape"] = draw(st.lists(st.integers(-3, 2**64 + 5) | st.sampled_from([0, 1, 2, 3, -1, 2**32, 2**63]), max_size=5)
                              | JSON_VALUES)
    elif field == "shape_same_size":  # still a valid safetensors file: only our checks can refuse it
        numel = math.prod(entry["shape"])
        entry["shape"] = draw(st.sampled_from([[numel], [numel, 1], [1, numel], list(reversed(entry["shape"])),
                                               entry["shape"] + [1], [], [0] if numel == 0 else [numel, 1, 1]]))
        if entry["shape"] == [] and numel != 1:
            entry["shape"] = [numel]
    elif field == "offsets":
        begin, end = entry["data_offsets"]
        entry["data_offsets"] = draw(st.sampled_from([[end, begin], [begin, end + 4], [begin - 4, end], [0, 2**64 - 1],
                                                      [begin], [begin, end, end], [-1, end], [2**63, 2**63 + 4]])
                                     | JSON_VALUES)
    elif field == "swap_offsets":
        other = header[draw(st.sampled_from(names))]
        if isinstance(other, dict):
            entry["data_offsets"], other["data_offsets"] = other.get("data_offsets"), entry["data_offsets"]
    elif field == "rename":
        new = draw(st.sampled_from([
            "unet.x.basis_a", "other.layer.basis_a", "unet..basis_a", "unet.down_blocks.0.attn.to_q.styles.s9.scale",
            "unet.down_blocks.0.attn.to_q.styles.s1.bias", "unet.down_blocks.0.attn.to_q.styles.s1.loadings_a",
            "unet", "", "unet.down_blocks.0.attn.to_q.styles.s1", "text_encoder.y.basis_b",
        ]) | st.text(max_size=30))
        header[new] = header.pop(name)
    elif field == "delete":
        del header[name]
    elif field == "copy":
        header[name + draw(st.sampled_from(["", "x", ".basis_a"]))] = dict(entry)
    else:
        header[name] = draw(JSON_VALUES)
    return header


@st.composite
def mutated_library(draw) -> tuple[str, bytes]:
    """(kind of mutation, bytes) from a valid library."""
    data = draw(st.sampled_from(BASES))
    header, body = split(data)
    header_length = struct.unpack("<Q", data[:8])[0]
    kind = draw(st.sampled_from(["flip", "truncate", "splice", "header_length", "header_json", "tensor_entry",
                                 "safetensors_metadata", "library_metadata", "library_metadata_x3", "header_text"]))
    if kind == "flip":
        out = bytearray(data)
        # Mostly the header, where one byte matters most; sometimes anywhere.
        end = draw(st.sampled_from([8 + header_length, len(data)]))
        for _ in range(draw(st.integers(1, 8))):
            out[draw(st.integers(0, end - 1))] ^= draw(st.integers(1, 255))
        return kind, bytes(out)
    if kind == "truncate":
        return kind, data[: draw(st.integers(0, len(data) - 1))]
    if kind == "splice":
        at = draw(st.integers(0, len(data)))
        cut = draw(st.integers(0, 16))
        return kind, data[:at] + draw(st.binary(max_size=16)) + data[at + cut :]
    if kind == "header_length":
        value = draw(st.sampled_from([0, 1, 2, 7, header_length - 1, header_length + 1, header_length + 8, len(data),
                                      len(data) - 8, 2**63, 2**64 - 1, 16 * 1024 * 1024, 16 * 1024 * 1024 + 1])
                     | st.integers(0, 2**64 - 1))
        return kind, struct.pack("<Q", value) + data[8:]
    if kind == "header_json":  # the whole header replaced by another JSON value
        document, _ = draw(json_edit(header))
        return kind, join(dumps(document), body)
    if kind == "tensor_entry":
        for _ in range(draw(st.integers(1, 3))):
            header = draw(tensor_edit(header))
        return kind, join(dumps(header), body, pad=draw(st.booleans()))
    if kind == "safetensors_metadata":
        header["__metadata__"] = draw(st.sampled_from([None, [], "x", {"share_studio": 5}, {"share_studio": "{"},
                                                       {"share_studio": "[]"}, {"share_studio": "null"},
                                                       {"share_studio": DEEP}, {}, {"other": "x"},
                                                       {"share_studio": header["__metadata__"]["share_studio"], "x": 1}])
                                      | JSON_VALUES)
        text = dumps(header)
        return kind, join(text, body)
    if kind == "header_text":  # a JSON text edit that may break the syntax
        text = json.dumps(header)
        at = draw(st.integers(0, len(text)))
        cut = draw(st.integers(0, 8))
        inserted = draw(st.sampled_from(['"', "{", "}", "[", ",", "\\", "\\u", "\x00", "NaN", "1e999", "\udcff"]) | st.text(max_size=6))
        return kind, join((text[:at] + inserted + text[at + cut :]).encode("utf-8", "surrogatepass"), body)
    # The Share Studio metadata: a JSON document stored as a string inside the header.
    meta = json.loads(header["__metadata__"]["share_studio"])
    for _ in range(3 if kind == "library_metadata_x3" else 1):
        meta, _ = draw(json_edit(meta))
    header["__metadata__"]["share_studio"] = dumps(meta)
    return kind, join(json.dumps(header), body)


# --------------------------------------------------------------------------------------
# the property
# --------------------------------------------------------------------------------------
class CaseFailure(AssertionError):
    pass


def usable(library: StyleLibrary) -> None:
    """Raise CaseFailure unless an accepted library can be used by Studio and the CLI."""
    meta = library.meta
    try:
        config = library.share_config()
        for value in (config.rank, config.max_basis_rank or 1):
            assert type(value) is int and value > 0, f"share setting {value!r}"
        assert config.alpha is None or (type(config.alpha) in (int, float) and math.isfinite(config.alpha)), "alpha"
        assert type(config.drift_budget) in (int, float) and 0 <= config.drift_budget <= 1, "drift_budget"
        assert all(type(t) is str for t in config.target_modules), "target modules"
        assert isinstance(meta["target_modules"]["unet"], list), "target modules are not a list"
        assert isinstance(meta["base_model"]["id"], str), "base model id"
        library.basis_rank()
        ids = {s["id"] for s in library.styles}
        for record in library.styles:
            assert isinstance(record["name"], str) and isinstance(record["trigger"], str), "name/trigger"
            assert type(record["error"]) in (int, float) and math.isfinite(record["error"]), "style error"
            assert isinstance(record["error_history"], list), "error history"
        assert isinstance(meta["merges"], list), "merges"
        new_id = copy.deepcopy(library).new_style_id()
        assert new_id not in ids, f"the next style id {new_id} is already used"
        again = StyleLibrary.from_bytes(library.to_bytes())
        assert again.meta == library.meta and again.state.keys() == library.state.keys(), "round trip"
    except CaseFailure:
        raise
    except Exception as error:  # noqa: BLE001 - any failure here is what we are looking for
        raise CaseFailure(f"accepted a library that is not usable: {type(error).__name__}: {error}"[:500]) from error


_BASE_STATES = []


def same_tensors_as_a_base(library: StyleLibrary) -> bool:
    """Whether the tensors are those of one of the valid files (bit flips in data change them)."""
    if not _BASE_STATES:
        _BASE_STATES.extend(StyleLibrary.from_bytes(data).state for data in BASES)
    return any(state.keys() == library.state.keys() and all(torch.equal(state[k], library.state[k]) for k in state)
               for state in _BASE_STATES)


def check_case(kind: str, data: bytes, directory: Path | None = None) -> str:
    """'accepted (...)' or 'refused'; raises CaseFailure for anything else. Counts the outcome."""
    outcomes = []
    for how in ("from_bytes", "load") if directory is not None else ("from_bytes",):
        source = str(directory / "case.safetensors") if how == "load" else "case.safetensors"
        try:
            if how == "load":
                Path(source).write_bytes(data)
                library = StyleLibrary.load(source)
            else:
                library = StyleLibrary.from_bytes(data, source=source)
        except LibraryError as error:
            message = str(error)
            if "\n" in message or "\r" in message or not message.startswith(source):
                OUTCOMES[(kind, "bad message")] += 1
                raise CaseFailure(f"{how}: message is not one line naming the file: {message[:300]!r}") from None
            outcomes.append("refused")
            continue
        except Exception as error:  # noqa: BLE001
            OUTCOMES[(kind, "unhandled exception")] += 1
            raise CaseFailure(f"{how}: unhandled {type(error).__name__}: {str(error)[:300]}") from error
        try:
            usable(library)
        except CaseFailure:
            OUTCOMES[(kind, "accepted but unusable")] += 1
            raise
        outcomes.append("accepted (tensors as in the original)" if same_tensors_as_a_base(library)
                        else "accepted (tensor values changed)")
    if len(set(outcomes)) != 1:
        raise CaseFailure(f"from_bytes and load disagree: {outcomes}")
    OUTCOMES[(kind, outcomes[0])] += 1
    return outcomes[0]


def main() -> None:  # pragma: no cover - the by-hand runner
    import argparse

    from hypothesis import HealthCheck, given, settings

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=2000)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="fuzz-library-"))

    @settings(max_examples=args.cases, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(mutated_library())
    def run(case):
        check_case(*case, directory)

    run()
    for (kind, outcome), count in sorted(OUTCOMES.items()):
        print(f"{kind:24} {outcome:24} {count}")
    print("total", sum(OUTCOMES.values()))


if __name__ == "__main__":  # pragma: no cover
    main()
