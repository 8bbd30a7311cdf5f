"""The final outputs of a run: the trained model (or LoRA adapter, or with ``merge_lora`` the merged model) and
tokenizer saved with save_pretrained from the main process, gathering sharded weights first, each file renamed
into place whole (config.json last, so a folder that looks like a model is one); then, with ``push_to_hub``,
the upload of output_dir.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..config import AlignError
from .checkpoints import error_line, fsync_dir, relative_files

if TYPE_CHECKING:
    from .loop import Run


def gathered_state(run: Run) -> dict[str, torch.Tensor] | None:
    """The full state dict of the trained module when its weights are sharded (FSDP, DeepSpeed): a collective
    call, so every process must make it. None when each process holds the whole module."""
    return run.accelerator.get_state_dict(run.model) if run.sharded else None


def save_pretrained(module: nn.Module, output_dir: str, tokenizer, full: dict[str, torch.Tensor] | None,
                    prefix: str) -> None:
    """`module.save_pretrained` (safetensors) plus the tokenizer into output_dir; with a gathered state dict
    `full` (see :func:`gathered_state`), the module's weights are its entries under `prefix`."""
    kw = {"state_dict": {k[len(prefix):]: v for k, v in full.items() if k.startswith(prefix)}} if full else {}
    try:
        with files_renamed_into(output_dir) as tmp:
            module.save_pretrained(tmp, safe_serialization=True, **kw)
            if tokenizer is not None:
                tokenizer.save_pretrained(tmp)
    except OSError as e:
        raise AlignError(f"{output_dir}: cannot save the model ({error_line(e)}); the run's checkpoints are kept "
                         f"(--resume_from_checkpoint latest finishes the run and saves again)") from None


# files whose presence makes a folder look like a model: renamed into place after all the others
_MARKERS = ("config.json", "adapter_config.json")


def _remove_stale_weights(output_dir: str, new: set[str]) -> None:
    """Weight files of an earlier save that the new one does not replace (other shards, an index), as
    save_pretrained removes them when it writes into the folder itself."""
    if not any(n.startswith(_WEIGHT_PREFIXES) for n in new):
        return
    for name in os.listdir(output_dir):
        if (name not in new and name.startswith(_WEIGHT_PREFIXES) and name.endswith((".safetensors", ".bin", ".json"))
                and os.path.isfile(os.path.join(output_dir, name))):
            os.remove(os.path.join(output_dir, name))


_WEIGHT_PREFIXES = ("model.safetensors", "model-", "pytorch_model", "adapter_model")


@contextlib.contextmanager
def files_renamed_into(output_dir: str):
    """A temporary folder inside `output_dir` whose files are renamed into `output_dir` once the body is done:
    a run killed while saving leaves no partly written file, and the files that make a folder look like a
    model (config.json, adapter_config.json) arrive last."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-save-", dir=output_dir)
    try:
        yield tmp
        names = sorted(relative_files(tmp), key=lambda rel: (os.path.basename(rel) in _MARKERS, rel))
        _remove_stale_weights(output_dir, set(names))
        for rel in names:
            src = os.path.join(tmp, rel)
            with open(src, "rb") as fh:
                os.fsync(fh.fileno())
            dst = os.path.join(output_dir, rel)
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            os.replace(src, dst)
        fsync_dir(output_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(run: Run, module: nn.Module, output_dir: str, tokenizer, full: dict[str, torch.Tensor] | None,
               prefix: str, base: str) -> None:
    """On the main process: :func:`save_pretrained` of `module`; with ``merge_lora`` and a LoRA (peft) module, its
    adapter merged into `base` (the model the stage loaded, by path) instead, saved as a full model that plain
    transformers loads (see :func:`align.export.merge_saved_adapter`)."""
    from peft import PeftModel

    if not (run.cfg.merge_lora and isinstance(module, PeftModel)):
        save_pretrained(module, output_dir, tokenizer, full, prefix)
        return
    from ..export import ADAPTER_FILES, merge_saved_adapter

    os.makedirs(output_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".adapter-", dir=output_dir)
    try:
        save_pretrained(module, tmp, None, full, prefix)
        merged = merge_saved_adapter(tmp, base, tokenizer, run.weights_dtype, run.cfg.trust_remote_code)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for name in ADAPTER_FILES:  # an earlier adapter save here would make loaders take the folder for an adapter
        if os.path.isfile(os.path.join(output_dir, name)):
            os.remove(os.path.join(output_dir, name))
    save_pretrained(merged, output_dir, tokenizer, None, "")


def push_final(run: Run) -> None:
    """With ``push_to_hub``: upload output_dir (the final model; not checkpoints/) from the main process."""
    if run.cfg.push_to_hub and run.is_main:
        from ..export import hub_repo_id, push_folder

        push_folder(run.cfg.output_dir, hub_repo_id(run.cfg), f"align {run.stage}: final model")


def save_final(run: Run, model: nn.Module, tokenizer, output_dir: str | None = None, prefix: str = "model.",
               base: str | None = None) -> None:
    """Save the trained model (or LoRA adapter; merged into `base`, default cfg.model, with ``merge_lora``) and
    tokenizer with save_pretrained, from the main process; then, for the run's own output_dir, push it to the
    hub with ``push_to_hub``. `prefix`: where `model` sits in the prepared module (a SelectiveLM's ``model.``)."""
    run.accelerator.wait_for_everyone()
    full = gathered_state(run)
    if run.is_main:
        save_model(run, model, output_dir or run.cfg.output_dir, tokenizer, full, prefix, base or run.cfg.model)
    run.accelerator.wait_for_everyone()
    if output_dir is None:
        push_final(run)
