"""Model loading: HF backbones with a [MASK] token, the offline tokenizer,
dlm checkpoint folders."""
