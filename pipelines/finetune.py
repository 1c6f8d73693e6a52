"""Fine-tune with LoRA-GA, LoRA, PiSSA or full fine-tuning on Ray Train, as a Ray job.

The same options as ``loraga-ray train``. Submit it from the repository root::

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \\
        python pipelines/finetune.py --model demo-minilm --data demo-rotten-tomatoes \\
        --init lora-ga --rank 8 --alpha 16 --lr 2e-4 --max-steps 200 --batch-size 16 \\
        --workers 2 --gpus-per-worker 1 --out /shared/runs/minilm-loraga \\
        --tracking-uri http://127.0.0.1:5000

or run it locally (an embedded Ray starts): ``python pipelines/finetune.py ...``. Under
``ray job submit`` the script joins the job's cluster (RAY_ADDRESS). ``--out`` must be storage
the head node can write (the checkpoints under OUT/ray, the adapter, metrics.json,
loss_curve.png and, without --tracking-uri, the MLflow SQLite file); on a multi-node cluster
make it shared storage so a --resume finds the checkpoints. ``--init lora-ga`` without
``--artifact`` runs the distributed init first and keeps its artifact in OUT/init_artifact.
Stopped? Run the same command again with ``--resume`` (or just ``--out OUT --resume``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # a checkout works without installing

from loraga_ray.cli import main  # noqa: E402

if __name__ == "__main__":
    # the `loraga-ray train` command: same options, same error messages
    sys.exit(main(["train", *sys.argv[1:]]))
