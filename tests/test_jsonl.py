"""JSON-lines helpers: file:line errors, atomic writes, the resumable writer."""

from __future__ import annotations

import json
import os

import pytest

from conslu.jsonl import (JSONLError, ResumableWriter, atomic_write_json, atomic_write_jsonl, atomic_write_text,
                          read_jsonl)


def test_read_reports_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n', encoding="utf-8")
    with pytest.raises(JSONLError, match=r"x\.jsonl:4: invalid JSON"):
        read_jsonl(p)
    p.write_text('{"a": 1}\n[1, 2]\n', encoding="utf-8")
    with pytest.raises(JSONLError, match=r"x\.jsonl:2: expected a JSON object, got list"):
        read_jsonl(p)
    p.write_bytes(b'{"a": 1}\n{"a": "\xff"}\n')
    with pytest.raises(JSONLError, match=r"x\.jsonl:2: not UTF-8"):
        read_jsonl(p)
    with pytest.raises(JSONLError, match=r"missing\.jsonl: cannot read"):
        read_jsonl(tmp_path / "missing.jsonl")


def test_read_truncated_tail_only_when_allowed(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\n{"a": 2}\n{"a": 3, "b', encoding="utf-8")
    with pytest.raises(JSONLError, match=":3:"):
        read_jsonl(p)
    assert read_jsonl(p, allow_truncated_tail=True) == [{"a": 1}, {"a": 2}]
    # a bad line that is not the last one is never excused
    p.write_text('{"a": 1}\n{"a": \n{"a": 3}', encoding="utf-8")
    with pytest.raises(JSONLError, match=":2:"):
        read_jsonl(p, allow_truncated_tail=True)


def test_atomic_writes_replace_and_leave_no_temp(tmp_path):
    p = tmp_path / "sub" / "out.jsonl"
    atomic_write_jsonl(p, [{"a": "é"}, {"b": [1, 2]}])
    assert p.read_text(encoding="utf-8") == '{"a": "é"}\n{"b": [1, 2]}\n'
    atomic_write_json(p, {"x": 1})
    assert json.loads(p.read_text()) == {"x": 1}
    atomic_write_text(p, "hello")
    assert p.read_text() == "hello"
    assert os.listdir(p.parent) == ["out.jsonl"]
    with pytest.raises(ValueError):
        atomic_write_json(p, {"x": float("nan")})  # refused, old content kept
    assert p.read_text() == "hello"
    assert os.listdir(p.parent) == ["out.jsonl"]


def test_resumable_writer_appends_and_skips_done(tmp_path):
    p = tmp_path / "pred.jsonl"
    with ResumableWriter(p, key=lambda r: r["id"]) as w:
        assert w.done == set() and w.records == []
        w.write({"id": "a", "v": 1})
        w.write({"id": "b", "v": 2})
        w.write({"id": "a", "v": 99})  # already there: ignored
        # flushed line by line: visible before close
        assert p.read_text().splitlines() == ['{"id": "a", "v": 1}', '{"id": "b", "v": 2}']
    with ResumableWriter(p, key=lambda r: r["id"]) as w:
        assert w.done == {"a", "b"} and "a" in w and "c" not in w
        w.write({"id": "c", "v": 3})
        assert w.written == 1
    assert [r["id"] for r in read_jsonl(p)] == ["a", "b", "c"]


def test_resumable_writer_drops_incomplete_last_line(tmp_path):
    p = tmp_path / "pred.jsonl"
    p.write_text('{"id": "a"}\n{"id": "b"}\n{"id": "c", "tra', encoding="utf-8")
    warnings: list[str] = []
    with ResumableWriter(p, key=lambda r: r["id"], warn=warnings.append) as w:
        assert w.done == {"a", "b"} and w.dropped_tail
        w.write({"id": "c"})
    assert p.read_text() == '{"id": "a"}\n{"id": "b"}\n{"id": "c"}\n'
    assert len(warnings) == 1 and "pred.jsonl:3: dropped an incomplete last line" in warnings[0]
    # even a parseable line without its newline is dropped: it may be cut inside a value
    p.write_text('{"id": "a"}\n{"id": "b"}', encoding="utf-8")
    with ResumableWriter(p, key=lambda r: r["id"], warn=warnings.append) as w:
        assert w.done == {"a"}
    assert p.read_text() == '{"id": "a"}\n'


def test_resumable_writer_refuses_corrupt_or_duplicate_lines(tmp_path):
    p = tmp_path / "pred.jsonl"
    p.write_text('{"id": "a"}\nnot json\n{"id": "b"}\n', encoding="utf-8")
    with pytest.raises(JSONLError, match=r"pred\.jsonl:2: invalid JSON"):
        ResumableWriter(p, key=lambda r: r["id"])
    p.write_text('{"id": "a"}\n{"id": "a"}\n', encoding="utf-8")
    with pytest.raises(JSONLError, match=r"pred\.jsonl:2: duplicate record for 'a'"):
        ResumableWriter(p, key=lambda r: r["id"])
    p.write_text('{"id": "a"}\n{"x": 1}\n', encoding="utf-8")
    with pytest.raises(JSONLError, match=r"pred\.jsonl:2: record has no usable key"):
        ResumableWriter(p, key=lambda r: r["id"])
    assert p.read_text() == '{"id": "a"}\n{"x": 1}\n'  # untouched


@pytest.mark.skipif(os.name != "posix", reason="flock is POSIX")
def test_resumable_writer_is_exclusive(tmp_path):
    p = tmp_path / "pred.jsonl"
    with ResumableWriter(p, key=lambda r: r["id"]):
        with pytest.raises(JSONLError, match="in use by another"):
            ResumableWriter(p, key=lambda r: r["id"])
    with ResumableWriter(p, key=lambda r: r["id"]):  # released on close
        pass
