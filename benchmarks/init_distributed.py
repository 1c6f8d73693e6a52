"""The distributed init pipeline: 1 vs N gradient workers, stage times and driver memory.

Each run is a fresh process (`loraga_ray.jobs.init.run_init` on an embedded local Ray). After a
small warm-up run in the same process (so one-off imports and caches are already in the baseline),
the driver's resident memory is sampled every 5 ms from just before the run until it returns, so the
peak *above the driver's baseline* can be set against the model's largest target layer (the
driver reduces one layer at a time: goal <= 2x the largest layer's float32 size) and against the
total size of all target weights (what a gather-everything driver would hold).

    python benchmarks/init_distributed.py                      # demo-minilm, workers 1 and 2, 3 repeats
    python benchmarks/init_distributed.py --workers 1,2 --repeats 3

Writes init_distributed.json and init_distributed.md into --out (default benchmarks/results).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import machine, medians, parser, rss_mb, run_interleaved  # noqa: E402


def run_one(args) -> dict:
    import tempfile

    import torch  # noqa: F401  (imported before the baseline is taken, as the run needs it)

    from loraga_ray.jobs.cluster import connect
    from loraga_ray import InitOptions, run_init
    from loraga_ray.models import load_model, resolve_model
    from loraga_ray.core.targets import find_target_modules, weight_shape

    # sizes of the target layers, from a model loaded and dropped before the baseline
    model = load_model(resolve_model(args.model))
    mods = dict(model.named_modules())
    sizes = [4 * weight_shape(mods[n])[0] * weight_shape(mods[n])[1] / 2**20 for n in find_target_modules(model)]
    del model, mods
    connect(None, num_cpus=8, quiet=True)
    # a small warm-up run first, so the baseline already holds what any run loads once (Ray Data,
    # pyarrow, the tokenizer, module imports): the measured run then shows what a run itself adds
    with tempfile.TemporaryDirectory() as warm:
        run_init(InitOptions(model=args.model, data=args.data, out=str(Path(warm) / "init"), num_samples=2 * args.batch_size,
                             batch_size=args.batch_size, max_rank=args.max_rank, workers=args.run_workers, gpus_per_worker=0,
                             max_length=args.max_length, progress=False))
    import gc

    gc.collect()
    base = rss_mb()
    peak = [base]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mb())
            time.sleep(0.005)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out = Path(tempfile.mkdtemp()) / "init"
    t0 = time.perf_counter()
    _, summary = run_init(InitOptions(model=args.model, data=args.data, out=str(out), num_samples=args.num_samples,
                                      batch_size=args.batch_size, max_rank=args.max_rank, workers=args.run_workers,
                                      gpus_per_worker=0, max_length=args.max_length, progress=False))
    wall = time.perf_counter() - t0
    stop.set()
    th.join()
    summary.update(wall_s=wall, driver_base_rss_mb=base, driver_peak_rss_during_mb=peak[0],
                   driver_above_base_mb=peak[0] - base, largest_layer_mb=max(sizes), all_targets_mb=sum(sizes),
                   num_target_layers=len(sizes))
    return summary


def main(argv=None) -> int:
    ap = parser(__doc__, rank_flag="--max-rank")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--run-workers", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_workers:
        print(json.dumps(run_one(args), default=str))
        return 0
    argv = list(argv if argv is not None else sys.argv[1:])
    rows = run_interleaved(__file__, argv, "--run-workers", [int(x) for x in args.workers.split(",")], args.repeats,
                           lambda r: f"wall {r['wall_s']:.1f}s gradient {r['gradient_s']:.1f}s "
                                     f"driver +{r['driver_above_base_mb']:.1f} MB")
    med = medians(rows, "workers", ("wall_s", "read_s", "start_s", "gradient_s", "reduce_s", "svd_s", "write_s",
                                    "tokens_per_s", "bytes_moved", "reduce_peak_mb", "driver_above_base_mb"))
    med = dict(sorted(med.items()))
    r0 = rows[0]
    machine_text = machine()
    lines = [f"# Distributed init: {args.model}, {args.num_samples} samples in batches of {args.batch_size}, max length "
             f"{args.max_length}, max rank {args.max_rank}, CPU workers", "",
             f"Machine: {machine_text}. Medians of {args.repeats} interleaved repeats, each a fresh process with an embedded Ray.",
             f"Command: `python benchmarks/init_distributed.py --workers {args.workers} --repeats {args.repeats}`", "",
             f"Target layers: {r0['num_target_layers']}, all target weights {r0['all_targets_mb']:.1f} MB float32, "
             f"largest layer {r0['largest_layer_mb']:.2f} MB (ratio {r0['all_targets_mb'] / r0['largest_layer_mb']:.0f}x).", "",
             "| workers | wall s | read s | worker start s | gradient s | reduce s | SVD s | tokens/s | MB moved | reduce buffers MB | driver RSS above baseline MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w, s in med.items():
        lines.append(f"| {w} | {s['wall_s']:.1f} | {s['read_s']:.1f} | {s['start_s']:.1f} | {s['gradient_s']:.1f} | "
                     f"{s['reduce_s']:.2f} | {s['svd_s']:.2f} | {s['tokens_per_s']:.0f} | {s['bytes_moved'] / 2**20:.1f} | "
                     f"{s['reduce_peak_mb']:.1f} | {s['driver_above_base_mb']:.1f} |")
    lines += ["", f"Goal: driver peak <= 2 x largest layer = {2 * r0['largest_layer_mb']:.1f} MB above baseline "
              f"(gathering every layer would need >= {r0['all_targets_mb']:.0f} MB). The reduce buffers are what the "
              "reduction itself holds; the RSS figure also counts everything else the driver does in the run "
              "(Ray Data sample, Python objects, allocator slack)."]
    if len(med) > 1:
        ws = sorted(med)
        lines.append(f"Gradient-stage speed-up {ws[-1]} vs {ws[0]} workers: "
                     f"{med[ws[0]]['gradient_s'] / med[ws[-1]]['gradient_s']:.2f}x (2 physical cores shared by all workers).")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "init_distributed.json").write_text(json.dumps({"machine": machine_text, "rows": rows, "medians": med}, indent=1, default=str))
    (out / "init_distributed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
