"""The Python steps of scripts/gpu_check.sh: the CUDA gate, what the environment holds against what
the node is expected to have, flex vs sdpa on a 0.5B-shaped model (logits and gradients, every
diffusion pattern, with and without the document mask), the tiny presets of the CPU rehearsal, and
the report that gathers every step's output into one JSON and one Markdown file. Stdlib only at
import: `deps` must run where anything may be missing.

    python scripts/gpu_check.py require-cuda
    python scripts/gpu_check.py deps OUT.json
    python scripts/gpu_check.py flex OUT.json [PRESET] [SEQ_LEN]
    python scripts/gpu_check.py rehearsal-presets OUT_DIR
    python scripts/gpu_check.py requirements    (what the check needs of dlm's dependencies)
    python scripts/gpu_check.py wheelhouse-matches REPORT.json
    python scripts/gpu_check.py report OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESET = "experiments/qwen2.5-0.5b-random.yaml"
PRESETS = ("qwen2.5-0.5b-random", "smollm2-135m-random")
"""The real shapes the check times decoding at (random weights, experiments/<name>.yaml)."""
NODE_PACKAGES = REPO / "scripts" / "gpu_node_packages.txt"
WHEELHOUSE = REPO / "scripts" / "wheelhouse.txt"
NOT_SHIPPED = ("lm-eval", "mlflow", "submitit", "gguf")
"""dlm dependencies the check never imports (dlm eval, tracking, sweeps, reading .gguf files), so
the node's wheelhouse leaves them out."""
TINY = {"model": {"dtype": "bfloat16", "config": {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
    "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 512}},
    "trainer": {"accelerator": "cpu"}, "data": {"num_workers": 0, "synthetic_size": 400}}
"""What the rehearsal changes in each preset: its shape (the offline tokenizer has 384 tokens) and
the device."""
TOL = 1e-2
"""Relative pass mark: 24 float32 layers, where the flex kernel may round matmuls as TF32 and sdpa
not."""
# (pattern, clean context, docs)
FLEX_CASES = [("block", "block", False), ("block_clean", "block", False),
              ("block_clean", "causal", False), ("block_clean", "block", True),
              ("block_window", "block", False)]


def require_cuda() -> int:
    try:
        import torch
    except ImportError:
        print("error: gpu-check needs torch (with CUDA); set PY to the environment's python",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA device (torch.cuda.is_available() is False here); "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    return 0


def _random_model(dtype: str, preset: str = PRESET):
    from dlm.models.backbone import load_backbone
    from dlm.settings import load_config

    cfg = load_config(preset, overrides=[f"model.dtype={dtype}"])
    import torch

    torch.manual_seed(0)
    return cfg, load_backbone(cfg.model, attn_implementation="sdpa")


def _forward_backward(model, ids, attn):
    import torch

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **attn.as_kwargs(), use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach().float(), grads


def _compare(model, pattern: str, clean_context: str, document_mask: bool, seq_len: int = 1024,
             batch: int = 2) -> dict:
    """sdpa against flex on CUDA; on CPU (the rehearsal: flex has no backward there) against
    eager."""
    import torch

    from dlm.tensor import patterns
    from dlm.tensor.attention import build_attention_inputs

    device = model.device
    other = ("flex", "flex_attention") if device.type == "cuda" else ("eager", "eager")
    g = torch.Generator(device=device).manual_seed(0)
    mask_pattern = patterns.get(pattern, block_size=16, clean_context=clean_context)
    n = mask_pattern.input_length(seq_len)
    ids = torch.randint(0, 384, (batch, n), device=device, generator=g)
    docs = None
    if document_mask:  # three documents per row, boundaries inside blocks (300, 701 at L 1024)
        cuts = torch.tensor([seq_len * 293 // 1000, seq_len * 685 // 1000], device=device)
        positions = torch.arange(seq_len, device=device)
        docs = torch.bucketize(positions, cuts).expand(batch, -1).contiguous()
    out = {}
    for backend, impl in (("sdpa", "sdpa"), other):
        model.set_attn_implementation(impl)
        attn = build_attention_inputs(mask_pattern, batch_size=batch, seq_len=seq_len,
                                      backend=backend, device=device, dtype=model.dtype,
                                      document_ids=docs)
        out[backend] = _forward_backward(model, ids, attn)
    (ls, gs), (lf, gf) = out["sdpa"], out[other[0]]
    logits_diff, grad_diff = (ls - lf).abs().max(), (gs - gf).norm()
    ok = logits_diff <= TOL * ls.abs().max() and grad_diff <= TOL * gs.norm()
    return {"pattern": pattern, "clean_context": clean_context, "document_mask": document_mask,
            "seq_len": seq_len, "against": other[0], "dtype": str(model.dtype),
            "logits_max_abs_diff": float(logits_diff), "logits_max_abs": float(ls.abs().max()),
            "grad_rel_diff": float(grad_diff / gs.norm()), "ok": bool(ok)}


def flex(out_json: str, preset: str = PRESET, seq_len: str = "1024") -> int:
    """flex vs sdpa on the 0.5B shape in float32: logits and the gradient of every weight, relative
    to `TOL`. Each case is written as soon as it ends (a step cut short keeps the cases it
    finished)."""
    import torch

    _, bb = _random_model("float32", preset)
    model = bb.model.to("cuda" if torch.cuda.is_available() else "cpu").train()
    rows = []
    for pattern, clean_context, document_mask in FLEX_CASES:
        start = time.perf_counter()
        row = _compare(model, pattern, clean_context, document_mask, seq_len=int(seq_len))
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row), flush=True)
        rows.append(row)
        Path(out_json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


def rehearsal_presets(out_dir: str) -> int:
    """experiments/<preset>.yaml at the rehearsal's tiny shape: `base:` the real preset, `TINY` on
    top."""
    import yaml

    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in PRESETS:
        layer = {"base": str(REPO / "experiments" / f"{name}.yaml"), "name": f"{name}-tiny", **TINY}
        print(folder / f"{name}.yaml")
        (folder / f"{name}.yaml").write_text(yaml.safe_dump(layer, sort_keys=False))
    return 0


def _requirement_lines(path: Path) -> list[str]:
    """A requirements file's requirements, comments dropped."""
    return [line.split(" #")[0].strip() for line in path.read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def _name(requirement: str) -> str:
    """PEP 503 normalized project name of a requirement string."""
    name = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1)
    return re.sub(r"[-_.]+", "-", name).lower()


def check_requirements() -> list[str]:
    """dlm's dependencies (pyproject.toml) less the ones the check never imports (`NOT_SHIPPED`)."""
    import tomllib

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if _name(d) not in NOT_SHIPPED]


def requirements() -> int:
    print("\n".join(check_requirements()))
    return 0


def wheelhouse_matches(report_json: str) -> int:
    """`pip install --dry-run --report` in a venv of the node's packages, for `check_requirements()`
    constrained by scripts/wheelhouse.txt, must install exactly the wheelhouse: nothing missing from
    it, nothing it ships in vain."""
    report = json.loads(Path(report_json).read_text())
    would = {_name(i["metadata"]["name"]): i["metadata"]["version"] for i in report["install"]}
    pins = {_name(r): r.split("==")[1] for r in _requirement_lines(WHEELHOUSE)}
    missing = sorted(f"{n}=={v}" for n, v in would.items() if pins.get(n) != v)
    extra = sorted(f"{n}=={v}" for n, v in pins.items() if would.get(n) != v)
    if missing or extra:
        print("error: scripts/wheelhouse.txt: differs from what the node lacks "
              "(scripts/gpu_node_packages.txt); "
              f"add: {', '.join(missing) or 'nothing'}; remove: {', '.join(extra) or 'nothing'}",
              file=sys.stderr)
        return 1
    print(f"scripts/wheelhouse.txt: the {len(pins)} wheels the node lacks, no more")
    return 0


def _installed_version(name: str) -> str | None:
    """The installed version of distribution `name`, or None if there is none."""
    from importlib import metadata

    try:
        # the first distribution on sys.path: the one `import` finds
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def deps(out_json: str) -> int:
    """What this environment imports against what the check expects: the node's packages
    (scripts/gpu_node_packages.txt; a different version is reported, not failed), every wheel of
    scripts/wheelhouse.txt found first on sys.path at its pinned version, and each of their
    requirements and the check's satisfied."""
    from importlib import metadata

    from packaging.requirements import Requirement

    node = {_name(r): r for r in _requirement_lines(NODE_PACKAGES)}
    pins = {_name(r): r for r in _requirement_lines(WHEELHOUSE)}
    data = {"python": sys.version.split()[0], "node_packages": {}, "wheelhouse": {},
            "problems": [], "notes": []}
    for name, req in node.items():
        version = _installed_version(name)
        data["node_packages"][name] = version
        if version is None or not Requirement(req).specifier.contains(version, prereleases=True):
            note = f"{name}: expected {req}, found {version or 'nothing'}"
            if name not in pins:  # the wheelhouse's copy replaces the node's where it ships one
                data["notes"].append(note)
    needed = [Requirement(r) for r in check_requirements()]
    for name, req in pins.items():
        version = _installed_version(name)
        data["wheelhouse"][name] = version
        if version != req.split("==")[1]:
            data["problems"].append(f"{name}: the wheelhouse pins {req}, "
                                    f"import finds {version or 'nothing'}")
        elif version is not None:
            needed += [Requirement(r) for r in metadata.requires(name) or []]
    for req in needed:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        version = _installed_version(req.name)
        if version is None or not req.specifier.contains(version, prereleases=True):
            data["problems"].append(f"{req}: found {version or 'nothing'}")
    data["problems"] = sorted(set(data["problems"]))
    Path(out_json).write_text(json.dumps(data, indent=2))
    versions = {**data["node_packages"], **data["wheelhouse"]}
    print(f"python {data['python']}; " + ", ".join(f"{n} {v}" for n, v in versions.items()))
    for line in data["notes"]:
        print(f"note: {line} (the node differs from scripts/gpu_node_packages.txt)")
    for line in data["problems"]:
        print(f"error: {line}")
    return 1 if data["problems"] else 0


def _train_rows(path: Path) -> list[dict]:
    """The `| pattern | tokens/s | vs causal | MFU |` table `dlm bench-train` prints."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("pattern", "---") and not cells[0].startswith("-"):
            rows.append(dict(zip(("pattern", "tokens_per_sec", "vs_causal", "mfu"), cells)))
    return rows


def _decode_tables(log: Path) -> list[str]:
    """The Markdown table(s) and note `dlm bench` printed into its step log."""
    lines = log.read_text().splitlines() if log.is_file() else []
    keep = [line for line in lines if line.startswith("|") or line.startswith("max new tokens")]
    return keep or ["(missing)"]


def report(out_dir: str) -> int:
    """report.json + report.md from the step files in `out_dir` (steps.tsv: name, rc, seconds,
    budget)."""
    import torch

    out = Path(out_dir)
    steps = [dict(zip(("step", "rc", "seconds", "budget"), line.split("\t"))) for line in
             (out / "steps.tsv").read_text().splitlines() if line.strip()]

    def read(name: str) -> dict | None:
        return json.loads((out / name).read_text()) if (out / name).is_file() else None

    decodes = sorted(p.name for p in out.glob("decode_*") if p.is_dir())
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (rehearsal)"
    pytest_log = out / "pytest_cuda.txt"
    pytest_cuda = pytest_log.read_text().strip().splitlines()[-1:] if pytest_log.is_file() else []
    data = {"device": device, "torch": torch.__version__, "cuda": torch.version.cuda,
            "steps": steps, "deps": read("deps.json"), "pytest_cuda": pytest_cuda,
            "flex_vs_sdpa": read("flex.json") or [],
            "bench_train": {name: _train_rows(out / f"bench_train_{name}.md")
                            for name in ("causal_sdpa", "block_clean_flex")},
            "decode": {name: read(f"{name}/bench.json") for name in decodes}}
    (out / "report.json").write_text(json.dumps(data, indent=2))
    wheelhouse = (data["deps"] or {}).get("wheelhouse") or {}
    versions = ", ".join(f"{n} {v}" for n, v in wheelhouse.items()
                         if n in ("transformers", "datasets"))
    md = [f"# gpu-check on {data['device']} (torch {data['torch']}, CUDA {data['cuda']}"
          f"{', ' if versions else ''}{versions})", "", "| step | rc | seconds | budget |",
          "|---|---:|---:|---:|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']} | {s.get('budget', '')} |" for s in steps]
    md += ["", "pytest -m cuda: " + " ".join(data["pytest_cuda"]), "",
           "## flex vs sdpa (0.5B shape, float32)", "",
           "| pattern | clean context | document mask | against | logits max abs diff "
           "| grad rel diff | ok |",
           "|---|---|---|---|---:|---:|---|"]
    md += [f"| {r['pattern']} | {r.get('clean_context', 'block')} | {r['document_mask']} | "
           f"{r.get('against', 'flex')} | {r['logits_max_abs_diff']:.2e} | "
           f"{r['grad_rel_diff']:.2e} | {r['ok']} |"
           for r in data["flex_vs_sdpa"]]
    md += ["", "## dlm bench-train (L 2048, bf16)", ""]
    for name in ("causal_sdpa", "block_clean_flex"):
        path = out / f"bench_train_{name}.md"
        rows = ([line for line in path.read_text().splitlines() if line.startswith("|")]
                if path.is_file() else [])
        md += [f"### {name}", "", *(rows or ["(missing)"]), ""]
    for name in [p.stem for p in sorted(out.glob("decode_*.log"))]:
        md += [f"## {name} (dlm bench, random weights, bf16)", "",
               *_decode_tables(out / f"{name}.log"), ""]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(out / "report.md")
    return 0


COMMANDS = {"require-cuda": require_cuda, "deps": deps, "flex": flex,
            "rehearsal-presets": rehearsal_presets, "requirements": requirements,
            "wheelhouse-matches": wheelhouse_matches, "report": report}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: gpu_check.py {{{','.join(COMMANDS)}}} [ARG]")
    sys.exit(COMMANDS[sys.argv[1]](*sys.argv[2:]))
