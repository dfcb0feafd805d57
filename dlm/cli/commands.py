"""Each `dlm` subcommand: its flags (generated from the settings dataclasses where it has settings)
and a runner that turns the parsed flags into those dataclasses,
calls the library and prints the result.

Library modules are imported inside the runners, so building the parser imports no torch
(`dlm --help` answers at once and a bad flag fails before anything loads).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

from dlm.cli.dataclass_args import add_dataclass_arguments, dataclass_from_args, given
from dlm.settings import (
    DTYPES,
    PATTERNS,
    BenchConfig,
    ConfigError,
    DecodeConfig,
    DistillConfig,
    DriftConfig,
    EvalConfig,
    LogTarget,
    TrainBenchConfig,
    check,
)
from dlm.settings.errors import deprecated
from dlm.settings.scaling import PlanConfig
from dlm.settings.sweep import ReportConfig, SweepRunConfig

if TYPE_CHECKING:
    from dlm.data.chat import ChatFormat
    from dlm.models.backbone import Backbone
    from dlm.models.checkpoint import CheckpointMeta

CHECKPOINT_HELP = ("dlm checkpoint folder (HF model + tokenizer + dlm.yaml), "
                   "e.g. outputs/tiny/final; "
                   "a plain HF causal LM folder, hub id or .gguf file is an AR model")


def add_configs(p: argparse.ArgumentParser) -> None:
    p.add_argument("configs", nargs="+", metavar="CONFIG.yaml [key=value ...]",
                   help="experiment YAML files, then dotlist overrides "
                        "such as attention.block_size=32")


def _split(items: list[str]) -> tuple[list[str], list[str]]:
    """argparse cannot tell `a.yaml` from `k=v` in one nargs list; split them here."""
    return [c for c in items if "=" not in c], [c for c in items if "=" in c]


# -- attention-demo, config, train -----------------------------------------------------------------
def add_demo(p: argparse.ArgumentParser) -> None:
    p.add_argument("--seq-len", type=int, default=8)
    p.add_argument("--block-size", type=int, default=4)
    p.add_argument("--patterns", nargs="*", choices=PATTERNS)


def run_demo(args: argparse.Namespace) -> None:
    from dlm.tensor import patterns
    from dlm.tensor.attention import describe

    for name in args.patterns or PATTERNS:
        print(describe(patterns.get(name, block_size=args.block_size), args.seq_len), end="\n\n")


def run_config(args: argparse.Namespace) -> None:
    from dlm.settings import to_yaml
    from dlm.tensor.patterns import load_experiment

    paths, overrides = _split(args.configs)
    print(to_yaml(load_experiment(*paths, overrides=overrides)), end="")


def run_train(args: argparse.Namespace) -> None:
    from dlm.tensor.patterns import load_experiment
    from dlm.training.trainer import train

    paths, overrides = _split(args.configs)
    result = train(load_experiment(*paths, overrides=overrides))
    # never a path that does not exist (other ranks of a multi-process run)
    if result.final_dir.is_dir():
        print(f"final checkpoint: {result.final_dir}")
    if result.run_id:
        print(f"mlflow run: {result.run_id} ({result.tracking_uri}); "
              f"browse with: mlflow ui --backend-store-uri {result.tracking_uri}")
    elif (Path(result.final_dir).parent / "metrics" / "metrics.csv").is_file():
        # tracking.enabled=false
        print(f"metrics: {Path(result.final_dir).parent / 'metrics' / 'metrics.csv'}")
    for key in sorted(k for k in result.metrics if k.startswith(("val/", "train/loss"))):
        print(f"{key}: {result.metrics[key]:.4f}")


# -- generate --------------------------------------------------------------------------------------
def add_generate(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--prompt", action="append", help="prompt text; repeat for a batch")
    p.add_argument("--prompts-file",
                   help="one prompt per line (write \\n for a newline inside a prompt)")
    p.add_argument("--stop", action="append", help="stop string; repeatable")
    p.add_argument("--ar", action="store_true",
                   help="deprecated alias of --mode ar (the engine's lean greedy AR loop)")
    _add_decoder_flags(p)


def _add_decoder_flags(p: argparse.ArgumentParser) -> None:
    """What loads a checkpoint for decoding and how it decodes: `dlm generate` and `dlm distill`."""
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render each prompt as a user turn of the chat template "
                        "(default: on when the checkpoint was trained on chat-rendered data, "
                        "off otherwise)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weight dtype (bfloat16: AMX CPUs and GPUs run it several times faster)")
    p.add_argument("--threads", type=int, help="torch CPU threads (time a decode at a fixed count)")
    add_dataclass_arguments(p, DecodeConfig, skip=("shift",), aliases={"use_cache": ["--no-cache"]})


def _load_decoder(args: argparse.Namespace, path: str
                  ) -> tuple[Backbone, CheckpointMeta, DecodeConfig, ChatFormat | None]:
    """`(backbone, meta, decode settings, chat format)` from `_add_decoder_flags`' flags; a bad
    thread count, device or decode setting fails before the weights load."""
    check(args.threads is None or args.threads > 0, "--threads", args.threads,
          "must be a positive integer")
    from dlm.decoding.text import chat_format_for, decode_config_for, load_for_decoding
    from dlm.models.checkpoint import read_meta
    from dlm.models.device import resolve_device

    resolve_device(args.device, key="--device")  # an absent device fails before anything is read
    decode = decode_config_for(read_meta(path), **given(args, DecodeConfig))
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    backbone, meta = load_for_decoding(path, device=args.device, dtype=args.dtype)
    return backbone, meta, decode, chat_format_for(meta, backbone.tokenizer, args.chat)


def run_generate(args: argparse.Namespace) -> None:
    prompts = _prompts(args)
    backbone, meta, decode, chat = _load_decoder(args, args.checkpoint)
    from dlm.decoding.text import complete

    if args.ar:
        deprecated("dlm generate --ar", "--mode ar")
        decode = dataclasses.replace(decode, mode="ar")
    result = complete(backbone, meta, prompts, decode, stop=args.stop, chat=chat)
    for prompt, text in zip(prompts, result.texts):
        print(f"--- prompt\n{prompt}\n--- completion\n{text}")
    out = result.output
    ar_mode = decode.mode == "ar"
    mode = ("AR model" if meta.attention_pattern.autoregressive
            else "AR mode of the dLM" if ar_mode
            else f"speculative ({decode.speculative_label}), drafts of {decode.block_size - 1}"
            if decode.mode == "speculative"
            else f"parallel, block {decode.block_size}, threshold {decode.threshold}")
    shown = f"{mode}, {args.dtype}" + (", chat template" if chat else "")
    print(f"--- stats ({shown}): generated {sum(out.num_generated)} tokens, NFE {out.nfe}, "
          f"TPF {out.tokens_per_forward:.2f}, {result.tokens_per_sec:.1f} tokens/s")


def _prompts(args: argparse.Namespace) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts_file:
        if not Path(args.prompts_file).is_file():
            raise ConfigError(f"--prompts-file={args.prompts_file!r}: no such file")
        lines = Path(args.prompts_file).read_text().splitlines()
        prompts += [line.replace("\\n", "\n") for line in lines if line.strip()]
    if not prompts:
        raise ConfigError("--prompt: give at least one prompt "
                          "(--prompt TEXT or --prompts-file FILE)")
    for i, prompt in enumerate(prompts):
        check(prompt.strip() != "", f"--prompt[{i}]", prompt,
              "empty; a prompt needs at least one token")
    for i, stop in enumerate(args.stop or []):
        check(stop != "", f"--stop[{i}]", stop,
              "empty; an empty stop string would cut every completion")
    return prompts


# -- distill ---------------------------------------------------------------------------------------
def add_distill(p: argparse.ArgumentParser) -> None:
    p.add_argument("teacher", help=CHECKPOINT_HELP)
    add_dataclass_arguments(p, DistillConfig)
    _add_decoder_flags(p)


def run_distill(args: argparse.Namespace) -> Any:
    settings = dataclass_from_args(args, DistillConfig)
    from dlm.decoding.distill import distill, source_rows

    rows = source_rows(settings)  # a bad file or field fails before the weights load
    backbone, meta, decode, chat = _load_decoder(args, args.teacher)
    report = distill((backbone, meta), rows, settings, decode, chat=chat)
    print(report.line())
    return report


# -- exactness -------------------------------------------------------------------------------------
def add_exactness(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    p.add_argument("--prompts", default="synthetic",
                   help="synthetic, or a JSONL file of {prompt|question, answer}")
    p.add_argument("--num-prompts", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--dtype", choices=DTYPES, default="float32")
    p.add_argument("--pairs", default="cache,batch,speculative",
                   help="comma list of: cache (cached vs no-cache), batch (batched vs alone), "
                        "speculative (vs AR mode), speculative-branched (the branched form vs AR "
                        "mode), speculative-branched-2 (the same with 2 blocks a forward)")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction, default=None,
                   help="render prompts through the chat template "
                        "(default: as the checkpoint was trained)")
    p.add_argument("--threads", type=int, help="torch CPU threads")


def run_exactness(args: argparse.Namespace) -> None:
    check(args.threads is None or args.threads > 0, "--threads", args.threads,
          "must be a positive integer")
    from dlm.measurement.exactness import check_exactness, format_results

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    pairs = [p.strip() for p in args.pairs.split(",") if p.strip()]
    results = check_exactness(args.checkpoint, prompts=args.prompts, num_prompts=args.num_prompts,
                              batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                              dtype=args.dtype, pairs=pairs, chat=args.chat)
    print(format_results(results, checkpoint=args.checkpoint, dtype=args.dtype))


# -- import ----------------------------------------------------------------------------------------
def add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", help="a .gguf file, an HF causal LM folder or a hub id")
    p.add_argument("out",
                   help="folder to write (safetensors + tokenizer + dlm.yaml, pattern causal)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="weight dtype of the written folder")


def run_import(args: argparse.Namespace) -> None:
    from dlm.models.importing import import_model

    out = import_model(args.source, args.out, dtype=args.dtype)
    print(f"imported {args.source} -> {out} ({args.dtype}); "
          "use it as model.name_or_path or --ar-baseline")


# -- average ---------------------------------------------------------------------------------------
def add_average(p: argparse.ArgumentParser) -> None:
    p.add_argument("sources", nargs="+",
                   help="two or more checkpoints of one lineage that decode the same way")
    p.add_argument("--out", required=True, help="folder to write (the mean weights, the first "
                   "source's tokenizer and dlm.yaml)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="weight dtype of the written folder (default: the first source's)")


def run_average(args: argparse.Namespace) -> None:
    from dlm.models.averaging import average_checkpoints

    out = average_checkpoints(args.sources, args.out, dtype=args.dtype)
    print(f"averaged {len(args.sources)} checkpoints -> {out}")


# -- bench, bench-train ----------------------------------------------------------------------------
def add_bench(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    add_dataclass_arguments(p, BenchConfig, aliases={"max_new_tokens": ["--gen-length"]})
    p.add_argument("--no-score", dest="scored", action="store_false", default=argparse.SUPPRESS,
                   help=argparse.SUPPRESS)
    add_dataclass_arguments(p, LogTarget)


def run_bench(args: argparse.Namespace) -> Any:
    settings, log = dataclass_from_args(args, BenchConfig), dataclass_from_args(args, LogTarget)
    from dlm.models.checkpoint import check_checkpoint

    # an experiment YAML: random weights, real shape
    if Path(args.checkpoint).suffix not in (".yaml", ".yml"):
        check_checkpoint(args.checkpoint)  # before the prompt set is read or generated
    from dlm.measurement.bench import run_bench as bench

    result = bench(args.checkpoint, settings, log=log)
    print(result.table)
    print(f"json: {result.json_path}\nplot: {result.plot_path}"
          + (f"\nmlflow run: {result.mlflow_run}" if result.mlflow_run else ""))
    return result


def add_bench_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, e.g. experiments/tiny.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides applied to every pattern")
    add_dataclass_arguments(p, TrainBenchConfig)


def run_bench_train(args: argparse.Namespace) -> None:
    settings = dataclass_from_args(args, TrainBenchConfig)
    from dlm.experiments.train_bench import bench_training, format_rows

    print(format_rows(bench_training(args.config, settings, overrides=args.overrides)))


# -- plan ------------------------------------------------------------------------------------------
def add_plan(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="experiment YAML, e.g. experiments/qwen3-8b.yaml")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. trainer.devices=8")
    add_dataclass_arguments(p, PlanConfig)
    p.add_argument("--measure", action="store_true",
                   help="also run one real training step on this CPU "
                        "and print its measured peak memory")


def run_plan(args: argparse.Namespace) -> None:
    settings = dataclass_from_args(args, PlanConfig)
    from dlm.tensor.patterns import load_experiment

    cfg = load_experiment(args.config, overrides=args.overrides)
    if args.measure:
        from dlm.experiments.plan_check import check_plan, format_check

        print(format_check(check_plan(cfg, config_dir=Path(args.config).parent)))
        return
    from dlm.planning.plan import plan_report

    print(plan_report(cfg, settings, config_dir=Path(args.config).parent))


# -- eval ------------------------------------------------------------------------------------------
def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help=CHECKPOINT_HELP)
    add_dataclass_arguments(p, EvalConfig, skip=("decode",))
    add_dataclass_arguments(p, DecodeConfig, prefix="decode.", skip=("shift",))
    add_dataclass_arguments(p, LogTarget)


def run_eval(args: argparse.Namespace) -> dict[str, Any]:
    decode = given(args, DecodeConfig, prefix="decode.")
    settings = dataclass_from_args(args, EvalConfig, decode=decode)
    log = dataclass_from_args(args, LogTarget)
    from dlm.evaluation.tasks import resolve_requested

    # before lm-eval loads
    resolve_requested(settings.tasks, data_dir=settings.data_dir, hub=settings.hub_tasks)
    from dlm.models.checkpoint import check_checkpoint
    from dlm.models.device import resolve_device

    resolve_device(settings.device, key="eval.device")
    check_checkpoint(args.checkpoint)
    from lm_eval.utils import make_table

    from dlm.evaluation.evaluate import evaluate

    results = evaluate(args.checkpoint, settings, log=log)
    print(make_table(results))
    if "groups" in results:
        print(make_table(results, "groups"))
    for key, value in sorted(results["dlm_metrics"].items()):
        print(f"{key}: {value:.4f}")
    print(f"results: {results['results_path']}")
    if "mlflow_run" in results:
        print(f"mlflow run: {results['mlflow_run']}")
    return results


# -- sweep, report, drift --------------------------------------------------------------------------
def add_sweep(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", help="sweep YAML, e.g. sweeps/attention_pattern_tiny.yaml")
    p.add_argument("sweep_overrides", nargs="*", metavar="key=value",
                   help="overrides of the sweep file itself, e.g. eval.limit=20 output_dir=/tmp/s")
    add_dataclass_arguments(p, SweepRunConfig)


def run_sweep(args: argparse.Namespace) -> int:
    run = dataclass_from_args(args, SweepRunConfig)
    from dlm.experiments.report import report
    from dlm.experiments.sweep import run_sweep as sweep_run
    from dlm.settings.sweep import load_sweep

    sweep = load_sweep(args.sweep, args.sweep_overrides)
    result = sweep_run(sweep, run)
    if run.dry_run:
        return 0
    for o in result.outcomes.values():
        print(f"  {o.point_id}: {o.status}" + (f" (run {o.run_id})" if o.run_id else "")
              + (f": {o.error}" if o.error else ""))
    if run.report:
        report(sweep.name, ReportConfig(tracking_uri=result.tracking_uri))
    if result.failed:
        print(f"error: {len(result.failed)} of {len(result.points)} points failed "
              f"({', '.join(o.point_id for o in result.failed)}); "
              "re-run the same command to retry them")
        return 1
    return 0


def add_report(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_name", help="the sweep's `name` (e.g. attention_pattern_tiny)")
    add_dataclass_arguments(p, ReportConfig)


def run_report(args: argparse.Namespace) -> Any:
    from dlm.experiments.report import report

    return report(args.sweep_name, dataclass_from_args(args, ReportConfig))


def add_drift(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoints", nargs="+", metavar="CKPT",
                   help="HF model folder (dlm checkpoint or plain HF); several draw one line each")
    add_dataclass_arguments(p, DriftConfig)
    add_dataclass_arguments(p, LogTarget)


def run_drift(args: argparse.Namespace) -> Any:
    settings, log = dataclass_from_args(args, DriftConfig), dataclass_from_args(args, LogTarget)
    from dlm.measurement.drift import checkpoint_drift

    reports = checkpoint_drift(args.checkpoints, settings, log=log)
    for ckpt, report in reports.items():
        print(f"== {ckpt} (relative drift from {settings.reference})\n{report.table()}")
    if settings.plot:
        print(f"plot: {settings.plot}")
    if log.mlflow_run:
        metrics = next(iter(reports.values())).as_metrics()
        print(f"logged {len(metrics)} drift metrics and the figure to run {log.mlflow_run}")
    return reports
