"""`essa report RUN_DIR`: PNG plots of fitness and validation accuracy, and a markdown summary."""

from __future__ import annotations

import io
import json
from pathlib import Path

from essa import EssaError
from essa.files import atomic_write_bytes, atomic_write_text, read_jsonl_lenient


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of metrics.jsonl that have a generation; damaged lines (a kill mid-write) are skipped."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise EssaError(f"{run_dir} has no metrics.jsonl; pass the run directory of an `essa train` or `essa grpo` run")
    records, bad = read_jsonl_lenient(path)
    rows = [r for r in records if isinstance(r.get("generation"), int)]
    if bad or len(rows) < len(records):
        print(f"essa: skipped {bad + len(records) - len(rows)} damaged line(s) of {path}")
    return rows


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        print(f"essa: {path} is damaged (not JSON); the report leaves it out")
        return {}
    return data if isinstance(data, dict) else {}


def write_report(run_dir: str | Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    num = lambda r, *keys: all(isinstance(r.get(k), (int, float)) for k in keys)  # noqa: E731
    fit = [r for r in rows if num(r, "wall_seconds", "fitness_mean", "fitness_max", "fitness_min")]
    val = [r for r in rows if num(r, "wall_seconds", "val_mean")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for col, (xkey, xlabel) in enumerate((("generation", "generation"), ("wall_seconds", "wall-clock (s)"))):
        ax = axes[0, col]
        if fit:
            x = [r[xkey] for r in fit]
            ax.plot(x, [r["fitness_mean"] for r in fit], label="population mean")
            ax.plot(x, [r["fitness_max"] for r in fit], label="best candidate")
            ax.fill_between(x, [r["fitness_min"] for r in fit], [r["fitness_max"] for r in fit], alpha=0.15)
        ax.set_xlabel(xlabel), ax.set_ylabel("fitness (mini-batch reward)"), ax.legend(loc="best"), ax.grid(alpha=0.3)
        ax = axes[1, col]
        if val:
            x = [r[xkey] for r in val]
            ax.plot(x, [r["val_mean"] for r in val], "o-", label="strategy mean")
            if any("val_best_candidate" in r for r in val):
                vb = [r for r in val if "val_best_candidate" in r]
                ax.plot([r[xkey] for r in vb], [r["val_best_candidate"] for r in vb], "s--", label="best candidate so far")
        ax.set_xlabel(xlabel), ax.set_ylabel("validation accuracy"), ax.legend(loc="best"), ax.grid(alpha=0.3)
    fig.suptitle(f"ESSA run {run_dir.name}")
    fig.tight_layout()
    png = run_dir / "report.png"
    buf = io.BytesIO()
    fig.savefig(buf, dpi=110, format="png")
    plt.close(fig)
    atomic_write_bytes(png, buf.getvalue())

    summary, config = _read_json(run_dir / "summary.json"), _read_json(run_dir / "config.json")
    lines = [f"# ESSA run `{run_dir}`", "", f"![curves]({png.name})", "", "## Configuration", ""]
    for k in ("model", "adapter", "task", "strategy", "popsize", "sigma0", "alpha", "batch_size", "generations", "seed"):
        if k in config:
            lines.append(f"- **{k}**: `{config[k]}`")
    if "generation" in config:
        lines.append(f"- **decoding**: `{config['generation']}`")
    lines += ["", "## Results", "", "| generation | fitness mean | fitness max | sigma | val (mean) | wall s | tokens |",
              "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fmt = lambda k: f"{r[k]:.4f}" if isinstance(r.get(k), float) else str(r.get(k, ""))  # noqa: E731
        lines.append(f"| {r['generation']} | {fmt('fitness_mean')} | {fmt('fitness_max')} | {fmt('sigma')} | "
                     f"{fmt('val_mean')} | {r.get('wall_seconds', '')} | {r.get('tokens', '')} |")
    if summary:
        lines += ["", "## Summary", "", "```json", json.dumps(summary, indent=2), "```",
                  "", f"Selection used: {summary.get('selection_split', 'validation split of train')} (not the test set)."]
    md = run_dir / "report.md"
    atomic_write_text(md, "\n".join(lines) + "\n")
    return {"plot": str(png), "markdown": str(md), "generations": len(fit), "validations": len(val)}
