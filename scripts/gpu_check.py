"""The Python steps of scripts/gpu_check.sh: the CUDA gate, the random real-shape checkpoint, flex vs sdpa on a
0.5B-shaped model (logits and gradients, every diffusion pattern, with and without the document mask), and the
report that gathers every step's output into one JSON and one Markdown file.

    python scripts/gpu_check.py require-cuda
    python scripts/gpu_check.py checkpoint OUT_DIR
    python scripts/gpu_check.py flex OUT.json
    python scripts/gpu_check.py report OUT_DIR
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

PRESET = "experiments/qwen2.5-0.5b-random.yaml"
TOL = 1e-2
"""Relative pass mark: 24 float32 layers, where the flex kernel may round matmuls as TF32 and sdpa not."""
FLEX_CASES = [("block", False), ("block_clean", False), ("block_clean", True)]  # (pattern, document mask)


def require_cuda() -> int:
    try:
        import torch
    except ImportError:
        print("error: gpu-check needs torch (with CUDA); set PY to the environment's python", file=sys.stderr)
        return 2
    if not torch.cuda.is_available():
        print("error: gpu-check needs a CUDA device (torch.cuda.is_available() is False here); "
              "run it on a GPU machine", file=sys.stderr)
        return 2
    return 0


def _random_model(dtype: str):
    from dlm.models.backbone import load_backbone
    from dlm.settings import load_config

    cfg = load_config(PRESET, overrides=[f"model.dtype={dtype}"])
    import torch

    torch.manual_seed(0)
    return cfg, load_backbone(cfg.model, attn_implementation="sdpa")


def checkpoint(out_dir: str) -> int:
    """A random-weight block_clean checkpoint of the preset's architecture, for `dlm bench`."""
    from dlm.models.checkpoint import CheckpointMeta, save_checkpoint

    cfg, bb = _random_model("bfloat16")
    meta = CheckpointMeta.from_config(cfg, bb.mask_token_id)
    print(save_checkpoint(bb.model, bb.tokenizer, meta, out_dir))
    return 0


def _forward_backward(model, ids, attn):
    import torch

    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, **attn.as_kwargs(), use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), ids.flatten())
    loss.backward()
    grads = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
    return logits.detach().float(), grads


def _compare(model, pattern: str, document_mask: bool, seq_len: int = 1024, batch: int = 2) -> dict:
    import torch

    from dlm.tensor.attention import build_attention_inputs, total_length

    g = torch.Generator(device="cuda").manual_seed(0)
    n = total_length(pattern, seq_len)
    ids = torch.randint(0, 384, (batch, n), device="cuda", generator=g)
    docs = None
    if document_mask:  # three documents per row, boundaries inside blocks
        docs = torch.bucketize(torch.arange(seq_len, device="cuda"), torch.tensor([300, 701], device="cuda"))
        docs = docs.expand(batch, -1).contiguous()
    out = {}
    for backend, impl in (("sdpa", "sdpa"), ("flex", "flex_attention")):
        model.set_attn_implementation(impl)
        attn = build_attention_inputs(pattern, batch_size=batch, seq_len=seq_len, block_size=16, backend=backend,
                                      device="cuda", dtype=model.dtype, document_ids=docs)
        out[backend] = _forward_backward(model, ids, attn)
    (ls, gs), (lf, gf) = out["sdpa"], out["flex"]
    return {"pattern": pattern, "document_mask": document_mask, "seq_len": seq_len, "dtype": str(model.dtype),
            "logits_max_abs_diff": float((ls - lf).abs().max()), "logits_max_abs": float(ls.abs().max()),
            "grad_rel_diff": float((gs - gf).norm() / gs.norm()),
            "ok": bool((ls - lf).abs().max() <= TOL * ls.abs().max() and (gs - gf).norm() <= TOL * gs.norm())}


def flex(out_json: str) -> int:
    """flex vs sdpa on the 0.5B shape in float32: logits and the gradient of every weight, relative to `TOL`."""
    _, bb = _random_model("float32")
    model = bb.model.cuda().train()
    rows = []
    for pattern, document_mask in FLEX_CASES:
        start = time.perf_counter()
        row = _compare(model, pattern, document_mask)
        row["seconds"] = round(time.perf_counter() - start, 1)
        print(json.dumps(row))
        rows.append(row)
    Path(out_json).write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


def _train_rows(path: Path) -> list[dict]:
    """The `| pattern | tokens/s | vs causal | MFU |` table `dlm bench-train` prints."""
    rows = []
    for line in path.read_text().splitlines() if path.is_file() else []:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("pattern", "---") and not cells[0].startswith("-"):
            rows.append(dict(zip(("pattern", "tokens_per_sec", "vs_causal", "mfu"), cells)))
    return rows


def report(out_dir: str) -> int:
    """report.json + report.md from the step files in `out_dir` (steps.tsv: name, rc, seconds)."""
    import torch

    out = Path(out_dir)
    steps = [dict(zip(("step", "rc", "seconds"), line.split("\t"))) for line in
             (out / "steps.tsv").read_text().splitlines() if line.strip()]
    bench = out / "bench" / "bench.json"
    data = {"device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "torch": torch.__version__, "steps": steps,
            "pytest_cuda": (out / "pytest_cuda.txt").read_text().strip().splitlines()[-1:] if
            (out / "pytest_cuda.txt").is_file() else [],
            "flex_vs_sdpa": json.loads((out / "flex.json").read_text()) if (out / "flex.json").is_file() else [],
            "bench_train": {name: _train_rows(out / f"bench_train_{name}.md") for name in ("causal_sdpa",
                                                                                         "block_clean_flex")},
            "bench": json.loads(bench.read_text()) if bench.is_file() else None}
    (out / "report.json").write_text(json.dumps(data, indent=2))
    md = [f"# gpu-check on {data['device']} (torch {data['torch']})", "", "| step | rc | seconds |", "|---|---:|---:|"]
    md += [f"| {s['step']} | {s['rc']} | {s['seconds']} |" for s in steps]
    md += ["", "pytest -m cuda: " + " ".join(data["pytest_cuda"]), "", "## flex vs sdpa (0.5B shape, float32)", "",
           "| pattern | document mask | logits max abs diff | grad rel diff | ok |", "|---|---|---:|---:|---|"]
    md += [f"| {r['pattern']} | {r['document_mask']} | {r['logits_max_abs_diff']:.2e} | {r['grad_rel_diff']:.2e} | "
           f"{r['ok']} |" for r in data["flex_vs_sdpa"]]
    md += ["", "## dlm bench-train (L 2048, bf16)", ""]
    for name in ("causal_sdpa", "block_clean_flex"):
        path = out / f"bench_train_{name}.md"
        md += [f"### {name}", "", path.read_text().strip() if path.is_file() else "(missing)", ""]
    log = out / "bench.log"
    printed = log.read_text().strip().splitlines()[-30:] if log.is_file() else ["(missing)"]
    md += ["## dlm bench (random-weight 0.5B shape; bench/bench.json)", "", "```", *printed, "```"]
    (out / "report.md").write_text("\n".join(md) + "\n")
    print(out / "report.md")
    return 0


COMMANDS = {"require-cuda": require_cuda, "checkpoint": checkpoint, "flex": flex, "report": report}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in COMMANDS:
        sys.exit(f"usage: gpu_check.py {{{','.join(COMMANDS)}}} [ARG]")
    sys.exit(COMMANDS[sys.argv[1]](*sys.argv[2:]))
