"""Command line: `align <stage> --config recipe.yaml [--field value ...]`.

The stages are the rows of `align.stages.STAGES`: a config dataclass and the function that runs it.
`align <stage> --help` lists every field of the dataclass with its help text.
"""

from __future__ import annotations

import json
import os
import sys

from . import __version__
from .config import AlignError, load_config
from .stages import STAGES, config_class, runner


def usage() -> str:
    width = max(len(s) for s in STAGES)
    lines = ["usage: align <stage> --config FILE [--field value ...]   (align --version)", "", "stages:"]
    lines += [f"  {name.ljust(width)}  {s.description}" for name, s in STAGES.items()]
    lines += ["", "`align <stage> --help` lists the stage's fields."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"align {__version__}")
        return 0
    stage, rest = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"error: unknown stage '{stage}'\n\n{usage()}", file=sys.stderr)
        return 2
    where = process_label()
    try:
        cfg = load_config(config_class(stage), rest, prog=f"align {stage}")
        result = runner(stage)(cfg)
    except AlignError as e:
        for line in str(e).splitlines() or [""]:
            print(f"error{where}: {line}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        if not (where and peer_lost(e)):
            raise
        print(f"error{where}: stopped because another process of the run failed or was killed (its error is "
              f"above; {str(e).splitlines()[0][:200]})", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    if isinstance(result, dict) and os.environ.get("RANK", "0") == "0":  # one copy from a multi-process launch
        print(json.dumps({k: v for k, v in result.items() if not str(k).startswith("_")}, indent=2, default=str))
    return 0


def process_label() -> str:
    """' (process R of N)' in a multi-process launch (torchrun / accelerate launch set RANK and WORLD_SIZE), so an
    error names the process that failed; '' for one process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    return f" (process {os.environ.get('RANK', '?')} of {world})" if world > 1 else ""


def peer_lost(e: BaseException) -> bool:
    """Whether a collective failed because another process went away (it printed its own error)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistBackendError", ())) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Broken pipe"))


def entry() -> None:
    """The `align` command (and `python -m align.cli`): `main`, then, after a run that succeeded, leave the
    process group together."""
    rc = main()
    if rc == 0:
        leave_process_group()
    elif process_label():
        # a failed process of a multi-process run leaves at once: the process group's teardown would wait for, or
        # abort on, peers that are gone, and the launcher should see this exit code first
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


def leave_process_group() -> None:
    """After a run that succeeded on every process: wait for all of them, then close the process group, so no
    process exits while another still talks to it (on several machines, the rendezvous store lives on
    machine 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":  # pragma: no cover
    entry()
