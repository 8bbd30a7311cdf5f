"""Shipping a trained model: a LoRA adapter merged into its base and saved as a full model, and the upload to the
Hugging Face Hub.

    align export --model runs/sft_lora --output_dir runs/sft_merged [--push_to_hub true --hub_model_id me/sft]

``align export`` takes a LoRA adapter directory saved by any stage (a causal LM, or a reward / value model: a
SEQ_CLS adapter with its trained ``score`` head) or a full model, and writes a full model + tokenizer that plain
transformers loads (``AutoModelForCausalLM`` or ``AutoModelForSequenceClassification``) with the logits of the
adapter run. The output is written to a temporary directory and renamed into place, so output_dir holds the old
content or the whole new model, never a part. ``merge_lora: true`` on a training stage makes its final save the
same merged model (:func:`merge_saved_adapter`, called by ``trainers/outputs.py``).

``push_to_hub`` (every stage and export): :func:`check_hub` refuses, before anything is loaded or written, a run
that could not upload (HF_HUB_OFFLINE set, no token, a malformed repository id); :func:`push_folder` uploads the
final output_dir (not checkpoints/ or tensorboard/) after the final save.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from typing import Any

import torch

from .config import AlignError, Checked, _f
from .heads import load_scalar_model
from .models import _first_line, _is_adapter_dir, _load_failure, check_model_path, load_causal_lm

CAUSAL_LM, REWARD_MODEL = "causal_lm", "reward_model"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")
# never uploaded: resumable checkpoints, tensorboard events, hidden temporary files
HUB_IGNORE = ["checkpoints/*", "tensorboard/*", ".*", "*/.*"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ExportConfig(Checked):
    """Merge a LoRA adapter into its base model (or re-save a full model) as a full model + tokenizer."""

    model: str = _f("", "What to export: a LoRA adapter directory saved by any stage (causal LM, or reward / value "
                        "model with its score head), or a full model directory or hub id (re-saved as safetensors).")
    output_dir: str = _f("", "Where the full model and tokenizer are written (a temporary directory renamed into "
                             "place).")
    overwrite_output_dir: bool = _f(False, "Replace a non-empty output_dir.")
    base_model: str = _f("", "Base model of the adapter (default: base_model_name_or_path in its "
                             "adapter_config.json). Set it when the base has moved, or when the adapter was trained "
                             "on another adapter's merged model (give that adapter's directory).")
    dtype: str = _f("float32", "dtype of the saved weights: float32 (the merge is exact), bfloat16, float16, or "
                               "auto (the dtype the base checkpoint was saved in).",
                    choices=("float32", "bfloat16", "float16", "auto"))
    trust_remote_code: bool = _f(False, "Allow model code from the hub to run.")
    push_to_hub: bool = _f(False, "Upload the exported model and tokenizer to the Hugging Face Hub (needs a "
                                  "network and a token: `hf auth login` or HF_TOKEN).")
    hub_model_id: str = _f("", "Hub repository for push_to_hub, e.g. user/my-model (default: the output_dir's "
                               "folder name under your account).")


# ---------------------------------------------------------------------------------------------------------------
# what a model directory holds


def adapter_config(path: str) -> dict[str, Any] | None:
    """The adapter_config.json of a LoRA adapter directory, or None for anything else."""
    if not _is_adapter_dir(path):
        return None
    try:
        with open(os.path.join(path, "adapter_config.json"), encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as e:
        raise AlignError(f"{path}: cannot read adapter_config.json: {_first_line(e)}") from None


def model_kind(path: str, trust_remote_code: bool = False) -> str:
    """``causal_lm`` or ``reward_model`` (a scalar-head ``*ForSequenceClassification``), for an adapter directory
    (its task_type) or a full model (its architectures)."""
    check_model_path(path)
    info = adapter_config(path)
    if info is not None:
        task = str(info.get("task_type") or "CAUSAL_LM")
        if task not in ("CAUSAL_LM", "SEQ_CLS"):
            raise AlignError(f"{path}: adapter task_type {task} is not supported (CAUSAL_LM or SEQ_CLS)")
        return REWARD_MODEL if task == "SEQ_CLS" else CAUSAL_LM
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_failure(path, "its config", e) from None
    archs = getattr(config, "architectures", None) or []
    return REWARD_MODEL if any(a.endswith("ForSequenceClassification") for a in archs) else CAUSAL_LM


def _load_full(path: str, kind: str, dtype: torch.dtype, trust_remote_code: bool, pad_token_id: int | None):
    if kind == REWARD_MODEL:
        return load_scalar_model(path, dtype=dtype, trust_remote_code=trust_remote_code, pad_token_id=pad_token_id)
    return load_causal_lm(path, dtype=dtype, trust_remote_code=trust_remote_code)


def load_merged(path: str, kind: str, dtype: torch.dtype = torch.float32, base_model: str = "",
                trust_remote_code: bool = False, pad_token_id: int | None = None):
    """The model of `path` as a plain transformers model: a LoRA adapter is loaded on its base (``base_model``,
    default the one its adapter_config.json records; a base that is itself an adapter is merged first) and
    merged with peft's ``merge_and_unload``; a full model is loaded as it is."""
    info = adapter_config(path)
    if info is None:
        return _load_full(path, kind, dtype, trust_remote_code, pad_token_id)
    base = base_model or str(info.get("base_model_name_or_path") or "")
    if not base:
        raise AlignError(f"{path}: adapter_config.json names no base model (set base_model)")
    try:
        check_model_path(base, "base model")
        model = _load_full(base, kind, dtype, trust_remote_code, pad_token_id)
    except AlignError as e:
        raise AlignError(f"{path}: the adapter's base model: {e} (set base_model to its directory or hub id)") \
            from None
    from peft import PeftModel

    try:
        return PeftModel.from_pretrained(model, path).merge_and_unload()
    except Exception as e:
        raise AlignError(f"{path}: cannot load the adapter on {base}: {_first_line(e)}") from None


def _load_tokenizer(path: str, base: str, trust_remote_code: bool):
    """The tokenizer saved with the model (as it is: no pad token added), else the adapter base's."""
    from transformers import AutoTokenizer

    last = None
    for p in (path, base):
        if not p:
            continue
        try:
            return AutoTokenizer.from_pretrained(p, trust_remote_code=trust_remote_code)
        except Exception as e:  # noqa: PERF203
            last = e
    raise AlignError(f"{path}: cannot load its tokenizer: {_first_line(last)}")


# ---------------------------------------------------------------------------------------------------------------
# writing


def check_export_output(output_dir: str, model: str, overwrite: bool) -> None:
    """Refuse an output_dir that is unset, a file, non-empty (without overwrite), the model itself or a folder
    that holds it (without writing anything)."""
    if not output_dir:
        raise AlignError("output_dir is not set")
    if os.path.isfile(output_dir):
        raise AlignError(f"{output_dir}: output_dir is a file")
    out, src = os.path.abspath(output_dir), os.path.abspath(model)
    if os.path.exists(model) and (out == src or src.startswith(out + os.sep)):
        raise AlignError(f"{output_dir}: output_dir would replace the model being exported ({model}); choose "
                         f"another directory")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not overwrite:
        raise AlignError(f"{output_dir}: output_dir is not empty (set overwrite_output_dir to replace it)")


def _write(model, tokenizer, folder: str) -> None:
    model.save_pretrained(folder, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def save_atomic(model, tokenizer, output_dir: str) -> None:
    """Write model + tokenizer to a temporary directory next to output_dir, then rename it into place (an
    existing output_dir is replaced; on failure nothing changes)."""
    out = os.path.abspath(output_dir)
    parent, name = os.path.dirname(out), os.path.basename(out)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=parent)
    try:
        _write(model, tokenizer, tmp)
        if os.path.isdir(out):
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.replace(out, os.path.join(old, name))
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def merge_saved_adapter(adapter_dir: str, base_model: str, tokenizer, dtype: torch.dtype,
                        trust_remote_code: bool = False):
    """A training stage's ``merge_lora``: the adapter it just saved in ``adapter_dir`` merged into ``base_model``
    (the stage's model as configured, loaded as the stage loaded it; a reward / value model gets its trained
    score head from the adapter). Returns the merged transformers model, for the stage to save."""
    kind = model_kind(adapter_dir)
    pad = getattr(tokenizer, "pad_token_id", None)
    return load_merged(adapter_dir, kind, dtype, base_model, trust_remote_code, pad_token_id=pad)


def _saved_dtype(path: str, base: str, trust_remote_code: bool) -> torch.dtype:
    """The dtype the checkpoint (the adapter's base for an adapter) records, float32 when it records none."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(base or path, trust_remote_code=trust_remote_code)
    except Exception:
        return torch.float32
    d = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(d, str):
        d = DTYPES.get(d)
    return d if isinstance(d, torch.dtype) else torch.float32


def run_export(cfg: ExportConfig) -> dict[str, Any]:
    """`align export`: check everything, merge (or load) in float32, cast to ``dtype``, write atomically, push."""
    check_export_output(cfg.output_dir, cfg.model, cfg.overwrite_output_dir)
    check_hub(cfg)
    kind = model_kind(cfg.model, cfg.trust_remote_code)
    info = adapter_config(cfg.model)
    base = (cfg.base_model or str(info.get("base_model_name_or_path") or "")) if info else ""
    tokenizer = _load_tokenizer(cfg.model, base, cfg.trust_remote_code)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    model = load_merged(cfg.model, kind, torch.float32, base, cfg.trust_remote_code, pad_token_id=pad)
    dtype = _saved_dtype(cfg.model, base, cfg.trust_remote_code) if cfg.dtype == "auto" else DTYPES[cfg.dtype]
    model = model.to(dtype)
    save_atomic(model, tokenizer, cfg.output_dir)
    out = {"output_dir": cfg.output_dir, "model_kind": kind, "merged_adapter": info is not None,
           "base_model": base, "dtype": str(dtype).replace("torch.", ""),
           "parameters": sum(p.numel() for p in model.parameters())}
    if cfg.push_to_hub:
        out["hub_repo"] = push_folder(cfg.output_dir, hub_repo_id(cfg), "align export")
    return out


# ---------------------------------------------------------------------------------------------------------------
# the hub


def hub_repo_id(cfg) -> str:
    """hub_model_id, or the output_dir's folder name (the hub puts it under the token's account)."""
    return cfg.hub_model_id or os.path.basename(os.path.normpath(os.path.abspath(cfg.output_dir)))


def _is_true(value: str | None) -> bool:
    return str(value or "").strip().upper() in ("1", "ON", "YES", "TRUE")


def check_hub(cfg) -> None:
    """With push_to_hub, refuse (one line, before anything is loaded or written) a run that could not upload its
    model at the end: HF_HUB_OFFLINE set, no token, or a malformed repository id."""
    if not getattr(cfg, "push_to_hub", False):
        return
    after = "checked before anything was written"
    if _is_true(os.environ.get("HF_HUB_OFFLINE")):
        raise AlignError(f"push_to_hub: HF_HUB_OFFLINE is set, so nothing can be uploaded (unset it, or set "
                         f"push_to_hub false and upload later with `hf upload`); {after}")
    repo = hub_repo_id(cfg)
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo)
    except HFValidationError as e:
        which = "hub_model_id" if cfg.hub_model_id else "hub_model_id (default: the output_dir's folder name)"
        raise AlignError(f"{which} '{repo}' is not a valid hub repository id: {_first_line(e)}") from None
    import huggingface_hub

    try:
        token = huggingface_hub.get_token()
    except Exception as e:
        raise AlignError(f"push_to_hub: cannot get a Hugging Face token: {_first_line(e)}") from None
    if not token:
        raise AlignError(f"push_to_hub: no Hugging Face token (run `hf auth login` or set HF_TOKEN); {after}")


def push_folder(folder: str, repo_id: str, commit_message: str) -> str:
    """Create the model repository (if needed) and upload `folder` to it, without checkpoints/, tensorboard/ and
    hidden files. Returns the full repository id."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo_id, repo_type="model", exist_ok=True)
        full = getattr(url, "repo_id", None) or repo_id
        api.upload_folder(repo_id=full, folder_path=folder, repo_type="model", ignore_patterns=HUB_IGNORE,
                          commit_message=commit_message)
    except Exception as e:
        raise AlignError(f"push_to_hub: uploading {folder} to {repo_id} failed: {_first_line(e)}; the model is "
                         f"saved in {folder} (upload it later with `hf upload {repo_id} {folder}`)") from None
    print(f"pushed {folder} to https://huggingface.co/{full}", file=sys.stderr)
    return full
