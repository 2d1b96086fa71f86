"""Stands in for a stage script as LAUNCH="python tests/fake_stage.py": records each call in
$FAKE_LOG (JSON a line: script, output folder as resolved, flags, whether its result was already
there) and writes empty stand-ins of what the script would, so vip_loop.sh and the ablation run
their whole plumbing in seconds. Like the real scripts, a call whose result exists does nothing."""
import json
import os
import sys

script, argv = os.path.basename(sys.argv[1]), sys.argv[2:]
out = argv[argv.index("--output_dir") + 1]
final = {"prune.py": "ranking.json", "curate.py": "pairs.jsonl", "train_redpo.py": "student/student.json",
         "evaluate.py": "eval.json", "export.py": "README.md"}[script]
flags = {}
for i, a in enumerate(argv):
    if a.startswith("--"):
        values = []
        for v in argv[i + 1:]:
            if v.startswith("--"):
                break
            values.append(v)
        flags[a[2:]] = values
done = os.path.exists(os.path.join(out, final)) and script != "evaluate.py"
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps({"script": script, "out": os.path.realpath(out), "flags": flags, "done": done}) + "\n")
if not done:
    os.makedirs(out, exist_ok=True)
    if script in ("prune.py", "train_redpo.py"):  # a student whose parents lead back to M0, as models.stage_of reads
        meta = {"parent": (flags.get("student") or ["M0"])[0], **({"pruned_this_stage": []} if script == "prune.py" else {})}
        os.makedirs(os.path.join(out, "student"), exist_ok=True)
        json.dump(meta, open(os.path.join(out, "student", "student.json"), "w"))
    if script == "evaluate.py":  # teacher, then the students in order: 3.0, 2.9, ...; two videos each, 0.1 apart
        aspects = ("visual_quality", "temporal_consistency", "dynamic_degree", "text_alignment")
        rows = [{"key": f"m{k}", "scores": dict.fromkeys(aspects, 3.0 - 0.1 * k)} for k in range(1 + len(flags["students"]))]
        os.makedirs(os.path.join(out, "items"), exist_ok=True)
        for k, row in enumerate(rows):
            for j in (0, 1):
                item = {"model": row["key"], "prompt": "a cat", "seed": j, "scores": dict.fromkeys(aspects, 2.95 - 0.1 * k + 0.1 * j)}
                json.dump(item, open(os.path.join(out, "items", f"m{k}__{j}.json"), "w"))
        json.dump({"aspects": aspects, "items": ["a cat (seed 0)", "a cat (seed 1)"], "models": rows},
                  open(os.path.join(out, final), "w"))
    elif script != "train_redpo.py":
        open(os.path.join(out, final), "w").close()
