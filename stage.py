"""What every stage script shares: its config (YAML sections + CLI flags, typed and checked), its
backend (the model family named by model.backend), the models it needs (checked before any work),
its input files (prompts, pair manifests), its sharded work and what it spent. What its results
are made from, and its output folder, are provenance.py's.
"""

import argparse
import collections
import collections.abc
import contextlib
import csv
import importlib
import io
import json
import os
import pkgutil
import re
import reprlib
import resource
import sys
import time
from pathlib import Path

import torch
import yaml
from accelerate.utils import gather_object
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError,
                                    RevisionNotFoundError)

from tqdm.auto import tqdm

from common import ConfigError, atomic_write_json, atomic_write_text, intact

# -----------------------------------------------------------------------------
# Configuration: one YAML per model with a section per stage, CLI flags override it.

SECTIONS = ("model", "reward", "prune", "curate", "train", "eval", "export")

MIXED_PRECISION = ("no", "fp16", "bf16")

# The model section's keys shared by every backend; a backend adds its own (its OPTIONS) and may
# give these other defaults.
MODEL_OPTIONS = {
    "backend": ("animatediff", "model family: a module of backends/ (animatediff, videocrafter2, world, ...) "
                               "or any importable module with the same interface"),
    "pretrained_model_name_or_path": (None, "the base model: hub id or local folder", {"input": True}),
    "cache_dir": (None, "where hub downloads go (default: the Hugging Face cache, HF_HOME)"),
    "revision": (None, "hub revision (branch, tag or commit) of pretrained_model_name_or_path"),
    "build_tiny": (False, "build random tiny models at the configured paths when missing (tests, CPU demo); "
                          "the paths must be local (./x, /x or a/b/c), never a hub id"),
    "num_frames": (16, "frames per generated video", {"min": 1}),
    "height": (512, "video height in pixels", {"min": 1}),
    "width": (512, "video width in pixels", {"min": 1}),
    "num_inference_steps": (25, "denoising steps per video", {"min": 1}),
    "guidance_scale": (7.5, "classifier-free guidance scale", {"min": 0}),
    "fps": (8, "frame rate of the MP4s written", {"min": 1}),
    "generation_batch_size": (4, "videos generated per pipeline call", {"min": 1}),
    "mixed_precision": ("no", "no | fp16 | bf16: weights of frozen models and generation; autocast in training",
                        {"choices": MIXED_PRECISION}),
    "teacher_cache": (None, "a folder where M0's videos, latents and scores are kept for reuse by every stage "
                            "(vip_loop.sh: <run>/teacher; teacher_cache.py); default: none kept"),
}


_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = 80
_REPR.maxlist = _REPR.maxdict = 6


def _short(value):
    """A value as an error message shows it: bounded, however large the value."""
    return _REPR.repr(value)


def _rule(option):
    """(default, help[, rule]) -> (default, rule): the rule's type defaults to the default's, and to
    str (a path, an id, a name) when the default is None."""
    default, rule = option[0], dict(option[2]) if len(option) > 2 else {}
    rule.setdefault("type", str if default is None else list if isinstance(default, (list, tuple)) else type(default))
    return default, rule


def _coerce(value, option, where, from_cli=False):
    """Cast a YAML or CLI value to its option's type and check its range and choices, so a typo fails
    here, not mid-run. CLI values are strings (lists: the strings given); YAML is parsed only where
    the type needs it (numbers, booleans, lists): a path is a string, whatever characters it holds."""
    default, rule = _rule(option)
    kind = rule["type"]
    if value is None or (from_cli and default is None and kind in (int, float) and value.lower() in ("none", "null")):
        return None
    if kind is bool:
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {_short(value)}")
    if kind is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string (a path, name or id; quote it in YAML), got {_short(value)}")
        if "choices" in rule and value not in rule["choices"]:
            raise ConfigError(f"{where}: expected one of {', '.join(rule['choices'])}; got {_short(value)}")
        return value
    if kind == "per_stage":  # one number, or a list of one a stage
        items = value if isinstance(value, list) else [value]
        numbers = [_coerce(v, (0, "", {**rule, "type": int}), where, from_cli) for v in items]
        return numbers[0] if len(numbers) == 1 and not (isinstance(value, list) and not from_cli) else numbers
    if kind is list:
        value = _as_list(value, where, from_cli)
        bad = [v for v in value if not isinstance(v, str) or ("choices" in rule and v not in rule["choices"])]
        if bad:
            expected = f"a list of {', '.join(rule['choices'])}" if "choices" in rule else "a list of strings"
            raise ConfigError(f"{where}: expected {expected}; got {_short(bad[0])} in {_short(value)}")
        return value
    try:
        if isinstance(value, bool) or isinstance(value, (list, dict)):
            raise ValueError
        if kind is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            number = int(value) if not isinstance(value, str) else int(value.strip())
        else:
            number = float(value)
            if number != number:  # NaN passes every comparison below
                raise ValueError
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {kind.__name__}, got {_short(value)}") from None
    for bound, ok, words in (("min", lambda x, b: x >= b, "at least"), ("max", lambda x, b: x <= b, "at most"),
                             ("gt", lambda x, b: x > b, "above"), ("lt", lambda x, b: x < b, "below")):
        if bound in rule and not ok(number, rule[bound]):
            raise ConfigError(f"{where}: expected a number {words} {rule[bound]}; got {_short(value)}")
    return number


def _as_list(value, where, from_cli):
    if from_cli:  # the strings of `--key a b c`
        if len(value) > 1:
            return list(value)
        value = value[0]
        if value.startswith("[") and not os.path.exists(value):  # a YAML flow list: --aspects '[a, b]'
            try:
                parsed = yaml.load(value, _ConfigLoader)
            except yaml.YAMLError:
                parsed = None
            if not isinstance(parsed, list):
                raise ConfigError(f"{where}: not a valid YAML list: {_short(value)}; give the values separated by spaces")
            return parsed
    if isinstance(value, str):
        # One path that exists is one value, commas and all; otherwise comma-separated values.
        return [value] if os.path.exists(value) else [v for v in value.split(",") if v]
    if not isinstance(value, list):
        raise ConfigError(f"{where}: expected a list, got {_short(value)}")
    return value


def parse_config(argv, description, sections):
    """Build the argparse flags of `sections` ({section: {key: (default, help[, rule])}}), read
    `--config` and apply CLI overrides. Returns a flat Namespace; `ns._sections` keeps the YAML shape.

    Precedence: CLI flag > YAML value > default. Unknown YAML sections or keys are an error that
    lists the valid ones. Keys are unique across sections so flags can stay flat, as in diffusers.
    A rule may give "type" (for a None default; else the default's type; "per_stage": a number or
    one a stage), "choices", bounds "min", "max" (inclusive), "gt", "lt" (exclusive), and "input":
    the value names a file, folder or model whose contents the results depend on (`ns._inputs`;
    provenance.py identifies it by them), and "used": a function of the parsed args saying whether
    the key shapes the results at all (`ns._used`; what a step is made from records one that does
    not as unused, so an option added later does not make finished steps that never use it stale).
    A "model" section gets the options of the backend that the CLI or the YAML names; where the
    backend gives a shared key another default, the key keeps its rule.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config"), pre.add_argument("--backend")
    early = pre.parse_known_args(argv)[0]
    data = read_config(early.config) if early.config else {}
    if "model" in sections:
        name = early.backend or data.get("model", {}).get("backend") or sections["model"]["backend"][0]
        model = dict(sections["model"])
        for key, option in load_backend(name).OPTIONS.items():
            ruled = len(option) < 3 and len(model.get(key, ())) > 2  # another default of a shared key: its rule stays
            model[key] = (*option, model[key][2]) if ruled else option
        sections = {**sections, "model": model}

    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=str, default=None, help="YAML config (configs/<model>.yaml)")
    for section, options in sections.items():
        group = parser.add_argument_group(section)
        for key, option in options.items():
            kind = _rule(option)[1]["type"]
            # a switch alone is true, as diffusers' --push_to_hub and --gradient_checkpointing are
            nargs = {list: "+", "per_stage": "+", bool: "?"}.get(kind)
            group.add_argument(f"--{key}", type=str, default=None, nargs=nargs, const="true" if kind is bool else None,
                               help=f"{option[1]} (default: {option[0]})")
    cli = parser.parse_args(argv)

    values = {}
    for section, body in data.items():
        if section not in sections:
            continue  # another stage's settings
        for key, value in body.items():
            if key not in sections[section]:
                raise ConfigError(f"{cli.config}: unknown key '{section}.{key}'; valid keys: "
                                  f"{', '.join(sections[section])}")
            values[key] = _coerce(value, sections[section][key], f"{cli.config}: {section}.{key}")

    ns = argparse.Namespace(config=cli.config)
    ns._sections = {}
    ns._inputs = {key for options in sections.values() for key, option in options.items() if _rule(option)[1].get("input")}
    ns._cli = {key for options in sections.values() for key in options if getattr(cli, key) is not None}
    ns._used = {key: _rule(option)[1]["used"] for options in sections.values() for key, option in options.items()
                if "used" in _rule(option)[1]}
    for section, options in sections.items():
        ns._sections[section] = {}
        for key, option in options.items():
            value = values.get(key, option[0])
            if getattr(cli, key) is not None:
                value = _coerce(getattr(cli, key), option, f"--{key}", from_cli=True)
            setattr(ns, key, value)
            ns._sections[section][key] = value
    return ns


class _ConfigLoader(yaml.SafeLoader):
    """YAML as a config needs it: no aliases (nested ones expand exponentially) and no key given
    twice in one mapping (the last would silently win: a second `train:` replacing the first)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.MarkedYAMLError(problem=f"an alias (*{event.anchor[:40]}); write the value out",
                                       problem_mark=event.start_mark)
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, collections.abc.Hashable) and key in seen:
                raise yaml.MarkedYAMLError(problem=f"{_short(key)} is given twice", problem_mark=key_node.start_mark)
            if isinstance(key, collections.abc.Hashable):
                seen.add(key)
        return super().construct_mapping(node, deep)


def read_config(path):
    """A config file's sections ({section: {key: value}}), checked for shape, not yet for values."""
    try:
        with open(path, encoding="utf-8-sig") as f:
            data = yaml.load(f, _ConfigLoader) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read config ({e.strerror})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: cannot read config (not UTF-8 text)") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}: not valid YAML ({getattr(e, 'problem', None) or str(e).splitlines()[0]}{where})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections {list(SECTIONS)}")
    data = {section: {} if body is None else body for section, body in data.items()}
    for section, body in data.items():
        if section not in SECTIONS:
            raise ConfigError(f"{path}: unknown section {_short(section)}; valid sections: {', '.join(SECTIONS)}")
        if not isinstance(body, dict) or not all(isinstance(k, str) for k in body):
            raise ConfigError(f"{path}: section '{section}' must be a mapping of key: value; got {_short(body)}")
    return data


def config_dict(args):
    """The resolved config in YAML shape, refreshed from the Namespace (scripts may fill values)."""
    return {s: {k: getattr(args, k) for k in keys} for s, keys in args._sections.items()}


def save_config(args, path):
    atomic_write_text(path, yaml.safe_dump(config_dict(args), sort_keys=False))


# -----------------------------------------------------------------------------
# Backends: a model family is one module of backends/ with the names below (backends/README.md).

BACKEND_NAMES = ("OPTIONS", "STUDENT_KEYS", "TABLE", "TRAINABLE", "FSDP_WRAP", "required_models", "build_tiny", "load_denoiser",
                 "load_text_encoder", "encode_prompts", "load_pipeline", "with_denoiser", "generate",
                 "objective", "enable_checkpointing", "predict", "prunable_blocks", "denoise_inputs", "export")


BACKEND = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", re.ASCII)


def load_backend(name):
    """The module of a model family: backends/<name>.py, or a module of that (dotted) name on the
    path. The one place a backend's name becomes code: nothing else compares names."""
    if not isinstance(name, str) or not BACKEND.fullmatch(name):
        raise ConfigError(f"model.backend: expected a module name such as animatediff (letters, digits, _ and "
                          f"dots); got {_short(name)}")
    for module in [name] if "." in name else [f"backends.{name}", name]:
        try:
            backend = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name is None or not (module == e.name or module.startswith(e.name + ".")):
                raise  # the backend exists; a package it needs does not
            continue
        missing = [n for n in BACKEND_NAMES if not hasattr(backend, n)]
        if missing:
            raise ConfigError(f"model.backend: {module} is not a backend: it lacks {', '.join(missing)}")
        return backend
    portions = importlib.import_module("backends").__path__  # a namespace package: every backends/ on the path
    found = sorted(m.name for m in pkgutil.iter_modules(portions) if not m.name.startswith("_"))
    raise ConfigError(f"model.backend: no backend {name!r}; backends: {', '.join(found)} (or a module on the path)")


def backend_of(args):
    return load_backend(args.backend)


# -----------------------------------------------------------------------------
# Models: checked before anything is written, so an offline node fails in one line, at once.


def is_local_path(name):
    """Whether a model name can only be a local path: it exists, or is written as one (absolute,
    ./ ../ ~, or more than one '/'); hub ids are 'namespace/name' or 'name'."""
    name = os.fspath(name)
    return os.path.exists(name) or name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def require_model(name, files, where, what, cache_dir=None, revision=None, large=()):
    """Check that a model is there before any work starts: a local folder with `files`, or a hub id
    whose files are cached or downloadable. One ConfigError line says what is wrong and how to fix
    it (offline clusters meet this on their first run). Files in `large` are only located, not fetched."""
    name = os.fspath(name)
    if os.path.isdir(name):
        missing = [f for f in files if not os.path.isfile(os.path.join(name, f))]
        if missing:
            raise ConfigError(f"{where}: {os.path.join(name, missing[0])} is missing; expected {what}")
        return
    if is_local_path(name):
        raise ConfigError(f"{where}: {name}: no such folder; expected {what}")
    for f in files:
        try:
            hf_hub_download(name, f, cache_dir=cache_dir, revision=revision, dry_run=f in large)
        except LocalEntryNotFoundError:
            why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "the hub cannot be reached"
            raise ConfigError(f"{where}: {name} is not in the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) "
                              f"and {why}; fetch it with `hf download {name}` where there is network (then copy the "
                              f"cache here), or set {where} to a local folder") from None
        except GatedRepoError:
            raise ConfigError(f"{where}: {name} is gated on the hub; accept its terms on huggingface.co and run "
                              f"`hf auth login`") from None
        except RepositoryNotFoundError:
            raise ConfigError(f"{where}: {name} is neither a local folder nor a model on the hub (a typo? a private "
                              f"model needs `hf auth login`); expected {what}") from None
        except RevisionNotFoundError:
            raise ConfigError(f"{where}: {name} has no revision {revision!r} on the hub") from None
        except EntryNotFoundError:
            raise ConfigError(f"{where}: {name} has no file {f} on the hub; expected {what}") from None


def check_models(args, needed, build=()):
    """Every model in `needed` (dicts: where, name, files, what, and optionally revision, large and
    tiny) is there: a local folder with its files, or a hub id that is cached or downloadable. One
    marked tiny, with build_tiny set, is built instead by `build` (functions of args, each building
    what is missing), so it must name a local path: a random model written at a hub id would later
    pass for the real one. Built here, before anything identifies the models by their contents."""
    for m in needed:
        if args.build_tiny and m.get("tiny"):
            if not is_local_path(m["name"]):
                raise ConfigError(f"{m['where']}: {m['name']!r} reads as a hub id, and build_tiny only builds at local "
                                  f"paths; write it as ./{m['name']} (or another local path), or set build_tiny: false")
            continue
        require_model(m["name"], m["files"], m["where"], m["what"], cache_dir=args.cache_dir,
                      revision=m.get("revision"), large=m.get("large", ()))
    if args.build_tiny:
        for builder in build:
            builder(args)


# -----------------------------------------------------------------------------
# Input files: prompts, and the pair manifests curate.py writes for train_redpo.py.


def read_prompts(path):
    """Prompts from a text file (one a line), JSONL ({"prompt": ...} a line) or CSV with a
    `prompt` column (VidProM's export has one; Excel's starts with a byte-order mark, dropped here).
    Lines end at \\n, \\r\\n or \\r only; any other whitespace in a prompt, a quoted CSV cell's line
    breaks included, becomes one space."""

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read prompts ({getattr(e, 'strerror', None) or e})") from None
    if str(path).endswith(".jsonl"):
        prompts = []
        for i, line in enumerate(_lines(text), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                prompts.append(row["prompt"] if isinstance(row["prompt"], str) else None)
            except (json.JSONDecodeError, KeyError, TypeError):
                prompts.append(None)
            if prompts[-1] is None:
                raise ConfigError(f"{path}:{i}: expected a JSON object with a 'prompt' string")
    elif str(path).endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text, newline=""))
        try:
            if "prompt" not in (reader.fieldnames or []):
                raise ConfigError(f"{path}: expected a CSV header with a 'prompt' column; got {_short(reader.fieldnames)}")
            prompts = [row["prompt"] for row in reader]
        except csv.Error as e:
            raise ConfigError(f"{path}:{reader.line_num}: not valid CSV ({e})") from None
    else:
        prompts = _lines(text)
    prompts = [" ".join(p.split()) for p in prompts if p and p.strip()]
    if not prompts:
        raise ConfigError(f"{path}: no prompts; expected one prompt a line, or JSONL/CSV with a 'prompt' field")
    return prompts


def _lines(text):
    # str.splitlines also splits at form feeds, U+2028 and other separators a prompt or JSON string may hold
    return re.split(r"\r\n|\r|\n", text)


MANIFEST_KEYS = ("id", "prompt", "seed", "winner", "loser", "latents", "winner_scores", "loser_scores")


def _inside(rel):
    """A manifest's file path is relative and stays in the manifest's folder."""
    return isinstance(rel, str) and rel and not os.path.isabs(rel) and \
        not os.path.normpath(rel).startswith(os.pardir) and os.path.normpath(rel) != "."


def read_manifest(path):
    """The rows of a pair manifest (curate.py's pairs.jsonl), each checked for its fields and types;
    file paths must be relative to the manifest's folder and stay inside it."""
    try:
        lines = Path(path).read_text().splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read pair manifest ({getattr(e, 'strerror', None) or e})") from None
    rows = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict) or not all(k in row for k in MANIFEST_KEYS):
            raise ConfigError(f"{path}:{i}: expected a JSON object with {', '.join(MANIFEST_KEYS)}")
        numbers = lambda d: isinstance(d, dict) and all(isinstance(v, (int, float)) for v in d.values())  # noqa: E731
        bad = [k for k, ok in (("prompt", isinstance(row["prompt"], str) and row["prompt"].strip()),
                               ("seed", isinstance(row["seed"], int) and not isinstance(row["seed"], bool)),
                               ("winner_scores", numbers(row["winner_scores"])),
                               ("loser_scores", numbers(row["loser_scores"])))
               if not ok]
        if bad:
            raise ConfigError(f"{path}:{i}: '{bad[0]}' is {row[bad[0]]!r}; expected "
                              + {"prompt": "a prompt string", "seed": "an integer seed"}.get(bad[0], "a dict of scores"))
        for key in ("winner", "loser", "latents"):
            if not _inside(row[key]):
                raise ConfigError(f"{path}:{i}: '{key}' is {row[key]!r}; expected a path relative to the manifest's "
                                  f"folder and inside it (as curate.py writes)")
        rows.append(row)
    return rows


# -----------------------------------------------------------------------------
# Sharded work: every process a share of the items, each result a file.


def run_items(items, work, out_path, accelerator, desc, batch_size=1, files_root=None):
    """Resumable sharded work: this process takes items[rank::world] (dicts with a unique "id") in
    chunks of `batch_size`, skips chunks whose items are all done, and calls `work(chunk) ->
    [result]` on the others. Each result lands in `out_path(id)` as JSON, atomically: the files
    are the gather. An item is done when its result is there and, with `files_root`, the files its
    result lists under "files" ({path relative to files_root: bytes}) are whole: a deleted video or
    latents file is made again. The chunks are the same however often the run was killed, so a
    resumed run batches (and so computes, to the last bit) exactly what an uninterrupted one does.
    Returns every item's result, on every process, once all processes are done."""

    def finished(item):
        try:
            result = json.loads(Path(out_path(item["id"])).read_text())
        except (OSError, ValueError):
            return False
        return files_root is None or intact(files_root, result.get("files", {}))

    mine = items[accelerator.process_index::accelerator.num_processes]
    chunks = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
    todo = [c for c in chunks if not all(finished(it) for it in c)]
    done = len(mine) - sum(map(len, todo))
    shard = "" if accelerator.num_processes == 1 else f" of this process's {len(mine)}"
    accelerator.print(f"{desc}: {len(items)} items on {accelerator.num_processes} process(es), {done}{shard} already done")
    bar = tqdm(total=len(mine), initial=len(mine) - sum(map(len, todo)), desc=desc,
               disable=not accelerator.is_main_process)
    try:
        for chunk in todo:
            for it, result in zip(chunk, work(chunk), strict=True):
                atomic_write_json(out_path(it["id"]), result)
            bar.update(len(chunk))
    finally:  # before any error's message, so that it is the last line
        bar.close()
    accelerator.wait_for_everyone()
    return [json.loads(Path(out_path(it["id"])).read_text()) for it in items]


# -----------------------------------------------------------------------------
# What a script spent (summed over a run by ledger.py).


class Ledger:
    """What one invocation of a script spends, written to cost.json beside its outputs (ledger.py)."""

    def __init__(self, script):
        self.script, self.counts, self.role = script, collections.Counter(), "student"
        self.wall, self.cpu = time.time(), time.process_time()

    def watch(self, *modules, role=None):
        """Count the modules' forward calls, one per video in the batch, as `role`'s (default: the current one's)."""
        for module in modules:
            module.register_forward_pre_hook(lambda m, args, kwargs: self.counts.update(
                {f"denoiser_calls/{role or self.role}": _batch(args, kwargs)}), with_kwargs=True)

    @contextlib.contextmanager
    def as_role(self, role):
        """Calls inside are the teacher's (M0's videos) or a student's (any other model, candidates too)."""
        old, self.role = self.role, role
        try:
            yield
        finally:
            self.role = old

    def generated(self, role, n):
        self.counts[f"videos/{role}"] += n

    def scored(self, n):
        self.counts["videos_scored"] += n

    def write(self, accelerator, out_dir):
        """Append this invocation's spending, summed over processes, to `out_dir/cost.json`."""
        mine = {**self.counts, "wall_s": time.time() - self.wall, "cpu_s": time.process_time() - self.cpu,
                "peak_bytes": torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
        every = gather_object([mine]) if accelerator.num_processes > 1 else [mine]
        if not accelerator.is_main_process:
            return
        total = {"script": self.script, "processes": len(every), "date": time.strftime("%Y-%m-%d %H:%M:%S")}
        for key in sorted({k for e in every for k in e}):
            values = [e.get(key) for e in every if e.get(key) is not None]
            if values:
                total[key] = max(values) if key in ("wall_s", "peak_bytes", "peak_rss_bytes") else sum(values)
        path = os.path.join(out_dir, "cost.json")
        entries = json.load(open(path)) if os.path.exists(path) else []
        atomic_write_json(path, entries + [total])


def _batch(args, kwargs):
    x = args[0] if args else kwargs.get("hidden_states", kwargs.get("sample"))
    return int(x.shape[0]) if isinstance(x, torch.Tensor) else 1
