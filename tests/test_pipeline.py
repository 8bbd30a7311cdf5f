"""The one-command pipeline with a shortened recipe: every stage runs, its output loads, the report is whole."""

import json
import os

import yaml

from align.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_short_pipeline_runs_every_stage_and_reports(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    monkeypatch.chdir(ROOT)  # recipes and data paths are relative to the repository, as in the README
    with open(os.path.join(ROOT, "recipes/tiny/pipeline.yaml")) as fh:
        recipe = yaml.safe_load(fh)
    short = dict(recipe, output_dir=str(tmp_path / "run"), eval_max_samples=24,
                 overrides={"sft": {"max_steps": 4}, "rm": {"max_steps": 2, "eval_steps": 0},
                            "ppo": {"max_steps": 2, "eval_steps": 0},
                            "grpo": {"max_steps": 2, "eval_steps": 0}})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(short))
    assert main(["pipeline", "--config", str(path)]) == 0

    run = tmp_path / "run"
    report = json.loads((run / "report.json").read_text())
    stages = report["stages"]
    assert list(stages) == ["base", "sft", "rm", *recipe.get("rl_stages", ["ppo", "grpo"])]
    for name in ["base", "sft", *recipe.get("rl_stages", ["ppo", "grpo"])]:
        assert 0.0 <= stages[name]["accuracy"] <= 1.0 and stages[name]["num_samples"] == 24
        assert stages[name]["seconds"] >= 0
    assert 0.0 <= stages["rm"]["pairwise_accuracy"] <= 1.0
    for name in recipe.get("rl_stages", ["ppo", "grpo"]):
        assert stages[name]["steps"] == 2 and stages[name]["final_kl"] is not None
        assert "gain_over_sft" in stages[name]
        AutoModelForCausalLM.from_pretrained(run / name)
    AutoModelForCausalLM.from_pretrained(run / "sft")
    AutoModelForSequenceClassification.from_pretrained(run / "rm")
    md = (run / "report.md").read_text()
    for name in stages:
        assert f"| {name} |" in md
    assert "**total**" in md
    assert (run / "curves.png").stat().st_size > 1000

    # a used output_dir is refused unless overwrite_output_dir is set
    short["overwrite_output_dir"] = False
    path.write_text(yaml.safe_dump(short))
    assert main(["pipeline", "--config", str(path)]) == 2


def test_an_rl_stage_without_its_recipe_is_refused_when_the_pipeline_uses_other_recipes(tmp_path, monkeypatch,
                                                                                       capsys):
    """A stage added to rl_stages of a real-model pipeline that names no recipe for it would train the built-in
    tiny task's recipe (other data, other hyperparameters) on the user's model: refused before anything runs."""
    monkeypatch.chdir(ROOT)
    pipe = {"output_dir": str(tmp_path / "run"), "base_model": str(tmp_path / "some-model"),
            "sft": "recipes/smollm2-135m/sft.yaml", "rm": "recipes/smollm2-135m/rm.yaml",
            "ppo": "recipes/smollm2-135m/ppo.yaml", "rl_stages": ["ppo", "trpo"],
            "eval_data": "data/addition/eval.jsonl"}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipe))
    assert main(["pipeline", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "rl_stages has trpo but no trpo recipe is set: the default recipes/tiny/trpo.yaml" in err, err
    assert not (tmp_path / "run").exists()
