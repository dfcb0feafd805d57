from __future__ import annotations

import json

import pytest

from dlm.cli.main import main
from dlm.decoding.distill import distill, source_rows
from dlm.decoding.text import complete, decode_config_for, load_for_decoding
from dlm.settings import ConfigError, DistillConfig

pytestmark = pytest.mark.usefixtures("one_thread")

ROWS = [{"question": "Tom has 3 cups. How many?", "answer": "3\n#### 3"},
        {"question": "Ana has 12 pens and loses 2.", "answer": "10\n#### 10"},
        {"question": "What is 4 + 5?", "answer": "9\n#### 9"},
        {"question": "Sam reads 7 pages a day for 2 days.", "answer": "14\n#### 14"}]


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_rows_are_the_teachers_completions_with_the_reference_kept(ar_checkpoint, prompts, tmp_path):
    teacher = load_for_decoding(ar_checkpoint, device="cpu")
    decode = decode_config_for(teacher[1], max_new_tokens=6)
    settings = DistillConfig(str(prompts), str(tmp_path / "out.jsonl"), batch_size=3,
                             keep_unfinished=True)
    report = distill(teacher, source_rows(settings), settings, decode)
    want = complete(*teacher, [r["question"] for r in ROWS], decode)
    rows = _read(tmp_path / "out.jsonl")
    assert [r["answer"] for r in rows] == want.texts
    assert [r["reference"] for r in rows] == [r["answer"] for r in ROWS]
    assert [r["question"] for r in rows] == [r["question"] for r in ROWS]
    assert (report.written, report.dropped) == (4, 0)
    assert report.tokens == sum(want.output.num_generated) and "wrote 4 rows" in report.line()


def test_unfinished_completions_are_dropped(ar_checkpoint, prompts, tmp_path):
    backbone, meta = load_for_decoding(ar_checkpoint, device="cpu")
    decode = decode_config_for(meta, max_new_tokens=6)
    first = complete(backbone, meta, [ROWS[0]["question"]], decode).output.tokens[0][2]
    # the token row 0 writes third ends a turn: row 0 finishes, rows that never write it do not
    backbone.tokenizer.eos_token = backbone.tokenizer.convert_ids_to_tokens(first)
    want = complete(backbone, meta, [r["question"] for r in ROWS], decode).output.tokens
    finished = [first in ids for ids in want]
    assert finished[0] and not all(finished)
    settings = DistillConfig(str(prompts), str(tmp_path / "out.jsonl"), batch_size=2)
    report = distill((backbone, meta), source_rows(settings), settings, decode)
    kept = [r["question"] for r in _read(tmp_path / "out.jsonl")]
    assert kept == [r["question"] for r, done in zip(ROWS, finished) if done]
    assert report.dropped == finished.count(False) and "unfinished dropped" in report.line()


def test_source_rows_refuse_bad_input_before_anything_loads(prompts, tmp_path):
    out = tmp_path / "out.jsonl"
    with pytest.raises(ConfigError, match="distill.data='nope.jsonl': no such file"):
        source_rows(DistillConfig("nope.jsonl", str(out)))
    with pytest.raises(ConfigError, match="row 0 has no such field; allowed: one of \\['answer', 'question'\\]"):
        source_rows(DistillConfig(str(prompts), str(out), prompt_field="prompt", response_field="x"))
    assert len(source_rows(DistillConfig(str(prompts), str(out), limit=2))) == 2
    rest = source_rows(DistillConfig(str(prompts), str(out), skip=2, limit=2))
    assert [r["question"] for r in rest] == [r["question"] for r in ROWS[2:4]]
    with pytest.raises(ConfigError, match=f"no rows after distill.skip={len(ROWS)}"):
        source_rows(DistillConfig(str(prompts), str(out), skip=len(ROWS)))
    holed = tmp_path / "holed.jsonl"
    holed.write_text("".join(json.dumps(r if i != 3 else {"answer": "x"}) + "\n" for i, r in enumerate(ROWS)))
    with pytest.raises(ConfigError, match="row 3 has no such field"):  # numbered as in the file
        source_rows(DistillConfig(str(holed), str(out), skip=2))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ConfigError, match="distill.data='.*empty.jsonl': no rows after distill.skip=0"):
        source_rows(DistillConfig(str(tmp_path / "empty.jsonl"), str(out)))
    out.write_text("kept\n")
    with pytest.raises(ConfigError, match="distill.out=.*: exists"):
        source_rows(DistillConfig(str(prompts), str(out)))
    assert out.read_text() == "kept\n"


def test_distill_command_writes_rows_a_conversion_reads(ar_checkpoint, prompts, tmp_path, capsys):
    out = tmp_path / "distilled.jsonl"
    args = ["distill", str(ar_checkpoint), "--data", str(prompts), "--out", str(out), "--limit", "3",
            "--max-new-tokens", "4", "--keep-unfinished", "--device", "cpu", "--threads", "1"]
    assert main(args) == 0
    assert f"wrote 3 rows to {out}" in capsys.readouterr().out
    assert [set(r) for r in _read(out)] == [{"question", "answer", "reference"}] * 3
    assert main(args) == 2  # the file now exists: one error line, nothing overwritten
    assert "distill.out=" in capsys.readouterr().err and len(_read(out)) == 3
