"""Estimate the LoRA-GA init (distributed gradient estimate + truncated SVD) as a Ray job.

The same options as ``loraga-ray init``. Submit it from the repository root::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/init_lora_ga.py --model demo-minilm --data demo-rotten-tomatoes \\
        --init-samples 256 --batch-size 8 --max-rank 32 --workers 2 --gpus-per-worker 1 \\
        --out s3://my-bucket/loraga/minilm-init

or run it locally (an embedded Ray starts): ``python pipelines/init_lora_ga.py ...``. Under
``ray job submit`` the script joins the job's cluster (RAY_ADDRESS). ``--out`` is a folder the
head node can write, or an s3:// / gs:// prefix; a local ``--data`` or ``--model`` path inside the
working dir is found by every node in its copy of the working dir.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from loraga_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # the `loraga-ray init` command: same options, same error messages
    sys.exit(main(["init", *sys.argv[1:]]))
