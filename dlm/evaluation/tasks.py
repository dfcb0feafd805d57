"""Which lm-eval tasks to run: the offline variants of the stock tasks shipped in `evals/` and the data
folder they read.

`evals/` holds copies of lm-eval's `gsm8k` and `mmlu` tasks (`gsm8k_local`, the `mmlu_local` group) and
`gsm8k_synthetic`, which read local files through `dlm.evaluation.datasets`. The data folder is found at run
time -- metadata `data_dir`, else `$DLM_DATA_DIR`, else `../shared/data` beside the source tree -- so the
YAMLs hold no paths and work from any working directory, also with lm-eval's own CLI
(`--include_path evals/`). `gsm8k`, `mmlu` and `mmlu_<subject>` run their local variants whenever that
folder holds the data (same files as the hub datasets) and are logged under the stock names.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dlm.settings import ConfigError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

REPO = Path(__file__).resolve().parents[2]
EVALS_DIR = REPO / "evals"
"""Task YAMLs shipped with the source tree (`--include_path evals/`)."""
DATA_ENV = "DLM_DATA_DIR"
LOCAL_FAMILIES = {"gsm8k": ("gsm8k_local", "gsm8k/test.jsonl"), "mmlu": ("mmlu_local", "mmlu/test.jsonl")}
"""Stock task family -> (local variant prefix, the data file it needs under the data folder)."""
OFFLINE_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


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
            raise ConfigError(f"tasks={name!r}: unknown task{f' (did you mean {hint[0]!r}?)' if hint else ''}; "
                              f"allowed: {', '.join([*LOCAL_FAMILIES, *local.all_groups, 'gsm8k_synthetic'])} "
                              f"or any lm-eval task (lm-eval ls tasks --include_path evals)")
    return full


def _known(name: str, manager: TaskManager) -> bool:
    return name in manager.all_tasks or (name.endswith(".yaml") and Path(name).is_file())


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
