"""Where a model runs: `auto` means CUDA when present; a CUDA device that is not there
fails in one line."""

from __future__ import annotations

import torch

from dlm.settings import ConfigError


def resolve_device(device: str | torch.device | None, *, key: str = "device") -> torch.device:
    """`auto` / None -> cuda if available else cpu; `cuda[:N]` is checked to exist."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError):
        target = None
    if (target is None or target.type not in ("cpu", "cuda")
            or (target.type == "cpu" and target.index)):
        raise ConfigError(f"{key}={str(device)!r}: unknown device; "
                          "allowed: auto, cpu, cuda, cuda:N")
    if target.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0 or (target.index or 0) >= count:
            raise ConfigError(f"{key}={str(device)!r}: no such CUDA device ({count} visible); "
                              "allowed: auto, cpu"
                              + "".join(f", cuda:{i}" for i in range(count)))
    return target
