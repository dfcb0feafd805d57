"""`dlm eval`: lm-eval on a dlm checkpoint, a results JSON and MLflow metrics.

Metric names: `eval/<task>/<metric>[_<filter>]`, e.g. `eval/gsm8k/exact_match_strict-match`,
`eval/mmlu/acc`, made MLflow-safe (alphanumerics and `_ - . / space`).
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dlm.evaluation.tasks import prepare_tasks
from dlm.models.checkpoint import read_meta
from dlm.settings import EvalConfig, LogTarget
from dlm.tracking import runs

if TYPE_CHECKING:
    from lm_eval.api.model import LM
    from lm_eval.tasks import TaskManager

DEFAULT_EXPERIMENT = "dlm-eval"


def run_lm_eval(lm: LM, tasks: Sequence[str], *, task_manager: TaskManager,
                settings: EvalConfig) -> dict[str, Any]:
    """`lm_eval.simple_evaluate` with a ready model object; returns lm-eval's results dict."""
    from lm_eval import simple_evaluate

    return simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=settings.num_fewshot,
                           limit=settings.limit_value, task_manager=task_manager,
                           gen_kwargs=settings.gen_kwargs,
                           apply_chat_template=settings.apply_chat_template,
                           log_samples=settings.log_samples,
                           batch_size=getattr(lm, "batch_size", None))


def mlflow_safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_\-./ ]", "_", name)


def metrics_from_results(results: dict[str, Any],
                         renames: dict[str, str] | None = None) -> dict[str, float]:
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
    text = json.dumps(results, indent=2, default=handle_non_serializable, ensure_ascii=False)
    path.write_text(text)
    return path


def log_to_mlflow(results: dict[str, Any], artifact: Path, *, log: LogTarget,
                  params: dict[str, Any], experiment: str = DEFAULT_EXPERIMENT,
                  step: int = 0) -> str:
    """`results["dlm_metrics"]` + the results JSON (artifact dir `lm_eval/`) into `log.mlflow_run`,
    or into a new run of `experiment` (with `params`); returns the run id."""
    new = log.mlflow_run is None
    run_id = (runs.new_run(log.tracking_uri, experiment, run_name=params.get("checkpoint"))
              if new else log.mlflow_run)
    runs.log_metrics(run_id, log.tracking_uri, results["dlm_metrics"], step=step,
                     params=params if new else None)
    runs.log_artifacts(run_id, log.tracking_uri, [artifact], "lm_eval")
    if new:
        runs.client(log.tracking_uri).set_terminated(run_id)
    return run_id


def evaluate(checkpoint: str | Path, settings: EvalConfig | None = None, *,
             log: LogTarget | None = None, task_metadata: dict[str, Any] | None = None,
             include_path: str | Path | None = None, experiment: str = DEFAULT_EXPERIMENT,
             step: int = 0) -> dict[str, Any]:
    """Evaluate a dlm checkpoint with lm-eval; returns lm-eval's results dict plus
    `results["dlm_metrics"]`.

    `settings.decode` overrides the checkpoint's decoder defaults (training block size, threshold
    0.9, ...). The results JSON (with every request and response under `settings.log_samples`) is
    always written: to `settings.output`, else `<checkpoint>/../eval/results_<time>.json`
    (`results["results_path"]`). MLflow: into run `log.mlflow_run`, or into a new run of
    `experiment` when only `log.tracking_uri` is given; nothing without either. Bad input fails
    before the model is loaded, in one line (ConfigError).
    """
    settings, log = settings or EvalConfig(), log or LogTarget()
    meta = read_meta(checkpoint)
    if settings.apply_chat_template is None:  # the form the checkpoint was trained on
        settings = dataclasses.replace(settings, apply_chat_template=bool(meta.chat_template))
    manager, names = prepare_tasks(settings.tasks, data_dir=settings.data_dir,
                                   include_path=include_path, hub=settings.hub_tasks,
                                   task_metadata=task_metadata)
    if log.mlflow_run is not None:
        runs.check_run(log.mlflow_run, log.tracking_uri)
    # here: importing the sweep needs no lm-eval
    from dlm.evaluation.lm_eval_model import DLMEvalModel

    lm = DLMEvalModel(str(checkpoint), decode=settings.decode_overrides(),
                      batch_size=settings.batch_size, device=settings.device,
                      dtype=settings.dtype, loglikelihood=settings.loglikelihood,
                      mc_num=settings.mc_num, seed=settings.seed)
    results = run_lm_eval(lm, list(names.values()), task_manager=manager, settings=settings)
    renames = {run: name for name, run in names.items()}
    results["dlm_metrics"] = metrics_from_results(results, renames)
    output = settings.output or default_output(checkpoint)
    results["results_path"] = str(write_results(results, output))
    if log.mlflow_run is not None or log.tracking_uri is not None:
        params = {"checkpoint": str(Path(checkpoint).resolve()), "pattern": meta.pattern,
                  "tasks": ",".join(names), "limit": settings.limit_value,
                  "num_fewshot": settings.num_fewshot,
                  **{f"decode.{k}": v for k, v in results["config"]["decode"].items()}}
        results["mlflow_run"] = log_to_mlflow(results, Path(results["results_path"]), log=log,
                                              params=params, experiment=experiment, step=step)
    return results


def default_output(checkpoint: str | Path) -> Path:
    """`<checkpoint>/../eval/results_<time>.json`, beside the `bench/` folder of the same run;
    never overwritten."""
    name = f"results_{time.strftime('%Y%m%d-%H%M%S')}.json"
    return Path(checkpoint).resolve().parent / "eval" / name
