"""`dlm.settings.sweep`: the sweep file's schema and its one-line errors (its `eval:` / `bench:` sections are
`dlm eval`'s and `dlm bench`'s own settings), and the shipped sweep files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dlm.experiments.points import expand
from dlm.settings import ConfigError
from dlm.settings.sweep import load_sweep
from tests.experiments.test_sweep import REPO, write_sweep


# -- the sweep file's own errors --------------------------------------------------------------------
@pytest.mark.parametrize("change, match", [
    ({"evall": {}}, r"evall: unknown key \(did you mean 'eval'\?\); allowed: name, experiment"),
    ({"bench": {"max_new_tokenz": 8}}, r"bench.max_new_tokenz: unknown key \(did you mean 'max_new_tokens'\?\)"),
    ({"bench": {"thresholds": [0.5, 1.5]}}, r"bench.thresholds=1.5: must be in \(0, 1\]"),
    ({"eval": {"decode": {"treshold": 0.5}}}, r"eval.decode.treshold: unknown key; allowed: mode, block_size"),
    ({"launcher": "kubernetes"}, r"launcher='kubernetes': unknown launcher; allowed: local, slurm"),
    ({"grid": {"output_dir": ["a", "b"]}}, r"^output_dir: set by the sweep for every point"),
    ({"grid": {"attention.pattern": []}}, r"grid.attention.pattern=\[\]: needs at least one value"),
    ({"experiment": "missing.yaml"}, r"experiment='.*missing.yaml': file not found"),
])
def test_bad_sweep_files_fail_in_one_line(tmp_path, change, match):
    path = write_sweep(tmp_path, Path("/nonexistent"))
    spec = yaml.safe_load(path.read_text()) | change
    if "points" in change:
        spec["grid"] = {}
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(ConfigError, match=match) as err:
        load_sweep(path)
    assert "\n" not in str(err.value)


def test_shipped_sweeps_load_and_expand():
    ids = {p.stem: [pt.id for pt in expand(load_sweep(p))] for p in sorted((REPO / "sweeps").glob("*.yaml"))}
    assert ids["attention_pattern_tiny"] == ids["attention_pattern"] and len(ids["attention_pattern"]) == 6
    assert ids["attention_pattern_demo"] == ["pattern-bidirectional", "pattern-block", "pattern-block_clean"]
    assert ids["masking_tiny"][:2] == ["strategy-uniform", "strategy-position_half_life-0.03"]
    tiny_block = load_sweep(REPO / "sweeps/block_size_tiny.yaml")
    assert (tiny_block.eval.decode_block_sizes == [2, 4, 8, 16]
            and load_sweep(REPO / "sweeps/block_size.yaml").launcher == "slurm")
