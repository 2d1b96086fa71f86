r"""Export: a student as the folder its family's users already load, with a model card, ready for the hub.

    python export.py --config configs/wan.yaml --student runs/wan/stage_3/train/student --output_dir runs/wan/export
    python export.py --config configs/wan.yaml --student runs/wan/stage_3/train/student --output_dir runs/wan/export \
        --push_to_hub --hub_model_id you/wan-1.3b-vip

Then, with plain diffusers and no vip on the path: `DiffusionPipeline.from_pretrained("runs/wan/export")`.
Each family's backend writes its own format (its `export`): Wan's blocks, a WanTransformer3DModel of
the kept blocks; AnimateDiff, a UNetMotionModel whose removed motion modules have no layers; where a
format cannot drop a removal (Wan's sub-layers, VideoCrafter2), the whole model with each removed
block's weights zero (the student's outputs, at the full model's cost), and for VideoCrafter2 the
official model.ckpt too. One process exports (under `accelerate launch`, the main one). Writes to --output_dir: the pipeline folder, README.md (the model card: front matter,
the evaluation rows of eval.json, the cut, the training, the commands), config.yaml, provenance.json.
"""

import json
import os
import shlex
import shutil

import torch
import yaml
from accelerate import Accelerator

import common
import evaluate
import models
import provenance
import stage

OPTIONS = {
    "output_dir": (None, "where the exported pipeline folder goes (vip_loop.sh: <run>/export)"),
    "student": (None, "the student to export: a folder from train_redpo.py or prune.py (student/)", {"input": True}),
    "eval_json": (None, "evaluate.py's eval.json whose rows the card shows (default: <run>/eval/eval.json of the "
                        "student's run, where there is one)", {"input": True}),
    "push_to_hub": (False, "upload the folder to the hub (huggingface_hub.create_repo and upload_folder)"),
    "hub_model_id": (None, "the hub repository to push to (default: the output folder's name)"),
    "hub_token": (None, "the hub token (default: the one `hf auth login` stored)"),
}


def parse_args(argv=None):
    return stage.parse_config(argv, __doc__, {"model": stage.MODEL_OPTIONS, "export": OPTIONS})


def read_eval(path):
    """evaluate.py's report, checked for what the card reads."""
    try:
        report = json.loads(open(path).read())
        if not isinstance(report.get("models"), list) or not all("scores" in m for m in report["models"]):
            raise ValueError
        return report
    except (OSError, ValueError, AttributeError):
        raise common.ConfigError(f"{path}: expected evaluate.py's eval.json (a 'models' list with scores)") from None


def lineage(student):
    """The students that led to `student`, oldest first: [(folder, student.json)], back to M0 or as
    far as their folders are still there."""
    chain = []
    while student not in (None, "M0") and os.path.exists(os.path.join(student, "student.json")):
        meta = models.read_student_meta(student)
        chain.append((student, meta))
        student = meta.get("parent")
    return chain[::-1]


def commands(chain):
    """The command of every step that made the chain (each step's provenance.json), in order."""
    folders = []
    for folder, meta in chain:
        folders += [os.path.dirname(p) for p in meta.get("pairs") or []] + [os.path.dirname(folder)]
    found = [(provenance.read(f) or {}).get("command") for f in dict.fromkeys(folders)]
    return [f"python {c}" for c in found if c]


def this_command(args):
    return shlex.join(["export.py", "--config", args.config, "--student", args.student, "--output_dir", args.output_dir])


def base_license(args):
    """The license in the base model's own card, where its README.md is at hand."""
    base = args.pretrained_model_name_or_path
    path = os.path.join(base, "README.md")
    if not os.path.isdir(base):
        from huggingface_hub import try_to_load_from_cache

        path = try_to_load_from_cache(base, "README.md", cache_dir=args.cache_dir, revision=args.revision)
    try:
        text = open(path).read() if isinstance(path, str) else ""
        front = yaml.safe_load(text.split("---")[1]) if text.startswith("---") else {}
        return front.get("license") if isinstance(front, dict) else None
    except (OSError, yaml.YAMLError, IndexError):
        return None


def eval_rows(report, student):
    """The teacher's row and the student's from evaluate.py's report, found by the student's contents."""
    key, where = evaluate.model_key(provenance.digest(student)), os.path.realpath(student)
    rows = [m for m in report["models"] if m.get("key") == "teacher" or m["path"] == "M0"][:1]
    mine = [m for m in report["models"] if m.get("key") == key or (m["path"] != "M0" and os.path.realpath(m["path"]) == where)]
    return rows + mine[:1] if mine else []


def model_card(args, backend, info, student, report):
    """README.md in the hub's format: YAML front matter, then what the model is and how it was made."""
    chain = lineage(args.student)
    removed = models.removed_blocks(backend, student)
    with torch.device("meta"):  # the teacher's counts, from its architecture alone
        teacher = type(student).from_config({k: v for k, v in student.config.items() if k != "_use_default_values"})
    names = backend.TABLE
    hub_bases = [getattr(args, k) for k in ("pretrained_model_name_or_path", *backend.STUDENT_KEYS)
                 if not stage.is_local_path(getattr(args, k))]
    front = {"base_model": list(dict.fromkeys(hub_bases)) or None, "library_name": "diffusers",
             "pipeline_tag": "text-to-video", "license": base_license(args),
             "tags": ["vip", "pruning", "distillation", "redpo", "text-to-video", args.backend]}
    front = {k: v for k, v in front.items() if v is not None}
    stages = [meta for _, meta in chain if "pruned_this_stage" in meta]
    trained = [meta for _, meta in chain if "loss_type" in meta]
    shape = dict(num_frames=args.num_frames, height=args.height, width=args.width)
    flops = {"teacher": models.count_flops(backend, teacher, **shape), "student": models.count_flops(backend, student, **shape),
             "export": models.count_flops(backend, info["denoiser"], **shape)}
    out = os.path.abspath(args.output_dir)  # the loop's <run>/export is named after its run
    title = args.hub_model_id or os.path.basename(os.path.dirname(out) if os.path.basename(out) == "export" else out)
    lines = [f"# {title}", "",
             f"`{args.pretrained_model_name_or_path}` with {len(removed)} of its {len(backend.prunable_blocks(student))} "
             f"prunable blocks removed by V.I.P. (prune, then distil from the full model with ReDPO), over "
             f"{len(stages)} stage(s), made with vip.", "",
             f"This folder holds {info['form']}." + (f" It needs {info['needs']}." if info.get("needs") else ""), ""]
    if report and (rows := eval_rows(report, args.student)):
        table = evaluate.table(rows, report["aspects"], names["blocks"],
                               names["denoiser"][:1].upper() + names["denoiser"][1:] + " params")
        lines += ["## Evaluation", "", f"From `{args.eval_json}` ({report.get('num_prompts')} held-out prompts of "
                  f"`{report.get('prompts')}`, on {report.get('device')}):", "", table]
    else:
        lines += ["## Evaluation", "", "No evaluation of this student was found (evaluate.py writes eval.json).", ""]
    lines += ["## The cut", "", "| | teacher | vip's student | this export |", "|---|---|---|---|",
              f"| {names['denoiser']} parameters | {models.count_parameters(teacher) / 1e6:.2f}M | "
              f"{models.count_parameters(student) / 1e6:.2f}M | {models.count_parameters(info['denoiser']) / 1e6:.2f}M |",
              f"| GFLOPs of one call ({args.num_frames} frames, {args.height}x{args.width}) | {flops['teacher'] / 1e9:.2f} | "
              f"{flops['student'] / 1e9:.2f} | {flops['export'] / 1e9:.2f} |", "",
              "Removed: " + (", ".join(f"`{b}`" for b in removed) or "nothing") + "."]
    lines += [f"Stage {k}: removed " + ", ".join(f"`{b}`" for b in meta["pruned_this_stage"]) + "." for k, meta in
              enumerate(stages, 1)] + [""]
    if trained:
        lines += ["## Training", "", "| stage | loss | beta | w_sft | steps | pairs |", "|---|---|---|---|---|---|"]
        for k, meta in enumerate(trained, 1):
            pairs = sum(len(stage.read_manifest(p)) for p in meta.get("pairs") or [] if os.path.exists(p))
            lines.append(f"| {k} | {meta['loss_type']} | {meta['beta']} | {meta['w_sft']} | {meta['steps']} | {pairs} |")
        lines.append("")
    made = commands(chain) + [f"python {getattr(args, '_command', None) or this_command(args)}"]
    lines += ["## How it was made", "", "```bash", *made, "```", "", "## Use", "", usage(args, info)]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(lines) + "\n"


def usage(args, info):
    if info["pipeline"] is None:  # a family whose pipeline is vip's own
        return (f"The official inference loads `model.ckpt`; vip loads this folder as a base model "
                f"(`--pretrained_model_name_or_path {args.output_dir}`).\n")
    return ("```python\nimport torch\nfrom diffusers import DiffusionPipeline\n\n"
            f"pipe = DiffusionPipeline.from_pretrained(\"{args.hub_model_id or args.output_dir}\")\n"
            f"frames = pipe(\"a red ball bounces on a wooden floor\", num_frames={args.num_frames}, height={args.height}, "
            f"width={args.width}, num_inference_steps={args.num_inference_steps}, guidance_scale={args.guidance_scale}"
            f").frames[0]\n```\n")


def push(args):
    """Upload the finished folder; where the hub cannot be reached, one line naming the folder that is ready."""
    from huggingface_hub import create_repo, upload_folder

    repo = args.hub_model_id or os.path.basename(os.path.abspath(args.output_dir))
    try:
        create_repo(repo, token=args.hub_token, exist_ok=True)
        url = upload_folder(repo_id=repo, folder_path=args.output_dir, token=args.hub_token, ignore_patterns=[".*"])
    except Exception as e:  # offline, refused, no token: the folder is whole either way
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise common.ConfigError(f"{args.output_dir}: complete and ready to upload, but the upload to {repo} failed "
                                 f"({reason}); where there is network: hf upload {repo} {args.output_dir}") from None
    print(f"export: pushed {args.output_dir} to {url}")


def main(args):
    for key in ("output_dir", "student"):
        if getattr(args, key) is None:
            raise common.ConfigError(f"--{key} is required (export.{key} in the config)")
    # Inputs first: nothing in the output folder is touched until they are all good.
    backend = stage.backend_of(args)
    models.check_student(backend, args, args.student)
    stage.check_models(args, backend.required_models(args), build=(backend.build_tiny,))
    if args.eval_json is None:  # the loop's: <run>/stage_<k>/<step>/student -> <run>/eval/eval.json
        found = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(args.student)))),
                             "eval", "eval.json")
        args.eval_json = found if os.path.exists(found) else None
    report = read_eval(args.eval_json) if args.eval_json else None
    accelerator = Accelerator()
    if not accelerator.is_main_process:  # one process exports; under accelerate launch the others are done
        return
    made = provenance.made_from(args)
    out = args.output_dir
    if provenance.done(out, made):
        print(f"export: {out} is done from this config and these inputs; skipping")
    else:
        student = models.load_model(backend, args, student=args.student)  # refuses another base model's student
        earlier = [n for n in os.listdir(out) if n not in ("replaced", provenance.RECORD, "config.yaml")
                   and not n.startswith(".")] if os.path.isdir(out) else []
        provenance.start(accelerator, out, made, args, results=earlier)
        tmp = common.tmp_name(os.path.join(out, "export"))  # a killed export leaves only this, removed on the rerun
        info = backend.export(args, student, str(tmp))
        common.atomic_write_text(os.path.join(tmp, "README.md"), model_card(args, backend, info, student, report))
        written = sorted(os.listdir(tmp))
        for name in written:
            dest = os.path.join(out, name)
            if os.path.isdir(dest):
                shutil.rmtree(dest)
            os.replace(os.path.join(tmp, name), dest)
        os.rmdir(tmp)
        provenance.finish(out, made, written)
        print(f"export: {out}: {info['form']}" + (f"; it needs {info['needs']}" if info.get("needs") else ""))
        if info.get("runs_removed"):
            print("export: the removed blocks still run in this format (their weights are zero); the speed of the "
                  "student needs vip's loader (models.load_model with its student.json)")
    if args.push_to_hub:
        push(args)


if __name__ == "__main__":
    common.run_main(main, parse_args)
