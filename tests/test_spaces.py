"""Search-space files: the shipped ones load, every mistake is an error naming its key."""

from __future__ import annotations

import pytest

from loraga_ray.spaces import SHIPPED_SPACES, SpaceError, load_space, parse_space


def test_shipped_spaces_load():
    names = sorted(p.stem for p in SHIPPED_SPACES.glob("*.yaml"))
    assert {"rank", "scaling", "baselines"} <= set(names)
    for name in names:
        space = load_space(SHIPPED_SPACES / f"{name}.yaml")
        assert space.params

    rank = load_space("tune_spaces/rank.yaml")
    assert rank.values("rank") == (4, 8, 16, 32)
    assert rank.params["lr"].kind == "loguniform"
    assert rank.max_rank(default=8) == 32
    assert rank.grid_size() == 4
    scaling = load_space("scaling")  # a shipped space by name
    assert {"alpha", "gamma", "lr"} <= set(scaling.params)
    baselines = load_space("baselines.yaml")
    assert baselines.values("init") == ("lora-ga", "lora-one", "lora", "pissa")
    assert baselines.may_use("lora-ga", default_init="lora")
    assert not parse_space({"init": "lora"}).may_use("lora-ga", default_init="lora-ga")
    assert parse_space({"lr": 1e-4}).may_use("lora-ga", default_init="lora-ga")


def test_param_space_for_tune():
    from ray import tune
    from ray.tune.search.sample import Categorical, Float

    space = parse_space({
        "rank": {"grid": [4, 8]},
        "lr": {"loguniform": ["1e-5", 1.0e-3]},  # YAML 1.1 reads 1e-5 as a string
        "alpha": {"choice": [8, 16]},
        "gamma": {"uniform": [4, 32]},
        "direction": "ArBr",
        "use_rslora": True,
    })
    ps = space.param_space()
    assert ps["rank"] == tune.grid_search([4, 8])
    assert isinstance(ps["lr"], Float) and ps["lr"].lower == pytest.approx(1e-5) and ps["lr"].upper == pytest.approx(1e-3)
    assert isinstance(ps["alpha"], Categorical) and ps["alpha"].categories == [8.0, 16.0]
    assert isinstance(ps["gamma"], Float)
    assert ps["direction"] == "ArBr" and ps["use_rslora"] is True
    assert space.to_dict()["lr"] == {"loguniform": [1e-5, 1e-3]}
    assert parse_space({"lr": 1e-4}).max_rank(default=8) == 8


@pytest.mark.parametrize(
    "data, key, words",
    [
        ({"rnak": {"grid": [4]}}, "rnak", ["unknown key", "did you mean 'rank'"]),
        ({"rank": {"grid": []}}, "rank", ["non-empty"]),
        ({"rank": {"choice": [4, 4]}}, "rank", ["twice"]),
        ({"rank": {"grid": [0, 4]}}, "rank", [">= 1"]),
        ({"rank": {"grid": [4.5]}}, "rank", ["whole number"]),
        ({"rank": {"uniform": [4, 32]}}, "rank", ["choice or grid"]),
        ({"rank": [4, 8]}, "rank", ["ambiguous"]),
        ({"lr": {"loguniform": [1.0e-3, 1.0e-5]}}, "lr", ["low < high"]),
        ({"lr": {"loguniform": [0, 1.0e-3]}}, "lr", ["> 0"]),
        ({"weight_decay": {"loguniform": [0.0, 0.1]}}, "weight_decay", ["low > 0"]),
        ({"gamma": {"uniform": [8, 8]}}, "gamma", ["low < high"]),
        ({"lr": {"loguniform": [1.0e-5]}}, "lr", ["[low, high]"]),
        ({"lr": "fast"}, "lr", ["not a number"]),
        ({"lr": {"logunifrom": [1.0e-5, 1.0e-3]}}, "lr", ["unknown distribution", "loguniform"]),
        ({"lr": {"uniform": [1.0e-5, 1.0e-3], "choice": [1]}}, "lr", ["exactly one"]),
        ({"alpha": -1}, "alpha", ["> 0"]),
        ({"warmup_ratio": 1.0}, "warmup_ratio", ["< 1"]),
        ({"direction": {"choice": ["ArB2r", "BrA2r"]}}, "direction", ["'BrA2r'", "ArB2r"]),
        ({"scale": "stabel"}, "scale", ["did you mean 'stable'"]),
        ({"init": {"grid": ["lora-ga", "dora"]}}, "init", ["'dora'", "pissa"]),
        ({"use_rslora": "yes"}, "use_rslora", ["true or false"]),
        ({"batch_size": True}, "batch_size", ["not a number"]),
    ],
)
def test_bad_spaces_name_the_key(data, key, words):
    with pytest.raises(SpaceError) as info:
        parse_space(data, source="bad.yaml")
    msg = str(info.value)
    assert f"'{key}'" in msg and "bad.yaml" in msg, msg
    for w in words:
        assert w in msg, msg


def test_bad_files(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing\n")
    with pytest.raises(SpaceError, match="empty"):
        load_space(empty)
    listy = tmp_path / "list.yaml"
    listy.write_text("- rank\n")
    with pytest.raises(SpaceError, match="mapping"):
        load_space(listy)
    broken = tmp_path / "broken.yaml"
    broken.write_text("rank: {grid: [4, 8\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(broken)
    with pytest.raises(SpaceError, match="not a file.*rank"):
        load_space(tmp_path / "missing.yaml")
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("rank: {grid: [4, 8]}\nlearning_rate: {loguniform: [1.0e-5, 1.0e-3]}\n")
    with pytest.raises(SpaceError, match=r"unknown\.yaml: unknown key 'learning_rate'"):
        load_space(unknown)
