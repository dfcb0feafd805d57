"""Which lm-eval tasks to run: the offline variants of the stock tasks shipped in `dlm/evals/` and
the data folder they read.

`dlm/evals/` (package data, so an installed wheel has it; `evals/` in the source tree links to it)
holds copies of lm-eval's `gsm8k` and `mmlu` tasks (`gsm8k_local`, the `mmlu_local` group) and
`gsm8k_synthetic`, which read local files through `dlm.evaluation.datasets`. The data folder is
found at run time -- metadata `data_dir`, else `$DLM_DATA_DIR`, else `../shared/data` beside the
source tree -- so the YAMLs hold no paths and work from any working directory, also with lm-eval's
own CLI (`--include_path evals/`, or `EVALS_DIR` of an installed package). `gsm8k`, `mmlu` and
`mmlu_<subject>` run their local variants whenever that folder holds the data (same files as the
hub datasets) and are logged under the stock names.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from dlm.settings import ConfigError

if TYPE_CHECKING:
    from lm_eval.tasks import TaskManager

EVALS_DIR = Path(__file__).resolve().parents[1] / "evals"
"""Task YAMLs shipped inside the package (`--include_path` for lm-eval's own CLI)."""
DATA_ENV = "DLM_DATA_DIR"
LOCAL_FAMILIES = {"gsm8k": ("gsm8k_local", "gsm8k/test.jsonl"),
                  "mmlu": ("mmlu_local", "mmlu/test.jsonl")}
"""Stock task family -> (local variant prefix, the data file it needs under the data folder)."""


def find_data_dir(data_dir: str | Path | None = None) -> Path | None:
    """The benchmark data folder: `data_dir`, else $DLM_DATA_DIR, else ../shared/data beside the
    source tree (an editable install), else beside the working directory."""
    if data_dir is not None:
        path = Path(data_dir).expanduser()
        if not path.is_dir():
            raise ConfigError(f"data_dir={str(data_dir)!r}: no such folder; "
                              "allowed: a folder with gsm8k/ and mmlu/ "
                              "(see ../shared/data/README.md)")
        return path.resolve()
    source_tree = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get(DATA_ENV), source_tree.parent / "shared" / "data",
                  Path.cwd().parent / "shared" / "data"]
    return next((Path(c).resolve() for c in candidates if c and Path(c).is_dir()), None)


def split_tasks(tasks: str | Sequence[str]) -> list[str]:
    items = (tasks.split(",") if isinstance(tasks, str)
             else [t for item in tasks for t in str(item).split(",")])
    names = [t.strip() for t in items if t.strip()]
    if not names:
        raise ConfigError(f"tasks={tasks!r}: no task given; e.g. gsm8k,mmlu")
    return names


def resolve_tasks(names: Sequence[str], *, local_names: set[str], data_dir: Path | None,
                  hub: bool = False) -> dict[str, str]:
    """Requested name -> name to run:
    `gsm8k`, `mmlu`, `mmlu_<subject|category>` -> their local variant.

    Offline first: a family with a local variant needs its file in the data folder, and without it
    the name fails here in one line saying where the data must be (no hub retries). `hub=True` runs
    the stock tasks.
    """
    resolved = {}
    for name in names:
        family = next((f for f in LOCAL_FAMILIES if name == f or name.startswith(f + "_")), None)
        target = LOCAL_FAMILIES[family][0] + name[len(family):] if family else None
        if target not in local_names or hub:
            resolved[name] = name
            continue
        needed = LOCAL_FAMILIES[family][1]
        if data_dir is None or not (data_dir / needed).is_file():
            shown = str(data_dir) if data_dir else None
            raise ConfigError(f"tasks={name!r}: its offline variant reads {needed} from the data "
                              f"folder, and data_dir={shown!r} has none; allowed: --data-dir DIR "
                              f"or ${DATA_ENV} (a folder like ../shared/data), "
                              "or --hub-tasks to download the stock task")
        resolved[name] = target
    return resolved


def build_task_manager(names: Sequence[str], *, include_path: str | Path | None = None,
                       metadata: dict[str, Any] | None = None) -> TaskManager:
    """A TaskManager that knows `names`: only evals/ where that suffices (instant), else also
    lm-eval's ~15k built-in tasks (~10 s to index). Unknown names fail in one line with a
    suggestion."""
    from lm_eval.tasks import TaskManager

    paths = [str(p) for p in ([include_path] if include_path else [EVALS_DIR])]
    local = TaskManager(include_path=paths, include_defaults=False, metadata=metadata)
    if all(_known(n, local) for n in names):
        return local
    full = TaskManager(include_path=paths, metadata=metadata)
    for name in names:
        if not _known(name, full):
            hint = difflib.get_close_matches(name, full.all_tasks, n=1)
            suggestion = f" (did you mean {hint[0]!r}?)" if hint else ""
            allowed = ", ".join([*LOCAL_FAMILIES, *local.all_groups, "gsm8k_synthetic"])
            raise ConfigError(f"tasks={name!r}: unknown task{suggestion}; allowed: {allowed} "
                              f"or any lm-eval task (lm-eval ls tasks --include_path evals)")
    return full


def _known(name: str, manager: TaskManager) -> bool:
    return name in manager.all_tasks or (name.endswith(".yaml") and Path(name).is_file())


_NAME_LINE = re.compile(r"^(?:task|group|tag):\s*([A-Za-z0-9_.-]+)\s*$", re.M)


@functools.lru_cache(maxsize=4)
def local_task_names(include_path: str | Path = EVALS_DIR) -> frozenset[str]:
    """Task, group and tag names the YAMLs under `include_path` define, read without lm-eval:
    importing its TaskManager takes seconds, and a missing data folder must fail before that."""
    files = Path(include_path).rglob("*yaml")
    return frozenset(name for path in files for name in _NAME_LINE.findall(path.read_text()))


def resolve_requested(tasks: str | Sequence[str], *, data_dir: str | Path | None = None,
                      hub: bool = False,
                      include_path: str | Path | None = None) -> dict[str, str]:
    """`resolve_tasks` for what a user typed: requested name -> name to run. Light: the CLI calls it
    before lm-eval, transformers or torch load, so a missing data folder fails within a second."""
    return resolve_tasks(split_tasks(tasks),
                         local_names=set(local_task_names(include_path or EVALS_DIR)),
                         data_dir=find_data_dir(data_dir), hub=hub)


def prepare_tasks(tasks: str | Sequence[str], *, data_dir: str | Path | None = None,
                  hub: bool = False, include_path: str | Path | None = None,
                  task_metadata: dict[str, Any] | None = None,
                  ) -> tuple[TaskManager, dict[str, str]]:
    """(TaskManager, requested name -> name to run):
    local mapping, data folder in the task metadata."""
    root = find_data_dir(data_dir)
    runs = resolve_requested(tasks, data_dir=data_dir, hub=hub, include_path=include_path)
    metadata = {**({"data_dir": str(root)} if root else {}), **(task_metadata or {})}
    manager = build_task_manager(list(runs.values()), include_path=include_path, metadata=metadata)
    return manager, runs
