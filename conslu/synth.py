"""`conslu synth`: speak TOPv2 (or STOP) text with espeak-ng into a corpus with STOP's exact layout.

Output (what the official release looks like, one recording per utterance)::

    OUT/manifests/{train,eval,test}.tsv        header + STOP's 9 columns, in STOP's order
    OUT/train/<domain>_train/<NNNNNNNN>.wav    file_id train/<domain>_train/<NNNNNNNN>.wav
    OUT/eval_0/<domain>_eval/<NNNNNNNN>.wav    file_id eval_0/<domain>_eval_0/<NNNNNNNN>.wav
    OUT/test_0/<domain>_test/<NNNNNNNN>.wav    file_id test_0/<domain>_test_0/<NNNNNNNN>.wav

The eval/test ``file_id`` keeps the release's quirk (``_eval_0`` in the folder name while the folder
on disk is ``_eval``), so readers are exercised on it. ``NNNNNNNN`` is the utterance's position among
the input rows of its split and domain (input order), so a file name never depends on --limit,
--domains or --skip-bad. Audio: 16 kHz mono 16-bit PCM of the *normalised* utterance.

Speaker: each utterance draws an espeak-ng voice, a rate (words per minute) and a pitch from a
generator seeded by ``(seed, file_id)``; optional white noise at a given SNR uses the same seed.
The same seed and options give byte-identical wavs. The default voices, rates and pitches stay
within what pretrained Whisper tiny.en transcribes well. ``gender`` comes from the voice variant's
espeak-ng data (``+f3`` -> female); ``native`` is ``yes``.

--limit N keeps N utterances per split spread evenly over the filtered rows (rows
``floor(i * n / N)``, i = 0..N-1), so all domains of a multi-file input are represented.

Runs are resumable and never leave partial output: each wav is written to a temp file in its
folder and renamed into place, so an existing wav is complete and is skipped on the next run;
manifests are written (atomically) only after every wav of the run exists. A wav is reused only
when it says the same normalised text (``OUT/.conslu-synth-texts.json``, a digest per file), so a
changed normaliser or input row is spoken again. The settings are
recorded in ``OUT/.conslu-synth.json``; a rerun with different speaker settings is refused rather
than mixing two corpora. A lock file stops two runs writing the same folder at once.
"""

from __future__ import annotations

import fcntl
import io
import json
import math
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from conslu.atomic import atomic_write_text

__all__ = [
    "DEFAULT_VOICES", "RATE_RANGE", "PITCH_RANGE", "SPLITS", "SynthError", "Utterance", "Speaker",
    "file_id_for", "audio_path_for", "choose_speaker", "voice_gender", "speak", "render",
    "synthesize",
]

SPLITS = ("train", "eval", "test")
SAMPLE_RATE = 16000
# Voices pretrained Whisper tiny.en transcribes best (espeak-ng 1.51, 14 TOPv2 sentences at 120/145 wpm,
# WER 0.25-0.41); left out: en-us (0.42-0.48), en+f1 (0.47), en+f4 (0.42).
DEFAULT_VOICES: tuple[str, ...] = ("en", "en+m1", "en+m2", "en+m3", "en-gb-x-rp", "en+f2", "en+f3")
RATE_RANGE = (120, 145)   # words per minute (espeak default 175 is too fast for tiny.en)
PITCH_RANGE = (35, 65)    # espeak 0-99, default 50
SETTINGS_FILE = ".conslu-synth.json"
TEXTS_FILE = ".conslu-synth-texts.json"   # what each wav says: a wav is reused only for the same text
LOCK_FILE = ".conslu-synth.lock"
_FORMAT_VERSION = 1


class SynthError(RuntimeError):
    """A problem that stops the run (bad input row, espeak failure, conflicting output folder)."""


@dataclass(frozen=True)
class Utterance:
    """One input row to speak: position ``index`` among its split's and domain's rows."""

    split: str
    domain: str
    index: int
    utterance: str
    seqlogical: str
    source: str  # "file:line" for messages


@dataclass(frozen=True)
class Speaker:
    voice: str
    rate: int
    pitch: int


# ----------------------------------------------------------------------------- layout

def file_id_for(split: str, domain: str, index: int) -> str:
    """The manifest ``file_id`` as the STOP release writes it (part _0 for eval/test)."""
    if split == "train":
        return f"train/{domain}_train/{index:08d}.wav"
    return f"{split}_0/{domain}_{split}_0/{index:08d}.wav"


def audio_path_for(split: str, domain: str, index: int) -> str:
    """Where the wav lies relative to the corpus root (the release's folder drops the ``_0``)."""
    if split == "train":
        return f"train/{domain}_train/{index:08d}.wav"
    return f"{split}_0/{domain}_{split}/{index:08d}.wav"


# ----------------------------------------------------------------------------- speakers

def _espeak_data_dir() -> Path | None:
    for d in ("/usr/lib/x86_64-linux-gnu/espeak-ng-data", "/usr/lib/aarch64-linux-gnu/espeak-ng-data",
              "/usr/share/espeak-ng-data", "/usr/local/share/espeak-ng-data", "/usr/lib/espeak-ng-data"):
        if (Path(d) / "voices" / "!v").is_dir():
            return Path(d)
    env = os.environ.get("ESPEAK_DATA_PATH")
    return Path(env) if env else None


@lru_cache(maxsize=None)
def voice_gender(voice: str) -> str:
    """"female" or "male" for an espeak-ng voice spec such as ``en+f3`` (from the variant's data)."""
    variant = voice.split("+", 1)[1] if "+" in voice else ""
    if not variant:
        return "male"  # espeak-ng's base voices are male
    data = _espeak_data_dir()
    if data is not None:
        f = data / "voices" / "!v" / variant
        if f.is_file():
            for line in f.read_text(errors="replace").splitlines():
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "gender":
                    return "female" if parts[1].lower().startswith("f") else "male"
    return "female" if variant[:1].lower() == "f" and variant[1:].isdigit() else "male"


def choose_speaker(seed: int, file_id: str, voices: Sequence[str] = DEFAULT_VOICES,
                   rates: tuple[int, int] = RATE_RANGE, pitches: tuple[int, int] = PITCH_RANGE) -> Speaker:
    """Voice, rate and pitch for one utterance, a pure function of (seed, file_id)."""
    rng = random.Random(f"{seed}|{file_id}")
    return Speaker(voice=voices[rng.randrange(len(voices))], rate=rng.randint(*rates), pitch=rng.randint(*pitches))


def choose_noise(seed: int, file_id: str, levels: "float | Sequence[float | None] | None") -> float | None:
    """The SNR (dB, None: clean) of one utterance: ``levels`` itself when one value, else one of
    them drawn from (seed, file_id)."""
    if levels is None or isinstance(levels, (int, float)):
        return None if levels is None else float(levels)
    options = list(levels)
    return options[random.Random(f"{seed}|noise|{file_id}").randrange(len(options))]


def _noise_seed(seed: int, file_id: str) -> list[int]:
    return [seed & 0xFFFFFFFF, zlib.crc32(file_id.encode())]


# ----------------------------------------------------------------------------- audio

def _espeak_binary() -> str:
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise SynthError("espeak-ng not found on PATH (Debian/Ubuntu: apt-get install espeak-ng)")
    return exe


def speak(text: str, speaker: Speaker, *, sr: int = SAMPLE_RATE) -> np.ndarray:
    """espeak-ng's rendering of ``text`` as float32 at ``sr`` Hz (resampled with soxr HQ)."""
    import soundfile as sf

    from conslu.audio import resample

    proc = subprocess.run(
        [_espeak_binary(), "-v", speaker.voice, "-s", str(speaker.rate), "-p", str(speaker.pitch), "--stdin", "--stdout"],
        input=text.encode("utf-8"), capture_output=True, check=False,
    )
    if proc.returncode != 0 or len(proc.stdout) <= 44:
        err = proc.stderr.decode("utf-8", "replace").strip() or f"exit status {proc.returncode}, no audio"
        raise SynthError(f"espeak-ng -v {speaker.voice} failed: {err}")
    x, native = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    if x.ndim == 2:
        x = x.mean(axis=1)
    return resample(x, native, sr)


def add_noise(x: np.ndarray, snr_db: float, rng: np.random.Generator) -> np.ndarray:
    """``x`` plus white Gaussian noise at ``snr_db`` relative to the signal's mean power."""
    power = float(np.mean(np.square(x, dtype=np.float64))) if x.size else 0.0
    if power <= 0.0:
        return x
    sigma = math.sqrt(power / (10.0 ** (snr_db / 10.0)))
    return (x + rng.standard_normal(x.shape) * sigma).astype(np.float32)


def _pcm16(x: np.ndarray) -> np.ndarray:
    return np.clip(np.round(x * 32767.0), -32768, 32767).astype(np.int16)


def _atomic_wav(path: Path, pcm: np.ndarray, sr: int) -> None:
    import soundfile as sf

    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        sf.write(tmp, pcm, sr, subtype="PCM_16", format="WAV")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _complete_wav(path: Path) -> bool:
    """True when ``path`` is a readable wav with samples (files only appear via rename)."""
    if not path.is_file():
        return False
    import soundfile as sf

    try:
        return sf.info(str(path)).frames > 0
    except Exception:
        return False


def render(path: Path, text: str, speaker: Speaker, *, noise_snr: float | None = None,
           noise_seed: Sequence[int] = (0,), sr: int = SAMPLE_RATE) -> float:
    """Speak ``text`` into ``path`` (atomic write); returns the duration in seconds."""
    x = speak(text, speaker, sr=sr)
    if noise_snr is not None:
        x = add_noise(x, noise_snr, np.random.default_rng(list(noise_seed)))
    _atomic_wav(path, _pcm16(x), sr)
    return len(x) / sr


# ----------------------------------------------------------------------------- inputs

def _split_of_topv2(path: Path) -> str:
    stem = path.stem.lower()
    for split in SPLITS:
        if stem == split or stem.endswith("_" + split) or stem.endswith("-" + split):
            return split
    if stem.endswith("_dev") or stem == "dev" or stem.endswith("_valid"):
        return "eval"
    raise SynthError(f"{path}: cannot tell the split from the file name (expected e.g. weather_eval.tsv)")


def _source_rows(path: Path, skip_bad: bool, report: list[str] | None) -> Iterable[tuple[str, str, str, str, str]]:
    """(split, domain, utterance, seqlogical, "file:line") for each row of one input.

    Uses :mod:`conslu.data`'s TSV primitives (BOM/CRLF tolerant) and its split/kind detection;
    the raw text is needed because the manifests keep the original utterance and tree.
    """
    from conslu import data

    def bad(msg: str) -> None:
        if not skip_bad:
            raise SynthError(msg)
        if report is not None:
            report.append(msg)

    kind = data._kind(path)
    if kind == "stop-root":
        for manifest, split in data.stop_manifests(path):
            yield from _manifest_rows(manifest, split, bad)
        return
    if kind == "stop-manifest":
        split = path.stem.lower()
        if split not in SPLITS:
            raise SynthError(f"{path}: cannot tell the split from the manifest name (expected train/eval/test.tsv)")
        yield from _manifest_rows(path, split, bad)
        return
    split = data.topv2_split(path)
    split = {"dev": "eval", "valid": "eval"}.get(split, split)
    for where, row in _table_rows(path, ("domain", "utterance", "semantic_parse"), bad):
        yield split, row["domain"].strip(), row["utterance"], row["semantic_parse"], where


_PART = re.compile(r"^(?:eval|test|valid|dev)_(\d+)/")


def _manifest_rows(manifest: Path, split: str, bad) -> Iterable[tuple[str, str, str, str, str]]:
    for where, row in _table_rows(manifest, ("file_id", "domain", "utterance", "seqlogical"), bad):
        part = _PART.match(row["file_id"].strip())
        if part and int(part.group(1)) != 0:
            continue  # the second recording of an eval/test utterance: same text
        yield split, row["domain"].strip(), row["utterance"], row["seqlogical"], where


def _table_rows(path: Path, need: Sequence[str], bad) -> Iterator[tuple[str, dict[str, str]]]:
    """(``file:line``, the ``need`` columns) of each TSV row; rows with the wrong field count go to ``bad``."""
    from conslu import data

    rows, header = data.open_table(path, need)
    idx = {c: header.index(c) for c in need}
    for lineno, fields in rows:
        if len(fields) != len(header):
            bad(f"{path}:{lineno}: expected {len(header)} fields, got {len(fields)}")
            continue
        yield f"{path}:{lineno}", {c: fields[idx[c]] for c in need}


def read_inputs(files: Sequence[str | os.PathLike], *, splits: Iterable[str] | None = None,
                domains: Iterable[str] | None = None, skip_bad: bool = False,
                report: list[str] | None = None) -> list[Utterance]:
    """Rows of TOPv2 files, STOP manifests or STOP folders, numbered per (split, domain) in input order.

    A row with the wrong number of fields stops the run with ``file:line`` (with ``skip_bad`` it
    is left out and its message appended to ``report``); trees are checked when the manifest row
    is built. STOP inputs: only the part-0 recording of each eval/test utterance is used (part 1
    holds the same text). Splits and domains compare case-insensitively.
    """
    from conslu import data

    keep_splits = {s.lower() for s in splits} if splits else None
    keep_domains = {d.lower() for d in domains} if domains else None
    counters: dict[tuple[str, str], int] = {}
    out: list[Utterance] = []
    for f in files:
        path = Path(f)
        if not path.exists():
            raise SynthError(f"{path}: no such file or folder")
        try:
            rows = list(_source_rows(path, skip_bad, report))
        except (data.DataError, OSError, UnicodeDecodeError) as e:
            raise SynthError(str(e) if isinstance(e, data.DataError) else f"{path}: cannot read ({e})") from e
        for split, domain, utterance, seqlogical, where in rows:
            if not domain or "/" in domain or domain.startswith("."):
                msg = f"{where}: bad domain {domain!r}"
                if not skip_bad:
                    raise SynthError(msg)
                if report is not None:
                    report.append(msg)
                continue
            key = (split, domain)
            index = counters.get(key, 0)
            counters[key] = index + 1
            if (keep_splits is None or split in keep_splits) and (keep_domains is None or domain.lower() in keep_domains):
                out.append(Utterance(split, domain, index, utterance, seqlogical, where))
    return out


# ----------------------------------------------------------------------------- driver

@dataclass
class SynthResult:
    written: int = 0
    skipped: int = 0
    seconds_audio: float = 0.0
    wall_seconds: float = 0.0
    manifests: tuple[str, ...] = ()
    bad_rows: tuple[str, ...] = ()


def _settings(seed: int, voices: Sequence[str], noise_snr: "float | Sequence[float | None] | None") -> dict:
    version = subprocess.run([_espeak_binary(), "--version"], capture_output=True, text=True).stdout.strip()
    return {"format": _FORMAT_VERSION, "seed": seed, "voices": list(voices), "rates": list(RATE_RANGE),
            "pitches": list(PITCH_RANGE),
            "noise_snr": noise_snr if noise_snr is None or isinstance(noise_snr, (int, float)) else list(noise_snr),
            "sample_rate": SAMPLE_RATE,
            "espeak": version.split(" Data at:")[0]}


def _check_settings(out: Path, settings: dict) -> None:
    f = out / SETTINGS_FILE
    if f.is_file():
        try:
            old = json.loads(f.read_text())
        except ValueError as e:
            raise SynthError(f"{f}: unreadable settings file ({e}); delete it if the folder is yours") from e
        diff = [k for k in settings if old.get(k) != settings[k]]
        if diff:
            detail = ", ".join(f"{k}: {old.get(k)!r} -> {settings[k]!r}" for k in diff)
            raise SynthError(f"{out}: made with other synth settings ({detail}); use a new --out folder "
                             "or the same settings")
        return
    atomic_write_text(f, json.dumps(settings, indent=1) + "\n")


def _text_digest(text: str) -> str:
    return f"{zlib.crc32(text.encode('utf-8')):08x}"


def _read_texts(out: Path) -> dict[str, str]:
    """What each existing wav says (empty for a corpus made before it was recorded: all spoken again)."""
    f = out / TEXTS_FILE
    try:
        data = json.loads(f.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _remove_stale_temps(dirs: Iterable[Path], pattern: str) -> int:
    """Delete temp files a killed run left behind (only our own names: ``.<name>.<random>.tmp``)."""
    n = 0
    for d in dirs:
        if d.is_dir():
            for f in d.glob(pattern):
                f.unlink(missing_ok=True)
                n += 1
    return n


def synthesize(utterances: Sequence[Utterance], out: str | os.PathLike, *, seed: int = 0,
               voices: Sequence[str] | None = None, noise_snr: "float | Sequence[float | None] | None" = None,
               jobs: int | None = None,
               limit: int | None = None, skip_bad: bool = False, progress: bool = True,
               bad_rows: Sequence[str] = ()) -> SynthResult:
    """Write the STOP-layout corpus for ``utterances`` under ``out`` (see the module docstring).
    ``noise_snr``: one SNR in dB for every utterance, or several (None: clean) drawn per utterance."""
    from conslu.data import spread, stop_row, write_manifest

    t0 = time.perf_counter()
    voices = tuple(voices) if voices else DEFAULT_VOICES
    out = Path(out)
    bad = list(bad_rows)

    # Manifest rows first (normalisation can reject a row before any audio is made).
    by_split: dict[str, list[Utterance]] = {}
    for u in utterances:
        by_split.setdefault(u.split, []).append(u)
    plan: list[tuple[dict, Utterance, Speaker]] = []
    manifest_rows: dict[str, list[dict]] = {}
    for split in sorted(by_split, key=lambda s: SPLITS.index(s) if s in SPLITS else len(SPLITS)):
        rows = by_split[split]
        chosen = [rows[i] for i in spread(len(rows), limit)]
        for u in chosen:
            fid = file_id_for(u.split, u.domain, u.index)
            spk = choose_speaker(seed, fid, voices)
            try:
                row = stop_row(fid, u.domain, voice_gender(spk.voice), "yes", u.utterance, u.seqlogical)
                if not str(row["normalized_utterance"]).strip():
                    raise ValueError("nothing to say after normalisation")
            except ValueError as e:  # MalformedTreeError (a ValueError) or nothing to say
                msg = f"{u.source}: {e}"
                if not skip_bad:
                    raise SynthError(msg) from e
                bad.append(msg)
                continue
            plan.append((row, u, spk))
            manifest_rows.setdefault(split, []).append(row)

    for spk_voice in sorted({s.voice for _, _, s in plan}):
        _check_voice(spk_voice)

    result = SynthResult(bad_rows=tuple(bad))
    out.mkdir(parents=True, exist_ok=True)
    with _locked(out):
        _check_settings(out, _settings(seed, voices, noise_snr))
        dirs = {(out / audio_path_for(u.split, u.domain, u.index)).parent for _, u, _ in plan}
        for d in dirs:
            d.mkdir(parents=True, exist_ok=True)
        _remove_stale_temps(dirs, ".*.wav.*.tmp")
        _remove_stale_temps([out / "manifests"], ".*.tsv.*.tmp")
        _remove_stale_temps([out], f"{SETTINGS_FILE}.*.tmp")
        _remove_stale_temps([out], f"{TEXTS_FILE}.*.tmp")
        said = _read_texts(out)
        todo = []
        for row, u, spk in plan:
            rel = audio_path_for(u.split, u.domain, u.index)
            path = out / rel
            if _complete_wav(path) and said.get(rel) == _text_digest(row["normalized_utterance"]):
                result.skipped += 1
            else:
                path.unlink(missing_ok=True)   # stale (another text) or incomplete: never left to pass as done
                todo.append((path, row["normalized_utterance"], spk, choose_noise(seed, row["file_id"], noise_snr),
                             _noise_seed(seed, row["file_id"]), u.source))
        failures = _run_jobs(todo, jobs, progress, result)
        said.update({audio_path_for(u.split, u.domain, u.index): _text_digest(row["normalized_utterance"])
                     for row, u, _ in plan if _complete_wav(out / audio_path_for(u.split, u.domain, u.index))})
        atomic_write_text(out / TEXTS_FILE, json.dumps(said, sort_keys=True) + "\n")
        if failures:
            shown = "\n".join(failures[:10]) + (f"\n... and {len(failures) - 10} more" if len(failures) > 10 else "")
            raise SynthError(f"{len(failures)} utterance(s) could not be synthesised (rerun to resume):\n{shown}")
        (out / "manifests").mkdir(exist_ok=True)
        written = []
        for split, rows in manifest_rows.items():
            path = out / "manifests" / f"{split}.tsv"
            write_manifest(path, rows)
            written.append(str(path))
        result.manifests = tuple(written)
    result.wall_seconds = time.perf_counter() - t0
    return result


@lru_cache(maxsize=None)
def _check_voice(voice: str) -> None:
    """Fail once, up front, for a voice espeak-ng does not know (it would silently fall back)."""
    if "+" in voice:
        data = _espeak_data_dir()
        variant = voice.split("+", 1)[1]
        if data is not None and not (data / "voices" / "!v" / variant).is_file():
            raise SynthError(f"espeak-ng voice {voice!r} is not usable: no variant {variant!r} in {data / 'voices' / '!v'}")
    proc = subprocess.run([_espeak_binary(), "-v", voice, "-q", "--stdin"], input=b"a", capture_output=True)
    err = proc.stderr.decode("utf-8", "replace").strip()
    if proc.returncode != 0 or err:
        raise SynthError(f"espeak-ng voice {voice!r} is not usable: {err or f'exit status {proc.returncode}'}")


class _locked:
    def __init__(self, out: Path) -> None:
        self.path = out / LOCK_FILE
        self.fh = None

    def __enter__(self) -> "_locked":
        self.fh = open(self.path, "a")
        try:
            fcntl.flock(self.fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            self.fh.close()
            raise SynthError(f"{self.path.parent}: another `conslu synth` is writing to this folder") from e
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.fh is not None
        fcntl.flock(self.fh, fcntl.LOCK_UN)
        self.fh.close()


def _run_jobs(todo: list, jobs: int | None, progress: bool, result: SynthResult) -> list[str]:
    """Render ``todo`` with ``jobs`` espeak-ng processes at a time; returns failure messages.

    Threads suffice: each job's work is an espeak-ng child process plus GIL-free resampling and
    file I/O. On Ctrl-C pending jobs are cancelled, running ones finish their (atomic) writes.
    """
    from tqdm import tqdm

    failures: list[str] = []
    if not todo:
        return failures
    jobs = max(1, jobs or os.cpu_count() or 1)
    bar = tqdm(total=len(todo), desc="synth", unit="utt", file=sys.stderr, disable=not progress, dynamic_ncols=True)
    pool = ThreadPoolExecutor(max_workers=jobs)
    try:
        futures = {pool.submit(render, path, text, spk, noise_snr=snr, noise_seed=ns): (path, src)
                   for path, text, spk, snr, ns, src in todo}
        for fut in as_completed(futures):
            path, src = futures[fut]
            try:
                result.seconds_audio += fut.result()
                result.written += 1
            except Exception as e:
                failures.append(f"{src}: {path}: {e}")
            bar.update(1)
    except BaseException:
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        bar.close()
    pool.shutdown(wait=True)
    return failures
