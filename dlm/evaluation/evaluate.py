"""`dlm eval`: lm-eval on a dlm checkpoint, offline task variants, a results JSON and MLflow metrics.

Offline tasks. `evals/` holds copies of lm-eval's `gsm8k` and `mmlu` tasks (`gsm8k_local`, the
`mmlu_local` group) and `gsm8k_synthetic`, which read local files through the loaders at the end of
this module (`custom_dataset: !function dlm.evaluation.evaluate.<loader>`). The loaders find the data folder at run
time -- metadata `data_dir`, else `$DLM_DATA_DIR`, else `../shared/data` beside the source tree -- so
the YAMLs hold no paths and work from any working directory, also with lm-eval's own CLI
(`--include_path evals/`). `evaluate(tasks="gsm8k,mmlu")` runs the local variants whenever that folder
holds the data (same files as the hub datasets) and logs them under the stock names.

Metric names: `eval/<task>/<metric>[_<filter>]`, e.g. `eval/gsm8k/exact_match_strict-match`,
`eval/mmlu/acc`, made MLflow-safe (alphanumerics and `_ - . / space`).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import json
import os
import re
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dlm.settings.experiment import ConfigError
from dlm.data.prompts import read_jsonl

if TYPE_CHECKING:
    from datasets import DatasetDict
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

    from dlm.decoding.engine import DecodeConfig

REPO = Path(__file__).resolve().parents[2]
EVALS_DIR = REPO / "evals"
"""Task YAMLs shipped with the source tree (`--include_path evals/`)."""
DATA_ENV = "DLM_DATA_DIR"
DEFAULT_EXPERIMENT = "dlm-eval"
LOCAL_FAMILIES = {"gsm8k": ("gsm8k_local", "gsm8k/test.jsonl"), "mmlu": ("mmlu_local", "mmlu/test.jsonl")}
"""Stock task family -> (local variant prefix, the data file it needs under the data folder)."""
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
DECODE_FLAGS = {"block_size": int, "threshold": float, "max_new_tokens": int, "sub_block_size": int, "temperature": float,
                "top_p": float, "policy": str, "factor": float, "one_token_per_forward": "bool", "use_cache": "bool"}
"""`--decode.<field>` flags: DecodeConfig's fields but `shift` (from the checkpoint). Kept here so that
building the `dlm` parser imports no torch; tests check it against DecodeConfig."""


# -- tasks ------------------------------------------------------------------------------------------
def find_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The benchmark data folder: `data_dir`, else $DLM_DATA_DIR, else ../shared/data (source tree, then cwd)."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data_dir={str(data_dir)!r}: no such folder; allowed: a folder with gsm8k/ and mmlu/ "
                              "(see ../shared/data/README.md)")
        return path.resolve()
    candidates = [os.environ.get(DATA_ENV), REPO.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"]
    return next((Path(c).resolve() for c in candidates if c and Path(c).is_dir()), None)


def split_tasks(tasks: str | Sequence[str]) -> list[str]:
    items = tasks.split(",") if isinstance(tasks, str) else [t for item in tasks for t in str(item).split(",")]
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise ConfigError(f"tasks={tasks!r}: no task given; e.g. gsm8k,mmlu")
    return names


def _offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in OFFLINE_ENV)


def resolve_tasks(names: Sequence[str], *, local_names: set[str], data_dir: Path | None,
                  local: bool | None = None) -> dict[str, str]:
    """Requested name -> name to run: `gsm8k`, `mmlu`, `mmlu_<subject|category>` -> their local variant.

    `local=None` maps where the data folder holds the family's file; True requires it; False never maps.
    Offline without the data, a stock name fails here in one line instead of deep inside `datasets`.
    """
    resolved = {}
    for name in names:
        family = next((f for f in LOCAL_FAMILIES if name == f or name.startswith(f + "_")), None)
        target = LOCAL_FAMILIES[family][0] + name[len(family):] if family else None
        if target not in local_names or local is False:
            resolved[name] = name
            continue
        needed = LOCAL_FAMILIES[family][1]
        if data_dir is not None and (data_dir / needed).is_file():
            resolved[name] = target
        elif local or _offline():
            why = "local_tasks=True" if local else f"offline ({'/'.join(OFFLINE_ENV)})"
            shown = str(data_dir) if data_dir else None
            raise ConfigError(f"tasks={name!r}: {why} but no {needed} in data_dir={shown!r}; allowed: "
                              f"--data-dir or ${DATA_ENV} pointing at a folder like ../shared/data")
        else:
            resolved[name] = name
    return resolved


def build_task_manager(names: Sequence[str], *, include_path: str | Path | None = None,
                       metadata: dict[str, Any] | None = None) -> TaskManager:
    """A TaskManager that knows `names`: only evals/ where that suffices (instant), else also lm-eval's
    ~15k built-in tasks (~10 s to index). Unknown names fail in one line with a suggestion."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in ([include_path] if include_path else [EVALS_DIR])]
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(_known(n, local) for n in names):
        return local
    full = TaskManager(include_path=paths, metadata=metadata)
    for name in names:
        if not _known(name, full):
            hint = difflib.get_close_matches(name, full.all_tasks, n=1)
            raise ConfigError(f"tasks={name!r}: unknown task{f' (did you mean {hint[0]!r}?)' if hint else ''}; allowed: "
                              f"{', '.join([*LOCAL_FAMILIES, *local.all_groups, 'gsm8k_synthetic'])} or any lm-eval task "
                              f"(lm-eval ls tasks --include_path evals)")
    return full


def _known(name: str, manager: TaskManager) -> bool:
    return name in manager.all_tasks or (name.endswith(".yaml") and Path(name).is_file())


# -- running ----------------------------------------------------------------------------------------
def run_lm_eval(lm: LM, tasks: Sequence[str], *, task_manager: TaskManager, num_fewshot: int | None = None,
                limit: int | float | None = None, gen_kwargs: str | dict | None = None, apply_chat_template: bool = False,
                log_samples: bool = False) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` with a ready model object; returns lm-eval's results dict."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit, task_manager=task_manager,
                           gen_kwargs=gen_kwargs, apply_chat_template=apply_chat_template, log_samples=log_samples,
                           batch_size=getattr(lm, "batch_size", None))


def mlflow_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def metrics_from_results(results: dict[str, Any], renames: dict[str, str] | None = None) -> dict[str, float]:
    """lm-eval results -> `eval/<task>/<metric>[_<filter>]` (filter `none` dropped), numbers only.

    `renames` maps a run task name back to the requested one (`gsm8k_local` -> `gsm8k`); a local
    variant's subtasks and subgroups follow their prefix (`mmlu_local_anatomy` -> `mmlu_anatomy`).
    """
    renames = renames or {}
    out: dict[str, float] = {}
    for task, values in results.get("results", {}).items():
        name = next((stock + task[len(run):] for run, stock in renames.items()
                     if task == run or task.startswith(run + "_")), task)
        for key, value in values.items():
            metric, _, filt = key.partition(",")
            if not filt or isinstance(value, bool) or not isinstance(value, (int, float)):
                continue  # alias, sample counts without a filter, "N/A" stderrs
            suffix = "" if filt == "none" else f"_{filt}"
            out[mlflow_safe(f"eval/{name}/{metric}{suffix}")] = float(value)
    tpf = results.get("config", {}).get("tokens_per_forward")
    if isinstance(tpf, (int, float)):
        out["eval/tokens_per_forward"] = float(tpf)
    return out


def write_results(results: dict[str, Any], path: str | Path) -> Path:
    from lm_eval.utils import handle_non_serializable

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False))
    return path


def log_to_mlflow(metrics: dict[str, float], artifact: Path, *, run_id: str | None, tracking_uri: str,
                  experiment: str = DEFAULT_EXPERIMENT, step: int = 0, params: dict[str, Any] | None = None) -> str:
    """Metrics + the results JSON (artifact dir `lm_eval/`) into `run_id`, or into a new run; returns its id."""
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient(tracking_uri)
    new = run_id is None
    if new:
        found = client.get_experiment_by_name(experiment)
        exp_id = found.experiment_id if found else client.create_experiment(experiment)
        run_id = client.create_run(exp_id, run_name=(params or {}).get("checkpoint")).info.run_id
    else:
        check_run(run_id, tracking_uri)
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()],
                     params=[Param(k, str(v)[:6000]) for k, v in (params or {}).items()] if new else [])
    client.log_artifact(run_id, str(artifact), artifact_path="lm_eval")
    if new:
        client.set_terminated(run_id)
    return run_id


def check_run(run_id: str, tracking_uri: str) -> None:
    """Fail in one line, before any evaluation, when the run to log into does not exist."""
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        raise ConfigError(f"mlflow_run={run_id!r}: no such run in tracking_uri={tracking_uri!r}") from None


def evaluate(checkpoint: str | Path, tasks: str | Sequence[str], *, num_fewshot: int | None = None,
             limit: int | float | None = None, batch_size: int = 1, decode: DecodeConfig | dict | None = None,
             mlflow_run: str | None = None, tracking_uri: str | None = None, experiment: str = DEFAULT_EXPERIMENT,
             output: str | Path | None = None, data_dir: str | Path | None = None, local_tasks: bool | None = None,
             include_path: str | Path | None = None, task_metadata: dict[str, Any] | None = None,
             gen_kwargs: str | dict | None = None, apply_chat_template: bool = False, log_samples: bool = False,
             device: str | None = None, dtype: str = "float32", step: int = 0) -> dict[str, Any]:
    """Evaluate a dlm checkpoint with lm-eval; returns lm-eval's results dict plus `results["dlm_metrics"]`.

    `decode`: a dict overrides the checkpoint's defaults (training block size, threshold 0.9, ...); a
    DecodeConfig is used as it is. Writes the results JSON to `output` when given. MLflow: into run
    `mlflow_run` (tracking_uri defaults to dlm train's sqlite:///mlflow.db), or into a new run of
    `experiment` when only `tracking_uri` is given; nothing without either. Bad input fails before the
    model is loaded, in one line (ConfigError).
    """
    from dlm.models.checkpoint import read_meta

    meta = read_meta(checkpoint)
    manager, runs = prepare_tasks(tasks, data_dir=data_dir, local_tasks=local_tasks, include_path=include_path,
                                  task_metadata=task_metadata)
    if mlflow_run is not None:
        tracking_uri = tracking_uri or _default_tracking_uri()
        check_run(mlflow_run, tracking_uri)
    from dlm.evaluation.lm_eval_model import DLMEvalModel

    lm = DLMEvalModel(str(checkpoint), decode=decode, batch_size=batch_size, device=device, dtype=dtype)
    results = run_lm_eval(lm, list(runs.values()), task_manager=manager, num_fewshot=num_fewshot, limit=limit,
                          gen_kwargs=gen_kwargs, apply_chat_template=apply_chat_template, log_samples=log_samples)
    results["dlm_metrics"] = metrics_from_results(results, {run: name for name, run in runs.items()})
    if output is not None:
        write_results(results, output)
    if mlflow_run is not None or tracking_uri is not None:
        params = {"checkpoint": str(Path(checkpoint).resolve()), "pattern": meta.pattern, "tasks": ",".join(runs),
                  "limit": limit, "num_fewshot": num_fewshot,
                  **{f"decode.{k}": v for k, v in results["config"]["decode"].items()}}
        with tempfile.TemporaryDirectory() as tmp:
            artifact = Path(output) if output is not None else write_results(results, Path(tmp) / "lm_eval_results.json")
            results["mlflow_run"] = log_to_mlflow(results["dlm_metrics"], artifact, run_id=mlflow_run,
                                                  tracking_uri=tracking_uri or _default_tracking_uri(),
                                                  experiment=experiment, step=step, params=params)
    return results


def prepare_tasks(tasks: str | Sequence[str], *, data_dir: str | Path | None = None, local_tasks: bool | None = None,
                  include_path: str | Path | None = None, task_metadata: dict[str, Any] | None = None,
                  ) -> tuple[TaskManager, dict[str, str]]:
    """(TaskManager, requested name -> name to run): local mapping, data folder in the task metadata."""
    from lm_eval.tasks import TaskManager

    names = split_tasks(tasks)
    root = find_data_dir(data_dir)
    paths = [str(include_path or EVALS_DIR)]
    local_names = set(TaskManager(include_path=paths, include_defaults=False).all_tasks)
    runs = resolve_tasks(names, local_names=local_names, data_dir=root, local=local_tasks)
    metadata = {**({"data_dir": str(root)} if root else {}), **(task_metadata or {})}
    return build_task_manager(list(runs.values()), include_path=include_path, metadata=metadata), runs


def _default_tracking_uri() -> str:
    from dlm.training.trainer import DEFAULT_TRACKING_URI

    return DEFAULT_TRACKING_URI


# -- offline datasets (called by lm-eval through `custom_dataset: !function` in evals/) ----------------
def gsm8k_local_dataset(data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """openai/gsm8k (main) from <data_dir>/gsm8k/{train,test}.jsonl. Other metadata keys are ignored:
    lm-eval passes the task metadata (model_args included) to every loader."""
    root = _require_data(data_dir, "gsm8k/test.jsonl")
    return _dataset_dict({split: _read_jsonl(root / "gsm8k" / f"{split}.jsonl") for split in ("train", "test")})


def mmlu_local_dataset(subject: str, data_dir: str | Path | None = None, **_: Any) -> DatasetDict:
    """One cais/mmlu subject (`test`, and `dev` for few-shot) from <data_dir>/mmlu/{test,dev}.jsonl."""
    root = _require_data(data_dir, "mmlu/test.jsonl")
    splits = {s: [r for r in _read_jsonl(root / "mmlu" / f"{s}.jsonl") if r["subject"] == subject] for s in ("test", "dev")}
    if not splits["test"]:
        raise ConfigError(f"dataset_kwargs.subject={subject!r}: no such MMLU subject in {root / 'mmlu/test.jsonl'}")
    return _dataset_dict(splits)


def gsm8k_synthetic_dataset(synthetic_size: int = 20000, synthetic_max_number: int = 20, cache_dir: str | None = None,
                            **_: Any) -> DatasetDict:
    """The synthetic task's splits as written by `dlm.data.synthetic_dir` (defaults: the tiny experiments')."""
    from dlm.settings.experiment import DataConfig
    from dlm.data.datamodule import synthetic_dir

    cfg = DataConfig(synthetic_size=int(synthetic_size), synthetic_max_number=int(synthetic_max_number),
                     cache_dir=str(cache_dir or DataConfig().cache_dir))
    root = synthetic_dir(cfg)
    splits = {s: [{"question": r["question"], "answer": r["answer"]} for r in _read_jsonl(root / f"{s}.jsonl") if r["question"]]
              for s in ("train", "test")}  # train's free-text rows have no question
    return _dataset_dict(splits)


def _require_data(data_dir: str | Path | None, needed: str) -> Path:
    root = find_data_dir(data_dir)
    if root is None or not (root / needed).is_file():
        raise ConfigError(f"data_dir={str(root) if root else None!r}: no {needed}; allowed: a folder like ../shared/data "
                          f"via ${DATA_ENV}, dlm eval --data-dir, or lm-eval --metadata '{{\"data_dir\": ...}}'")
    return root


@functools.lru_cache(maxsize=8)
def _read_jsonl_cached(path: str, mtime_ns: int) -> tuple[dict, ...]:
    return tuple(read_jsonl(Path(path)))


def _read_jsonl(path: Path) -> list[dict]:
    """Rows of a jsonl file, parsed once per process (57 MMLU subjects read the same file)."""
    return list(_read_jsonl_cached(str(path), path.stat().st_mtime_ns))


def _dataset_dict(splits: dict[str, list[dict]]) -> DatasetDict:
    from datasets import Dataset, DatasetDict

    return DatasetDict({name: Dataset.from_list(rows) for name, rows in splits.items()})


# -- command line (wired into dlm.cli as `dlm eval`) ---------------------------------------------------
def add_eval_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`dlm eval CHECKPOINT --tasks gsm8k,mmlu [--limit N] [--decode.threshold 0.9 ...]`; imports no torch."""
    parser.add_argument("checkpoint", help="dlm checkpoint folder (HF model + tokenizer + dlm.yaml)")
    parser.add_argument("--tasks", required=True, help="comma-separated lm-eval tasks/groups; gsm8k and mmlu run "
                        "their offline variants when the data folder is present")
    parser.add_argument("--num-fewshot", type=int, default=None)
    parser.add_argument("--limit", type=_number, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--output", default=None, help="write lm-eval's results JSON here")
    parser.add_argument("--mlflow-run", default=None, help="log eval/<task>/<metric> and the JSON into this run")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow tracking URI (default with --mlflow-run: sqlite:///mlflow.db)")
    parser.add_argument("--data-dir", default=None, help=f"benchmark data folder (default: ${DATA_ENV}, else ../shared/data)")
    parser.add_argument("--hub-tasks", action="store_true", help="run stock gsm8k/mmlu from the hub even when local data exists")
    parser.add_argument("--gen-kwargs", default=None, help="lm-eval generation overrides, e.g. max_gen_toks=128")
    parser.add_argument("--apply-chat-template", action="store_true")
    parser.add_argument("--device", default=None)
    for name, kind in DECODE_FLAGS.items():
        parser.add_argument(f"--decode.{name}", dest=f"decode_{name}", type=_bool if kind == "bool" else kind, default=None,
                            metavar=kind.upper() if isinstance(kind, str) else kind.__name__.upper())
    return parser


def run_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """Run `dlm eval` from parsed arguments; prints lm-eval's table and the logged metric names."""
    from lm_eval.utils import make_table

    decode = {name: getattr(args, f"decode_{name}") for name in DECODE_FLAGS if getattr(args, f"decode_{name}") is not None}
    results = evaluate(args.checkpoint, args.tasks, num_fewshot=args.num_fewshot, limit=args.limit,
                       batch_size=args.batch_size, decode=decode, mlflow_run=args.mlflow_run,
                       tracking_uri=args.tracking_uri, output=args.output, data_dir=args.data_dir,
                       local_tasks=False if args.hub_tasks else None, gen_kwargs=args.gen_kwargs,
                       apply_chat_template=args.apply_chat_template, device=args.device)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    for key, value in sorted(results["dlm_metrics"].items()):
        print(f"{key}: {value:.4f}")
    if args.output:
        print(f"results: {args.output}")
    if "mlflow_run" in results:
        print(f"mlflow run: {results['mlflow_run']}")
    return results


def _number(text: str) -> int | float:
    value = float(text)
    return int(value) if value.is_integer() and value >= 1 else value


def _bool(text: str) -> bool:
    if text.lower() not in ("true", "false", "1", "0"):
        raise argparse.ArgumentTypeError(f"{text!r}: must be true or false")
    return text.lower() in ("true", "1")
