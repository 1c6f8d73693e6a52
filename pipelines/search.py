"""Search rank / alpha / gamma / lr on a Ray cluster, all trials sharing one gradient estimate.

The same options as ``loraga-ray tune``. Submit it as a Ray job from the repository root::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/search.py --model demo-minilm --data demo-rotten-tomatoes \\
        --space tune_spaces/rank.yaml --tune-samples 2 --max-concurrent 2 --out /shared/runs/rank-search

or run it locally (an embedded Ray starts): ``python pipelines/search.py ...``. Under
``ray job submit`` the script joins the job's cluster (RAY_ADDRESS). ``--out`` must be on storage
the head node can write (the Tune experiment, the init artifact, the MLflow SQLite file); on a
multi-node cluster pass ``--tracking-uri`` of an MLflow server so every node can log.
Interrupted? Run it again with ``--out <same folder> --resume``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from loraga_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # the `loraga-ray tune` command: same options, same error messages
    sys.exit(main(["tune", *sys.argv[1:]]))
