"""GGUF sources and `dlm import`: a tiny Llama written as a real GGUF file (F32 tensors under llama.cpp's names,
Q/K permuted as llama.cpp's converter does, a byte-level BPE vocabulary in the metadata) loads with the original
model's logits, imports to a plain HF folder, and reads as a causal AR checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from torch import Tensor
from torch.testing import assert_close
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from dlm.cli.main import main
from dlm.models.backbone import load_backbone, load_model, load_tokenizer
from dlm.models.checkpoint import META_FILE, load_checkpoint, read_meta
from dlm.models.importing import import_model
from dlm.models.tokenizer import EOS_TOKEN, MASK_TOKEN
from dlm.settings import ConfigError, ModelConfig

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 384
"""The tiny tokenizer's size (`<|endoftext|>` is id 0, `<|mask|>` id 1)."""
ROPE_THETA = 500_000.0
"""Not LlamaConfig's default (10000), so the logits only match if the file's `rope.freq_base` is read."""
RMS_EPS = 1e-5


# -- a tiny Llama as a GGUF file ---------------------------------------------------------------------------
def tiny_llama(*, tied: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         rms_norm_eps=RMS_EPS, rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
                         tie_word_embeddings=tied, eos_token_id=0, bos_token_id=0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms of ones would hide a norm weight written to the wrong tensor
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
    return model


def llama_cpp_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's Q/K row order (rotary halves interleaved); transformers reverses it on load."""
    return (weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def gguf_tensors(model: LlamaForCausalLM) -> dict[str, np.ndarray]:
    """The model's weights under llama.cpp's tensor names, as float32 arrays; no `output.weight` when tied."""
    cfg = model.config
    hf = {name: t.detach().float().numpy().copy() for name, t in model.state_dict().items()}
    tensors = {"token_embd.weight": hf["model.embed_tokens.weight"], "output_norm.weight": hf["model.norm.weight"]}
    if not cfg.tie_word_embeddings:
        tensors["output.weight"] = hf["lm_head.weight"]
    for i in range(cfg.num_hidden_layers):
        layer = lambda name: hf[f"model.layers.{i}.{name}.weight"]  # noqa: E731
        tensors |= {
            f"blk.{i}.attn_norm.weight": layer("input_layernorm"),
            f"blk.{i}.attn_q.weight": llama_cpp_permute(layer("self_attn.q_proj"), cfg.num_attention_heads),
            f"blk.{i}.attn_k.weight": llama_cpp_permute(layer("self_attn.k_proj"), cfg.num_key_value_heads),
            f"blk.{i}.attn_v.weight": layer("self_attn.v_proj"),
            f"blk.{i}.attn_output.weight": layer("self_attn.o_proj"),
            f"blk.{i}.ffn_norm.weight": layer("post_attention_layernorm"),
            f"blk.{i}.ffn_gate.weight": layer("mlp.gate_proj"),
            f"blk.{i}.ffn_up.weight": layer("mlp.up_proj"),
            f"blk.{i}.ffn_down.weight": layer("mlp.down_proj"),
        }
    return tensors


def add_bpe_tokenizer(writer: gguf.GGUFWriter, tokenizer_dir: Path) -> None:
    """The tokenizer.json's vocabulary and merges as a llama.cpp "gpt2" (byte-level BPE) tokenizer."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab: dict[str, int] = spec["model"]["vocab"]
    special = {token["content"] for token in spec["added_tokens"] if token["special"]}
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]])
    writer.add_bos_token_id(vocab[EOS_TOKEN])
    writer.add_eos_token_id(vocab[EOS_TOKEN])
    writer.add_pad_token_id(vocab[EOS_TOKEN])


def write_gguf(model: LlamaForCausalLM, tokenizer_dir: Path, path: Path) -> Path:
    """`model` as an unquantized (F32) llama GGUF file with the tiny tokenizer in its metadata."""
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny-llama")
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(ROPE_THETA)
    writer.add_layer_norm_rms_eps(RMS_EPS)
    add_bpe_tokenizer(writer, tokenizer_dir)
    for name, array in gguf_tensors(model).items():
        writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture(scope="module")
def llama() -> LlamaForCausalLM:
    return tiny_llama(tied=False)


@pytest.fixture(scope="module")
def gguf_path(llama, tokenizer_dir, tmp_path_factory) -> Path:
    return write_gguf(llama, tokenizer_dir, tmp_path_factory.mktemp("gguf") / "tiny-llama-f32.gguf")


@pytest.fixture(scope="module")
def imported(gguf_path, tmp_path_factory) -> Path:
    return import_model(str(gguf_path), tmp_path_factory.mktemp("imported") / "tiny-llama")


def logits(model: PreTrainedModel, ids: Tensor) -> Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


def token_ids(seed: int = 0) -> Tensor:
    return torch.randint(2, VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))


# -- loading a GGUF file -----------------------------------------------------------------------------------
def test_the_file_holds_permuted_q_and_k(llama, gguf_path):
    """Guards the fixture: a loader that skipped the un-permute would then give other logits."""
    stored = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    assert {t.tensor_type for t in stored.values()} == {gguf.GGMLQuantizationType.F32}
    q_proj = llama.model.layers[0].self_attn.q_proj.weight.detach().numpy()
    q_file = np.asarray(stored["blk.0.attn_q.weight"].data).reshape(q_proj.shape)
    assert not np.array_equal(q_file, q_proj) and np.array_equal(llama_cpp_permute(q_proj, 4), q_file)


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_gguf_backbone_gives_the_original_models_logits(tied, tokenizer_dir, tmp_path):
    original = tiny_llama(tied=tied, seed=1)
    path = write_gguf(original, tokenizer_dir, tmp_path / "model.gguf")
    bb = load_backbone(ModelConfig(name_or_path=str(path)))
    assert type(bb.model) is LlamaForCausalLM and bb.model.dtype == torch.float32
    assert not hasattr(bb.model.config, "quantization_config")  # a plain dense model, not a GGUF-quantized one
    assert bb.model.config.tie_word_embeddings is tied
    # The vocabulary already holds <|mask|>: it becomes the mask token and the embeddings keep their size.
    assert bb.mask_token_id == 1 and bb.model.get_input_embeddings().weight.shape[0] == VOCAB
    ids = token_ids()
    assert_close(logits(bb.model, ids), logits(original, ids))


def test_gguf_tokenizer_is_the_tiny_vocabulary_with_its_special_ids(gguf_path, tokenizer):
    loaded = load_tokenizer(ModelConfig(name_or_path=str(gguf_path)))
    assert loaded.get_vocab() == tokenizer.get_vocab()
    assert (loaded.eos_token, loaded.eos_token_id, loaded.bos_token_id) == (EOS_TOKEN, 0, 0)
    assert loaded.convert_tokens_to_ids(MASK_TOKEN) == 1


def test_load_model_of_a_gguf_casts_to_the_configured_dtype(llama, gguf_path):
    cfg = ModelConfig(name_or_path=str(gguf_path), dtype="bfloat16")
    model = load_model(cfg, load_tokenizer(cfg))
    assert model.dtype == torch.bfloat16
    assert_close(model.lm_head.weight, llama.lm_head.weight.to(torch.bfloat16))


# -- dlm import ------------------------------------------------------------------------------------------
def test_import_writes_a_causal_folder_recording_its_source(imported, gguf_path):
    names = {p.name for p in imported.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", META_FILE} <= names
    meta = yaml.safe_load((imported / META_FILE).read_text())
    assert meta["pattern"] == "causal" and meta["mask_token_id"] is None
    assert meta["source"] == f"{gguf_path.resolve()} (GGUF, dequantized)"
    assert "quantization_config" not in json.loads((imported / "config.json").read_text())


def test_imported_folder_loads_in_plain_transformers_with_the_same_logits(imported, llama):
    plain = AutoModelForCausalLM.from_pretrained(imported).eval()
    assert plain.dtype == torch.float32
    ids = token_ids(seed=2)
    assert_close(logits(plain, ids), logits(llama, ids))


def test_import_dtype_bfloat16_writes_bf16_weights(gguf_path, llama, tmp_path):
    out = import_model(str(gguf_path), tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
        lm_head = f.get_tensor("lm_head.weight")
    assert dtypes == {"BF16"}
    assert_close(lm_head, llama.lm_head.weight.to(torch.bfloat16))


def test_import_rejects_an_unknown_dtype(gguf_path, tmp_path):
    with pytest.raises(ConfigError, match=r"--dtype='int8': unknown weight dtype"):
        import_model(str(gguf_path), tmp_path / "out", dtype="int8")  # type: ignore[arg-type]


# -- reading AR checkpoints without dlm.yaml --------------------------------------------------------------
def test_read_meta_of_an_imported_folder_is_causal_with_its_source(imported, gguf_path):
    meta = read_meta(imported)
    assert (meta.pattern, meta.mask_token_id) == ("causal", None)
    assert meta.source.startswith(str(gguf_path.resolve()))


def test_read_meta_of_a_plain_hf_folder_is_causal_with_one_note(tmp_path, tokenizer, capsys):
    tiny_llama(tied=True).save_pretrained(tmp_path)  # no dlm.yaml
    tokenizer.save_pretrained(tmp_path)
    capsys.readouterr()  # drop the progress bar of the save
    meta = read_meta(tmp_path)
    assert (meta.pattern, meta.mask_token_id, meta.source) == ("causal", None, str(tmp_path))
    note = capsys.readouterr().err.strip().splitlines()
    assert len(note) == 1 and note[0].startswith(f"note: {tmp_path}: no {META_FILE}")


def test_read_meta_of_a_gguf_file_is_causal(gguf_path, capsys):
    assert read_meta(gguf_path, quiet=True).pattern == "causal"
    assert capsys.readouterr().err == ""


def test_read_meta_of_a_folder_without_dlm_yaml_or_config_names_it(tmp_path):
    (tmp_path / "notes.txt").write_text("not a model")
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"^checkpoint='{where}': no {META_FILE} and no config.json") as err:
        read_meta(tmp_path)
    assert "\n" not in str(err.value)


def test_load_checkpoint_of_an_imported_folder_gives_the_original_logits(imported, llama):
    bb, meta = load_checkpoint(imported)
    assert meta.pattern == "causal" and bb.mask_token_id == bb.tokenizer.convert_tokens_to_ids(MASK_TOKEN)
    ids = token_ids(seed=3)
    assert_close(logits(bb.model, ids), logits(llama, ids))


# -- the CLI -----------------------------------------------------------------------------------------------
def test_cli_import_returns_0_and_prints_the_output_path(gguf_path, tmp_path, capsys):
    out = tmp_path / "cli-imported"
    assert main(["import", str(gguf_path), str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert read_meta(out).pattern == "causal"


def test_cli_import_of_a_missing_gguf_is_one_error_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "absent.gguf"
    assert main(["import", str(missing), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and str(missing) in err[0]
    assert not (tmp_path / "out").exists()
