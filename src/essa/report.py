"""`essa report RUN_DIR`: PNG plots of fitness and validation accuracy, and a markdown summary."""

from __future__ import annotations

import json
from pathlib import Path

from essa import EssaError


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise EssaError(f"{run_dir} has no metrics.jsonl; pass the run directory of an `essa train` run")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_report(run_dir: str | Path) -> dict:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    rows = read_metrics(run_dir)
    fit = [r for r in rows if "fitness_mean" in r]
    val = [r for r in rows if "val_mean" in r]
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
    fig.savefig(png, dpi=110)
    plt.close(fig)

    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    config = json.loads((run_dir / "config.json").read_text()) if (run_dir / "config.json").exists() else {}
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
    md.write_text("\n".join(lines) + "\n")
    return {"plot": str(png), "markdown": str(md), "generations": len(fit), "validations": len(val)}
