"""The style library: one `.safetensors` file holding every learned style.

Tensors (float32):
    unet.<layer>.basis_a | basis_b                       the shared basis, stored once per layer
    unet.<layer>.styles.<id>.loadings_a | loadings_b | scale
    text_encoder.<layer>...                              the same, when the text encoder is adapted
    text_encoder_2.<layer>...                            the same for SDXL's second text encoder
Metadata: one JSON document under the key "share_studio" (see `new_metadata`).

Format versions: 2 records each style's drift budget, whether its error is exact, how often a
merge cut it and its rank, and an optional size limit (share.max_basis_rank, null: none) in place
of version 1's fixed cap and energy threshold. Version 1 files load as version 2 (`upgrade`): the
cap of 64 was a default, not a choice, so they get no size limit; a recorded error above float
rounding was a triangle-inequality bound, so it is kept as a bound.

Version 3 puts Share layers on every layer kind a typical LoRA touches (share.UNET_LORA_MODULES,
CLIP_LORA_MODULES: attention, proj_in/out, feed-forward, CLIP's MLP), in the UNet and the text
encoder, so `target_modules` lists both components'. The tensor layout is unchanged: a layer no
style uses yet has an empty basis (d×0), and a style that does not touch a layer has rank 0 there.
Version 2 files load as version 3 (`upgrade`): their targets widen to these, and the layers that
they lack start empty (Studio._attach), every style with ΔW = 0 in them, which is what they were.
SDXL's second text encoder (`text_encoder_2`) joined version 3 the same way: a file without its
targets gets CLIP_LORA_MODULES, and its layers start empty. (Share Studio from before it cannot
open an SDXL library that holds text_encoder_2 tensors: it names the unexpected tensor.)

A layer outside those that an imported file touches (a LoCon's k×k convolutions, the resnets'
time_emb_proj and conv_shortcut) gets a Share layer of its own, and only such a layer: its whole
module name joins `target_modules` (PEFT's rule matches a whole name as it matches a suffix), so
the metadata records which layers a library holds. Every version-3 reader injects by that rule,
so this needs no new version, and a library without such layers loads as it always did.

Styles have a stable internal id ("s1", "s2", ...) used in tensor names, and a display name that
users may change freely. Writes are atomic (temporary file, fsync, rename) and keep the previous
version as `<file>.bak`, which is what "undo the last merge" restores. Loading validates everything
before any tensor reaches a model, and reads nothing but safetensors.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import struct
import threading
import unicodedata
from datetime import datetime, timezone
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save as save_safetensors_bytes

try:
    import fcntl
except ImportError:  # Windows: the exclusively created lock file alone
    fcntl = None

from . import families
from .errors import ShareStudioError, first_line
from .share import CLIP_LORA_MODULES, DRIFT_BUDGET, EXACT, UNET_LORA_MODULES, ShareConfig

FORMAT_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
METADATA_KEY = "share_studio"
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_FILE_BYTES = 4 * 1024**3
MAX_NAME_LENGTH = 64
#: The pipeline components a library can hold Share layers for.
STORED_COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TENSOR_FIELDS = ("basis_a", "basis_b")
STYLE_FIELDS = ("loadings_a", "loadings_b", "scale")


class LibraryError(ShareStudioError, ValueError):
    """A library file that cannot be used, with a message saying why."""


class LibraryLockedError(LibraryError):
    pass


def utc_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def check_style_name(name: object) -> str:
    """A display name: 1-64 printable characters, no path separators."""
    if not isinstance(name, str):
        raise LibraryError("a style name must be text")
    name = unicodedata.normalize("NFC", name).strip()
    if not name:
        raise LibraryError("a style name cannot be empty")
    if len(name) > MAX_NAME_LENGTH:
        raise LibraryError(f"a style name has at most {MAX_NAME_LENGTH} characters (got {len(name)})")
    if any(unicodedata.category(c).startswith("C") for c in name):
        raise LibraryError(f"style name {name!r} contains control characters")
    if "/" in name or "\\" in name:
        raise LibraryError(f"style name {name!r} contains a path separator")
    return name


def style_name_from(text: str, fallback: str = "Imported style") -> str:
    """A valid style name made from free text such as a file name."""
    kept = "".join(" " if unicodedata.category(c).startswith("C") or c in "/\\" else c for c in text)
    name = " ".join(kept.split())[:MAX_NAME_LENGTH].strip()
    return name or fallback


def file_stem(name: str, max_bytes: int = 100) -> str:
    """A file-name stem from a style name: letters, digits, '-' and '_', at most `max_bytes` in UTF-8,
    so that any suffix still fits the 255-byte name limit of common file systems."""
    stem = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
    while len(stem.encode("utf-8")) > max_bytes:
        stem = stem[:-1]
    return stem or "style"


def check_trigger(trigger: object) -> str:
    trigger = check_style_name(trigger)
    if not re.fullmatch(r"[\w\- ]+", trigger):
        raise LibraryError(f"trigger {trigger!r}: use letters, digits, spaces, '-' or '_'")
    return trigger.lower()


def default_trigger(name: str) -> str:
    """A trigger word from a style name: lower-case letters and digits, e.g. "Ink Wash 2" -> "inkwash2"."""
    word = re.sub(r"[^a-z0-9]", "", unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode().lower())
    return word or "style"


def new_metadata(base_model: str, fingerprint: str, config: ShareConfig, text_encoder_modules=None,
                 family: str | None = None) -> dict:
    """A new library's metadata; ``family`` is the base model's (families.py), "unknown" when not given."""
    return {
        "format_version": FORMAT_VERSION,
        "base_model": {"id": base_model, "fingerprint": fingerprint, "family": family or families.UNKNOWN},
        "target_modules": {"unet": list(config.target_modules), "text_encoder": list(text_encoder_modules or []),
                           "text_encoder_2": list(text_encoder_modules or [])},
        "share": {
            "rank": config.rank,
            "alpha": config.alpha,
            "max_basis_rank": config.max_basis_rank,  # the size limit on k per side; None: none
            "drift_budget": config.drift_budget,  # for new styles; each style records its own
        },
        "next_style_number": 1,
        "styles": [],
        "merges": [],
    }


def library_family(meta: dict) -> str:
    """The family a library was made for; "unknown" for libraries from before families were recorded."""
    family = meta["base_model"].get("family")
    return family if families.known(family) else families.UNKNOWN


def check_family(meta: dict, family: str | None, source: str) -> None:
    """Refuse a model of another family than the library's; an unknown family on either side passes."""
    expected = library_family(meta)
    if families.known(expected) and families.known(family) and expected != family:
        raise LibraryError(
            f"{source}: made for an {families.label(expected)} base model ({meta['base_model']['id']!r}), but the "
            f"loaded model is {families.label(family)}; start Share Studio with an {families.label(expected)} model "
            f"(--model {meta['base_model']['id']})"
        )


class StyleLibrary:
    """The Share state of a pipeline (`state`: tensors) plus metadata (`meta`: plain JSON)."""

    def __init__(self, meta: dict, state: dict[str, torch.Tensor]):
        self.meta = meta
        self.state = state

    # --- styles ---------------------------------------------------------------------------

    @property
    def styles(self) -> list[dict]:
        return self.meta["styles"]

    def style(self, name: str) -> dict:
        for record in self.styles:
            if record["name"] == name:
                return record
        known = ", ".join(repr(s["name"]) for s in self.styles) or "none yet"
        raise LibraryError(f"no style named {name!r} in this library (styles: {known})")

    def has_style(self, name: str) -> bool:
        return any(s["name"] == name for s in self.styles)

    def new_style_id(self) -> str:
        number = self.meta["next_style_number"]
        self.meta["next_style_number"] = number + 1
        return f"s{number}"

    def share_config(self, component: str = "unet") -> ShareConfig:
        """The Share settings, with the Share layers of `component` (STORED_COMPONENTS) as targets."""
        share = self.meta["share"]
        return ShareConfig(
            rank=share["rank"],
            alpha=share["alpha"],
            max_basis_rank=share["max_basis_rank"],
            drift_budget=share["drift_budget"],
            target_modules=tuple(self.meta["target_modules"][component]),
        )

    def component_state(self, component: str) -> dict[str, torch.Tensor]:
        prefix = component + "."
        return {k[len(prefix):]: v for k, v in self.state.items() if k.startswith(prefix)}

    def set_component_state(self, component: str, state: dict[str, torch.Tensor]) -> None:
        prefix = component + "."
        self.state = {k: v for k, v in self.state.items() if not k.startswith(prefix)}
        self.state.update({prefix + k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state.items()})

    def basis_rank(self) -> int:
        """The widest basis of any layer (k)."""
        return max((v.shape[1] for k, v in self.state.items() if k.endswith(".basis_a")), default=0)

    # --- files ----------------------------------------------------------------------------

    def to_bytes(self) -> bytes:
        return save_safetensors_bytes(self.state, metadata={METADATA_KEY: json.dumps(self.meta)})

    def save(self, path: str | os.PathLike) -> None:
        validate(self.meta, self.state, str(path))  # never write a file that could not be opened again
        write_atomically(Path(path), self.to_bytes(), keep_backup=True)

    @classmethod
    def load(cls, path: str | os.PathLike) -> StyleLibrary:
        path = Path(path)
        try:
            status = path.stat()
        except FileNotFoundError:
            raise LibraryError(f"{path}: no such library file") from None
        except OSError as error:
            raise LibraryError(f"{path}: cannot read it ({error.strerror})") from None
        if not stat.S_ISREG(status.st_mode):  # a FIFO would block forever, /dev/zero fill the memory
            raise LibraryError(f"{path}: not a regular file")
        size = status.st_size
        if size > MAX_FILE_BYTES:
            raise LibraryError(f"{path}: {size} bytes is too large for a style library")
        try:
            data = path.read_bytes()
        except OSError as error:
            raise LibraryError(f"{path}: cannot read it ({error.strerror})") from None
        return cls.from_bytes(data, source=str(path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "library") -> StyleLibrary:
        meta = read_header_metadata(data, source)
        try:
            state = load_safetensors_bytes(data)
        except (SafetensorError, ValueError, RuntimeError, OverflowError) as error:
            raise LibraryError(f"{source}: damaged tensor data ({first_line(error)})") from None
        validate(meta, state, source)
        return cls(upgrade(meta, state), state)


def style_rank(state: dict[str, torch.Tensor], style_id: str) -> int:
    """A style's rank: the widest of its loadings over the layers (each layer stores its own r_s)."""
    suffix = f".styles.{style_id}.loadings_a"
    return max((v.shape[1] for k, v in state.items() if k.endswith(suffix)), default=0)


def upgrade(meta: dict, state: dict[str, torch.Tensor]) -> dict:
    """Version 1 or 2 metadata as version 3, and text_encoder_2 targets where a file has none (a
    validated file; see the module docstring)."""
    targets = meta["target_modules"]
    if "text_encoder_2" not in targets:
        meta = {**meta, "target_modules": {**targets, "text_encoder_2": list(CLIP_LORA_MODULES)}}
    if meta["format_version"] == FORMAT_VERSION:
        return meta
    version, meta = meta["format_version"], {**meta, "format_version": FORMAT_VERSION}
    targets = meta["target_modules"]
    meta["target_modules"] = {
        "unet": [*targets["unet"], *(t for t in UNET_LORA_MODULES if t not in targets["unet"])],
        "text_encoder": [*targets["text_encoder"], *(t for t in CLIP_LORA_MODULES if t not in targets["text_encoder"])],
        "text_encoder_2": targets["text_encoder_2"],
    }
    if version >= 2:
        return meta
    meta["share"] = {"rank": meta["share"]["rank"], "alpha": meta["share"]["alpha"], "max_basis_rank": None,
                     "drift_budget": DRIFT_BUDGET}
    meta["styles"] = [
        {**record, "drift_budget": DRIFT_BUDGET, "error_exact": record["error"] <= EXACT,
         "cuts": 0 if record["error"] <= EXACT else 2, "rank": style_rank(state, record["id"])}
        for record in meta["styles"]
    ]
    return meta


def read_header_metadata(data: bytes, source: str) -> dict:
    """Parse the safetensors header ourselves, with limits, before safetensors sees the file."""
    # A safetensors file has its JSON header from byte 8; its 8-byte length may itself start like a
    # pickle (a header of 0x580 bytes is b"\x80\x05..."), so that alone does not make it one.
    looks_safetensors = data[8:9] == b"{"
    if not looks_safetensors and (data[:2] in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") or data[:2] == b"PK"):
        raise LibraryError(f"{source}: this is a pickle/zip file, not safetensors; it was not opened")
    if len(data) < 8:
        raise LibraryError(f"{source}: not a safetensors file (only {len(data)} bytes)")
    (header_length,) = struct.unpack("<Q", data[:8])
    if header_length > MAX_HEADER_BYTES:
        raise LibraryError(f"{source}: header of {header_length} bytes is over the {MAX_HEADER_BYTES}-byte limit")
    if 8 + header_length > len(data):
        raise LibraryError(f"{source}: truncated or not a safetensors file (header runs past the end)")
    try:
        header = json.loads(data[8 : 8 + header_length].decode("utf-8"))
        text = header["__metadata__"][METADATA_KEY]
        meta = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):  # RecursionError: absurdly deep nesting
        raise LibraryError(f"{source}: damaged or not a safetensors file (header is not valid JSON)") from None
    except (KeyError, TypeError):
        raise LibraryError(f"{source}: a safetensors file, but not a Share Studio style library") from None
    if not isinstance(meta, dict):
        raise LibraryError(f"{source}: library metadata is not a JSON object")
    return meta


def validate(meta: dict, state: dict[str, torch.Tensor], source: str) -> None:
    """Check metadata and tensors agree, so that nothing malformed reaches a model."""

    def fail(message: str):
        raise LibraryError(f"{source}: {message}")

    version = meta.get("format_version")
    if type(version) is not int or version not in READABLE_VERSIONS:
        fail(f"format version {version!r} is not supported (this Share Studio reads versions "
             f"{', '.join(map(str, READABLE_VERSIONS))})")

    def integer(value, low, high) -> bool:
        return type(value) is int and low <= value <= high

    def number(value) -> bool:
        return type(value) in (int, float) and math.isfinite(value)

    def budget(value) -> bool:
        return number(value) and 0 <= value <= 1

    # Exact types, since Studio and the training code use these values as they are.
    try:
        fingerprint = meta["base_model"]["fingerprint"]
        share = meta["share"]
        rank, max_rank = share["rank"], share["max_basis_rank"]
        targets = meta["target_modules"]
        styles = meta["styles"]
        next_number = meta["next_style_number"]
        assert isinstance(meta["merges"], list) and isinstance(styles, list)
        assert isinstance(fingerprint, str) and isinstance(meta["base_model"]["id"], str)
        assert isinstance(meta["base_model"].get("family", families.UNKNOWN), str)  # absent before families
        assert isinstance(targets, dict) and {"unet", "text_encoder"} <= targets.keys()  # text_encoder_2: newer files
        assert all(isinstance(targets[c], list) and all(isinstance(t, str) for t in targets[c])
                   for c in STORED_COMPONENTS if c in targets)
        assert integer(rank, 1, 1024) and (max_rank is None and version > 1 or integer(max_rank, 1, 4096))
        # "phi" (temporary basis directions) is written by libraries from before free-factor training.
        assert "phi" not in share or integer(share["phi"], 1, 4096)
        assert share["alpha"] is None or number(share["alpha"])
        if version == 1:
            assert number(share["energy_threshold"]) and 0 < share["energy_threshold"] <= 1
        else:
            assert budget(share["drift_budget"])
        assert integer(next_number, 1, 10**9)
    except (KeyError, TypeError, ValueError, AssertionError, OverflowError):
        fail("library metadata is incomplete or malformed")
    ids, names = set(), set()
    for record in styles:
        if not isinstance(record, dict) or not isinstance(record.get("id"), str):
            fail("a style record is malformed")
        if not re.fullmatch(r"s[0-9]{1,9}", record["id"]) or record["id"] in ids:
            fail(f"style id {record['id'][:40]!r} is invalid or repeated")
        if int(record["id"][1:]) >= next_number:
            fail(f"style id {record['id']!r} is not below next_style_number {next_number}")
        if not number(record.get("error")) or not isinstance(record.get("error_history"), list):
            fail(f"style {record['id']!r} lacks its error bookkeeping")
        if version > 1 and not (budget(record.get("drift_budget")) and type(record.get("error_exact")) is bool
                                and integer(record.get("cuts"), 0, 10**9) and integer(record.get("rank"), 0, 4096)):
            fail(f"style {record['id']!r} lacks its drift budget, error kind, cut count or rank")
        try:
            name = check_style_name(record.get("name"))
            check_trigger(record.get("trigger"))
        except LibraryError as error:
            fail(str(error))
        if name in names:
            fail(f"style name {name!r} appears twice")
        ids.add(record["id"])
        names.add(name)

    layers: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        component, _, rest = key.partition(".")
        if component not in STORED_COMPONENTS:
            fail(f"unexpected tensor {key[:80]!r}")
        if tensor.dtype != torch.float32:
            fail(f"tensor {key[:80]!r} is {tensor.dtype}, expected float32")
        if not torch.isfinite(tensor).all():
            fail(f"tensor {key[:80]!r} holds NaN or infinite values")
        if rest.endswith(TENSOR_FIELDS):
            layer, _, field = rest.rpartition(".")
            layers.setdefault((component, layer), {})[field] = tensor
            continue
        parts = rest.rsplit(".", 3)
        if len(parts) != 4 or parts[1] != "styles" or parts[3] not in STYLE_FIELDS:
            fail(f"unexpected tensor {key[:80]!r}")
        layer, _, style_id, field = parts
        if style_id not in ids:
            fail(f"tensor {key[:80]!r} belongs to no style in the metadata")
        layers.setdefault((component, layer), {})[f"{style_id}.{field}"] = tensor

    for (component, layer), fields in layers.items():
        where = f"layer {component}.{layer}"
        basis_a, basis_b = fields.get("basis_a"), fields.get("basis_b")
        if basis_a is None or basis_b is None or basis_a.dim() != 2 or basis_b.dim() != 2:
            fail(f"{where} lacks a two-dimensional basis")
        # Version 1's cap bound every basis; version 2's size limit binds the next merge (it may have been lowered).
        if version == 1 and (basis_a.shape[1] > max_rank or basis_b.shape[1] > max_rank):
            fail(f"{where} has a basis wider than the library's cap of {max_rank}")
        for style_id in ids:
            loadings_a = fields.get(f"{style_id}.loadings_a")
            loadings_b = fields.get(f"{style_id}.loadings_b")
            scale = fields.get(f"{style_id}.scale")
            if loadings_a is None or loadings_b is None or scale is None:
                fail(f"{where} lacks the tensors of style {style_id}")
            if (
                loadings_a.dim() != 2
                or loadings_b.dim() != 2
                or loadings_a.shape[0] != basis_a.shape[1]
                or loadings_b.shape[0] != basis_b.shape[1]
                or loadings_a.shape[1] != loadings_b.shape[1]
                or scale.numel() != 1
            ):
                fail(f"{where}: the shapes of style {style_id} disagree with its basis")
    if ids and not layers:
        fail("the metadata lists styles but the file holds no tensors")


def write_atomically(path: Path, data: bytes, keep_backup: bool) -> None:
    """Write, fsync, then rename over `path`, so a crash at any moment leaves the old or the new file.

    With keep_backup the current file first becomes `<file>.bak` (by a hard link or an atomic copy).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Unique per write, not just per process: two threads must never share a temporary file.
    unique = f"{os.getpid()}.{threading.get_ident()}"
    temporary = path.with_name(f".{path.name}.{unique}.tmp")
    try:
        _write_synced(temporary, data)
        if keep_backup and path.exists():
            backup = path.with_name(path.name + ".bak")
            backup_temporary = path.with_name(f".{path.name}.{unique}.bak.tmp")
            with contextlib.suppress(FileNotFoundError):  # a leftover may be a hard link to the backup
                backup_temporary.unlink()
            try:
                os.link(path, backup_temporary)
            except OSError:
                _write_synced(backup_temporary, path.read_bytes())
            os.replace(backup_temporary, backup)
            # After a crash between the two renames, path and backup are one file: then the rename
            # above does nothing (POSIX) and the temporary name stays; remove it.
            with contextlib.suppress(FileNotFoundError):
                backup_temporary.unlink()
        os.replace(temporary, path)
        _sync_directory(path.parent)
    except BaseException:
        with contextlib.suppress(OSError):
            temporary.unlink()
        raise


def _write_synced(path: Path, data: bytes) -> None:
    with open(path, "wb") as file:
        file.write(data)
        file.flush()
        os.fsync(file.fileno())


def _sync_directory(directory: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


class LibraryLock:
    """`<file>.lock`, so that two processes never write one library at once.

    Where fcntl exists (Linux, macOS) the lock is an flock on that file: the system releases it when
    its process ends, however it ends, so a crashed holder never blocks anyone, and no check-then-act
    race exists between two processes. Elsewhere the file is created exclusively, and a lock left by a
    process that no longer runs is taken over. Within one process, a lock held by another LibraryLock
    (another Studio, another thread) is refused like one held by another process. The file holds the
    holder's pid, for the message.
    """

    _held_here: set[str] = set()  # lock files held by this process
    _held_here_guard = threading.Lock()

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).with_name(Path(path).name + ".lock")
        self.held = False

    def __enter__(self) -> LibraryLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        with self._held_here_guard:
            if key in self._held_here:
                raise LibraryLockedError(
                    f"{self.path.with_suffix('')} is being changed by another operation in this process; "
                    "wait for it to finish"
                )
            self._take()
            self._held_here.add(key)
            self._key = key
        return self

    def _take(self) -> None:
        if fcntl is not None:
            return self._take_flock()
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner != os.getpid() and _process_alive(owner):
                    raise LibraryLockedError(
                        f"{self.path.with_suffix('')} is being changed by another Share Studio process "
                        f"(pid {owner}); wait for it to finish"
                    ) from None
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                continue
            with os.fdopen(fd, "w") as file:
                file.write(str(os.getpid()))
            self.held = True
            return
        raise LibraryLockedError(f"could not take the lock {self.path}")

    def _take_flock(self) -> None:
        for _ in range(10):
            fd = os.open(self.path, os.O_CREAT | os.O_RDWR, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise LibraryLockedError(
                    f"{self.path.with_suffix('')} is being changed by another Share Studio process "
                    f"(pid {self._owner() or 'unknown'}); wait for it to finish"
                ) from None
            except BaseException:
                os.close(fd)
                raise
            try:  # the holder before us removes the file on release: then we locked an orphan
                current = os.stat(self.path)
                ours = os.fstat(fd)
                same = (current.st_dev, current.st_ino) == (ours.st_dev, ours.st_ino)
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
            self._fd = fd
            self.held = True
            return
        raise LibraryLockedError(f"could not take the lock {self.path}")

    def __exit__(self, *exc) -> None:
        if self.held:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # before releasing the flock, so that a waiter sees it is gone
            if getattr(self, "_fd", None) is not None:
                os.close(self._fd)
                self._fd = None
            self.held = False
            with self._held_here_guard:
                self._held_here.discard(self._key)

    def _owner(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or "0") or None
        except (OSError, ValueError):
            return None


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def estimated_lora_file_bytes(state: dict[str, torch.Tensor], rank: int = 16, bytes_per_number: int = 2) -> int:
    """An estimate, not a measurement: the tensor bytes of one plain rank-`rank` LoRA over the
    layers of this library's `state` that hold a style (fp16, the common format), without the file's header."""
    numbers = sum(rank * v.shape[0] for k, v in state.items() if k.endswith((".basis_a", ".basis_b")) and v.shape[1])
    return numbers * bytes_per_number
