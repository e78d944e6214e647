"""The architecture-config folders shipped in ``share_diffusion/configs/``, ready for diffusers.

A single-file checkpoint (A1111/Civitai layout) holds weights but no architecture: diffusers'
``from_single_file`` needs a diffusers folder of the same architecture (``config=``) and would
otherwise download one from the Hub.  Share Studio ships one per supported family, without
weights: ``sd15`` (SD 1.x), ``sd2-base`` (SD 2.x 512 px, epsilon), ``sd21-v`` (SD 2.x 768 px,
v-prediction) and ``sdxl-base`` (SDXL 1.0 base).  Their values are those of the Hub's
``stable-diffusion-v1-5``, ``stable-diffusion-2-1-base``, ``stable-diffusion-2-1`` and
``stable-diffusion-xl-base-1.0`` folders.

Their tokenizers need CLIP's ``vocab.json`` and ``merges.txt``; both are built from CLIP's BPE
merge list (``configs/clip-bpe/``, see its NOTICE) the first time a folder is used, and the whole
folder is written to a cache directory: :func:`config_folder` returns that complete folder.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from .errors import ModelLoadError

CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
#: Shipped folder names, one per architecture.
CONFIG_NAMES = ("sd15", "sd2-base", "sd21-v", "sdxl-base")
BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
SHIPPED_BPE = CONFIGS_DIR / "clip-bpe" / BPE_FILE_NAME
#: Where a PyPI package installs the same file, tried when the shipped copy is missing.
PACKAGED_BPE = (("open_clip", BPE_FILE_NAME), ("clip", BPE_FILE_NAME))
#: CLIP's vocabulary: 256 byte symbols, the same with "</w>", 48,894 merges, 2 special tokens.
CLIP_MERGES = 49152 - 256 - 2
CLIP_VOCAB_SIZE = 49408


def cache_dir() -> Path:
    """``$SHARE_STUDIO_CACHE``, else ``$XDG_CACHE_HOME/share-studio``, else ``~/.cache/share-studio``."""
    if os.environ.get("SHARE_STUDIO_CACHE"):
        return Path(os.environ["SHARE_STUDIO_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "share-studio"


def clip_bpe_file() -> Path:
    """CLIP's BPE merge list: the shipped copy, else one installed by open-clip-torch or clip."""
    if SHIPPED_BPE.is_file():
        return SHIPPED_BPE
    for package, name in PACKAGED_BPE:
        try:
            spec = importlib.util.find_spec(package)  # locates without importing
        except (ImportError, ValueError):
            spec = None
        for location in (spec.submodule_search_locations or []) if spec else []:
            candidate = Path(location) / name
            if candidate.is_file():
                return candidate
    raise ModelLoadError(
        f"CLIP's tokenizer vocabulary is missing: {SHIPPED_BPE} is not there and no installed open-clip-torch ships "
        f"{BPE_FILE_NAME}; restore share_diffusion/configs/clip-bpe/ from the repository (or `pip install open-clip-torch`)"
    )


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (and GPT-2's) reversible byte -> printable character table."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def clip_vocab_and_merges(bpe_file: str | os.PathLike) -> tuple[dict[str, int], list[str]]:
    """``vocab.json``'s mapping and ``merges.txt``'s merge lines, as OpenAI's ``SimpleTokenizer`` builds them."""
    lines = gzip.decompress(Path(bpe_file).read_bytes()).decode("utf-8").split("\n")
    merges = lines[1 : CLIP_MERGES + 1]
    if len(merges) != CLIP_MERGES or any(len(m.split()) != 2 for m in merges):
        raise ModelLoadError(f"{bpe_file} is not CLIP's BPE merge list (expected {CLIP_MERGES} merges)")
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != CLIP_VOCAB_SIZE:
        raise ModelLoadError(f"{bpe_file} gives {len(vocab)} tokens, not CLIP's {CLIP_VOCAB_SIZE}")
    return vocab, merges


def write_clip_tokenizer_files(folder: str | os.PathLike, bpe_file: str | os.PathLike | None = None) -> None:
    """Write ``vocab.json`` and ``merges.txt`` (the Hub's CLIP tokenizer files) into ``folder``."""
    vocab, merges = clip_vocab_and_merges(bpe_file or clip_bpe_file())
    folder = Path(folder)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def shipped_folder(name: str) -> Path:
    """The shipped (tokenizer-less) folder ``configs/<name>``."""
    if name not in CONFIG_NAMES:
        raise ValueError(f"no shipped model config {name!r} (known: {', '.join(CONFIG_NAMES)})")
    return CONFIGS_DIR / name


def _digest(folder: Path, bpe: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(path.relative_to(folder).as_posix().encode() + b"\0" + path.read_bytes())
    h.update(bpe.read_bytes())
    return h.hexdigest()[:12]


def _tokenizer_dirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("tokenizer"))


@lru_cache(maxsize=None)
def config_folder(name: str) -> Path:
    """A complete diffusers config folder (tokenizers included) for the shipped architecture ``name``.

    Built once in :func:`cache_dir` (keyed by the shipped files' hash, so an update rebuilds it);
    where the cache is not writable, in a temporary folder.  Never touches the network.
    """
    source = shipped_folder(name)
    bpe = clip_bpe_file()
    target_name = f"{name}-{_digest(source, bpe)}"
    for root in (cache_dir() / "model-configs", Path(tempfile.gettempdir()) / "share-studio-model-configs"):
        target = root / target_name
        if (target / "model_index.json").is_file() and all((t / "merges.txt").is_file() for t in _tokenizer_dirs(target)):
            return target
        try:
            if target.exists():  # incomplete (a file deleted by hand): build it again
                shutil.rmtree(target)
            root.mkdir(parents=True, exist_ok=True)
            staging = Path(tempfile.mkdtemp(prefix=f".{target_name}-", dir=root))
            try:
                built = staging / name
                shutil.copytree(source, built)
                for tokenizer in _tokenizer_dirs(built):
                    write_clip_tokenizer_files(tokenizer, bpe)
                try:
                    os.replace(built, target)
                except OSError:
                    if not (target / "model_index.json").is_file():  # not just another process winning the race
                        raise
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            return target
        except OSError:
            continue
    raise ModelLoadError(f"could not write the model config folder {target_name} to {cache_dir()} or the temp folder")
