"""`conslu bench`: output keys, table, plot (fast) and one real --quick run (slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conslu.bench import KEYS, demo_examples, plot, table


def _fake() -> dict:
    res = {k: 1.0 for k in KEYS}
    res.update({k: 1.0 for k in ("constrained_overhead_loop_b1", "loss_overhead_with_states", "parse_vs_transcribe_plain",
                                 "speculative_speedup_total", "speculative_speedup_vs_generate", "speculative_speedup_b16",
                                 "decoder_passes_per_token_total")})
    res.update({"speculative_speedup": 2.0, "loss_overhead": 1.2, "model": "m", "trained": True, "device": "cpu",
                "utterances": 2, "batch": 4, "draft_len": 8, "repeats": 1, "seconds": {"a_s": 0.5},
                "per_utterance": [{"tokens": n, "unconstrained_s": 0.1 * n, "constrained_s": 0.11 * n,
                                   "speculative_s": 0.07 * n} for n in (12, 30)]})
    return res


def test_table_marks_targets():
    text = table(_fake())
    assert "speculative_speedup" in text and "MISSED" in text.split("loss_overhead ")[1].splitlines()[0]
    assert "ok" in text.split("speculative_speedup ")[1].splitlines()[0]


def test_encoder_plot_writes_png(tmp_path):
    from conslu.bench import plot_encoder

    out = tmp_path / "enc.png"
    plot_encoder([{"seconds": 2.0, "context_s": 0.1, "window_s": 1.0}, {"seconds": 30.0, "context_s": 1.0, "window_s": 1.0}], out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and [p.name for p in tmp_path.iterdir()] == ["enc.png"]


def test_plot_writes_png(tmp_path):
    out = tmp_path / "sub" / "decode.png"
    plot(_fake(), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["decode.png"]  # no temporary left behind


def test_demo_examples_spread_over_lengths():
    ex = demo_examples(5)
    assert len(ex) == 5
    lengths = [len(t.split()) for t, _ in ex]
    assert lengths == sorted(lengths) and lengths[-1] > lengths[0]
    assert all(lf.startswith("[IN:") for _, lf in ex)


def test_bench_rejects_bad_threads():
    r = subprocess.run([sys.executable, "-m", "conslu", "bench", "--threads", "0"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 2 and "--threads must be >= 1" in r.stderr


@pytest.mark.slow
def test_bench_quick_json_has_all_keys(tmp_path):
    png, enc_png = tmp_path / "d.png", tmp_path / "e.png"
    r = subprocess.run([sys.executable, "-m", "conslu", "bench", "--quick", "--json", "--threads", "1", "--plot", str(png),
                        "--plot-encoder", str(enc_png)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    for k in KEYS:
        assert k in res, k
    assert res["speculative_identical"] == 1.0
    assert 0 < res["decoder_passes_per_token"] <= 1.0
    assert png.is_file() and enc_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["seconds"] for r in res["encoder_curve"]] == [2, 4, 6, 10, 15, 20, 30]
    assert res["encoder_speedup"] > 0 and res["parse_utt_per_s"] > 0
    assert "peer" in res  # measured, or skipped with the reason
    assert res["device"] == "cpu (1 threads)"
    assert set(res["profile_ms"]) >= {"pass_ms_1", "pass_ms_9", "projection_full_ms", "projection_compact_ms"}
