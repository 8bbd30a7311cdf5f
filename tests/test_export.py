"""Shipping a model: `align export` (a LoRA adapter of a causal LM or of a reward model merged into its base, a full
model re-saved; atomic, refusing bad input with the culprit named), `merge_lora` on SFT and PPO (policy and critic),
`report_to` trackers (checked up front, tensorboard end to end), and `push_to_hub` (refused up front when it could
not upload; the final output_dir uploaded, checkpoints left out, with HfApi monkeypatched)."""

from __future__ import annotations

import os

import pytest
import torch

import align.export as export
import align.trainers.metrics as metrics
from align.cli import main
from align.config import AlignError
from conftest import addition_rows, read_metrics, write_jsonl

BASE = ["--max_length", "32", "--disable_tqdm", "true", "--logging_steps", "1", "--seed", "5"]
LORA = ["--use_lora", "true", "--lora_r", "4", "--learning_rate", "1e-2"]
RL = ["--disable_tqdm", "true", "--logging_steps", "1", "--seed", "3", "--max_new_tokens", "4",
      "--per_device_train_batch_size", "4", "--max_length", "32", "--learning_rate", "1e-2", "--max_steps", "2",
      "--num_ppo_epochs", "1", "--reward_funcs", "format_digits"]


def sft(model, data, out, *extra):
    assert main(["sft", "--model", model, "--train_data", data, "--output_dir", str(out), *BASE, *extra]) == 0
    return str(out)


def fails(argv, capsys) -> str:
    """Run the CLI expecting a one-line error; returns it."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("error: ")
    return err[-1]


def batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 200, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:] = 0  # one right-padded row
    return ids, mask


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@torch.no_grad()
def lm_logits(model, ids, mask):
    return model.eval()(input_ids=ids, attention_mask=mask).logits


@torch.no_grad()
def values(model, ids, mask):
    from align.heads import token_values

    return token_values(model.eval(), ids, mask)[mask.bool()]


def no_adapter(path) -> bool:
    return not os.path.exists(os.path.join(path, "adapter_config.json"))


# ---------------------------------------------------------------------------------------------------------------
# fixtures: a trained LoRA SFT adapter and a trained LoRA reward-model adapter (non-zero adapters)


@pytest.fixture(scope="module")
def sft_adapter(tiny_model_dir, sft_file, tmp_path_factory) -> str:
    return sft(tiny_model_dir, sft_file, tmp_path_factory.mktemp("exp") / "sft_lora", "--max_steps", "3", *LORA)


@pytest.fixture(scope="module")
def rm_adapter(tiny_model_dir, tmp_path_factory) -> str:
    d = tmp_path_factory.mktemp("exp")
    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) - 10)}
            for r in addition_rows(16, seed=4)]
    out = str(d / "rm_lora")
    assert main(["rm", "--model", tiny_model_dir, "--train_data", write_jsonl(d / "prefs.jsonl", rows),
                 "--output_dir", out, *BASE, "--max_steps", "2", *LORA]) == 0
    return out


@pytest.fixture(scope="module")
def rl_prompts(tmp_path_factory) -> str:
    rows = [{"prompt": r["prompt"], "answer": r["answer"]} for r in addition_rows(8, seed=7)]
    return write_jsonl(tmp_path_factory.mktemp("exp") / "rl.jsonl", rows)


# ---------------------------------------------------------------------------------------------------------------
# align export


def test_export_causal_lm_adapter_gives_the_adapter_logits(tiny_model_dir, sft_adapter, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "merged")
    assert main(["export", "--model", sft_adapter, "--output_dir", out]) == 0
    assert no_adapter(out) and os.path.isfile(os.path.join(out, "model.safetensors"))
    merged = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no peft
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(sft_adapter).get_vocab()
    ids, mask = batch()
    adapter_logits = lm_logits(AutoPeftModelForCausalLM.from_pretrained(sft_adapter), ids, mask)
    assert max_diff(lm_logits(merged, ids, mask), adapter_logits) < 1e-5
    # the adapter did change the model, so the comparison above means something
    assert max_diff(lm_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids, mask), adapter_logits) > 1e-3


def test_export_reward_model_adapter_keeps_the_trained_head(tiny_model_dir, rm_adapter, tmp_path):
    from transformers import AutoModelForSequenceClassification

    from align.heads import load_scalar_model

    out = str(tmp_path / "rm_merged")
    assert main(["export", "--model", rm_adapter, "--output_dir", out]) == 0
    assert no_adapter(out)
    merged = AutoModelForSequenceClassification.from_pretrained(out)
    assert merged.config.num_labels == 1 and merged.config.pad_token_id is not None
    ids, mask = batch(1)
    adapter = load_scalar_model(rm_adapter, merge_adapter=False)  # peft model, adapter and score head unmerged
    assert max_diff(values(merged, ids, mask), values(adapter, ids, mask)) < 1e-5
    with torch.no_grad():  # transformers' own forward (score at the last non-pad token) agrees too
        a = merged(input_ids=ids, attention_mask=mask).logits
        b = adapter(input_ids=ids, attention_mask=mask).logits
    assert max_diff(a, b) < 1e-5


def test_export_full_model_is_resaved(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    out = str(tmp_path / "copy")
    assert main(["export", "--model", tiny_model_dir, "--output_dir", out, "--dtype", "bfloat16"]) == 0
    src, dst = load_file(os.path.join(tiny_model_dir, "model.safetensors")), load_file(os.path.join(out,
                                                                                                  "model.safetensors"))
    assert set(src) <= set(dst) and all(dst[k].dtype == torch.bfloat16 for k in dst)
    assert all(torch.equal(src[k].to(torch.bfloat16), dst[k]) for k in src)


def test_export_refuses_bad_input_naming_it(tiny_model_dir, sft_adapter, tmp_path, capsys):
    import json
    import shutil

    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("x")
    err = fails(["export", "--model", sft_adapter, "--output_dir", str(busy)], capsys)
    assert str(busy) in err and "not empty" in err and "overwrite_output_dir" in err
    assert os.listdir(busy) == ["keep.txt"]
    err = fails(["export", "--model", sft_adapter, "--output_dir", sft_adapter, "--overwrite_output_dir", "true"],
                capsys)
    assert "would replace the model being exported" in err
    err = fails(["export", "--model", str(tmp_path / "nowhere"), "--output_dir", str(tmp_path / "o")], capsys)
    assert "nowhere" in err and "not found" in err
    (tmp_path / "empty").mkdir()
    err = fails(["export", "--model", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "o")], capsys)
    assert "empty" in err and "not a model directory" in err
    # an adapter whose base has moved: the base is named, and base_model is the way out
    moved = tmp_path / "moved"
    shutil.copytree(sft_adapter, moved)
    conf = json.loads((moved / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = str(tmp_path / "gone_base")
    (moved / "adapter_config.json").write_text(json.dumps(conf))
    err = fails(["export", "--model", str(moved), "--output_dir", str(tmp_path / "o")], capsys)
    assert "gone_base" in err and "base_model" in err
    assert not os.path.exists(tmp_path / "o")
    assert main(["export", "--model", str(moved), "--output_dir", str(tmp_path / "o"),
                 "--base_model", tiny_model_dir]) == 0
    # overwrite replaces the old content entirely
    assert main(["export", "--model", sft_adapter, "--output_dir", str(busy), "--overwrite_output_dir", "true"]) == 0
    assert "keep.txt" not in os.listdir(busy) and os.path.isfile(busy / "model.safetensors")
    assert not [d for d in os.listdir(tmp_path) if d.startswith(".")]  # no temporary folder left


def test_export_is_atomic(sft_adapter, tmp_path, monkeypatch):
    out = tmp_path / "old"
    out.mkdir()
    (out / "previous.txt").write_text("previous export")

    def broken(model, tokenizer, folder):
        model.save_pretrained(folder)
        raise OSError("disk full")

    monkeypatch.setattr(export, "_write", broken)
    cfg = export.ExportConfig(model=sft_adapter, output_dir=str(out), overwrite_output_dir=True)
    with pytest.raises(OSError, match="disk full"):
        export.run_export(cfg)
    assert os.listdir(out) == ["previous.txt"]  # the old content, untouched
    assert sorted(os.listdir(tmp_path)) == ["old"]  # and no temporary folder left behind


# ---------------------------------------------------------------------------------------------------------------
# merge_lora on the training stages


def test_merge_lora_sft_saves_the_merged_model(tiny_model_dir, sft_file, sft_adapter, tmp_path):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM

    out = sft(tiny_model_dir, sft_file, tmp_path / "merged", "--max_steps", "3", *LORA, "--merge_lora", "true")
    assert no_adapter(out) and sorted(d for d in os.listdir(out) if d.startswith(".")) == []
    ids, mask = batch(2)
    # the same run without merge_lora (the fixture) saved the adapter: the merged model gives its logits
    want = lm_logits(AutoPeftModelForCausalLM.from_pretrained(sft_adapter), ids, mask)
    assert max_diff(lm_logits(AutoModelForCausalLM.from_pretrained(out), ids, mask), want) < 1e-5


def test_merge_lora_ppo_merges_policy_and_critic_and_pushes(tiny_model_dir, rl_prompts, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.heads import load_scalar_model

    uploads = fake_hub(monkeypatch)
    argv = ["ppo", "--model", tiny_model_dir, "--train_data", rl_prompts, *RL, *LORA[:4]]
    adapter, merged = str(tmp_path / "adapter"), str(tmp_path / "merged")
    assert main([*argv, "--output_dir", adapter]) == 0
    assert main([*argv, "--output_dir", merged, "--merge_lora", "true", "--push_to_hub", "true",
                 "--hub_model_id", "me/ppo-tiny"]) == 0
    assert not no_adapter(os.path.join(adapter, "value_model"))  # the critic is a LoRA adapter with a score head
    assert no_adapter(merged) and no_adapter(os.path.join(merged, "value_model"))
    ids, mask = batch(3)
    want = lm_logits(AutoPeftModelForCausalLM.from_pretrained(adapter), ids, mask)
    assert max_diff(lm_logits(AutoModelForCausalLM.from_pretrained(merged), ids, mask), want) < 1e-5
    assert max_diff(lm_logits(AutoModelForCausalLM.from_pretrained(tiny_model_dir), ids, mask), want) > 1e-4
    critic = AutoModelForSequenceClassification.from_pretrained(os.path.join(merged, "value_model"))
    critic_adapter = load_scalar_model(os.path.join(adapter, "value_model"), merge_adapter=False)
    assert max_diff(values(critic, ids, mask), values(critic_adapter, ids, mask)) < 1e-5
    # pushed once, after the final save, with the critic
    assert [u["repo_id"] for u in uploads] == ["me/ppo-tiny"] and uploads[0]["folder_path"] == merged
    assert "model.safetensors" in uploads[0]["files"] and "value_model/model.safetensors" in uploads[0]["files"]


# ---------------------------------------------------------------------------------------------------------------
# report_to


def test_report_to_resolution(monkeypatch):
    monkeypatch.setattr(metrics, "installed_trackers", lambda: {"tensorboard", "mlflow"})
    assert metrics.resolve_trackers([]) == [] and metrics.resolve_trackers(["none"]) == []
    assert metrics.resolve_trackers(["all"]) == ["mlflow", "tensorboard"]
    assert metrics.resolve_trackers(["tensorboard", "TensorBoard", "mlflow"]) == ["tensorboard", "mlflow"]
    with pytest.raises(AlignError, match=r"report_to: wandb is not installed \(pip install wandb\)"):
        metrics.resolve_trackers(["tensorboard", "wandb"])
    with pytest.raises(AlignError, match=r"report_to: comet_ml is not installed \(pip install comet_ml\)"):
        metrics.resolve_trackers(["comet"])
    with pytest.raises(AlignError, match="report_to: unknown tracker 'tensorbaord'"):
        metrics.resolve_trackers(["tensorbaord"])
    with pytest.raises(AlignError, match="'none' cannot be combined"):
        metrics.resolve_trackers(["none", "mlflow"])


def test_report_to_not_installed_stops_before_anything_is_written(tiny_model_dir, sft_file, tmp_path, capsys,
                                                                  monkeypatch):
    monkeypatch.setattr(metrics, "installed_trackers", lambda: {"tensorboard"})
    out = tmp_path / "o"
    err = fails(["sft", "--model", tiny_model_dir, "--train_data", sft_file, "--output_dir", str(out), *BASE,
                 "--report_to", "tensorboard,wandb"], capsys)
    assert err == "error: report_to: wandb is not installed (pip install wandb)"
    assert not out.exists()


def test_a_tracker_gets_project_run_name_config_and_every_row(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    """accelerate's wandb tracker, with a stand-in `wandb` module (the package is not a dependency): the run is
    started once under project 'align' with run_name, gets the config, every logged row at its step, and ends."""
    import sys
    import types

    import accelerate.tracking as tracking
    from accelerate.utils import LoggerType

    calls: dict = {"init": [], "config": {}, "log": [], "finish": 0}

    class FakeRun:
        def log(self, values, step=None):
            calls["log"].append((step, dict(values)))

        def finish(self):
            calls["finish"] += 1

    class FakeConfig:
        def update(self, values, allow_val_change=False):
            calls["config"].update(values)

    def init(**kw):
        calls["init"].append(kw)
        return FakeRun()

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init, config=FakeConfig()))
    monkeypatch.setattr(tracking, "_available_trackers", [*tracking.get_available_trackers(), LoggerType.WANDB])
    out = sft(tiny_model_dir, sft_file, tmp_path / "tracked", "--max_steps", "3", "--report_to", "wandb",
              "--run_name", "sft-try-1", "--learning_rate", "1e-3")
    assert calls["init"] == [{"project": "align", "name": "sft-try-1"}]
    assert calls["config"]["stage"] == "sft" and calls["config"]["learning_rate"] == 1e-3
    assert calls["config"]["report_to"] == '["wandb"]'  # lists go in as text (tensorboard's hparams need scalars)
    rows = read_metrics(out)
    assert [s for s, _ in calls["log"]] == [r["step"] for r in rows] == [1, 2, 3]
    assert [v["loss"] for _, v in calls["log"]] == [r["loss"] for r in rows]
    assert calls["finish"] == 1


def test_tensorboard_gets_every_logged_row(tiny_model_dir, sft_file, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    argv = ("--max_steps", "4", "--report_to", "tensorboard", "--learning_rate", "1e-3", "--save_steps", "2")
    out = sft(tiny_model_dir, sft_file, tmp_path / "tb", *argv)
    # resuming from step 2 logs steps 3 and 4 again: tensorboard drops the first ones, as metrics.jsonl does
    sft(tiny_model_dir, sft_file, out, *argv, "--resume_from_checkpoint", "latest")
    events = EventAccumulator(os.path.join(out, "tensorboard"))
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("loss")]
    rows = read_metrics(out)  # metrics.jsonl is still written
    assert [s for s, _ in logged] == [r["step"] for r in rows] == [1, 2, 3, 4]
    assert [v for _, v in logged] == pytest.approx([r["loss"] for r in rows], rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# push_to_hub


def fake_hub(monkeypatch) -> list[dict]:
    """Online, with a token, and HfApi's create_repo/upload_folder recording what would be uploaded."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    uploads: list[dict] = []

    class Url:
        def __init__(self, repo_id):
            self.repo_id = repo_id if "/" in repo_id else f"me/{repo_id}"

    def create_repo(self, repo_id, **kw):
        assert kw.get("exist_ok") is True
        return Url(repo_id)

    def upload_folder(self, *, repo_id, folder_path, ignore_patterns=None, **kw):
        files = [os.path.relpath(os.path.join(b, n), folder_path).replace(os.sep, "/")
                 for b, _, names in os.walk(folder_path) for n in names]
        uploads.append({"repo_id": repo_id, "folder_path": str(folder_path),
                        "files": sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns))})

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return uploads


def test_push_to_hub_is_refused_up_front(tiny_model_dir, sft_file, tmp_path, capsys, monkeypatch):
    out = tmp_path / "o"
    argv = ["sft", "--model", tiny_model_dir, "--train_data", sft_file, "--output_dir", str(out), *BASE,
            "--push_to_hub", "true"]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    err = fails(argv, capsys)
    assert "push_to_hub" in err and "HF_HUB_OFFLINE" in err
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    err = fails(argv, capsys)
    assert "push_to_hub" in err and "token" in err
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr("huggingface_hub.get_token", lambda: "hf_test_token")
    err = fails([*argv, "--hub_model_id", "me/two/slashes"], capsys)
    assert "hub_model_id 'me/two/slashes'" in err
    assert not out.exists()  # nothing was written by any of them
    err = fails(["export", "--model", tiny_model_dir, "--output_dir", str(out), "--push_to_hub", "true",
                 "--hub_model_id", "bad id"], capsys)
    assert "hub_model_id 'bad id'" in err and not out.exists()


def test_push_to_hub_uploads_the_final_model_not_checkpoints(tiny_model_dir, sft_file, tmp_path, monkeypatch):
    uploads = fake_hub(monkeypatch)
    out = sft(tiny_model_dir, sft_file, tmp_path / "my-sft", "--max_steps", "2", "--save_steps", "1",
              "--save_total_limit", "0", "--push_to_hub", "true")
    assert os.path.isdir(os.path.join(out, "checkpoints", "step-1"))
    assert len(uploads) == 1
    up = uploads[0]
    assert up["repo_id"] == "me/my-sft" and up["folder_path"] == out  # default: output_dir's name, user's account
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.jsonl"} <= set(up["files"])
    assert not [f for f in up["files"] if f.startswith(("checkpoints/", ".")) or "/." in f]


def test_export_pushes_after_writing(sft_adapter, tmp_path, monkeypatch):
    uploads = fake_hub(monkeypatch)
    out = str(tmp_path / "shipped")
    result = export.run_export(export.ExportConfig(model=sft_adapter, output_dir=out, push_to_hub=True,
                                                   hub_model_id="org/shipped-sft"))
    assert result["hub_repo"] == "org/shipped-sft"
    assert uploads and uploads[0]["folder_path"] == out and "model.safetensors" in uploads[0]["files"]


# ---------------------------------------------------------------------------------------------------------------
# adapters trained on adapters


def test_an_adapter_trained_on_an_adapter_loads_on_that_adapter(tiny_model_dir, sft_file, sft_adapter, tmp_path):
    """A LoRA run from a LoRA run's output (SFT -> SFT, SFT -> RM) saves an adapter whose base is that output: it
    loads (align's loaders, `align export`) with both updates, the same as the run's own merged model."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from align.heads import load_scalar_model
    from align.models import adapter_base, load_causal_lm

    ids, mask = batch(3)
    second = sft(sft_adapter, sft_file, tmp_path / "second", "--max_steps", "2", *LORA)
    merged = sft(sft_adapter, sft_file, tmp_path / "second_merged", "--max_steps", "2", *LORA, "--merge_lora", "true")
    assert os.path.abspath(adapter_base(second)) == os.path.abspath(sft_adapter)
    want = lm_logits(AutoModelForCausalLM.from_pretrained(merged), ids, mask)  # base + both updates
    assert max_diff(lm_logits(load_causal_lm(second), ids, mask), want) < 1e-5
    # without the first update the logits are clearly different: the check above can fail
    assert max_diff(lm_logits(load_causal_lm(sft_adapter), ids, mask), want) > 1e-3
    out = str(tmp_path / "exported")
    assert main(["export", "--model", second, "--output_dir", out]) == 0
    assert max_diff(lm_logits(AutoModelForCausalLM.from_pretrained(out), ids, mask), want) < 1e-5

    rows = [{"prompt": r["prompt"], "chosen": r["answer"], "rejected": str(int(r["answer"]) - 10)}
            for r in addition_rows(16, seed=4)]
    prefs = write_jsonl(tmp_path / "prefs.jsonl", rows)
    rm_args = ["--train_data", prefs, *BASE, "--max_steps", "2", *LORA]
    rm = str(tmp_path / "rm")
    rm_merged = str(tmp_path / "rm_merged")
    assert main(["rm", "--model", sft_adapter, "--output_dir", rm, *rm_args]) == 0
    assert main(["rm", "--model", sft_adapter, "--output_dir", rm_merged, *rm_args, "--merge_lora", "true"]) == 0
    want = values(AutoModelForSequenceClassification.from_pretrained(rm_merged), ids, mask)
    assert max_diff(values(load_scalar_model(rm), ids, mask), want) < 1e-5
