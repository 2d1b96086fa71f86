"""What every artifact was made from, and the output folder that keeps it: a step is done only when
its config and the contents of its inputs are what they were when it ran, and its outputs are whole.

A step's `made_from` is its config without the keys that change how a run goes rather than what it
makes, those its settings do not use marked UNUSED (stage.parse_config's "used" rule), each input
(a key whose rule says `"input": True`: a model, a student, a prompt file, a pair manifest) named
by its contents instead of its path: a local file or folder by the sha256 of its bytes (`digest`),
a hub model by the commit its revision resolves to (`hub_identity`). The output folder records it
in provenance.json when the step starts, and the outputs with their sizes when it finishes. A rerun
is done when both still hold; it resumes where they were made from the same and only outputs are
missing; results made from anything else move aside to replaced/<time>/.

A big file's digest is computed once and kept in its folder's .digests.json, guarded by its size,
mtime and inode: a producer's first consumer hashes a student once, the steps after it read the
digest, and a file rewritten in place (a retrained student, a teacher trained again at its path)
is hashed again.
"""

import argparse
import contextlib
import fcntl
import glob
import hashlib
import json
import os
import re
import shutil
import socket
import sys
import time
from pathlib import Path

from accelerate.utils import broadcast_object_list
from huggingface_hub import constants
from huggingface_hub.file_download import repo_folder_name

import common
import stage

RECORD = "provenance.json"
SIDECAR = ".digests.json"
SMALL = 1 << 20  # smaller files are hashed each time: no sidecar beside prompt files and JSON

# Keys that change how a run goes, not what it makes: a rerun differing only in them resumes. Where
# a model comes from (cache_dir, revision, build_tiny) is covered by the identity of its contents.
RUN_ONLY_KEYS = {"output_dir", "resume_from_checkpoint", "report_to", "logging_steps", "checkpointing_steps",
                 "validation_steps", "validation_prompts", "num_validation_videos", "checkpoints_total_limit",
                 "dataloader_num_workers", "generation_batch_size", "reward_batch_size", "teacher_cache",
                 "cache_dir", "revision", "build_tiny", "num_stages", "push_to_hub", "hub_model_id", "hub_token"}

# -----------------------------------------------------------------------------
# Identities of contents: digests of local files and folders, commits of hub models.


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def files_below(folder):
    """Every file below `folder` but hidden ones (digests, temporaries, locks), relative, sorted."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.relpath(os.path.join(root, f), folder) for f in files if not f.startswith(".")]
    return sorted(found)


def _file_digests(folder, names):
    """The sha256 of each of `names` in `folder`, read from its .digests.json where the file is
    unchanged since (size, mtime, inode), computed and kept there otherwise."""
    sidecar = os.path.join(folder, SIDECAR)
    try:
        known = json.loads(Path(sidecar).read_text())
    except (OSError, ValueError):
        known = {}
    known = known if isinstance(known, dict) else {}
    shas, changed = [], False
    for name in names:
        st = os.stat(os.path.join(folder, name))
        guard = [st.st_size, st.st_mtime_ns, st.st_ino]
        entry = known.get(name)
        if isinstance(entry, dict) and entry.get("guard") == guard and isinstance(entry.get("sha256"), str):
            shas.append(entry["sha256"])
            continue
        shas.append(sha256_file(os.path.join(folder, name)))
        if st.st_size >= SMALL:
            known[name], changed = {"guard": guard, "sha256": shas[-1]}, True
    if changed:
        with contextlib.suppress(OSError):  # a read-only folder: hashed again next time
            common.remove_stale_temporaries(folder)
            common.atomic_write_json(sidecar, known)
    return shas


def digest(path):
    """'sha256:<hex>' of a file's bytes, or of a folder's files (relative names and digests); the
    same folder reached through a symlink has the same digest."""
    path = os.path.realpath(path)
    if os.path.isfile(path):
        return "sha256:" + _file_digests(os.path.dirname(path), [os.path.basename(path)])[0]
    names = files_below(path)
    listing = "".join(f"{n}\t{s}\n" for n, s in zip(names, _file_digests(path, names)))
    return "sha256:" + hashlib.sha256(listing.encode()).hexdigest()


def hub_identity(name, revision=None, cache_dir=None):
    """'<repo>@<commit>': the commit `revision` (default main) names in the Hugging Face cache, which
    the model checks (stage.check_models) bring up to date wherever the hub can be reached."""
    if revision and re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"{name}@{revision}"
    ref = os.path.join(cache_dir or constants.HF_HUB_CACHE, repo_folder_name(repo_id=name, repo_type="model"),
                       "refs", revision or "main")
    try:
        return f"{name}@{Path(ref).read_text().strip()}"
    except (OSError, UnicodeDecodeError):
        return f"{name}@{revision or 'main'}"  # not in the cache: a model this step does not load


def identity(value, revision=None, cache_dir=None):
    """What an input is, by its contents: a local file or folder's digest, a hub model's commit; a
    value that names neither (unset, a path checked elsewhere) stands for itself."""
    if isinstance(value, list):
        return [identity(v, revision, cache_dir) for v in value]
    if not isinstance(value, str) or not value:
        return value
    if os.path.exists(value):
        return digest(value)
    if stage.is_local_path(value):
        return value
    return "hub:" + hub_identity(value, revision, cache_dir)


UNUSED = "<unused>"  # a key the step's settings do not use (stage.parse_config's "used" rule)


class Made(dict):
    """What a step is made from ({section: {key: value}}), with the "used" rules of its options
    (`used`), by which a saved record is read: see `differing`."""

    def __init__(self, sections, used=None):
        super().__init__(sections)
        self.used = used or {}


def settings(made, drop=()):
    """The values of `made` (or of a saved record) as the Namespace the "used" rules read."""
    return argparse.Namespace(**{k: v for body in made.values() if isinstance(body, dict) for k, v in body.items()
                                 if k not in drop})


def made_from(args):
    """What a step of `args` makes its results from: the config that changes them, inputs by contents;
    a key its settings do not use is UNUSED, whatever its value (an unused model's identity, which
    changes when the model is downloaded or built for another step, changes nothing here)."""
    made, used = {}, getattr(args, "_used", {})
    for section, body in stage.config_dict(args).items():
        made[section] = {}
        for key, value in body.items():
            if key in RUN_ONLY_KEYS:
                continue
            if key in used and not used[key](args):
                value = UNUSED
            elif key in getattr(args, "_inputs", ()):
                # a revision names a commit of the base model only (models.hub_kwargs)
                revision = getattr(args, "revision", None) if key == "pretrained_model_name_or_path" else None
                value = identity(value, revision, getattr(args, "cache_dir", None))
            made[section][key] = value
    return Made(json.loads(json.dumps(made, default=str)), used)  # as provenance.json reads back


def differing(saved, current, ignore=()):
    """The keys (section.key) whose values differ. A key `saved` lacks differs, unless `current`
    does not use it; a key only `saved` has (a version's that this one dropped) cannot change what
    this version makes. A key `current` does not use is unchanged where the saved run did not use it
    either: a record older than the key's rule holds a value, and the rule on its settings tells."""
    rules = getattr(current, "used", {})
    old = settings(saved)

    def same(key, was, now):
        if now == UNUSED:
            return was in ("<unset>", UNUSED) or (key in rules and not rules[key](old))
        return was == now

    return [f"{s}.{k}" for s, body in current.items() for k, v in body.items()
            if k not in ignore and not same(k, (saved.get(s) or {}).get(k, "<unset>"), v)]


# -----------------------------------------------------------------------------
# The output folder: done, resumed or replaced by what its results were made from.


def read(output_dir):
    """The folder's record ({"made_from", "outputs"}), or None where there is none that reads."""
    try:
        record = json.loads(Path(output_dir, RECORD).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or not isinstance(record.get("made_from"), dict) \
            or not all(isinstance(v, dict) for v in record["made_from"].values()) \
            or not isinstance(record.get("outputs"), (dict, type(None))):
        return None
    return record


def done(output_dir, made):
    """Whether the step finished in `output_dir` from what `made` describes, its outputs still whole."""
    record = read(output_dir)
    return record is not None and record["outputs"] is not None and not differing(record["made_from"], made) \
        and common.intact(output_dir, record["outputs"])


def finish(output_dir, made, outputs):
    """Mark the step done: `outputs` (files and folders relative to `output_dir`) with their sizes.
    Written last: a step killed before it is resumed, one killed after it is done."""
    command = (read(output_dir) or {}).get("command")
    files = {}
    for rel in outputs:
        path = os.path.join(output_dir, rel)
        names = [rel] if os.path.isfile(path) else [os.path.join(rel, n) for n in files_below(path)]
        files.update({n: os.path.getsize(os.path.join(output_dir, n)) for n in names})
    common.atomic_write_json(os.path.join(output_dir, RECORD), {"made_from": made, "outputs": files, "command": command})


_LOCKS = {}  # output folder -> open lock file: the lock lives as long as the process


def lock_folder(folder):
    """One run per output folder: an exclusive lock on `folder/.lock`, released when the process
    ends, however it ends. A second run gets a ConfigError naming the holder."""
    folder = os.path.abspath(folder)
    if folder in _LOCKS:
        return
    f = open(os.path.join(folder, ".lock"), "a+")
    for attempt in range(50):  # a few seconds, in which a just-killed holder finishes exiting
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            time.sleep(0.1)
    else:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise common.ConfigError(f"{folder}: in use by {holder}; wait for it to finish or stop it, "
                                 f"or use another --output_dir") from None
    f.seek(0), f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()} ({' '.join(sys.argv)[:200]})\n")
    f.flush()
    _LOCKS[folder] = f


def _remove_temporaries(folder):
    """What killed runs left: temporaries (common.tmp_name's) and folders named *.tmp. Under the
    folder's lock no other process writes here, so every one of them is stale."""
    for root, dirs, files in os.walk(folder):
        if root == folder and "replaced" in dirs:
            dirs.remove("replaced")
        for d in [d for d in dirs if d.endswith(".tmp") or common.TEMPORARY.match(d)]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
            dirs.remove(d)
        for name in files:
            if common.TEMPORARY.match(name):
                os.remove(os.path.join(root, name))


def _move_aside(output_dir, paths):
    aside = os.path.join(output_dir, "replaced", time.strftime("%Y%m%d-%H%M%S"))
    while os.path.exists(aside):
        aside += "+"
    for path in paths:
        dest = os.path.join(aside, os.path.relpath(path, output_dir))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        shutil.move(path, dest)
    return aside


def start(accelerator, output_dir, made, args, results, work=(), work_ignores=()):
    """Take `output_dir` for this run, once its inputs are checked: lock it, remove what killed runs
    left half-written, and record what its results are made from (provenance.json; config.yaml,
    the resolved config, beside it).

    Results (glob patterns of what the step writes) made from anything else are moved aside to
    replaced/<time>/, never deleted, and said so; where the two differ only in `work_ignores`, the
    per-item `work` (patterns among `results`) is kept, as it is keyed by what each item was made
    from. Every process calls this; the main one acts, and its error is everyone's. Returns the
    replaced/<time> folder results were moved to, or None."""
    error = aside = None
    if accelerator.is_main_process:
        try:
            os.makedirs(output_dir, exist_ok=True)
            lock_folder(output_dir)
            _remove_temporaries(output_dir)
            record = read(output_dir)
            changed = differing(record["made_from"], made) if record else ["no record"]
            keep_work = record is not None and not differing(record["made_from"], made, work_ignores)
            if changed and not keep_work:
                found = [p for pattern in results for p in glob.glob(os.path.join(glob.escape(output_dir), pattern))]
                if found:  # with the record of what they were made from
                    found += [p for n in (RECORD, "config.yaml") if os.path.exists(p := os.path.join(output_dir, n))]
                    aside = _move_aside(output_dir, found)
                    why = ", ".join(changed[:4]) + (" ..." if len(changed) > 4 else "") if record else \
                        "no record of what they were made from"
                    print(f"{output_dir}: made from another config or other inputs ({why}); its results are kept "
                          f"in {aside}", file=sys.stderr)
            common.atomic_write_json(os.path.join(output_dir, RECORD), {"made_from": made, "outputs": None,
                                                                        "command": getattr(args, "_command", None)})
            stage.save_config(args, os.path.join(output_dir, "config.yaml"))
        except common.ConfigError as e:
            error = str(e)
    if accelerator.num_processes > 1:
        error, aside = broadcast_object_list([error, aside])
    if error:
        raise common.ConfigError(error)
    return aside
