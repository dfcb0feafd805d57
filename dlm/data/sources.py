"""Raw text in, packed token rows out: a hub id, a local file or folder, or the synthetic task,
loaded with `datasets`, tokenized and packed through `Dataset.map` (so `datasets` caches it; lazily
for a stream).

Rows become ``ids + [EOS]`` (SFT rows: ``prompt ids + response ids + [EOS]``, only the response and
EOS eligible for noise and loss; with `data.chat_template` or `data.messages_field`, the
conversation rendered by the tokenizer's chat template, only assistant turns eligible:
`dlm.data.chat`), optionally padded with EOS to a block multiple so no block spans two documents
(Fast-dLLM v2), then concatenated and cut into `max_length` chunks (with `data.document_mask`, each
chunk also carries per-token document ids).
"""

from __future__ import annotations

from pathlib import Path

from datasets import Dataset, IterableDataset, load_dataset
from datasets.exceptions import DatasetGenerationError
from datasets.utils import logging as ds_logging
from transformers import PreTrainedTokenizerBase

from dlm.data.chat import as_messages, chat_format_of, conversation_tokens
from dlm.data.synthetic import synthetic_dir
from dlm.settings import SYNTHETIC, ConfigError, DataConfig

LOCAL_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".txt": "text",
                  ".csv": "csv"}
AnyDataset = Dataset | IterableDataset


def check_source(cfg: DataConfig) -> None:
    """Fail in one line on a local path that does not exist, before anything is loaded."""
    if cfg.path == SYNTHETIC:
        return
    path = Path(cfg.path)
    looks_local = cfg.path.startswith((".", "/", "~")) or path.suffix in LOCAL_BUILDERS
    if looks_local and not path.expanduser().exists():
        raise ConfigError(f"data.path={cfg.path!r}: no such file or folder; "
                          f"allowed: a local file/folder, an HF dataset id, {SYNTHETIC}")


def load_raw(cfg: DataConfig, split: str) -> AnyDataset:
    """One split of the raw dataset: synthetic, a local file or folder, or a hub id
    (a stream if `streaming`)."""
    check_source(cfg)
    stream = cfg.streaming
    if cfg.path == SYNTHETIC:
        root = synthetic_dir(cfg)
        files = {"train": str(root / "train.jsonl"), "test": str(root / "test.jsonl")}
        return load_dataset("json", data_files=files, split=split, streaming=stream)
    path = Path(cfg.path).expanduser()
    verbosity = ds_logging.get_verbosity()
    # a parse error is reported below in one line; datasets would also log it, with a traceback
    if path.is_file():
        ds_logging.set_verbosity(ds_logging.CRITICAL)
    try:
        if path.is_file():
            builder = LOCAL_BUILDERS.get(path.suffix, "text")
            return load_dataset(builder, data_files={split: str(path)}, split=split,
                                streaming=stream)
        source = str(path) if path.is_dir() else cfg.path
        return load_dataset(source, cfg.name, split=split, streaming=stream)
    except StopIteration:
        # the json builder reads a first table to infer features: an empty file has none
        raise ConfigError(f"data.path={cfg.path!r}: no rows in split {split!r} "
                          "(empty file)") from None
    except (FileNotFoundError, ValueError, ConnectionError, DatasetGenerationError) as err:
        # the parser's own error
        shown = (err.__cause__ or err) if isinstance(err, DatasetGenerationError) else err
        first = (str(shown).strip().splitlines() or [type(shown).__name__])[0]
        raise ConfigError(f"data.path={cfg.path!r}: cannot load split {split!r} "
                          f"({first})") from None
    finally:
        ds_logging.set_verbosity(verbosity)


def tokenize_rows(batch: dict[str, list], *, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                  block_size: int) -> dict[str, list]:
    """Batched map fn: ids and per-token `eligible` flags (1 = may be noised and scored)."""
    eos = tokenizer.eos_token_id
    if cfg.chat_template or cfg.messages_field:
        docs = _conversations(batch, tokenizer, cfg)
    elif cfg.prompt_field and cfg.response_field:
        prompts = tokenizer(batch[cfg.prompt_field], add_special_tokens=False)["input_ids"]
        responses = tokenizer(batch[cfg.response_field], add_special_tokens=False)["input_ids"]
        docs = [(p + r + [eos], [0] * len(p) + [1] * (len(r) + 1))
                for p, r in zip(prompts, responses)]
    else:
        texts = tokenizer(batch[cfg.text_field], add_special_tokens=False)["input_ids"]
        docs = [(t + [eos], [1] * (len(t) + 1)) for t in texts]
    if cfg.pad_to_block:
        # EOS padding stays eligible: the model must learn to fill a block's tail with EOS to stop.
        docs = [(ids + [eos] * (-len(ids) % block_size), el + [1] * (-len(ids) % block_size))
                for ids, el in docs]
    return {"input_ids": [d[0] for d in docs], "eligible": [d[1] for d in docs]}


def _conversations(batch: dict[str, list], tokenizer: PreTrainedTokenizerBase,
                   cfg: DataConfig) -> list[tuple[list[int], list[int]]]:
    """Rows rendered by the chat template; the template's end-of-turn token ends each
    document (no extra EOS)."""
    chat = chat_format_of(tokenizer, cfg.system_prompt)
    if cfg.messages_field:
        key = f"data.messages_field={cfg.messages_field!r}"
        conversations = [as_messages(row, key=key) for row in batch[cfg.messages_field]]
    else:
        conversations = [chat.messages(p) + [{"role": "assistant", "content": r}]
                         for p, r in zip(batch[cfg.prompt_field], batch[cfg.response_field])]
    return [conversation_tokens(tokenizer, chat, c) for c in conversations]


def pack_rows(batch: dict[str, list], *, max_length: int,
              document_ids: bool = False) -> dict[str, list]:
    """Batched map fn: concatenate documents and cut fixed-length chunks (the remainder is dropped).

    With `document_ids`, each chunk also carries per-token document ids (distinct for the documents
    of a chunk).
    """
    out: dict[str, list] = {}
    if document_ids:
        doc_ids = [[j] * len(row) for j, row in enumerate(batch["input_ids"])]
        batch = dict(batch, document_ids=doc_ids)
    for key in ("input_ids", "eligible") + (("document_ids",) if document_ids else ()):
        flat = [x for row in batch[key] for x in row]
        usable = len(flat) - len(flat) % max_length
        out[key] = [flat[i : i + max_length] for i in range(0, usable, max_length)]
    return out


def column_names(raw: AnyDataset) -> list[str]:
    """A stream may not know its features before it is read:
    then its first row names the columns."""
    if raw.column_names is not None:
        return list(raw.column_names)
    return list(next(iter(raw), {}).keys())


def check_columns(columns: list[str], cfg: DataConfig) -> None:
    fields = {"data.prompt_field": cfg.prompt_field, "data.response_field": cfg.response_field}
    if cfg.messages_field:
        fields = {"data.messages_field": cfg.messages_field}
    elif cfg.chat_template and not (cfg.prompt_field and cfg.response_field):
        raise ConfigError("data.chat_template=true: needs data.prompt_field and "
                          "data.response_field (one user and one assistant turn a row) "
                          "or data.messages_field (conversations)")
    elif not (cfg.prompt_field and cfg.response_field):
        fields = {"data.text_field": cfg.text_field}
    for key, name in fields.items():
        if name not in columns:
            raise ConfigError(f"{key}={name!r}: no such column; allowed: {', '.join(columns)}")


def tokenize_and_pack(raw: AnyDataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig, *,
                      block_size: int) -> AnyDataset:
    """Eager and cached for a `Dataset`, lazy for a stream (which takes no progress-bar `desc`)."""
    stream = isinstance(raw, IterableDataset)
    tokenized = raw.map(
        tokenize_rows, batched=True, remove_columns=column_names(raw),
        fn_kwargs={"tokenizer": tokenizer, "cfg": cfg, "block_size": block_size},
        **({} if stream else {"desc": "tokenize"}),
    )
    pack_kwargs = {"max_length": cfg.max_length, "document_ids": cfg.document_mask}
    return tokenized.map(pack_rows, batched=True, batch_size=1000, fn_kwargs=pack_kwargs,
                         **({} if stream else {"desc": "pack"}))
