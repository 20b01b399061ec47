"""The first thing a measured child does (bench/decode.py, bench/prompt_budget.py): join the memory cgroup
its parent made for it, before importing anything big, since memory charged before the move would stay
outside the limit. Imports nothing but the standard library."""

import json
import os


def join_cgroup(argv) -> None:
    """`script --child SPEC`: when SPEC names a cgroup, move this process into it."""
    if len(argv) > 2 and argv[1] == "--child" and json.loads(argv[2]).get("cgroup"):
        with open(os.path.join(json.loads(argv[2])["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
