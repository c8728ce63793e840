"""The command registry (`conslu.commands`), `conslu.cli.main` and the shared file loop (`conslu.runner`)."""

from __future__ import annotations

import ast
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest

from conslu import cli, commands
from conslu.runner import DecodeError, Item, run_batches, run_files

PACKAGE = Path(__file__).resolve().parents[1] / "conslu"


def test_every_command_module_has_the_interface():
    names = []
    for mod in commands.load():
        assert isinstance(mod.NAME, str) and isinstance(mod.HELP, str) and mod.HELP, mod.__name__
        if getattr(mod, "PASS_THROUGH", False):
            assert callable(mod.run_argv), mod.__name__
        else:
            assert callable(mod.add_arguments) and callable(mod.run), mod.__name__
        names.append(mod.NAME)
    assert len(names) == len(set(names))
    assert {"parse", "evaluate", "transcribe", "grammar extract", "grammar show", "train", "demo"} <= set(names)


def test_help_lists_every_command_without_heavy_imports():
    code = ("import sys\nfrom conslu.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy', 'lightning') if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    for mod in commands.load():
        assert mod.NAME.split(" ")[0] in r.stdout


def test_groups_and_pass_through_are_generic(monkeypatch, capsys):
    seen = {}

    def cmd(name, **kw):
        return types.SimpleNamespace(NAME=name, HELP=f"help of {name}", **kw)

    def echo(argv):
        seen["argv"] = argv
        return 7

    def interrupted(args):
        raise KeyboardInterrupt

    fake = [
        cmd("echo", PASS_THROUGH=True, run_argv=echo),
        cmd("box open", add_arguments=lambda p: p.add_argument("--n", type=int), run=lambda a: a.n),
        cmd("box shut", add_arguments=lambda p: None, run=lambda a: None),
        cmd("stop", add_arguments=lambda p: None, run=interrupted),
    ]
    monkeypatch.setattr(commands, "load", lambda: fake)
    assert cli.main(["echo", "--help", "--x", "1"]) == 7 and seen["argv"] == ["--help", "--x", "1"]
    assert cli.main(["box", "open", "--n", "3"]) == 3
    assert cli.main(["box", "shut"]) == 0
    assert cli.main(["stop"]) == 130
    assert capsys.readouterr().err.strip() == "conslu: interrupted"
    with pytest.raises(SystemExit):
        cli.main(["--help"])
    out = capsys.readouterr().out
    assert "box commands" in out and "help of echo" in out and "{echo,box,stop}" in out


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


DOMAIN = ("parse", "evaluate", "transcribe", "synth", "grammar", "model", "ct2", "bench", "metrics", "runner",
          "pretrained", "jsonl", "data", "audio", "decoding")


@pytest.mark.parametrize("name", DOMAIN)
def test_domain_modules_know_no_argparse(name):
    assert "argparse" not in _imports(PACKAGE / f"{name}.py")


def test_converter_does_not_know_the_registry():
    assert not any(m.startswith("conslu.pretrained") for m in _imports(PACKAGE / "ct2.py"))


# ----------------------------------------------------------------------------------------------
# conslu.runner


def _wav(path: Path, n: int) -> str:
    import soundfile as sf

    sf.write(str(path), np.zeros(n, np.float32) + 0.1, 16000)
    return str(path)


def test_run_batches_any_decode_function(tmp_path):
    files = [_wav(tmp_path / f"{i}.wav", 1600 + i) for i in range(5)]
    items = [Item(f, f) for f in files[:2]] + [Item("gone", None), Item("bad", "x", error="x: known bad")] + \
            [Item(f, f) for f in files[2:]]
    calls = []

    def decode(audios):
        calls.append(len(audios))
        return [{"n": len(a)} for a in audios]

    out = list(run_batches(decode, items, batch_size=3))
    assert [o.item.key for o in out] == [i.key for i in items]
    assert calls == [2, 2, 1]  # chunks of 3 items, only readable audio decoded
    assert [o.result["n"] for o in out if o.ok] == [1600, 1601, 1602, 1603, 1604]
    assert [o.error for o in out if not o.ok] == ["gone: no audio file", "x: known bad"]

    def broken(audios):
        raise RuntimeError("boom")

    with pytest.raises(DecodeError, match=f"batch starting at {files[0]}: RuntimeError: boom"):
        list(run_batches(broken, items, batch_size=3))


def test_run_files_stdout_and_resumable_output(tmp_path, capsys):
    files = [_wav(tmp_path / f"{i}.wav", 1600 + i) for i in range(3)]
    items = [Item(f, f, {"file": f}) for f in files]
    loads = []

    def load():
        loads.append(1)
        return "model"

    def decode(model, audios):
        assert model == "model"
        return [{"n": len(a)} for a in audios]

    def record(oc):
        return {**oc.item.meta, "n": oc.result["n"]}

    res = run_files(items, load, decode, record, batch_size=2)
    assert res.code is None and res.failed == 0 and res.written == 3 and res.todo == 3
    assert capsys.readouterr().out.splitlines()[0] == f'{{"file": "{files[0]}", "n": 1600}}'
    out = tmp_path / "o.jsonl"
    res = run_files(items[:2], load, decode, record, out=out, key=lambda r: r["file"], settings={"a": 1})
    assert res.written == 2 and len(loads) == 2
    res = run_files(items, load, decode, record, out=out, key=lambda r: r["file"], settings={"a": 1})
    assert res.written == 1 and [r["n"] for r in res.records] == [1600, 1601, 1602]
    assert f"conslu: {out}: 2 of 3 files already done, skipped" in capsys.readouterr().err
    res = run_files(items, load, decode, record, out=out, key=lambda r: r["file"], settings={"a": 1})
    assert res.todo == 0 and len(loads) == 3  # nothing left: not loaded
    res = run_files(items, load, decode, record, out=out, key=lambda r: r["file"], settings={"a": 2})
    assert res.code == 2 and "made with other settings (a: 1 -> 2)" in capsys.readouterr().err


@pytest.mark.parametrize("cuda, keep_env, expected", [
    (True, "0", "keep the installed torch 9.9.9+cu999 (CUDA is available)"),
    (False, "0", "install torch==2.14.1 torchaudio==2.11.0"),
    (None, "0", "install torch==2.14.1 torchaudio==2.11.0"),          # no torch at all
    (False, "1", "keep the installed torch (CONSLU_KEEP_TORCH=1)"),
])
def test_setup_keeps_a_torch_that_sees_a_gpu(tmp_path, cuda, keep_env, expected):
    """setup.sh's torch decision (conslu/torch_choice.py, fed to python on stdin as setup.sh does)
    in a fake environment: a torch whose CUDA is available is kept, else the CPU pair is installed."""
    import os
    import subprocess
    import sys

    fake = tmp_path / "site" / "torch"
    fake.mkdir(parents=True)
    if cuda is None:
        (fake / "__init__.py").write_text("raise ImportError('no torch here')\n")
    else:
        (fake / "__init__.py").write_text(
            f"__version__ = '9.9.9+cu999'\nclass cuda:\n    @staticmethod\n    def is_available():\n        return {cuda}\n")
    repo = Path(__file__).resolve().parents[1]
    script = repo / "conslu" / "torch_choice.py"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site"), "CONSLU_KEEP_TORCH": keep_env}
    with open(script, encoding="utf-8") as stdin:
        out = subprocess.run([sys.executable, "-"], stdin=stdin, env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == expected
    assert "conslu/torch_choice.py" in (repo / "setup.sh").read_text()
