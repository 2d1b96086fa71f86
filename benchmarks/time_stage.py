"""One stage of the loop, timed: `python benchmarks/time_stage.py LOG SCRIPT ARGS...` runs `python
SCRIPT ARGS...` and appends its wall time and CPU time (user + system, which a busy machine disturbs
far less than wall time) to LOG. cpu_loop.py sets it as vip_loop.sh's LAUNCH; it imports nothing
heavy, so that no stage's time includes a second torch import."""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path


def time_stage(log, script, *script_args):
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    code = subprocess.run([sys.executable, script, *script_args]).returncode
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    out = script_args[script_args.index("--output_dir") + 1] if "--output_dir" in script_args else ""
    with open(log, "a") as f:
        f.write(json.dumps({"stage": Path(script).stem, "output_dir": out, "seconds": seconds, "cpu_seconds": cpu,
                            "returncode": code}) + "\n")
    return code


if __name__ == "__main__":
    sys.exit(time_stage(*sys.argv[1:]))
