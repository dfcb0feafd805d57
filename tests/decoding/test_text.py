from __future__ import annotations

import pytest
import torch

from dlm.cli.main import main
from dlm.decoding.engine import generate
from dlm.decoding.text import complete, decode_config_for, encode_prompts, left_pad, load_for_decoding, pad_token_id
from dlm.models.checkpoint import CheckpointMeta
from tests.conftest import make_backbone, save_tiny

PROMPTS = ["Question: Tom has 3 cups.\nAnswer:", "Question: Ana has 12 pens. Ana loses 2. How many?\nAnswer:"]


@pytest.fixture
def checkpoint(tokenizer, tmp_path):
    return save_tiny(make_backbone("qwen3", tokenizer), tmp_path / "ckpt")


def test_decode_config_follows_checkpoint_then_overrides():
    meta = CheckpointMeta("block", 8, "<|mask|>", 1, shift=True)
    cfg = decode_config_for(meta, threshold=0.5, block_size=None)
    assert (cfg.block_size, cfg.shift, cfg.threshold) == (8, True, 0.5)


def test_complete_matches_decoder_on_left_padded_batch(checkpoint):
    bb, meta = load_for_decoding(checkpoint, device="cpu")
    decode = decode_config_for(meta, max_new_tokens=8, threshold=0.5)
    result = complete(bb, meta, PROMPTS, decode)
    ids, attention = encode_prompts(bb, PROMPTS)
    assert attention[0, 0] == 0 and attention[:, -1].all()  # left padding
    direct = generate(bb.model, ids, attention_mask=attention, mask_token_id=bb.mask_token_id, config=decode,
                      eos_token_id=bb.tokenizer.eos_token_id)
    assert result.output.tokens == direct.tokens
    assert len(result.texts) == 2 and result.tokens_per_sec > 0


def test_encoded_prompts_match_the_tokenizers_own_left_padding(qwen3):
    ids, attention = encode_prompts(qwen3, PROMPTS)
    want = qwen3.tokenizer(PROMPTS, padding=True, padding_side="left", return_tensors="pt", add_special_tokens=False)
    assert torch.equal(ids, want["input_ids"]) and torch.equal(attention, want["attention_mask"])
    no_pad = type("Tok", (), {"pad_token_id": None, "eos_token_id": 5})
    assert pad_token_id(no_pad) == 5 and pad_token_id(qwen3.tokenizer) == qwen3.tokenizer.pad_token_id
    torch.testing.assert_close(left_pad([[1, 2], [3]], 9),
                               (torch.tensor([[1, 2], [9, 3]]), torch.tensor([[1, 1], [0, 1]])))


def test_generate_command_prints_completion_and_stats(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", PROMPTS[0], "--max-new-tokens", "8", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "--- completion" in out and "NFE" in out and "TPF" in out and "block 4, threshold 0.9" in out


def test_generate_command_ar_baseline(checkpoint, capsys):
    import dlm.settings.errors as errors

    errors._DEPRECATED.discard("dlm generate --ar")  # said once per process
    assert main(["generate", str(checkpoint), "--prompt", PROMPTS[1], "--max-new-tokens", "4", "--ar",
                 "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "AR mode of the dLM" in captured.out
    assert "deprecated: dlm generate --ar; use --mode ar" in captured.err


def test_generate_command_bad_input_is_one_line(checkpoint, tmp_path, capsys):
    assert main(["generate", str(tmp_path), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: checkpoint={str(tmp_path)!r}: no dlm.yaml and no config.json; allowed: a dlm checkpoint (dlm train "
        "exports one to <output_dir>/final), a plain HF causal LM folder or hub id, a .gguf file")
    assert main(["generate", str(checkpoint), "--prompt", "x", "--threshold", "1.5"]) == 2
    assert capsys.readouterr().err.strip() == "error: decode.threshold=1.5: must be in (0, 1]"
    assert main(["generate", str(checkpoint), "--prompt", "x", "--max-new-tokens", "1000"]) == 2
    assert "exceeds model.config.max_position_embeddings=256" in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_plain_hf_folder_decodes_as_transformers_generate(tokenizer, tmp_path, capsys, dtype):
    bb = make_backbone("llama", tokenizer)
    with torch.no_grad():
        bb.model.lm_head.weight.mul_(30.0)  # confident: no near-ties for bf16 rounding to flip
    bb.model.save_pretrained(tmp_path)  # no dlm.yaml: a plain HF causal LM
    tokenizer.save_pretrained(tmp_path)
    assert main(["generate", str(tmp_path), "--prompt", PROMPTS[0], "--max-new-tokens", "12", "--mode", "ar",
                 "--dtype", dtype, "--threads", "1", "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("used as a plain causal LM") == 1
    assert f"--- stats (AR model, {dtype})" in captured.out
    text = captured.out.split("--- completion\n")[1].split("\n--- stats")[0]
    model = bb.model.to(getattr(torch, dtype))
    ids = tokenizer(PROMPTS[0], add_special_tokens=False, return_tensors="pt")["input_ids"]
    want = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
    assert text == tokenizer.decode(want[0, ids.shape[1]:], skip_special_tokens=True)


def test_chat_without_a_template_or_bad_threads_is_one_line(checkpoint, capsys):
    assert main(["generate", str(checkpoint), "--prompt", "x", "--chat", "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: --chat=true: the tokenizer")
    assert main(["generate", str(checkpoint), "--prompt", "x", "--threads", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --threads=0: must be a positive integer"
