"""The lm-eval model class `dlm`:
dlm checkpoints (block diffusion or the AR baseline) in the harness.

Registered in lm-eval's model registry on import, so `simple_evaluate(model="dlm", ...)` and the
`dlm-lm-eval` console script (`dlm.cli.lm_eval`) find it. `lm_eval.models` is imported first:
lm-eval loads its built-in models only while its registry is empty, so registering ours first would
hide them.

generate_until: the cached parallel decoder (`dlm.decoding.engine.generate`) for diffusion patterns,
the engine's lean greedy AR mode for `causal` checkpoints (or `decode.mode=ar`); `until` and
`max_gen_toks` are honoured, the decoder knobs come from `model_args` (`block_size`, `threshold`,
`sub_block_size`, `gen_length` = `max_new_tokens`, any `DecodeConfig` field).

loglikelihood / loglikelihood_rolling: exact scores from `dlm.evaluation.likelihood` (the chain rule
under the decoder's block layout for diffusion patterns, the plain causal log-likelihood for
`causal`); this class only tokenizes, batches and caches the requests.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
from pathlib import Path
from typing import Any

# built-ins first: lm-eval loads them only into an empty registry
import lm_eval.models  # noqa: F401
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from dlm.data.chat import ChatFormat, chat_format_of
from dlm.decoding.engine import generate
from dlm.decoding.output import GenerationOutput
from dlm.decoding.text import left_pad, pad_token_id
from dlm.evaluation.likelihood import score_continuations
from dlm.models.backbone import Backbone
from dlm.models.checkpoint import CheckpointMeta, load_checkpoint, read_meta
from dlm.models.device import resolve_device
from dlm.settings import ConfigError, DecodeConfig, check
from dlm.settings.eval import LIKELIHOODS

log = logging.getLogger(__name__)

MODEL_NAME = "dlm"
DECODE_KEYS = tuple(f.name for f in dataclasses.fields(DecodeConfig) if f.name != "shift")
"""Decoder knobs accepted in model_args; `shift` always comes from the checkpoint's dlm.yaml."""
ALIASES = {"gen_length": "max_new_tokens"}
MODEL_KEYS = ("pretrained", "batch_size", "max_batch_size", "device", "dtype", "max_length",
              "loglikelihood", "mc_num", "seed")
GEN_KEYS = ("until", "max_gen_toks", "do_sample", "temperature", "top_p")
"""Request generation kwargs the adapter understands (lm-eval task `generation_kwargs`)."""


@register_model(MODEL_NAME)
class DLMEvalModel(TemplateLM):
    """lm-eval model over a dlm checkpoint folder (`pretrained=`)
    or an in-memory backbone (training).

    Example::

        lm_eval --model dlm --tasks gsm8k_local \\
            --model_args pretrained=outputs/tiny/final,threshold=0.9

    Unknown `model_args` keys fail in one line (ConfigError) listing the allowed ones.
    """

    def __init__(self, pretrained: str | Path | None = None, *, backbone: Backbone | None = None,
                 meta: CheckpointMeta | None = None, decode: DecodeConfig | dict | None = None,
                 batch_size: int | str = 1, max_batch_size: int | None = None,
                 device: str | None = None, dtype: str = "float32", max_length: int | None = None,
                 loglikelihood: str = "chain", mc_num: int | str = 128, seed: int | str = 0,
                 **knobs: Any) -> None:
        super().__init__()  # max_batch_size: passed by lm-eval, unused (no auto batch size)
        _check_keys(knobs)  # every check before the weights load: a typo fails in a second
        # the chain rule or the Monte-Carlo ELBO (dlm.evaluation.likelihood)
        check(loglikelihood in LIKELIHOODS, "model_args.loglikelihood", loglikelihood,
              "unknown method", LIKELIHOODS)
        self.likelihood_method = loglikelihood
        self.mc_num = _positive_int("model_args.mc_num", mc_num)
        self.seed = _coerce("seed", seed, 0)
        self.batch_size = _positive_int("batch_size", batch_size)
        self._max_length = (_positive_int("max_length", max_length) if max_length is not None
                            else None)
        if backbone is None:
            if pretrained is None:
                raise ConfigError("model_args.pretrained=None: required; "
                                  "allowed: a dlm checkpoint folder (with dlm.yaml)")
            _decode_config(read_meta(pretrained), decode, knobs)
            backbone, meta = load_checkpoint(pretrained, dtype=str(dtype))
            backbone.model.to(_resolve_device(device)).eval()
        elif meta is None:
            raise ConfigError("meta=None: an in-memory backbone needs its CheckpointMeta "
                              "(pattern, block size, shift)")
        self.decode = _decode_config(meta, decode, knobs)
        self.backbone, self.meta, self.checkpoint = backbone, meta, str(pretrained or "in-memory")
        self.model, self.tokenizer = backbone.model, backbone.tokenizer
        self._warned_tasks: set[str] = set()
        # during loglikelihood(): its Instances, in order
        self._requests: list[Instance] | None = None
        self.stats = {"generated_tokens": 0, "row_forwards": 0}
        """Decoding totals for tokens-per-forward:
        generated tokens, and sum over batches of rows * nfe."""

    # -- what lm-eval reads ------------------------------------------------------------------------
    @property
    def is_ar(self) -> bool:
        return self.meta.attention_pattern.autoregressive

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        positions = getattr(self.model.config, "max_position_embeddings", None)
        return self._max_length or positions or 2048

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def tokenizer_name(self) -> str:
        return str(self.tokenizer.name_or_path).replace("/", "__")

    @property
    def tokens_per_forward(self) -> float | None:
        """Generated tokens per row per decoding forward over everything generated so far (TPF)."""
        rows = self.stats["row_forwards"]
        return self.stats["generated_tokens"] / rows if rows else None

    def get_model_info(self) -> dict[str, Any]:
        """Merged into lm-eval's results["config"]."""
        info = {"checkpoint": self.checkpoint, "pattern": self.meta.pattern,
                "train_block_size": self.meta.block_size, "loglikelihood": self.likelihood_method,
                "decode": dataclasses.asdict(self.decode)}
        if self.likelihood_method == "elbo":
            info["mc_num"], info["seed"] = self.mc_num, self.seed
        if self.tokens_per_forward is not None:
            info["tokens_per_forward"] = self.tokens_per_forward
        return info

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs) -> list[int]:
        """No special tokens by default:
        training tokenized text the same way (`dlm.data.sources`)."""
        return self.tokenizer(string, add_special_tokens=bool(add_special_tokens))["input_ids"]

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        """lm-eval calls this under `--apply_chat_template`: the template the checkpoint was trained
        with (its dlm.yaml `chat_template` and system turn), else the tokenizer's own."""
        if self.meta.chat_template:
            chat = ChatFormat(self.meta.chat_template, self.meta.system_prompt)
        else:
            chat = chat_format_of(self.tokenizer, key=f"apply_chat_template ({self.checkpoint})")
        system = chat.system_prompt
        if system is not None and not any(m.get("role") == "system" for m in chat_history):
            chat_history = [{"role": "system", "content": system}, *chat_history]
        return self.tokenizer.apply_chat_template(chat_history, chat_template=chat.template,
                                                  tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    # -- scoring -----------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]],
               disable_tqdm: bool) -> list[tuple[float, bool]]:
        """(log p(continuation | context), greedy) per (context ids, continuation ids) pair."""
        pattern = self.meta.attention_pattern.resized(self.decode.block_size)
        return score_continuations(self.model, pairs, pattern=pattern,
                                   mask_token_id=self.backbone.mask_token_id,
                                   shift=self.decode.shift, max_length=self.max_length,
                                   pad_token_id=self._pad_id, batch_size=self.batch_size,
                                   disable_tqdm=disable_tqdm, method=self.likelihood_method,
                                   mc_num=self.mc_num, seed=self.seed)

    def loglikelihood(self, requests: list[Instance],
                      disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        """lm-eval's own tokenizing;
        the requests are kept so `_loglikelihood_tokens` can name their tasks."""
        self._requests = requests
        try:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        finally:
            self._requests = None

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        # one warning per task whose context + continuation will not fit
        if self._requests is not None:
            # causal scoring drops the last input
            limit = self.max_length + 1 if self.is_ar else self.max_length
            lengths = [len(ctx) + len(cont) for _, ctx, cont in requests]
            self._warn_truncated(self._requests, lengths, limit, f"max_length {self.max_length}")
        results = self._score([(ctx, cont) for _, ctx, cont in requests], disable_tqdm)
        for (strings, _, _), result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", strings, result)
        return results

    def loglikelihood_rolling(self, requests: list[Instance],
                              disable_tqdm: bool = False) -> list[float]:
        """Whole-document log-likelihood:
        the sum over `rolling_windows` (as lm-eval's HFLM cuts them)."""
        out = []
        for (text,) in tqdm([r.args for r in requests], disable=disable_tqdm, desc="dlm rolling"):
            windows = rolling_windows(self.tok_encode(text), prefix_token_id=self.prefix_token_id,
                                      max_length=self.max_length, causal=self.is_ar)
            total = sum(lp for lp, _ in self._score(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # -- generation --------------------------------------------------------------------------------
    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        """Batches requests that share generation kwargs; longest prompts first (least padding)."""
        out: list[str | None] = [None] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(json.dumps(req.args[1], sort_keys=True, default=str), []).append(i)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="dlm generate")
        for idxs in groups.values():
            options = self._gen_options(requests[idxs[0]].args[1])
            encoded = {i: self.tok_encode(requests[i].args[0]) for i in idxs}
            max_new = options["max_new_tokens"]
            prompts = {i: self._prompt_ids(ids, max_new) for i, ids in encoded.items()}
            self._warn_truncated([requests[i] for i in idxs], [len(encoded[i]) for i in idxs],
                                 self.max_length - max_new,
                                 f"max_length {self.max_length} - max_gen_toks {max_new}")
            idxs = sorted(idxs, key=lambda i: -len(prompts[i]))
            for start in range(0, len(idxs), self.batch_size):
                chunk = idxs[start:start + self.batch_size]
                for i, text in zip(chunk, self._generate([prompts[i] for i in chunk], options)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(chunk))
        bar.close()
        return out

    def _gen_options(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Request generation kwargs -> until / max_new_tokens / sampling;
        unknown keys fail in one line."""
        for key in kwargs:
            if key not in GEN_KEYS:
                raise ConfigError(f"gen_kwargs.{key}={kwargs[key]!r}: not supported by the dlm "
                                  f"model; allowed: {', '.join(GEN_KEYS)}")
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else [u for u in until if u]
        max_new = int(kwargs.get("max_gen_toks") or self.decode.max_new_tokens)
        if max_new >= self.max_length:
            raise ConfigError(f"max_gen_toks={max_new}: leaves no room for the prompt in "
                              f"max_length={self.max_length}; "
                              f"allowed: 1..{self.max_length - 1} (gen_length / task max_gen_toks)")
        sample = bool(kwargs.get("do_sample", False)) and float(kwargs.get("temperature", 1.0)) > 0
        if sample and self.is_ar:
            raise ConfigError("gen_kwargs.do_sample=True: the AR baseline decodes greedily only; "
                              "allowed: do_sample=false")
        temperature = float(kwargs.get("temperature", 1.0)) if sample else 0.0
        top_p = float(kwargs.get("top_p", self.decode.top_p)) if sample else self.decode.top_p
        return {"until": until, "max_new_tokens": max_new, "temperature": temperature,
                "top_p": top_p}

    def _prompt_ids(self, ids: list[int], max_new_tokens: int) -> list[int]:
        """Left-truncated so prompt + generation fit in `max_length` (as lm-eval's HFLM does)."""
        return ids[-(self.max_length - max_new_tokens):] or [self.prefix_token_id]

    def _warn_truncated(self, requests: list[Instance], lengths: list[int], limit: int,
                        why: str) -> None:
        """One warning per task whose prompts lose their start:
        a cut few-shot prompt scores a different task."""
        by_task: dict[str, list[int]] = {}
        for req, length in zip(requests, lengths):
            if length > limit:
                by_task.setdefault(str(req.task_name), []).append(length)
        for task, cut in by_task.items():
            if task not in self._warned_tasks:
                self._warned_tasks.add(task)
                log.warning("task %s: %d of %d prompts truncated from up to %d tokens "
                            "to their last %d (%s); raise max_length or use fewer shots",
                            task, len(cut), sum(str(r.task_name) == task for r in requests),
                            max(cut), limit, why)

    def _generate(self, prompts: list[list[int]], options: dict[str, Any]) -> list[str]:
        ids, mask = left_pad(prompts, self._pad_id, self.device)
        common = dict(attention_mask=mask, eos_token_id=self._eos_ids, stop=options["until"],
                      tokenizer=self.tokenizer)
        mode = "ar" if self.is_ar else self.decode.mode
        cfg = dataclasses.replace(self.decode, max_new_tokens=options["max_new_tokens"], mode=mode,
                                  temperature=options["temperature"], top_p=options["top_p"])
        result = generate(self.model, ids, mask_token_id=self.backbone.mask_token_id, config=cfg,
                          pattern=self.meta.attention_pattern, **common)
        self._count(result)
        return [_cut(self.tok_decode(tokens), options["until"]) for tokens in result.tokens]

    def _count(self, result: GenerationOutput) -> None:
        self.stats["generated_tokens"] += sum(result.num_generated)
        self.stats["row_forwards"] += sum(result.row_forwards)

    @property
    def _pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    @property
    def _eos_ids(self) -> list[int]:
        ids = {self.tokenizer.eos_token_id}
        config_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids |= set(config_eos) if isinstance(config_eos, (list, tuple)) else {config_eos}
        return sorted(i for i in ids if i is not None)


def rolling_windows(tokens: list[int], *, prefix_token_id: int, max_length: int,
                    causal: bool) -> list[tuple[list[int], list[int]]]:
    """A whole document as disjoint (context, continuation) windows,
    as lm-eval's HF model cuts it."""
    window = max_length if causal else max_length - 1  # diffusion counts the context token too
    return [make_disjoint_window(w) for w in get_rolling_token_windows(
        tokens, prefix_token=prefix_token_id, max_seq_len=window, context_len=1)]


def _cut(text: str, until: list[str]) -> str:
    """Text before the first stop string
    (the decoder already cuts at token level; this catches the rest)."""
    for stop in until:
        text = text.split(stop)[0]
    return text


def _decode_config(meta: CheckpointMeta, decode: DecodeConfig | dict | None,
                   knobs: dict[str, Any]) -> DecodeConfig:
    """The checkpoint's defaults (training block size, shift), then `decode`,
    then model_args knobs."""
    if isinstance(decode, DecodeConfig):
        base = dataclasses.replace(decode, shift=meta.shift)
    else:
        base = DecodeConfig(block_size=meta.block_size, shift=meta.shift)
        knobs = {**(decode or {}), **knobs}
    overrides = {ALIASES.get(k, k): _coerce(k, v, getattr(base, ALIASES.get(k, k)))
                 for k, v in knobs.items()}
    cfg = dataclasses.replace(base, **overrides)
    meta.check_decode_mode(cfg.mode)
    return cfg


def _check_keys(knobs: dict[str, Any]) -> None:
    for key in knobs:
        if key not in DECODE_KEYS and key not in ALIASES:
            allowed = [*MODEL_KEYS, *DECODE_KEYS, *ALIASES]
            hint = difflib.get_close_matches(key, allowed, n=1)
            raise ConfigError(f"model_args.{key}={knobs[key]!r}: "
                              f"unknown key{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                              f"allowed: {', '.join(allowed)}")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """model_args arrive as strings from the CLI;
    cast to the field's type (None-default fields are ints)."""
    kind = type(default) if default is not None else int
    if value is None or isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
        return value
    try:
        if kind is bool:
            if str(value).lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return str(value).lower() in ("true", "1")
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"model_args.{key}={value!r}: must be {kind.__name__}") from None


def _positive_int(key: str, value: Any) -> int:
    """lm-eval hands model_args over as strings: `"4"` is 4, `"auto"` is refused."""
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    check(number > 0 and not (isinstance(value, float) and value != number), key, value,
          "must be a positive integer ('auto' is not supported)")
    return number


def _resolve_device(device: str | None) -> torch.device:
    """lm-eval's CLI defaults to cuda:0; fall back to CPU (with a warning) where there is no GPU."""
    if device is not None and str(device).startswith("cuda") and not torch.cuda.is_available():
        log.warning("device=%s: CUDA is not available; running on cpu", device)
        return torch.device("cpu")
    return resolve_device(device)
