"""Lightning callbacks: HF export at the end of training; evaluation and benchmarks during it."""

from dlm.callbacks.drift import WeightDriftCallback
from dlm.callbacks.export import HFExportCallback
from dlm.callbacks.lm_eval import LmEvalCallback
from dlm.callbacks.throughput import ThroughputCallback

__all__ = ["HFExportCallback", "LmEvalCallback", "ThroughputCallback", "WeightDriftCallback"]
