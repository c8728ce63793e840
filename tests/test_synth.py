"""`conslu synth`: STOP layout readable by read_stop, determinism, resumption, bad rows."""

from __future__ import annotations

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conslu import synth
from conslu.cli import main
from conslu.data import spread
from conslu.synth import Speaker, choose_speaker, file_id_for, audio_path_for, voice_gender

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

HEADER = "domain\tutterance\tsemantic_parse\n"
WEATHER = [
    ("weather", "Will it rain tomorrow at 7pm?", "[IN:GET_WEATHER Will it [SL:WEATHER_ATTRIBUTE rain ] [SL:DATE_TIME tomorrow at 7pm ] ? ]"),
    ("weather", "how hot is it in Paris", "[IN:GET_WEATHER how [SL:WEATHER_ATTRIBUTE hot ] is it in [SL:LOCATION Paris ] ]"),
]
ALARM = [
    ("alarm", "Set an alarm for 6:30 am", "[IN:CREATE_ALARM Set an alarm [SL:DATE_TIME for 6:30 am ] ]"),
    ("alarm", "delete my alarms", "[IN:DELETE_ALARM delete my alarms ]"),
]
STOP_HEADER = ["file_id", "domain", "gender", "native", "utterance", "seqlogical", "normalized_utterance",
               "normalized_seqlogical", "decoupled_normalized_seqlogical"]


def write_topv2(path: Path, rows) -> Path:
    path.write_text(HEADER + "".join("\t".join(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture
def inputs(tmp_path) -> list[str]:
    src = tmp_path / "src"
    src.mkdir()
    return [str(write_topv2(src / "weather_eval.tsv", WEATHER)), str(write_topv2(src / "alarm_train.tsv", ALARM))]


def digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and not p.name.endswith(".lock")}


def run(*argv: str) -> int:
    return main(["synth", *argv])


# ------------------------------------------------------------------------------ pure parts

def test_layout_names_follow_the_release_quirk():
    assert file_id_for("train", "alarm", 7) == "train/alarm_train/00000007.wav"
    assert audio_path_for("train", "alarm", 7) == "train/alarm_train/00000007.wav"
    assert file_id_for("eval", "alarm", 12) == "eval_0/alarm_eval_0/00000012.wav"
    assert audio_path_for("eval", "alarm", 12) == "eval_0/alarm_eval/00000012.wav"
    assert file_id_for("test", "music", 0) == "test_0/music_test_0/00000000.wav"
    assert audio_path_for("test", "music", 0) == "test_0/music_test/00000000.wav"


def test_spread_is_even_and_deterministic():
    assert spread(10, None) == list(range(10))
    assert spread(10, 20) == list(range(10))
    assert spread(10, 0) == []
    assert spread(10, 5) == [0, 2, 4, 6, 8]
    assert spread(7, 3) == [0, 2, 4]


def test_speaker_choice_is_a_function_of_seed_and_id():
    a = choose_speaker(0, "eval_0/alarm_eval_0/00000001.wav")
    assert a == choose_speaker(0, "eval_0/alarm_eval_0/00000001.wav")
    many = {choose_speaker(s, "x") for s in range(200)}
    assert {s.voice for s in many} == set(synth.DEFAULT_VOICES)
    assert all(synth.RATE_RANGE[0] <= s.rate <= synth.RATE_RANGE[1] for s in many)
    assert all(synth.PITCH_RANGE[0] <= s.pitch <= synth.PITCH_RANGE[1] for s in many)


@needs_espeak
def test_voice_gender_from_espeak_variants():
    assert voice_gender("en") == "male"
    assert voice_gender("en+m3") == "male"
    assert voice_gender("en+f3") == "female"
    assert voice_gender("en-gb-x-rp+f2") == "female"
    assert {voice_gender(v) for v in synth.DEFAULT_VOICES} == {"male", "female"}


@needs_espeak
def test_noise_hits_the_requested_snr():
    x = synth.speak("turn on the lights", Speaker("en", 130, 50))
    noisy = synth.add_noise(x, 10.0, np.random.default_rng(0))
    snr = 10 * np.log10(np.mean(x.astype(np.float64) ** 2) / np.mean((noisy - x).astype(np.float64) ** 2))
    assert snr == pytest.approx(10.0, abs=0.3)
    assert np.array_equal(synth.add_noise(np.zeros(10, np.float32), 0.0, np.random.default_rng(0)), np.zeros(10))


# ------------------------------------------------------------------------------ end to end

@needs_espeak
def test_synth_writes_stop_layout_read_by_read_stop(tmp_path, inputs, capsys):
    from conslu.data import read_stop

    out = tmp_path / "stop"
    assert run(*inputs, "--out", str(out), "--jobs", "2") == 0
    assert "4 wav(s) written" in capsys.readouterr().err
    assert sorted(p.name for p in (out / "manifests").iterdir()) == ["eval.tsv", "train.tsv"]
    lines = (out / "manifests" / "eval.tsv").read_text().splitlines()
    assert lines[0].split("\t") == STOP_HEADER
    assert len(lines) == 3 and all(len(l.split("\t")) == 9 for l in lines)
    first = dict(zip(STOP_HEADER, lines[1].split("\t")))
    assert first["file_id"] == "eval_0/weather_eval_0/00000000.wav"
    assert first["utterance"] == WEATHER[0][1] and first["seqlogical"] == WEATHER[0][2]
    assert first["normalized_utterance"] == "will it rain tomorrow at seven pm"
    assert first["decoupled_normalized_seqlogical"] == \
        "[IN:GET_WEATHER [SL:WEATHER_ATTRIBUTE rain ] [SL:DATE_TIME tomorrow at seven pm ] ]"
    assert first["native"] == "yes" and first["gender"] in ("male", "female")
    assert (out / "eval_0" / "weather_eval" / "00000001.wav").is_file()
    assert not (out / "eval_0" / "weather_eval_0").exists()
    assert (out / "train" / "alarm_train" / "00000001.wav").is_file()

    ds = read_stop(out)
    assert len(ds) == 4
    assert sorted(ds["id"]) == ["eval_0/weather_eval_0/00000000.wav", "eval_0/weather_eval_0/00000001.wav",
                                "train/alarm_train/00000000.wav", "train/alarm_train/00000001.wav"]
    for row in ds:
        info = sf.info(row["audio"])
        assert (info.samplerate, info.channels, info.subtype) == (16000, 1, "PCM_16")
        assert 0.5 < info.duration < 10
        assert row["gender"] == voice_gender(choose_speaker(0, row["id"]).voice)
    from conslu.audio import load_audio

    x = load_audio(ds[0]["audio"])
    assert np.abs(x).max() > 0.05  # speech, not silence


@needs_espeak
def test_same_seed_same_bytes_other_seed_other_speakers(tmp_path, inputs):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    assert run(*inputs, "--out", str(a), "--seed", "3", "--jobs", "2") == 0
    assert run(*inputs, "--out", str(b), "--seed", "3", "--jobs", "1") == 0
    assert digests(a) == digests(b)
    assert run(*inputs, "--out", str(c), "--seed", "4") == 0
    da, dc = digests(a), digests(c)
    assert da.keys() == dc.keys()
    assert any(da[k] != dc[k] for k in da if k.endswith(".wav"))


@needs_espeak
def test_noise_option_is_seeded(tmp_path, inputs):
    a, b, clean = tmp_path / "a", tmp_path / "b", tmp_path / "clean"
    for d in (a, b):
        assert run(inputs[0], "--out", str(d), "--noise-snr", "15") == 0
    assert run(inputs[0], "--out", str(clean)) == 0
    assert digests(a) == digests(b)
    wav = "eval_0/weather_eval/00000000.wav"
    x, _ = sf.read(a / wav)
    y, _ = sf.read(clean / wav)
    assert x.shape == y.shape and not np.array_equal(x, y)


def test_noise_levels_are_drawn_per_utterance():
    ids = [f"train/alarm_train/{i:08d}.wav" for i in range(200)]
    drawn = [synth.choose_noise(0, f, [None, 30.0, 20.0]) for f in ids]
    assert set(drawn) == {None, 30.0, 20.0}
    assert drawn == [synth.choose_noise(0, f, [None, 30.0, 20.0]) for f in ids]  # a function of (seed, file)
    assert drawn != [synth.choose_noise(1, f, [None, 30.0, 20.0]) for f in ids]
    assert synth.choose_noise(0, ids[0], 15) == 15.0 and synth.choose_noise(0, ids[0], None) is None


@needs_espeak
def test_several_noise_levels_on_the_command_line(tmp_path, inputs):
    out, clean = tmp_path / "mixed", tmp_path / "clean"
    seed = next(k for k in range(100)  # a seed that draws both levels for these utterances
                if {synth.choose_noise(k, f"eval_0/weather_eval_0/{i:08d}.wav", [None, 10.0]) for i in range(2)}
                | {synth.choose_noise(k, f"train/alarm_train/{i:08d}.wav", [None, 10.0]) for i in range(2)}
                == {None, 10.0})
    assert run(*inputs, "--out", str(out), "--noise-snr", "none", "10", "--seed", str(seed)) == 0
    assert run(*inputs, "--out", str(clean), "--seed", str(seed)) == 0
    a, b = digests(clean), digests(out)
    wavs = [k for k in a if k.endswith(".wav")]
    assert len(wavs) == 4
    for k in wavs:
        fid = k.replace("eval_0/weather_eval/", "eval_0/weather_eval_0/")  # the file id (the release quirk)
        assert (a[k] == b[k]) == (synth.choose_noise(seed, fid, [None, 10.0]) is None), k
    assert json.loads((out / ".conslu-synth.json").read_text())["noise_snr"] == [None, 10.0]
    with pytest.raises(SystemExit):
        run(inputs[0], "--out", str(tmp_path / "bad"), "--noise-snr", "loud")


@needs_espeak
def test_filters_and_limit(tmp_path, inputs, capsys):
    out = tmp_path / "o"
    assert run(*inputs, "--out", str(out), "--splits", "eval", "--limit", "1") == 0
    ds_ids = [l.split("\t")[0] for l in (out / "manifests" / "eval.tsv").read_text().splitlines()[1:]]
    assert ds_ids == ["eval_0/weather_eval_0/00000000.wav"]
    assert not (out / "manifests" / "train.tsv").exists() and not (out / "train").exists()
    out2 = tmp_path / "o2"
    assert run(*inputs, "--out", str(out2), "--domains", "alarm") == 0
    assert sorted(p.name for p in (out2 / "manifests").iterdir()) == ["train.tsv"]
    assert run(*inputs, "--out", str(tmp_path / "o3"), "--domains", "music") == 1
    assert "no utterances" in capsys.readouterr().err
    assert run(*inputs, "--out", str(tmp_path / "o4"), "--splits", "dev") == 2


@needs_espeak
def test_resume_after_interruption(tmp_path, inputs):
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert run(*inputs, "--out", str(ref)) == 0
    assert run(*inputs, "--out", str(out)) == 0
    # simulate a killed run: manifests not yet written, one wav missing, a stale temp file
    for m in (out / "manifests").iterdir():
        m.unlink()
    victim = out / "eval_0" / "weather_eval" / "00000001.wav"
    victim.unlink()
    stale = victim.parent / ".00000001.wav.abc123.tmp"
    stale.write_bytes(b"RIFF\x00\x00")
    stale_manifest = out / "manifests" / ".eval.tsv.xyz.tmp"
    stale_manifest.write_text("file_id\n")
    kept = out / "train" / "alarm_train" / "00000000.wav"
    before = kept.stat().st_mtime_ns
    assert run(*inputs, "--out", str(out)) == 0
    assert not stale.exists() and not stale_manifest.exists()
    assert kept.stat().st_mtime_ns == before  # finished wavs are not redone
    assert digests(out) == digests(ref)


def test_a_wav_whose_text_changed_is_spoken_again(tmp_path, inputs, capsys):
    """A changed normalised text (an edited row, or a normaliser that now writes it differently)
    is spoken again; the other wavs are reused."""
    out = tmp_path / "out"
    assert run(*inputs, "--out", str(out)) == 0
    kept = out / "train" / "alarm_train" / "00000001.wav"
    changed = out / "train" / "alarm_train" / "00000000.wav"
    before = {p: p.stat().st_mtime_ns for p in (kept, changed)}
    old = changed.read_bytes()
    write_topv2(Path(inputs[1]), [("alarm", "Set an alarm for 6:45 am", ALARM[0][2].replace("6:30", "6:45")), ALARM[1]])
    capsys.readouterr()
    assert run(*inputs, "--out", str(out)) == 0
    assert "1 wav(s) written" in capsys.readouterr().err
    assert kept.stat().st_mtime_ns == before[kept] and changed.read_bytes() != old
    assert "six forty five am" in (out / "manifests" / "train.tsv").read_text()


@needs_espeak
def test_failure_mid_run_leaves_no_partial_output(tmp_path, inputs, monkeypatch, capsys):
    out = tmp_path / "out"
    real = synth.render
    calls = {"n": 0}

    def flaky(path, *a, **kw):
        calls["n"] += 1
        if path.name == "00000001.wav" and "alarm" in str(path):
            raise synth.SynthError("boom")
        return real(path, *a, **kw)

    monkeypatch.setattr(synth, "render", flaky)
    assert run(*inputs, "--out", str(out), "--jobs", "1") == 1
    assert "1 utterance(s) could not be synthesised" in capsys.readouterr().err
    assert not (out / "manifests").exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(synth, "render", real)
    assert run(*inputs, "--out", str(out)) == 0
    assert len((out / "manifests" / "train.tsv").read_text().splitlines()) == 3


@needs_espeak
def test_killed_process_resumes_to_identical_corpus(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    rows = [("alarm", f"set an alarm for {h} am number {i}", f"[IN:CREATE_ALARM set an alarm [SL:DATE_TIME for {h} am ] number {i} ]")
            for i, h in enumerate([5, 6, 7, 8, 9, 10, 11] * 6)]
    inp = str(write_topv2(src / "alarm_test.tsv", rows))
    out, ref = tmp_path / "out", tmp_path / "ref"
    cmd = [sys.executable, "-m", "conslu", "synth", inp, "--out", str(out), "--jobs", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    folder = out / "test_0" / "alarm_test"
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:
        if folder.is_dir() and len(list(folder.glob("*.wav"))) >= 3:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(folder.glob("*.wav")))
    assert 0 < done < len(rows), "the run was not interrupted mid-way"
    assert not (out / "manifests" / "test.tsv").exists()
    for wav in folder.glob("*.wav"):  # every wav that exists is complete
        assert sf.info(str(wav)).frames > 0
    assert run(inp, "--out", str(out)) == 0
    assert run(inp, "--out", str(ref)) == 0
    assert digests(out) == digests(ref)


@needs_espeak
def test_settings_conflict_is_refused(tmp_path, inputs, capsys):
    out = tmp_path / "out"
    assert run(inputs[0], "--out", str(out), "--seed", "1") == 0
    assert run(inputs[0], "--out", str(out), "--seed", "2") == 1
    err = capsys.readouterr().err
    assert "other synth settings" in err and "seed: 1 -> 2" in err


@needs_espeak
def test_bad_rows_fail_with_file_line_or_are_skipped(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    inp = write_topv2(src / "alarm_eval.tsv", [ALARM[0], ("alarm", "broken", "[IN:CREATE_ALARM broken "), ALARM[1]])
    out = tmp_path / "out"
    assert run(str(inp), "--out", str(out)) == 1
    err = capsys.readouterr().err
    assert f"{inp}:3: " in err and "malformed" in err
    assert not (out / "manifests").exists()
    with open(inp, "a") as f:
        f.write("alarm\tonly two fields\n")
    assert run(str(inp), "--out", str(out)) == 1
    assert f"{inp}:5: expected 3 fields, got 2" in capsys.readouterr().err
    assert run(str(inp), "--out", str(out), "--skip-bad") == 0
    err = capsys.readouterr().err
    assert f"skipped: {inp}:3:" in err and f"skipped: {inp}:5: expected 3 fields, got 2" in err
    ids = [l.split("\t")[0] for l in (out / "manifests" / "eval.tsv").read_text().splitlines()[1:]]
    # numbering follows the input rows, so skipping a row never renames the others
    assert ids == ["eval_0/alarm_eval_0/00000000.wav", "eval_0/alarm_eval_0/00000002.wav"]


@needs_espeak
def test_unknown_voice_and_split_from_name(tmp_path, inputs, capsys):
    assert run(inputs[0], "--out", str(tmp_path / "a"), "--voices", "en+nosuchvariant") == 1
    assert "not usable" in capsys.readouterr().err
    odd = tmp_path / "weather.tsv"
    odd.write_text(HEADER + "\t".join(WEATHER[0]) + "\n")
    assert run(str(odd), "--out", str(tmp_path / "b")) == 1
    assert "cannot tell the split" in capsys.readouterr().err
    assert run(str(tmp_path / "missing_eval.tsv"), "--out", str(tmp_path / "c")) == 1


@needs_espeak
def test_stop_manifest_as_input(tmp_path, inputs):
    first = tmp_path / "first"
    assert run(*inputs, "--out", str(first)) == 0
    again = tmp_path / "again"
    assert run(str(first / "manifests" / "eval.tsv"), str(first / "manifests" / "train.tsv"), "--out", str(again)) == 0
    assert digests(first) == digests(again)
    # a STOP root folder works too, and part-1 rows (second recording) are not spoken twice
    man = first / "manifests" / "eval.tsv"
    lines = man.read_text().splitlines()
    lines.append(lines[1].replace("eval_0/", "eval_1/", 1))
    man.write_text("\n".join(lines) + "\n")
    third = tmp_path / "third"
    assert run(str(first), "--out", str(third)) == 0
    assert digests(third) == digests(first) | {"manifests/eval.tsv": digests(again)["manifests/eval.tsv"]}


@needs_espeak
def test_two_runs_on_one_folder_are_refused(tmp_path, inputs, capsys):
    import fcntl

    out = tmp_path / "out"
    out.mkdir()
    with open(out / synth.LOCK_FILE, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert run(inputs[0], "--out", str(out)) == 1
    assert "another `conslu synth` is writing" in capsys.readouterr().err
    assert run(inputs[0], "--out", str(out)) == 0
