"""`dlm bench` on real tiny checkpoints: the grid, table, JSON, MLflow record, plot, and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import mlflow
import pytest
import torch
import yaml

from dlm.cli.main import main
from dlm.data.synthetic import format_example, problems
from dlm.measurement.bench import bench_metrics, format_table, run_bench
from dlm.settings import BenchConfig, ConfigError, LogTarget
from tests.conftest import save_tiny, sharp_backbone

pytestmark = pytest.mark.usefixtures("one_thread")

GEN = 16


def bench(checkpoint, *, mlflow_run=None, tracking_uri=None, **settings):
    """`run_bench` with its settings as keywords (sequences and paths as the YAML / CLI would give them)."""
    settings = {k: list(v) if isinstance(v, tuple) else str(v) if isinstance(v, Path) else v
                for k, v in settings.items()}
    log = LogTarget(mlflow_run, tracking_uri) if mlflow_run or tracking_uri else None
    return run_bench(checkpoint, BenchConfig(**settings), log=log)


def _save(tokenizer, out: Path, pattern: str, seed: int) -> Path:
    # sharpened: confident enough that threshold 0.3 commits several tokens a pass
    return save_tiny(sharp_backbone("qwen3", tokenizer, dtype=torch.float32, seed=seed), out, pattern)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tokenizer):
    tmp = tmp_path_factory.mktemp("bench")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": format_example(p)["prompt"], "answer": p["answer"]}) + "\n"
                               for p in problems(3, seed=1)))
    return {"dlm": _save(tokenizer, tmp / "dlm", "block_clean", 0), "ar": _save(tokenizer, tmp / "ar", "causal", 1),
            "prompts": prompts, "tmp": tmp}


@pytest.fixture(scope="module")
def new_run(files):
    """Runs in one sqlite store per module: creating the store costs seconds."""
    client = mlflow.MlflowClient(f"sqlite:///{files['tmp']}/mlflow.db")
    experiment = client.create_experiment("bench")
    return lambda: client.create_run(experiment).info.run_id


@pytest.fixture(scope="module")
def result(files, new_run):
    run = new_run()
    return bench(files["dlm"], ar_baseline=files["ar"], thresholds=(0.3, 1.0), batch_sizes=(1, 2), max_new_tokens=GEN,
                     repeats=2, warmup=1, prompts=files["prompts"], ignore_eos=True, mlflow_run=run,
                     tracking_uri=f"sqlite:///{files['tmp']}/mlflow.db", output_dir=files["tmp"] / "out")


def _row(result, method, batch_size, threshold=None):
    (row,) = [r for r in result.rows if (r.method, r.batch_size, r.threshold) == (method, batch_size, threshold)]
    return row


def test_grid_has_every_setting_once_per_batch_size(result):
    settings = [(r.method, r.batch_size, r.threshold) for r in result.rows]
    per_batch = [("ar", None), ("ar-hf", None), ("dlm-1tpf", None), ("dlm", 0.3), ("dlm", 1.0), ("dlm-nocache", 0.9)]
    assert settings == [(m, b, t) for b in (1, 2) for m, t in per_batch]
    assert all(r.tokens_per_prompt == GEN and r.tokens_per_sec_min <= r.tokens_per_sec <= r.tokens_per_sec_max
               for r in result.rows)


def test_one_token_per_forward_references_have_tpf_one(result):
    for b in (1, 2):
        assert _row(result, "dlm-1tpf", b).tpf == 1.0 and _row(result, "dlm-1tpf", b).nfe == GEN
        assert _row(result, "ar", b).tpf == 1.0 and _row(result, "ar", b).speedup_vs_ar == 1.0
        assert _row(result, "ar-hf", b).tpf == 1.0 and _row(result, "ar-hf", b).speedup_vs_hf == 1.0
    assert _row(result, "dlm", 1, 0.3).tpf > 1.0  # the sharpened model commits several tokens in some passes


def test_speedups_divide_the_matching_rows(result):
    cached, no_cache, ar = _row(result, "dlm", 2, 0.3), _row(result, "dlm-nocache", 2, 0.9), _row(result, "ar", 2)
    assert cached.speedup_vs_ar == pytest.approx(cached.tokens_per_sec / ar.tokens_per_sec)
    assert cached.forward_vs_ar == pytest.approx(cached.tpf / cached.speedup_vs_ar)  # seconds per forward, over AR's
    hf = _row(result, "ar-hf", 2)
    assert cached.speedup_vs_hf == pytest.approx(cached.tokens_per_sec / hf.tokens_per_sec)
    assert cached.speedup_cache is None  # no no-cache row at threshold 0.3
    assert no_cache.speedup_cache is None and no_cache.exact_match is not None


def test_table_json_plot_and_mlflow_record(result, files):
    lines = result.table.splitlines()
    assert lines[0].startswith("| setting | batch | policy | tokens/s |") and len(lines) == 2 + 12 + 2
    assert f"AR rows: {files['ar']} (--ar-baseline)" in result.table and "EOS ignored" in result.table
    saved = json.loads(result.json_path.read_text())
    assert saved["meta"]["max_new_tokens"] == GEN and saved["meta"]["block_size"] == 4
    assert [r["tpf"] for r in saved["rows"]] == [r.tpf for r in result.rows]
    assert result.plot_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    client = mlflow.MlflowClient(f"sqlite:///{files['tmp']}/mlflow.db")
    metrics = client.get_run(result.mlflow_run).data.metrics
    assert metrics["bench/dlm_batch1_t0.3/tpf"] == pytest.approx(_row(result, "dlm", 1, 0.3).tpf)
    assert metrics["bench/ar_batch2/tokens_per_sec"] == pytest.approx(_row(result, "ar", 2).tokens_per_sec)
    assert ({a.path for a in client.list_artifacts(result.mlflow_run, "bench")}
            == {"bench/bench.json", "bench/pareto.png"})


def test_cached_and_uncached_decoding_agree_on_tokens_per_forward(files):
    out = bench(files["dlm"], thresholds=(0.3,), no_cache_thresholds=(0.3,), batch_sizes=(2,), max_new_tokens=8,
                    repeats=1, warmup=0, prompts=files["prompts"], output_dir=files["tmp"] / "agree")
    cached, no_cache = _row(out, "dlm", 2, 0.3), _row(out, "dlm-nocache", 2, 0.3)
    assert (cached.tpf, cached.nfe, cached.exact_match) == (no_cache.tpf, no_cache.nfe, no_cache.exact_match)
    assert cached.speedup_cache == pytest.approx(cached.tokens_per_sec / no_cache.tokens_per_sec)
    assert "itself in AR mode (no source AR checkpoint recorded" in out.table


@pytest.mark.parametrize("kwargs, match", [
    ({"thresholds": (0.5, 1.5)}, r"^bench.thresholds=1.5: must be in \(0, 1\]"),
    ({"thresholds": (0.0,)}, r"^bench.thresholds=0.0: must be in \(0, 1\]"),
    ({"no_cache_thresholds": (-1.0,)}, r"^bench.no_cache_thresholds=-1.0: must be in \(0, 1\]"),
    ({"block_size": 0}, r"^bench.block_size=0: must be a positive integer"),
    ({"batch_sizes": (1, 0)}, r"^bench.batch_sizes=0: must be a positive integer"),
    ({"max_new_tokens": 250}, r"^bench.max_new_tokens=250: longest prompt \d+ tokens \+ 250 = \d+ exceeds "
                              r"max_position_embeddings=256"),
    ({"mlflow_run": "nope"}, r"^bench.mlflow_run='nope': no such run"),
    ({"tokens_per_pass": (2, 0)}, r"^bench.tokens_per_pass=0: must be a positive integer"),
    ({"forward_costs": (-1,)}, r"^bench.forward_costs=-1: must be a positive integer"),
    ({"v2_count_thresholds": (2.0,)}, r"^bench.v2_count_thresholds=2.0: must be in \(0, 1\]"),
    ({"thresholds": ()}, r"^bench.thresholds=\[\]: need at least one threshold "
                         r"\(or bench.tokens_per_pass, decoders, ar_mode\)"),
    ({"dtype": "float8"}, r"^bench.dtype='float8': .*allowed: float32, bfloat16, float16, float64"),
    ({"scored": True, "prompts": "PLAIN"}, r"scoring needs an 'answer' in every row"),
    ({"speculative": True}, r"^decode.mode='speculative': needs a checkpoint trained with "
                            r"attention.clean_context=causal"),
])
def test_bad_input_fails_in_one_line_before_any_output(files, new_run, tmp_path, kwargs, match):
    if kwargs.get("prompts") == "PLAIN":
        (tmp_path / "plain.jsonl").write_text('{"prompt": "hi"}\n')
        kwargs["prompts"] = tmp_path / "plain.jsonl"
    kwargs = {"prompts": files["prompts"], "tracking_uri": f"sqlite:///{files['tmp']}/mlflow.db"} | kwargs
    with pytest.raises(ConfigError, match=match) as err:
        bench(files["dlm"], output_dir=tmp_path / "out", **kwargs)
    assert "\n" not in str(err.value) and not (tmp_path / "out").exists()


def test_checkpoint_without_dlm_yaml_is_refused(files, tmp_path):
    with pytest.raises(ConfigError, match=r"^checkpoint='.*': no dlm.yaml and no config.json"):
        bench(tmp_path)
    with pytest.raises(ConfigError, match=r"no dlm.yaml and no config.json"):
        bench(files["dlm"], ar_baseline=tmp_path)


def test_an_ar_checkpoint_benches_its_own_ar_rows_and_forward_costs(files, tmp_path, capsys):
    out = bench(files["ar"], thresholds=(0.3,), batch_sizes=(1,), no_cache_thresholds=(), max_new_tokens=6,
                repeats=1, warmup=0, prompts=files["prompts"], forward_costs=(1, 4), forward_cost_context=8,
                output_dir=tmp_path / "ar")
    assert {r.method for r in out.rows} == {"ar", "ar-hf"} and all(r.tpf == 1.0 for r in out.rows)
    assert [c["query_tokens"] for c in out.meta["forward_costs"]] == [1, 4]
    assert "is an AR model (pattern causal): only its AR rows" in capsys.readouterr().out
    assert "(an AR model)" in out.table and out.plot_path.is_file()
    with pytest.raises(ConfigError, match=r"^bench.ar_baseline='.*': the checkpoint '.*' itself; allowed: another AR"):
        bench(files["ar"], ar_baseline=files["ar"], output_dir=tmp_path / "refused")
    with pytest.raises(ConfigError, match=r"^bench.speculative=True: '.*' is an AR model \(pattern causal\)"):
        bench(files["ar"], speculative=True, output_dir=tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_an_ar_checkpoint_runs_its_own_ar_loop_beside_another_ar_baseline(files, tokenizer, tmp_path, capsys):
    same = tmp_path / "same"  # the checkpoint's weights as a plain HF folder: its loop must give the baseline's tokens
    shutil.copytree(files["ar"], same, ignore=shutil.ignore_patterns("dlm.yaml"))
    other = _save(tokenizer, tmp_path / "other", "causal", 2)
    kwargs = dict(batch_sizes=(1,), no_cache_thresholds=(), max_new_tokens=6, repeats=1, warmup=0,
                  prompts=files["prompts"], hf_generate=False)
    twin = bench(files["ar"], ar_baseline=same, output_dir=tmp_path / "twin", **kwargs)  # thresholds: no rows
    assert [r.method for r in twin.rows] == ["ar", "ar-self"]
    assert _row(twin, "ar-self", 1).same_as_ar == 1.0 and _row(twin, "ar-self", 1).tpf == 1.0
    assert "its own AR loop runs beside the baseline" in capsys.readouterr().out
    apart = bench(files["ar"], ar_baseline=other, thresholds=(), ar_mode=True, output_dir=tmp_path / "apart",
                  **kwargs)
    assert _row(apart, "ar-self", 1).same_as_ar < 1.0 and f"{other} (--ar-baseline)" in apart.table


def test_a_plain_hf_folder_is_an_ar_baseline_and_rows_report_agreement_with_it(files, tmp_path):
    plain = tmp_path / "plain"  # the AR checkpoint's weights without dlm.yaml, as a user's HF folder holds them
    shutil.copytree(files["ar"], plain, ignore=shutil.ignore_patterns("dlm.yaml"))
    kwargs = dict(thresholds=(0.3,), batch_sizes=(1,), no_cache_thresholds=(), max_new_tokens=6, repeats=1, warmup=0,
                  prompts=files["prompts"])
    out = bench(files["dlm"], ar_baseline=plain, output_dir=tmp_path / "plain_out", **kwargs)
    ref = bench(files["dlm"], ar_baseline=files["ar"], output_dir=tmp_path / "ref_out", **kwargs)
    assert _row(out, "ar", 1).tokens_per_prompt == _row(ref, "ar", 1).tokens_per_prompt
    assert _row(out, "ar-hf", 1).same_as_ar == 1.0  # transformers generate gives the lean loop's tokens
    hf_answers = _row(out, "ar-hf", 1).same_answer_as_ar
    assert 0 <= hf_answers <= 1  # equal tokens, but outputs without '#### N' agree on no answer
    assert _row(out, "ar", 1).same_as_ar is None
    cached = _row(out, "dlm", 1, 0.3)
    assert 0 <= cached.same_as_ar <= 1 and 0 <= cached.same_answer_as_ar <= 1
    assert "= AR tokens" in out.table and "= AR answer" in out.table


def test_command_line_parses_lists_and_prints_the_table(files, capsys):
    argv = ["bench", str(files["dlm"]), "--thresholds", "0.3", "--batch-sizes", "2", "--gen-length", "8",
            "--no-cache-thresholds", "", "--repeats", "1", "--warmup", "0", "--no-score",
            "--prompts", str(files["prompts"]), "--output-dir", str(files["tmp"] / "cli")]
    assert main(argv) == 0
    saved = json.loads((files["tmp"] / "cli" / "bench.json").read_text())
    assert [r["method"] for r in saved["rows"]] == ["ar", "ar-hf", "dlm-1tpf", "dlm"]
    assert saved["rows"][0]["exact_match"] is None
    assert "| dLM cached | 2 | t 0.3 |" in capsys.readouterr().out


def test_mlflow_run_auto_logs_into_the_run_that_trained_the_checkpoint(files, new_run, tmp_path):
    uri = f"sqlite:///{files['tmp']}/mlflow.db"
    client, run = mlflow.MlflowClient(uri), new_run()
    # as dlm train writes it
    (files["tmp"] / "mlflow_run.json").write_text(json.dumps({"run_id": run, "tracking_uri": uri}))
    out = bench(files["dlm"], mlflow_run="auto", thresholds=(0.5,), batch_sizes=(1,), no_cache_thresholds=(),
                    max_new_tokens=4, repeats=1, warmup=0, prompts=files["prompts"], output_dir=tmp_path)
    assert out.mlflow_run == run and "bench/dlm_batch1_t0.5/tokens_per_sec" in client.get_run(run).data.metrics
    with pytest.raises(ConfigError, match=r"^bench.mlflow_run='auto': no mlflow_run.json beside .*; pass a run id"):
        bench(shutil.copytree(files["dlm"], tmp_path / "copy/final"), mlflow_run="auto")


# --- which AR model the AR rows run --------------------------------------------------------------------------


def _with_base_model(files, tmp_path, base: str) -> Path:
    ckpt = shutil.copytree(files["dlm"], tmp_path / "converted")
    meta = yaml.safe_load((ckpt / "dlm.yaml").read_text()) | {"base_model": base}
    (ckpt / "dlm.yaml").write_text(yaml.safe_dump(meta))
    return ckpt


def test_ar_rows_default_to_the_model_it_was_converted_from(files, tmp_path):
    ckpt = _with_base_model(files, tmp_path, str(files["ar"]))
    kwargs = dict(thresholds=(0.3,), batch_sizes=(1,), no_cache_thresholds=(), max_new_tokens=6, repeats=1, warmup=0,
                  prompts=files["prompts"], scored=False)
    default = bench(ckpt, output_dir=tmp_path / "default", **kwargs)
    explicit = bench(ckpt, ar_baseline=files["ar"], output_dir=tmp_path / "explicit", **kwargs)
    assert f"AR rows: {files['ar']} (the model it was converted from, dlm.yaml base_model)" in default.table
    same = [(r.method, r.tpf, r.nfe, r.tokens_per_prompt) for r in default.rows]
    assert same == [(r.method, r.tpf, r.nfe, r.tokens_per_prompt) for r in explicit.rows]


def test_a_recorded_base_model_that_is_gone_fails_in_one_line(files, tmp_path):
    ckpt = _with_base_model(files, tmp_path, str(tmp_path / "moved_away"))
    with pytest.raises(ConfigError, match=r"^bench.ar_baseline: the source model '.*moved_away' recorded in .* does "
                                          r"not exist; pass --ar-baseline PATH$"):
        bench(ckpt, prompts=files["prompts"], output_dir=tmp_path / "out")
    assert not (tmp_path / "out").exists()


# --- random weights at a given shape: fixed policy and the per-forward cost -----------------------------------


def test_an_experiment_yaml_benches_random_weights_at_a_known_tpf(files, tmp_path):
    shape = tmp_path / "shape.yaml"
    shape.write_text(yaml.safe_dump({"name": "shape", "model": {
        "arch": "qwen3", "tokenizer": "builtin:tiny", "config": {
            "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
            "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 256, "vocab_size": 1000}},
        "attention": {"pattern": "block_clean", "block_size": 4}, "data": {"max_length": 32}}))
    out = bench(shape, thresholds=(0.9,), tokens_per_pass=(2, 4), no_cache_tokens_per_pass=(2,), batch_sizes=(1,),
                no_cache_thresholds=(), max_new_tokens=8, repeats=1, warmup=0, prompts=files["prompts"],
                ignore_eos=True, forward_costs=(1, 4), forward_cost_context=16, output_dir=tmp_path / "out")
    assert _fixed(out, "dlm-fixed", 2).tpf == 2.0 and _fixed(out, "dlm-fixed", 4).tpf == 4.0
    assert _fixed(out, "dlm-fixed", 2).speedup_cache == pytest.approx(
        _fixed(out, "dlm-fixed", 2).tokens_per_sec / _fixed(out, "dlm-nocache", 2).tokens_per_sec)
    assert out.meta["parameters"] > 1000 * 32  # the config's vocabulary, not the tokenizer's 384
    costs = out.meta["forward_costs"]
    assert [c["query_tokens"] for c in costs] == [1, 4] and costs[0]["ratio"] == 1.0
    assert "| query tokens | ms / forward" in out.table and "against 16 cached tokens" in out.table


def _fixed(result, method, n):
    (row,) = [r for r in result.rows if (r.method, r.tokens_per_pass) == (method, n)]
    return row


def test_v2_counting_rows_count_the_eos_block_and_a_cache_update_forward_per_block(files, tmp_path):
    out = bench(files["dlm"], thresholds=(0.3,), v2_count_thresholds=(0.3,), batch_sizes=(1,), no_cache_thresholds=(),
                max_new_tokens=8, repeats=1, warmup=0, prompts=files["prompts"], ignore_eos=True,
                output_dir=tmp_path / "v2")
    ours, theirs = _row(out, "dlm", 1, 0.3), _row(out, "dlm-v2count", 1, 0.3)
    assert theirs.tpf == ours.tpf  # without EOS the decodes are the same ...
    blocks = 8 // 4
    assert theirs.tpf_v2 == pytest.approx(8 / (theirs.nfe + blocks))  # ... and v2 charges a forward per block


def test_bf16_bench_decodes_in_bf16_and_says_so(files, tmp_path):
    out = bench(files["dlm"], ar_baseline=files["ar"], dtype="bfloat16", thresholds=(0.3,), batch_sizes=(1,),
                no_cache_thresholds=(), max_new_tokens=6, repeats=1, warmup=0, prompts=files["prompts"],
                output_dir=tmp_path)
    assert out.meta["dtype"] == "bfloat16" and "bfloat16" in out.table
    assert _row(out, "ar-hf", 1).same_as_ar == 1.0  # one token a forward on both sides: no rounding difference


def test_any_decoder_setting_benches_beside_the_ar_rows_the_factor_policy_included(files, tmp_path):
    out = bench(files["dlm"], ar_baseline=files["ar"], thresholds=(), decoders=["policy=factor factor=2.0",
                "policy=fixed tokens_per_pass=4"], batch_sizes=(1,), max_new_tokens=GEN, repeats=1, warmup=0,
                prompts=files["prompts"], ignore_eos=True, hf_generate=False, one_token_reference=False,
                no_cache_thresholds=(), output_dir=tmp_path)
    rows = {r.decoder: r for r in out.rows if r.method == "dlm"}
    assert set(rows) == {"policy=factor factor=2.0", "policy=fixed tokens_per_pass=4"}
    assert rows["policy=fixed tokens_per_pass=4"].tpf == 4.0 and rows["policy=factor factor=2.0"].tpf >= 1.0
    assert "dlm_batch1_policy-factor_factor-2.0/tpf" in " ".join(bench_metrics(out.rows))
    assert "policy=factor factor=2.0" in format_table(out.rows, out.meta)
