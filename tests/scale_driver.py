"""Runs several `align` commands one after another in one launched process group (torchrun / accelerate launch),
so a multi-process test pays the start-up of the processes once: ``python tests/scale_driver.py JOBS.json`` with
JOBS a JSON list of argument lists (``["sft", "--model", ...]``). Exits with the first failing command's code."""

import json
import sys

from align.cli import leave_process_group, main

if __name__ == "__main__":
    with open(sys.argv[1], encoding="utf-8") as fh:
        jobs = json.load(fh)
    for argv in jobs:
        rc = main(argv)
        if rc:
            print(f"scale_driver: {' '.join(argv[:1])} exited with {rc}", file=sys.stderr)
            sys.exit(rc)
    leave_process_group()
