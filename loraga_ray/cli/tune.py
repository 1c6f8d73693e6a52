"""``loraga-ray tune``: a Ray Tune search from one shared gradient estimate, each trial a Ray Train
run or, for one CPU worker, the same loop in the trial's process (``--trial-runner``)."""

from __future__ import annotations

import argparse

from ..options import SearchError, SearchOptions, TrainOptions
from .common import Deprecated, add_option, add_options, given_values
from .train import add_train_groups

HELP = "search rank / alpha / gamma / lr on Ray Tune from one shared gradient estimate"

SEARCH = ("space", "num_samples", "max_concurrent", "grace_period", "reduction_factor", "name", "resume", "overwrite")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("search")
    add_option(g, TrainOptions, "out", required=True, help="output folder of the search (created; --resume continues "
                                                            "the one there)")
    add_options(g, SearchOptions, SEARCH)
    # the training options: values the space does not set; the trials' own folders are under --out
    add_train_groups(parser, suppress_default=False)
    g = parser.add_argument_group("more")
    add_option(g, SearchOptions, "trial_cpus")
    add_option(g, SearchOptions, "trial_runner")
    # 0.1.0 spelled the estimate's SVD method --svd here
    g.add_argument("--svd", dest="init_svd", action=Deprecated, new_flag="--init-svd", choices=("randomized", "exact"),
                   default=argparse.SUPPRESS, help="deprecated spelling of --init-svd")


def options_from_args(args: argparse.Namespace) -> tuple[TrainOptions | None, SearchOptions]:
    """(TrainOptions, SearchOptions) from parsed arguments; with --resume the base options come
    from the search's search.json, so TrainOptions is None."""
    if not args.resume and (not args.model or not args.data or not args.space):
        missing = [f"--{n}" for n in ("model", "data", "space") if not getattr(args, n)]
        raise SearchError(f"{', '.join(missing)} required (only --out and --resume are needed to continue a search).")
    sopts = SearchOptions(**given_values(args, SearchOptions))
    if args.resume:
        return None, sopts
    values = given_values(args, TrainOptions)
    if values.get("epochs") is not None:
        values["max_steps"] = None  # --epochs decides the length
    return TrainOptions(**values), sopts


def run(args: argparse.Namespace) -> int:
    from ..jobs.search import search

    base, sopts = options_from_args(args)
    result = search(base, sopts, out=args.out)
    print(f"\n{len(result.rows)} trials, {result.gradient_estimates} gradient estimate(s); results in {result.out}")
    print((result.out / "trials.md").read_text())
    if result.best:
        print(f"best: trial {result.best['trial_id']} eval_loss={result.best['eval_loss']:.4f} config={result.best['config']}")
        print(f"      {result.best['train_command']}")
    print(f"MLflow: parent run {result.parent_run_id} in {result.tracking_uri}")
    if result.interrupted:
        print(f"interrupted: continue with `loraga-ray tune --out {result.out} --resume`")
        return 130
    if result.rows and all(r["status"] == "error" for r in result.rows):
        print(f"every trial failed; the errors are in {result.out / 'trials.md'} and in the Tune logs under {result.experiment_path}")
        return 1
    return 0
