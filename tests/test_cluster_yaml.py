"""cluster.yaml / cluster-gcp.yaml: valid Ray autoscaler configs for a GPU cluster that installs loraga-ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ["cluster.yaml", "cluster-gcp.yaml"]


@pytest.fixture(scope="module")
def schema():
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid(name, schema):
    import jsonschema

    config = yaml.safe_load((ROOT / name).read_text())
    jsonschema.validate(config, schema)
    # the checks `ray up` adds on top of the schema (head type exists, min <= max workers, ...)
    from ray.autoscaler._private.util import validate_config

    validate_config(config)


@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_cluster_that_installs_this_project(name):
    config = yaml.safe_load((ROOT / name).read_text())
    types = config["available_node_types"]
    head = config["head_node_type"]
    assert head in types
    workers = {k: v for k, v in types.items() if k != head}
    gpu = [t for t in workers.values() if "g5." in str(t["node_config"]) or "g2-" in str(t["node_config"])
           or t["resources"].get("GPU", 0) >= 1]
    assert gpu, "a GPU worker type"
    assert all(t["min_workers"] == 0 and t["max_workers"] >= 1 for t in gpu), "GPU workers autoscale from zero"
    assert config["provider"]["type"] in ("aws", "gcp")
    mounts = config["file_mounts"]
    assert "." in mounts.values(), "this checkout is copied to the nodes"
    project = next(k for k, v in mounts.items() if v == ".")
    assert any("pip install" in c and project in c for c in config["setup_commands"]), "and installed there"
    assert ".venv" in config["rsync_exclude"]
    assert all("--dashboard-host=127.0.0.1" in c for c in config["head_start_ray_commands"] if "--head" in c)


@pytest.mark.parametrize("name", ["cluster.yaml", "cluster-gcp.yaml"])
def test_nodes_start_with_token_authentication(name):
    """Every node starts Ray with RAY_AUTH_MODE=token and reads the token from Ray's default file,
    mounted from the user's machine; no token is written in the file itself."""
    text = (ROOT / name).read_text()
    config = yaml.safe_load(text)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        starts = [c for c in config[key] if "ray start" in c]
        assert starts and all("RAY_AUTH_MODE=token" in c for c in starts), key
    assert config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"
    assert "RAY_AUTH_TOKEN=" not in text
