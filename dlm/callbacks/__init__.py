"""Lightning callbacks: HF export at the end of training; evaluation and benchmarks during it."""

from dlm.callbacks.export import HFExportCallback

__all__ = ["HFExportCallback"]
