"""Declared field rules: every numeric field of every stage's config states its valid values, and a value that
breaks the rule is refused before anything is read, loaded or written, one line per problem naming the field,
the value and the rule."""

from __future__ import annotations

import dataclasses
import math
import typing

import pytest

from align import __version__
from align.cli import main
from align.config import AlignError, SFTConfig, build_config, load_config, rule_text
from align.stages import STAGES, config_class


def _bad_values(meta: dict, typ) -> list:
    """Values just outside each declared bound (or not among the choices), of the field's type."""
    if "choices" in meta:
        return ["not-a-choice"]
    out = []
    step = 1 if typ is int else 0.5
    for k, b in meta.items():
        if k == "ge":
            out.append(b - step)
        elif k == "le":
            out.append(b + step)
        elif k in ("gt", "lt"):
            out.append(b)  # the excluded bound itself
    if typ is float:
        out.append(math.nan)
    return [typ(v) for v in out]


def _ruled_fields():
    for stage in STAGES:
        cls = config_class(stage)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            yield stage, cls, f, hints[f.name]


def test_every_numeric_field_declares_its_rule():
    missing = [f"{stage}.{f.name}" for stage, cls, f, typ in _ruled_fields()
               if typ in (int, float) and not rule_text(f.metadata)]
    assert missing == []


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_out_of_range_value_is_refused_before_anything_is_written(stage, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a stage without output_dir writes relative to here (e.g. the pipeline's runs/)
    cls = config_class(stage)
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    checked = 0
    for f in dataclasses.fields(cls):
        rule = rule_text(f.metadata)
        if not rule:
            continue
        for bad in _bad_values(f.metadata, hints[f.name]):
            out = tmp_path / "out"
            argv = [stage, f"--{f.name}", str(bad)] + (["--output_dir", str(out)] if "output_dir" in names else [])
            assert main(argv) == 2, (stage, f.name, bad)
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [f"error: command line: field '{f.name}': {bad!r} is not {rule}"], (stage, f.name, err)
            assert list(tmp_path.iterdir()) == [], (stage, f.name)  # nothing written, not even output_dir
            checked += 1
    assert checked > 0


def test_each_problem_is_one_line_naming_the_file(tmp_path, capsys):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("per_device_train_batch_size: 0\nlearning_rate: -1\nwarmup_ratio: 2\nlr_scheduler_type: exp\n")
    assert main(["sft", "--config", str(recipe), "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {recipe}: field 'per_device_train_batch_size': 0 is not >= 1",
                   f"error: {recipe}: field 'learning_rate': -1.0 is not > 0",
                   f"error: {recipe}: field 'lr_scheduler_type': 'exp' is not one of constant, linear, cosine",
                   f"error: {recipe}: field 'warmup_ratio': 2.0 is not in [0, 1]"]
    assert not (tmp_path / "o").exists()


def test_rules_hold_for_direct_construction_and_list_elements():
    with pytest.raises(AlignError, match=r"^field 'learning_rate': 0.0 is not > 0$"):
        SFTConfig(learning_rate=0.0)
    with pytest.raises(AlignError, match=r"field 'report_to': 'neptune' is not one of none, all, tensorboard"):
        build_config(SFTConfig, {"report_to": "tensorboard,neptune"}, "x")
    with pytest.raises(AlignError, match=r"field 'max_grad_norm': inf is not >= 0"):
        load_config(SFTConfig, ["--max_grad_norm", "inf"], "align sft")
    # the bounds themselves are valid where they are included
    cfg = load_config(SFTConfig, ["--warmup_ratio", "1", "--max_steps", "-1", "--adam_beta1", "0"], "align sft")
    assert (cfg.warmup_ratio, cfg.max_steps, cfg.adam_beta1) == (1.0, -1, 0.0)


def test_rule_text():
    assert rule_text({"ge": 0, "lt": 1}) == "in [0, 1)"
    assert rule_text({"gt": 0, "le": 1}) == "in (0, 1]"
    assert rule_text({"ge": 1}) == ">= 1"
    assert rule_text({"choices": ("a", "b")}) == "one of a, b"
    assert rule_text({"help": "x"}) == ""


def test_version_and_grouped_help(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"align {__version__}"
    with pytest.raises(SystemExit):
        main(["grpo", "--help"])
    out = capsys.readouterr().out
    titles = [line.rstrip(":") for line in out.splitlines() if line.endswith(":") and not line.startswith(" ")]
    assert titles == ["options", "model", "data", "optimisation", "RL: sampling, rewards and KL", "GRPO settings",
                      "output, logging and checkpoints"]
    assert "(default: 8; >= 2)" in out  # num_generations states its rule
