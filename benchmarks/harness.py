"""What the benchmarks share: the common flags, memory readers, the machine's description, and
running each measurement in a fresh process (so its peak memory is its own), interleaved over
repeats because these machines are shared and noisy."""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

RESULTS = Path(__file__).resolve().parent / "results"


def parser(doc: str, *, rank_flag: str = "--rank", rank_default: int = 8) -> argparse.ArgumentParser:
    """The flags every init benchmark takes: model, data, sample, batch, length, rank, repeats, out."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo-minilm")
    ap.add_argument("--data", default="demo-rotten-tomatoes")
    ap.add_argument("--num-samples", type=int, default=256, help="examples in the gradient estimate")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-length", type=int, default=64)
    ap.add_argument(rank_flag, type=int, default=rank_default)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(RESULTS))
    return ap


def peak_rss_mb() -> float:
    """This process's peak resident memory so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def rss_mb() -> float:
    """This process's resident memory now (MiB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def machine() -> str:
    import torch

    return f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"


def run_interleaved(script: str, argv: Sequence[str], flag: str, values: Iterable, repeats: int,
                    describe: Callable[[dict], str]) -> list[dict]:
    """For each repeat, for each value: ``python script *argv flag value`` in a fresh process,
    whose last stdout line is a JSON object; returns those objects with their ``repeat``."""
    rows = []
    values = list(values)
    for rep in range(repeats):
        for v in values:
            proc = subprocess.run([sys.executable, script, *argv, flag, str(v)], capture_output=True, text=True)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{flag} {v} failed")
            # the last JSON line: Ray may still print its workers' lines after it
            line = next((x for x in reversed(proc.stdout.strip().splitlines()) if x.startswith("{")), None)
            if line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"{flag} {v} printed no result line")
            row = json.loads(line)
            row["repeat"] = rep
            rows.append(row)
            print(f"[{rep + 1}/{repeats}] {flag} {v}: {describe(row)}", flush=True)
    return rows


def medians(rows: list[dict], by: str, keys: Iterable[str]) -> dict:
    """Per value of ``by``: the median of each key over the repeats."""
    keys = list(keys)
    return {v: {k: statistics.median(r[k] for r in rows if r[by] == v) for k in keys}
            for v in dict.fromkeys(r[by] for r in rows)}
