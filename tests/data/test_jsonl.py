"""JSON Lines files: read whole (blank lines skipped, only '\\n' ends a line), written atomically."""

from __future__ import annotations

import json

from dlm.data.jsonl import read_jsonl, write_jsonl


def test_written_rows_read_back_equal(tmp_path):
    rows = [{"prompt": "Tom has 3 apples", "answer": "3"}, {"nested": {"a": [1, 2.5, None, True]}},
            {"text": "caf\u00e9 \u2028 \u2603 \U0001f600", "quote": 'say "hi"\n'}, {}]
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, rows)
    assert read_jsonl(path) == rows
    assert len(path.read_text(encoding="utf-8").splitlines()) == len(rows)


def test_writing_again_replaces_the_whole_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"i": i} for i in range(5)])
    write_jsonl(path, [{"i": 9}])
    assert read_jsonl(path) == [{"i": 9}]


def test_empty_rows_write_an_empty_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [])
    assert path.read_text() == "" and read_jsonl(path) == []


def test_blank_and_whitespace_only_lines_are_skipped(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('\n{"a": 1}\n\n   \n\t\n{"a": 2}\n\n', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_last_line_without_newline_is_read(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{"a": 2}', encoding="utf-8")
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]


def test_raw_line_separators_inside_a_string_are_kept(tmp_path):
    # json.dumps would escape them; files from elsewhere may hold them raw, and str.splitlines would split there
    text = "first\u2028second\u2029third\x85fourth"
    path = tmp_path / "raw.jsonl"
    path.write_text(json.dumps({"text": text}, ensure_ascii=False) + "\n" + '{"n": 2}\n', encoding="utf-8")
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_jsonl(path) == [{"text": text}, {"n": 2}]


def test_atomic_write_leaves_no_temporary_file(tmp_path):
    path = tmp_path / "rows.jsonl"
    write_jsonl(path, [{"a": 1}])
    write_jsonl(path, [{"a": 2}])
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]
