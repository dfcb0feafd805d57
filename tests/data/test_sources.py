"""`dlm.data.sources`: tokenizing (eligible tokens, block padding), packing, and local paths checked before loading."""

from __future__ import annotations

import json

import pytest

from dlm.data.sources import check_source, pack_rows, tokenize_rows
from dlm.data.synthetic import format_example, problems, synthetic_dir
from dlm.settings import ConfigError
from tests.data.test_datamodule import _cfg


def test_tokenize_marks_only_response_and_eos_eligible(tokenizer, tmp_path):
    cfg = _cfg(tmp_path).data
    row = format_example({"question": "Tom has 3 cups.", "answer": "3\n#### 3"})
    out = tokenize_rows({"prompt": [row["prompt"]], "response": [row["response"]]}, tokenizer=tokenizer, cfg=cfg,
                        block_size=4)
    ids, eligible = out["input_ids"][0], out["eligible"][0]
    n_prompt = len(tokenizer(row["prompt"], add_special_tokens=False)["input_ids"])
    assert ids[-1] == tokenizer.eos_token_id
    assert eligible == [0] * n_prompt + [1] * (len(ids) - n_prompt)
    assert tokenizer.decode(ids[:-1]) == row["text"]


def test_pad_to_block_pads_each_document_with_eos(tokenizer, tmp_path):
    cfg = _cfg(tmp_path, "data.pad_to_block=true", "data.prompt_field=null", "data.response_field=null").data
    out = tokenize_rows({"text": ["a b c", "Question: 12"]}, tokenizer=tokenizer, cfg=cfg, block_size=4)
    for ids in out["input_ids"]:
        assert len(ids) % 4 == 0 and ids[-1] == tokenizer.eos_token_id


def test_pack_cuts_fixed_chunks_in_order():
    out = pack_rows({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "eligible": [[0, 1, 1], [1, 1], [0, 0, 1, 1]]},
                    max_length=4)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["eligible"] == [[0, 1, 1, 1], [1, 0, 0, 1]]


def test_pack_with_document_ids_labels_each_token_with_its_document():
    out = pack_rows({"input_ids": [[1, 2, 3], [4, 5], [6, 7, 8, 9]], "eligible": [[1] * 3, [1] * 2, [1] * 4]},
                    max_length=4, document_ids=True)
    assert out["input_ids"] == [[1, 2, 3, 4], [5, 6, 7, 8]]
    assert out["document_ids"] == [[0, 0, 0, 1], [1, 2, 2, 2]]


def test_unknown_local_path_fails_before_loading(tmp_path):
    with pytest.raises(ConfigError, match=r"^data.path='./nope.jsonl': no such file or folder"):
        check_source(_cfg(tmp_path, "data.path=./nope.jsonl").data)


def test_synthetic_test_split_is_disjoint_from_train(tmp_path):
    root = synthetic_dir(_cfg(tmp_path).data)
    train = {json.loads(line)["question"] for line in (root / "train.jsonl").read_text().splitlines()}
    test = [json.loads(line) for line in (root / "test.jsonl").read_text().splitlines()]
    assert test and not {r["question"] for r in test} & train
    assert all(r["answer"].rsplit("#### ", 1)[1].isdigit() for r in test)


def test_synthetic_generation_is_deterministic():
    assert list(problems(5, seed=3)) == list(problems(5, seed=3))
