"""Every settings dataclass in one place, with one validation helper and one error formatter.

The bottom layer: imports nothing of dlm but itself, and nothing heavier than omegaconf, so the CLI
can build its parser (and fail on bad input) before torch loads. Each dataclass validates its own
values where they enter (`__post_init__`, or `validate` for the experiment config after merging).
"""

from dlm.settings.bench import BenchConfig, TrainBenchConfig
from dlm.settings.decode import DecodeConfig
from dlm.settings.distill import DistillConfig
from dlm.settings.drift import DriftConfig
from dlm.settings.errors import ConfigError, check
from dlm.settings.eval import EvalConfig
from dlm.settings.experiment import (
    BACKENDS,
    CLEAN_CONTEXTS,
    DTYPES,
    PATTERNS,
    STRATEGIES,
    SYNTHETIC,
    WEIGHTINGS,
    AttentionConfig,
    DataConfig,
    ExperimentConfig,
    MaskingConfig,
    ModelConfig,
    ObjectiveConfig,
    OptimConfig,
    TrainerConfig,
    load_config,
    save_config,
    validate,
)
from dlm.settings.loading import flatten, to_yaml
from dlm.settings.lora import LoraConfig
from dlm.settings.tracking import LogTarget, TrackingConfig

__all__ = [
    "BACKENDS", "CLEAN_CONTEXTS", "DTYPES", "PATTERNS",
    "STRATEGIES", "SYNTHETIC", "WEIGHTINGS", "AttentionConfig", "BenchConfig", "ConfigError",
    "DataConfig", "DecodeConfig", "DistillConfig", "DriftConfig", "EvalConfig", "ExperimentConfig",
    "LogTarget",
    "LoraConfig", "MaskingConfig",
    "ModelConfig", "ObjectiveConfig", "OptimConfig", "TrackingConfig", "TrainBenchConfig",
    "TrainerConfig", "check",
    "flatten", "load_config", "save_config", "to_yaml", "validate",
]
