"""The recipes for real small models run through exactly the code path they would use with the hub: each hub
model is swapped for a tiny local model of the same architecture, each hub dataset for a local file with the
same columns, and every stage runs two steps, each stage reading the previous stage's output."""

import glob
import json
import os

import pytest
import yaml

from align.cli import main
from align.config import build_config, read_yaml
from align.pipeline import stage_config
from align.rewards import load_function
from align.stages import RL_STAGES, STAGES, config_class
from align.tiny import save_tiny_model
from conftest import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_MODELS = {"HuggingFaceTB/SmolLM2-135M-Instruct": "llama", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2"}
FAMILIES = ["smollm2-135m", "smollm2-135m-lora", "qwen2.5-0.5b"]
# stage recipes, in the order they run
ORDER = {"sft": 0, "rm": 1, "ppo": 2, "grpo": 3, "trpo": 4, "reinforce": 5, "online_dpo": 6, "dpo": 7}
PIPELINES = {"smollm2-135m": "pipeline.yaml"}  # run by test_real_model_pipeline_runs_two_steps_per_stage_...


def hub_stand_in(hub_id: str, tmp_path) -> str:
    """A tiny random model saved locally with the architecture of the hub model `hub_id`."""
    arch = HUB_MODELS[hub_id]
    return save_tiny_model(tmp_path / f"hub-{arch}", arch=arch, hidden_size=32, num_layers=2, num_heads=4,
                           intermediate_size=64, max_position_embeddings=128)


def local_dataset(hub_id: str, path) -> str:
    """A small local file with the columns of the hub dataset (as the recipes expect them)."""
    pairs = [(a, b) for a in (12, 25, 47, 63) for b in (18, 30, 56)]
    if hub_id == "trl-lib/tldr":
        rows = [{"prompt": f"POST: I added {a} and {b}.\nTL;DR:", "completion": f" sum is {a + b}"} for a, b in pairs]
    elif hub_id == "trl-lib/tldr-preference":
        rows = [{"prompt": f"POST: {a} and {b}\nTL;DR:", "chosen": f" {a + b}", "rejected": f" {a + b - 10}"}
                for a, b in pairs]
    elif hub_id == "trl-lib/DeepMath-103K":
        rows = [{"prompt": [{"role": "user", "content": f"What is {a}+{b}?"}], "solution": str(a + b)}
                for a, b in pairs]
    elif hub_id == "trl-lib/Capybara":
        rows = [{"messages": [{"role": "user", "content": f"What is {a}+{b}?"},
                              {"role": "assistant", "content": f"It is {a + b}."}]} for a, b in pairs]
    else:
        raise AssertionError(f"recipe uses hub dataset {hub_id}: add its columns to this test")
    return write_jsonl(path, rows)


SHORT = {"max_steps": 2, "save_steps": 0, "eval_steps": 0, "logging_steps": 1, "disable_tqdm": True,
         "max_length": 96, "per_device_train_batch_size": 4, "per_device_eval_batch_size": 4,
         "gradient_accumulation_steps": 1}
RL_SHORT = {"max_new_tokens": 6, "per_device_train_batch_size": 4}


def short_overrides(stage: str, cfg: dict, tmp_path, tag: str = "") -> dict:
    """Two steps of `stage` with small batches, and the recipe's hub data sets swapped for local stand-ins."""
    over = dict(SHORT)
    over["train_data"] = local_dataset(cfg["train_data"], tmp_path / f"{tag}{stage}-train.jsonl")
    if cfg.get("eval_data"):
        over["eval_data"] = local_dataset(cfg["eval_data"], tmp_path / f"{tag}{stage}-eval.jsonl")
    if stage in ("ppo", "grpo", "trpo", "reinforce", "online_dpo"):
        over.update(RL_SHORT)
        if stage == "grpo":
            over["per_device_train_batch_size"] = 2 * cfg.get("num_generations", 2)
    return over


def test_every_real_model_recipe_is_run_by_a_test():
    """A recipe file added to a family must be a stage recipe (run by the stage test), the family's pipeline
    (run by the pipeline test) or a file one of them uses."""
    for family in FAMILIES:
        yamls = glob.glob(os.path.join(ROOT, "recipes", family, "*.yaml"))
        for path in yamls:
            name = os.path.basename(path)
            assert name[:-5] in ORDER or name == PIPELINES.get(family), f"{path}: run by no test"
        text = ""
        for path in yamls:
            with open(path) as fh:
                text += fh.read()
        for path in set(glob.glob(os.path.join(ROOT, "recipes", family, "*"))) - set(yamls):
            assert f"recipes/{family}/{os.path.basename(path)}" in text, f"{path}: used by no recipe"


@pytest.mark.parametrize("path", sorted(p for fam in ("tiny", *FAMILIES)
                                        for p in glob.glob(os.path.join(ROOT, "recipes", fam, "*.yaml"))),
                         ids=lambda p: os.path.relpath(p, os.path.join(ROOT, "recipes")))
def test_recipe_fields_are_valid_for_their_stage(path, monkeypatch):
    """Every field of a recipe is one its stage knows (the loader refuses unknown ones) with a valid value, its
    reward functions load, and a pipeline's stage recipes pass the same check with the pipeline's overrides."""
    monkeypatch.chdir(ROOT)
    stage = os.path.basename(path)[:-5]
    assert stage in STAGES, f"{path}: the file name is no stage"
    cfg = build_config(config_class(stage), read_yaml(path), path)
    if stage != "pipeline":
        for spec in [*getattr(cfg, "reward_funcs", []), *getattr(cfg, "gold_reward_funcs", [])]:
            load_function(spec)
        return
    for spec in cfg.eval_reward_funcs:
        load_function(spec)
    for s in ["sft", "rm", *RL_STAGES]:
        recipe = getattr(cfg, s)
        if s in ("sft", "rm", *cfg.rl_stages) or os.path.dirname(recipe) == os.path.dirname(os.path.relpath(path)):
            stage_config(s, recipe, {}, cfg.overrides.get(s))


@pytest.mark.parametrize("family", FAMILIES)
def test_real_model_recipes_run_two_steps_on_tiny_stand_ins(family, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    recipes = sorted((p for p in glob.glob(os.path.join(ROOT, "recipes", family, "*.yaml"))
                      if os.path.basename(p) != PIPELINES.get(family)),
                     key=lambda p: ORDER[os.path.basename(p)[:-5]])
    assert recipes
    produced: dict[str, str] = {}  # recipe output_dir -> where the test wrote that stage
    ran = []
    for recipe in recipes:
        stage = os.path.basename(recipe)[:-5]
        with open(recipe) as fh:
            cfg = yaml.safe_load(fh)
        over = dict(short_overrides(stage, cfg, tmp_path), output_dir=str(tmp_path / stage))
        model = cfg["model"]
        if model in HUB_MODELS:
            over["model"] = hub_stand_in(model, tmp_path)
        else:
            assert model in produced, f"{recipe}: model {model} is made by no earlier recipe of {family}"
            over["model"] = produced[model]
        for key in ("reward_model", "value_model"):
            if cfg.get(key) and cfg[key] != "policy":
                assert cfg[key] in produced, f"{recipe}: {key} {cfg[key]} is made by no earlier recipe"
                over[key] = produced[cfg[key]]
        argv = [stage, "--config", recipe]
        for k, v in over.items():
            argv += [f"--{k}", str(v)]
        assert main(argv) == 0, f"{recipe} failed"
        assert os.path.isfile(os.path.join(over["output_dir"], "metrics.jsonl"))
        if cfg.get("share_base"):  # the one-base-copy recipes must really share (else they fall back in one line)
            said = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith(f"{stage}: ")]
            assert said and said[-1].startswith(f"{stage}: one copy of the base weights for the policy, the "
                                                "reference, the reward model"), said
        produced[cfg["output_dir"]] = over["output_dir"]
        ran.append(stage)
    assert ran[0] in ("sft", "rm", "grpo")  # a family starts from a hub model (an instruct model needs no SFT)


def test_real_model_pipeline_runs_two_steps_per_stage_on_tiny_stand_ins(tmp_path, monkeypatch):
    """recipes/smollm2-135m/pipeline.yaml through `align pipeline`: its own stage recipes, hub model and data swapped
    for local stand-ins through the pipeline's base_model, eval_data and per-stage overrides, two steps per stage;
    every RL stage (GRPO, the one-line swap, and the others) runs after PPO from the same SFT model (and reward
    model)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    monkeypatch.chdir(ROOT)
    family = "smollm2-135m"
    with open(os.path.join(ROOT, "recipes", family, PIPELINES[family])) as fh:
        pipe = yaml.safe_load(fh)
    recipes = {s: read_yaml(pipe[s]) for s in ("sft", "rm", *RL_STAGES)}
    # the pipeline is the family's stage recipes (one for every RL stage, so that a stage added to rl_stages
    # never falls back to the tiny task's), chained as they are when run one by one
    assert pipe["rl_stages"] == ["ppo"]
    assert pipe["base_model"] == recipes["sft"]["model"]
    for s, cfg in recipes.items():
        assert pipe[s] == f"recipes/{family}/{s}.yaml"
        assert cfg["output_dir"] == f"{pipe['output_dir']}/{s}"
    for s in RL_STAGES:
        assert recipes[s]["model"] == recipes["rm"]["model"] == recipes["sft"]["output_dir"]
        if s != "dpo":
            assert recipes[s]["reward_model"] == recipes["rm"]["output_dir"]

    # the held-out file as recipes/smollm2-135m/tldr_eval.py writes it, from a stand-in for trl-lib/tldr
    from importlib.util import module_from_spec, spec_from_file_location

    spec = spec_from_file_location("tldr_eval", os.path.join(ROOT, "recipes", family, "tldr_eval.py"))
    tldr_eval = module_from_spec(spec)
    spec.loader.exec_module(tldr_eval)
    eval_file = tldr_eval.write_eval_file(local_dataset("trl-lib/tldr", tmp_path / "tldr-validation.jsonl"),
                                          "validation", 8, str(tmp_path / "tldr_eval.jsonl"))
    assert tldr_eval.rouge_l([], ["the sum is 30", ""], [" sum is 30", "sum"]) == [2 * 3 / 7, 0.0]

    run = tmp_path / "run"
    short = dict(pipe, base_model=hub_stand_in(pipe["base_model"], tmp_path), output_dir=str(run),
                 eval_data=eval_file, eval_max_new_tokens=6, rl_stages=list(RL_STAGES), num_threads=1,
                 overrides={s: short_overrides(s, cfg, tmp_path, "pipe-") for s, cfg in recipes.items()})
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(short))
    assert main(["pipeline", "--config", str(path)]) == 0

    report = json.loads((run / "report.json").read_text())
    assert list(report["stages"]) == ["base", "sft", "rm", *RL_STAGES]
    for s in ("base", "sft", *RL_STAGES):
        assert 0.0 <= report["stages"][s]["accuracy"] <= 1.0 and report["stages"][s]["num_samples"] == 8
    for s in RL_STAGES:
        assert report["stages"][s]["steps"] == 2
        if s != "dpo":
            assert report["stages"][s]["final_kl"] is not None
    for s in ("sft", "rm", *RL_STAGES):
        assert os.path.isfile(run / s / "metrics.jsonl") and os.path.isfile(run / s / "model.safetensors")
    for s in ("sft", *RL_STAGES):
        AutoModelForCausalLM.from_pretrained(run / s)
    AutoModelForSequenceClassification.from_pretrained(run / "rm")
    AutoModelForSequenceClassification.from_pretrained(run / "ppo" / "value_model")
    # each RL stage started from this run's SFT model against its reward model, with its recipe's own settings
    for s in RL_STAGES:
        used = json.loads((run / s / f"{s}_config.json").read_text())
        assert used["model"] == str(run / "sft")
        assert used.get("reward_model", "") == ("" if s == "dpo" else str(run / "rm"))
        for key in ("learning_rate", "beta", "num_generations", "loss_type", "psi"):
            if key in recipes[s]:
                assert used[key] == recipes[s][key], (s, key)
    assert json.loads((run / "ppo" / "ppo_config.json").read_text())["value_model"] == str(run / "rm")
