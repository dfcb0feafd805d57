"""Build a real HF tokenizer offline (a small byte-level BPE), so tests and the tiny
default need no hub."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

EOS_TOKEN = "<|endoftext|>"
MASK_TOKEN = "<|mask|>"


def train_tokenizer(texts: Iterable[str], *, vocab_size: int = 384,
                    out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE on `texts` with EOS (also pad) and MASK special tokens.

    Digits are split one per token, as in Qwen and Llama 3, so arithmetic is learnable digit by
    digit. Any UTF-8 text still encodes (byte fallback), so real GSM8K/MMLU data runs through it.
    """
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True),
         pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN, MASK_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token=EOS_TOKEN, pad_token=EOS_TOKEN, mask_token=MASK_TOKEN
    )
    if out_dir is not None:
        hf.save_pretrained(str(out_dir))
    return hf


def tiny_tokenizer(out_dir: str | Path | None = None) -> PreTrainedTokenizerFast:
    """The embedded default's tokenizer: BPE trained on the synthetic task corpus
    (deterministic)."""
    from dlm.data.synthetic import corpus

    return train_tokenizer(corpus(2000, seed=0), vocab_size=384, out_dir=out_dir)
