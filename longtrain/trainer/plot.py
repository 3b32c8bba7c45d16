"""`longtrain plot RUN_DIR`: loss, eval accuracy, tokens/s and memory vs step from metrics.jsonl, as one PNG."""
import json
import os

PANELS = [("train/loss", "train loss"), ("eval/accuracy", "eval accuracy"), ("train/tokens_per_s", "tokens/s"),
          ("train/peak_mem_gb", "peak memory (GB)")]


def read_metrics(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def plot_run(run_dir: str) -> str | None:
    """Write RUN_DIR/metrics.png (one panel per metric, vs step); returns its path, None without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    records = read_metrics(run_dir)
    fig, axes = plt.subplots(2, 2, figsize=(10, 7), constrained_layout=True)
    for ax, (key, title) in zip(axes.flat, PANELS):
        points = [(r["step"], r[key]) for r in records if key in r]
        if points:
            ax.plot(*zip(*points), marker="." if len(points) < 50 else None)
        else:
            ax.text(0.5, 0.5, f"no {key} in metrics.jsonl", ha="center", transform=ax.transAxes)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)))
    path = os.path.join(run_dir, "metrics.png")
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
