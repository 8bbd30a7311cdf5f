"""Run directories and checkpoints: refusing to mix runs in one output_dir (or one that cannot be created),
atomic resumable checkpoints (written to a temporary directory with a manifest of every file's size and sha256,
renamed into place, pruned to save_total_limit), and verifying and resuming from one.

A directory ``checkpoints/step-N`` exists only once all of it was written: it is renamed from ``.tmp-step-N`` after
its manifest, and an old one is renamed away before it is deleted. Resuming verifies the manifest first, so a
damaged file (cut short by a full disk, changed afterwards) is named in one line instead of failing deep inside
safetensors or torch. The final model is written by `outputs.py`; resumable stops on signals are `signals.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import TYPE_CHECKING

from ..config import AlignError

if TYPE_CHECKING:
    from .loop import Run


CHECKPOINT_PREFIX = "step-"
STATE_FILE = "trainer_state.json"
MANIFEST_FILE = "manifest.json"
RESUME_HINT = "--resume_from_checkpoint latest"


def check_output_dir(cfg) -> None:
    """Refuse to mix a new run into a used output_dir, and an output_dir that cannot be created; verify the
    checkpoint to resume from. Writes nothing."""
    if not cfg.output_dir:
        raise AlignError("output_dir is not set")
    if os.path.isfile(cfg.output_dir):
        raise AlignError(f"{cfg.output_dir}: output_dir is a file")
    _check_creatable(cfg.output_dir)
    if cfg.resume_from_checkpoint:
        resolve_checkpoint(cfg)
        return
    if os.path.isdir(cfg.output_dir) and os.listdir(cfg.output_dir) and not cfg.overwrite_output_dir:
        raise AlignError(f"{cfg.output_dir}: output_dir is not empty (set overwrite_output_dir or "
                         f"resume_from_checkpoint)")


def _check_creatable(path: str) -> None:
    """One line when `path` lies below a file or below a folder this user cannot write to."""
    parent = os.path.abspath(path)
    while not os.path.exists(parent):
        up = os.path.dirname(parent)
        if up == parent:
            return
        parent = up
    if parent == os.path.abspath(path):
        if not os.path.isdir(parent):
            raise AlignError(f"{path}: output_dir is a file")
        return
    if not os.path.isdir(parent):
        raise AlignError(f"{path}: output_dir cannot be created: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise AlignError(f"{path}: output_dir cannot be created: no permission to write in {parent}")


def _checkpoint_steps(root: str) -> list[int]:
    if not os.path.isdir(root):
        return []
    return sorted(int(d[len(CHECKPOINT_PREFIX):]) for d in os.listdir(root)
                  if d.startswith(CHECKPOINT_PREFIX) and d[len(CHECKPOINT_PREFIX):].isdigit())


def latest_checkpoint(output_dir: str) -> str | None:
    steps = _checkpoint_steps(os.path.join(output_dir, "checkpoints"))
    return os.path.join(output_dir, "checkpoints", f"{CHECKPOINT_PREFIX}{steps[-1]}") if steps else None


def resolve_checkpoint(cfg) -> str | None:
    """The verified checkpoint directory to resume from (None when not resuming). A damaged one is an error
    naming the damaged file; with ``latest`` the error also names the newest older checkpoint that is intact
    (there is no silent fall-back to it: its steps would be trained again)."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        path = latest_checkpoint(cfg.output_dir)
        if path is None:
            raise AlignError(f"{cfg.output_dir}: resume_from_checkpoint=latest but no checkpoint found")
        try:
            verify_checkpoint(path)
        except AlignError as e:
            raise AlignError(f"{e}; {_intact_hint(cfg.output_dir, path)}") from None
        return path
    path = cfg.resume_from_checkpoint
    if not os.path.isdir(path):
        raise AlignError(f"{path}: checkpoint not found")
    if not os.path.isfile(os.path.join(path, STATE_FILE)) and not os.path.isfile(os.path.join(path, MANIFEST_FILE)):
        raise AlignError(f"{path}: not a checkpoint (no {STATE_FILE})")
    verify_checkpoint(path)
    return path


def clear_previous_checkpoints(run: Run) -> None:
    """A new run with overwrite_output_dir (not resuming): the checkpoints of an earlier run in output_dir are
    removed (by the main process, renamed away first), so that a later ``resume_from_checkpoint latest`` can
    only find this run's. Every process waits for it."""
    root = os.path.join(run.cfg.output_dir, "checkpoints")
    if run.is_main and os.path.isdir(root):
        old = os.path.join(run.cfg.output_dir, f".old-checkpoints-{os.getpid()}")
        os.replace(root, old)
        shutil.rmtree(old, ignore_errors=True)
    run.accelerator.wait_for_everyone()


def _intact_hint(output_dir: str, damaged: str) -> str:
    """What to do when the newest checkpoint is damaged: the newest older one that verifies, if any."""
    root = os.path.join(output_dir, "checkpoints")
    newest = int(os.path.basename(damaged)[len(CHECKPOINT_PREFIX):])
    for s in reversed(_checkpoint_steps(root)):
        if s >= newest:
            continue
        older = os.path.join(root, f"{CHECKPOINT_PREFIX}{s}")
        try:
            verify_checkpoint(older)
        except AlignError:
            continue
        return (f"the newest intact checkpoint is {older} (step {s}): resume from it with "
                f"--resume_from_checkpoint {older}")
    return "no older checkpoint is intact: start again with overwrite_output_dir"


# ---------------------------------------------------------------------------------------------------------------
# the manifest: every file's size and sha256


def _sha256(path: str, sync: bool = False) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
        if sync:
            os.fsync(fh.fileno())
    return h.hexdigest()


def fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def relative_files(folder: str) -> list[str]:
    """Paths of the files below `folder`, relative to it, '/'-separated, sorted."""
    out = []
    for base, _, names in os.walk(folder):
        for n in names:
            out.append(os.path.relpath(os.path.join(base, n), folder).replace(os.sep, "/"))
    return sorted(out)


def write_manifest(folder: str) -> dict:
    """Record the size and sha256 of every file below `folder` in folder/manifest.json, flushing each file to
    disk first (the manifest then describes bytes that survive a crash); returns the manifest."""
    files = {}
    for rel in relative_files(folder):
        if rel == MANIFEST_FILE:
            continue
        full = os.path.join(folder, rel)
        files[rel] = {"size": os.path.getsize(full), "sha256": _sha256(full, sync=True)}
    manifest = {"format": 1, "files": files}
    target = os.path.join(folder, MANIFEST_FILE)
    with open(target, "w", encoding="utf-8") as fh:
        json.dump(manifest, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(folder)
    return manifest


_VERIFIED: dict[str, tuple] = {}  # checkpoint path -> the (file, size, mtime) stamp it verified with


def _stamp(folder: str) -> tuple:
    return tuple((rel, *(lambda st: (st.st_size, st.st_mtime_ns))(os.stat(os.path.join(folder, rel))))
                 for rel in relative_files(folder))


def verify_checkpoint(path: str) -> None:
    """Check every file of the checkpoint against its manifest (presence, size, sha256); the first damage is an
    AlignError naming the file. A checkpoint verified before in this process and not touched since is not read
    again."""
    key = os.path.abspath(path)
    try:
        stamp = _stamp(path)
    except OSError:
        stamp = None
    if stamp is not None and _VERIFIED.get(key) == stamp:
        return
    mpath = os.path.join(path, MANIFEST_FILE)
    if not os.path.isfile(mpath):
        raise AlignError(f"{path}: no {MANIFEST_FILE}: an incomplete checkpoint (or one written before checkpoints "
                         f"had manifests)")
    try:
        with open(mpath, encoding="utf-8") as fh:
            files = json.load(fh)["files"]
        entries = [(str(rel), int(e["size"]), str(e["sha256"])) for rel, e in files.items()]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise AlignError(f"{mpath}: damaged manifest ({type(e).__name__}: {e})") from None
    for rel, size, digest in entries:
        full = os.path.join(path, *rel.split("/"))
        if not os.path.isfile(full):
            raise AlignError(f"{path}/{rel}: missing (the manifest lists {size} bytes)")
        actual = os.path.getsize(full)
        if actual != size:
            raise AlignError(f"{path}/{rel}: size {actual}, manifest says {size}")
    for rel, size, digest in entries:
        if _sha256(os.path.join(path, *rel.split("/"))) != digest:
            raise AlignError(f"{path}/{rel}: checksum mismatch (sha256 differs from the manifest's)")
    if stamp is not None:
        _VERIFIED[key] = stamp


# ---------------------------------------------------------------------------------------------------------------
# writing and reading checkpoints


def save_checkpoint(run: Run, step: int) -> str:
    """Everything needed to continue bit-exactly (weights, optimizer, schedule, RNG of every process,
    step, stage state), written to a temporary directory with its manifest and renamed into place."""
    root = os.path.join(run.cfg.output_dir, "checkpoints")
    final = os.path.join(root, f"{CHECKPOINT_PREFIX}{step}")
    tmp = os.path.join(root, f".tmp-{CHECKPOINT_PREFIX}{step}")
    if run.is_main:
        os.makedirs(root, exist_ok=True)
        for d in os.listdir(root):  # left by a run that was killed while writing or deleting one
            if d.startswith((".tmp-", ".old-")):
                shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    run.accelerator.wait_for_everyone()
    try:
        run.accelerator.save_state(tmp)
        run.accelerator.wait_for_everyone()
        if run.is_main:
            state = {"step": step, "stage": run.stage}
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as fh:
                json.dump(state, fh)
            write_manifest(tmp)
            if os.path.exists(final):
                old = os.path.join(root, f".old-{CHECKPOINT_PREFIX}{step}")
                if os.path.exists(old):
                    shutil.rmtree(old)
                os.replace(final, old)
                os.replace(tmp, final)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, final)
            fsync_dir(root)
            _prune_checkpoints(root, run.cfg.save_total_limit)
    except (OSError, RuntimeError) as e:  # a full disk, a quota, a vanished mount (torch says RuntimeError)
        shutil.rmtree(tmp, ignore_errors=True)
        raise AlignError(f"{final}: cannot write the checkpoint ({error_line(e)}); the checkpoints written before "
                         f"it are kept") from None
    run.accelerator.wait_for_everyone()
    return final


def error_line(e: BaseException) -> str:
    text = getattr(e, "strerror", None) or str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _prune_checkpoints(root: str, limit: int) -> None:
    """Delete all but the newest `limit` checkpoints; each is renamed away first, so a run killed while deleting
    leaves no half-deleted ``step-N``."""
    if not limit or limit <= 0:
        return
    for s in _checkpoint_steps(root)[:-limit]:
        name = f"{CHECKPOINT_PREFIX}{s}"
        old = os.path.join(root, f".old-{name}")
        os.replace(os.path.join(root, name), old)
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(run: Run, path: str) -> int:
    """Restore a checkpoint written by :func:`save_checkpoint` into the prepared run; returns its step."""
    verify_checkpoint(path)
    try:
        with open(os.path.join(path, STATE_FILE), encoding="utf-8") as fh:
            state = json.load(fh)
        step = int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AlignError(f"{path}/{STATE_FILE}: unreadable ({type(e).__name__}: {e})") from None
    if state.get("stage") != run.stage:
        raise AlignError(f"{path}: checkpoint of stage '{state.get('stage')}', not '{run.stage}'")
    try:
        run.accelerator.load_state(path)
    except Exception as e:  # a checkpoint of another model or set-up: shapes, missing keys, ...
        msg = str(e).strip().splitlines()
        raise AlignError(f"{path}: cannot restore this checkpoint into the run (is it from another model or "
                         f"configuration?): {msg[0] if msg else type(e).__name__}") from None
    return step
