"""The results of a search: one row per trial (status, config, eval metrics, steps, time), the
best trial, and the files written from them (trials.csv / trials.md, best.json, eval_loss.png),
also logged to the search's MLflow run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from ..core.files import write_json
from ..spaces import SearchSpace

TRIALS_DIR = "trials"
METRIC = "eval_loss"
SCORE_KEYS = ("eval_accuracy", "eval_exact_match")


def _finite(v) -> float | None:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def _eval_history(result, trial_dir: Path) -> list[tuple[int, float]]:
    """(step, eval_loss) of a trial: from its own metrics.json when it finished (complete), else
    from the results Tune received."""
    metrics_file = trial_dir / "metrics.json"
    if metrics_file.is_file():
        history = json.loads(metrics_file.read_text()).get("history", [])
        points = [(int(h["step"]), float(h[METRIC])) for h in history if _finite(h.get(METRIC)) is not None]
        if points:
            return points
    df = result.metrics_dataframe
    if df is None or METRIC not in df or "step" not in df:
        return []
    df = df[df[METRIC].notna()]
    return [(int(s), float(v)) for s, v in zip(df["step"], df[METRIC])]


def collect_rows(grid, space: SearchSpace, base, statuses: dict[str, str], out: Path) -> list[dict]:
    """One row per trial: status, config, final eval metrics, steps, time."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        trial_id = m.get("trial_id") or next((t for t in statuses if t in Path(result.path or "").name), "?")
        history = _eval_history(result, out / TRIALS_DIR / trial_id)
        df = result.metrics_dataframe
        last_eval = {}
        if df is not None and METRIC in df:
            evals = df[df[METRIC].notna()]
            if len(evals):
                last_eval = evals.iloc[-1].to_dict()
        if result.error is not None or statuses.get(trial_id) == "ERROR":
            status = "error"
        elif m.get("train_done"):
            status = "completed"
        elif statuses.get(trial_id) == "TERMINATED":
            status = "stopped early"  # by ASHA
        else:
            status = "unfinished"
        row = {"trial_id": trial_id, "status": status}
        for key in space.params:
            row[key] = result.config.get(key)
        row["init"] = result.config.get("init", base.init)
        row["eval_loss"] = _finite(last_eval.get(METRIC))
        for key in SCORE_KEYS:
            if key in last_eval:
                row[key] = _finite(last_eval.get(key))
        row["eval_step"] = int(last_eval["step"]) if "step" in last_eval and _finite(last_eval["step"]) is not None else None
        row["best_eval_loss"] = min((v for _, v in history), default=None)
        row["train_loss"] = _finite(m.get("train_loss"))
        row["steps"] = int(m["step"]) if _finite(m.get("step")) is not None else 0
        row["time_s"] = round(float(m.get("time_total_s", 0.0)), 1)
        row["error"] = (str(result.error).strip().splitlines() or [""])[-1][:200] if result.error is not None else ""
        row["_history"] = history
        rows.append(row)
    rows.sort(key=lambda r: r["trial_id"])
    return rows


def pick_best(rows: list[dict]) -> dict | None:
    """The trial with the lowest final eval loss (among trials that reached an evaluation)."""
    scored = [r for r in rows if r.get("eval_loss") is not None]
    return min(scored, key=lambda r: r["eval_loss"]) if scored else None


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols.extend(k for k in r if not k.startswith("_") and k not in cols)
    return cols


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_tables(rows: list[dict], out: Path) -> tuple[Path, Path]:
    cols = _columns(rows)
    csv_path, md_path = out / "trials.csv", out / "trials.md"
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(_fmt(r.get(k)).replace("|", "/") for k in cols) + " |" for r in rows]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def _trial_label(row: dict, space: SearchSpace) -> str:
    return row["trial_id"] + " " + " ".join(f"{k}={_fmt(row.get(k))}" for k in space.params if space.params[k].kind != "const")


def best_record(best: dict | None, space: SearchSpace, base) -> dict | None:
    if best is None:
        return None
    config = {k: best.get(k) for k in space.params}
    config.setdefault("init", best.get("init"))
    record = {
        "trial_id": best["trial_id"],
        "config": config,
        "eval_loss": best["eval_loss"],
        "steps": best["steps"],
        "time_s": best["time_s"],
        "status": best["status"],
    }
    for key in SCORE_KEYS:
        if best.get(key) is not None:
            record[key] = best[key]
    flags = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in config.items() if not isinstance(v, bool))
    if config.get("use_rslora") is False:
        flags += " --no-rslora"
    if getattr(base, "head_warmup_steps", 0) and "head_warmup_steps" not in config:  # every trial had it
        flags += f" --head-warmup-steps {base.head_warmup_steps} --head-warmup-lr {base.head_warmup_lr:g}"
    record["train_command"] = f"loraga-ray train --model {base.model} --data {base.data} {flags}".strip()
    return record


def write_results(rows, best, space, base, sopts, out: Path) -> dict[str, Path]:
    from ..plots import plot_eval_loss

    csv_path, md_path = write_tables(rows, out)
    best_path = write_json(out / "best.json", best_record(best, space, base))
    curves = {_trial_label(r, space): r["_history"] for r in rows}
    png = plot_eval_loss(curves, out / "eval_loss.png", best=_trial_label(best, space) if best else None,
                         title=f"eval loss per trial: {base.model} on {base.data} ({Path(space.source).name})")
    return {"csv": csv_path, "markdown": md_path, "best": best_path, "plot": png}


def log_results(uri: str, run_id: str, rows, best, files: dict[str, Path]) -> None:
    from mlflow.tracking import MlflowClient

    from .. import tracking

    client = MlflowClient(tracking_uri=uri)
    for path in files.values():
        tracking.log_artifacts(uri, run_id, path, "search")
    metrics = {"num_trials": len(rows), "num_completed": sum(r["status"] == "completed" for r in rows)}
    if best is not None:
        metrics["best_eval_loss"] = best["eval_loss"]
        for key in SCORE_KEYS:
            if best.get(key) is not None:
                metrics[f"best_{key}"] = best[key]
        client.set_tag(run_id, "best_trial", best["trial_id"])
    tracking.log_metrics(client, run_id, metrics, step=0)
