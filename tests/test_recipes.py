"""The recipes for real small models run through exactly the code path they would use with the hub: each hub
model is swapped for a tiny local model of the same architecture, each hub dataset for a local file with the
same columns, and every stage runs two steps, each stage reading the previous stage's output."""

import glob
import os

import pytest
import yaml

from align.cli import main
from align.tiny import save_tiny_model
from conftest import write_jsonl

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_MODELS = {"HuggingFaceTB/SmolLM2-135M-Instruct": "llama", "Qwen/Qwen2.5-0.5B-Instruct": "qwen2"}


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


@pytest.mark.parametrize("family", ["smollm2-135m", "qwen2.5-0.5b"])
def test_real_model_recipes_run_two_steps_on_tiny_stand_ins(family, tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    order = {"sft": 0, "rm": 1, "ppo": 2, "grpo": 3, "trpo": 4, "reinforce": 5}
    recipes = sorted(glob.glob(os.path.join(ROOT, "recipes", family, "*.yaml")),
                     key=lambda p: order[os.path.basename(p)[:-5]])
    assert recipes
    produced: dict[str, str] = {}  # recipe output_dir -> where the test wrote that stage
    ran = []
    for recipe in recipes:
        stage = os.path.basename(recipe)[:-5]
        with open(recipe) as fh:
            cfg = yaml.safe_load(fh)
        over = dict(SHORT, output_dir=str(tmp_path / stage))
        model = cfg["model"]
        if model in HUB_MODELS:
            over["model"] = save_tiny_model(tmp_path / f"hub-{HUB_MODELS[model]}", arch=HUB_MODELS[model],
                                            hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                                            max_position_embeddings=128)
        else:
            assert model in produced, f"{recipe}: model {model} is made by no earlier recipe of {family}"
            over["model"] = produced[model]
        for key in ("reward_model", "value_model"):
            if cfg.get(key) and cfg[key] != "policy":
                assert cfg[key] in produced, f"{recipe}: {key} {cfg[key]} is made by no earlier recipe"
                over[key] = produced[cfg[key]]
        over["train_data"] = local_dataset(cfg["train_data"], tmp_path / f"{stage}-train.jsonl")
        if cfg.get("eval_data"):
            over["eval_data"] = local_dataset(cfg["eval_data"], tmp_path / f"{stage}-eval.jsonl")
        if stage in ("ppo", "grpo", "trpo", "reinforce"):
            over.update(RL_SHORT)
            if stage == "grpo":
                over["per_device_train_batch_size"] = 2 * cfg.get("num_generations", 2)
        argv = [stage, "--config", recipe]
        for k, v in over.items():
            argv += [f"--{k}", str(v)]
        assert main(argv) == 0, f"{recipe} failed"
        assert os.path.isfile(os.path.join(over["output_dir"], "metrics.jsonl"))
        produced[cfg["output_dir"]] = over["output_dir"]
        ran.append(stage)
    assert ran[0] in ("sft", "grpo")
