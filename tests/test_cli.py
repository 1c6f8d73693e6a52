"""The command line is generated from the options dataclasses: every field has its flag, every
subcommand spells a shared option the same way and lists every choice, and the 0.1.0 spellings
still work (with a note)."""

from __future__ import annotations

import dataclasses

import pytest

from loraga_ray.cli import build_parser
from loraga_ray.cli.train import options_from_args as train_options
from loraga_ray.cli.tune import options_from_args as tune_options
from loraga_ray.options import INITS, DemoOptions, InitOptions, SearchOptions, TrainOptions


def _dests(parser, command: str) -> set[str]:
    sub = next(a for a in parser._actions if a.dest == "command").choices[command]
    return {a.dest for a in sub._actions}


def test_every_field_has_its_flag():
    parser = build_parser()
    assert {f.name for f in dataclasses.fields(InitOptions)} <= _dests(parser, "init")
    assert {f.name for f in dataclasses.fields(TrainOptions)} <= _dests(parser, "train")
    # tune: the training options the trials share, and the search's own; run-specific ones stay out
    run_only = {"parent_run_id", "run_name", "report_every", "checkpoint_every", "stop_after"}
    assert {f.name for f in dataclasses.fields(TrainOptions)} - run_only <= _dests(parser, "tune")
    assert {f.name for f in dataclasses.fields(SearchOptions)} <= _dests(parser, "tune")
    assert {f.name for f in dataclasses.fields(DemoOptions)} <= _dests(parser, "demo")


@pytest.mark.parametrize("command", ["train", "tune"])
def test_help_lists_every_choice(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = capsys.readouterr().out
    assert "{" + ",".join(INITS) + "}" in text  # peft-lora-ga included
    assert "{ArB2r,A2rBr,ArBr,random}" in text and "{stable,gd,unit,weight_svd}" in text and "{auto,cpu,cuda}" in text


def test_target_modules_take_one_form_everywhere():
    common = ["--model", "m", "--data", "d", "--out", "o"]
    for form in (["q_proj", "v_proj"], ["q_proj,v_proj"], ["q_proj,", "v_proj"]):
        init = build_parser().parse_args(["init", *common, "--target-modules", *form])
        opts = InitOptions(model="m", data="d", target_modules=init.target_modules)
        opts.validate()  # the API takes a list or a comma-separated string too
        assert opts.target_modules == ["q_proj", "v_proj"]
        assert train_options(build_parser().parse_args(["train", *common, "--target-modules", *form])).target_modules \
            == ["q_proj", "v_proj"]
        base, _ = tune_options(build_parser().parse_args(["tune", *common, "--space", "s.yaml", "--target-modules", *form]))
        assert base.target_modules == ["q_proj", "v_proj"]


def test_stage_names_and_old_spellings(capsys):
    common = ["--model", "m", "--data", "d", "--out", "o"]
    init = build_parser().parse_args(["init", *common, "--init-samples", "64"])
    assert init.num_samples == 64
    old = build_parser().parse_args(["init", *common, "--num-samples", "32"])
    assert old.num_samples == 32 and "--num-samples is deprecated; use --init-samples" in capsys.readouterr().err
    base, sopts = tune_options(build_parser().parse_args(["tune", *common, "--space", "s.yaml", "--tune-samples", "3",
                                                          "--init-samples", "48", "--init-svd", "exact"]))
    assert sopts.num_samples == 3 and base.init_samples == 48 and base.init_svd == "exact"
    base, sopts = tune_options(build_parser().parse_args(["tune", *common, "--space", "s.yaml", "--num-samples", "2",
                                                          "--svd", "exact"]))
    err = capsys.readouterr().err
    assert sopts.num_samples == 2 and base.init_svd == "exact"
    assert "--num-samples is deprecated; use --tune-samples" in err and "--svd is deprecated; use --init-svd" in err
    demo = build_parser().parse_args(["demo", "--num-samples", "16"])
    assert demo.init_samples == 16


def test_train_resume_leaves_unset_flags_to_the_saved_run():
    args = build_parser().parse_args(["train", "--out", "o", "--lr", "0.1"])
    assert "rank" not in vars(args) and args.lr == 0.1  # unset flags do not shadow saved options
