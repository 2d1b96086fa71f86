"""The teacher M0's videos, made once per run: M0 never changes, so its video, latents and reward
scores for a (prompt, seed) are kept and reused by every stage's block scan and curation (the
winners) and by every evaluation (the teacher's rows).

They live in `<teacher_cache>/<key>/`, one safetensors file a (prompt, seed), written atomically;
processes share them through the files. `key` is a digest of the model and reward sections of what
a step is made from (provenance.made_from): every setting that changes a video or its scores, and
the contents of the teacher's and the reward's weights (a teacher trained again at its path, or a
hub revision that moved, is another key), so another teacher makes (and keeps) another set beside
the old one. vip_loop.sh passes `--teacher_cache <run>/teacher`; without the flag nothing is kept.
"""

import contextlib
import hashlib
import json
import os
import sys

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import common
import provenance


def settings_key(made):
    """A digest of what makes M0's videos and their scores: the model and reward sections of `made`,
    but for keys the curating reward does not use (a model only evaluate.py's `rewards` reads)."""
    rules, curating = getattr(made, "used", {}), provenance.settings(made, drop=("rewards",))
    sections = [s for s in ("model", "reward") if s in made]
    unused = {k for s in sections for k in made[s] if k in rules and not rules[k](curating)}
    settings = {s: {k: v for k, v in made[s].items() if v != provenance.UNUSED and k not in unused} for s in sections}
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16], settings


class TeacherCache:
    def __init__(self, args, made):
        """`made`: provenance.made_from(args), what the videos of `args` are made from."""
        self.folder = None
        if args.teacher_cache:
            key, settings = settings_key(made)
            self.folder = os.path.join(args.teacher_cache, key)
            os.makedirs(self.folder, exist_ok=True)
            common.remove_stale_temporaries(self.folder)  # what killed writers left; live ones' are theirs
            common.atomic_write_json(os.path.join(self.folder, "settings.json"), settings)

    def path(self, prompt, seed):
        return os.path.join(self.folder, f"{hashlib.sha1(prompt.encode()).hexdigest()[:16]}_{seed}.safetensors")

    def load(self, prompt, seed):
        """(frames, latents, scores), or None where this (prompt, seed) was never made."""
        path = self.folder and self.path(prompt, seed)
        if not path or not os.path.exists(path):
            return None
        try:
            with safe_open(path, "pt") as f:
                meta = f.metadata()
                if meta.get("prompt") != prompt:  # a digest collision: make it again
                    return None
                return f.get_tensor("frames").numpy(), f.get_tensor("latents"), json.loads(meta["scores"])
        except Exception as e:  # cut short or damaged outside vip: written whole or not at all here
            reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:120]
            print(f"teacher cache: {path} cannot be read ({reason}); making it again", file=sys.stderr)
            with contextlib.suppress(OSError):
                os.remove(path)
            return None

    def save(self, prompt, seed, frames, latents, scores):
        if self.folder:
            with common.atomic_path(self.path(prompt, seed)) as tmp:
                save_file({"frames": torch.from_numpy(frames).contiguous(), "latents": latents.contiguous()}, str(tmp),
                          metadata={"prompt": prompt, "seed": str(seed), "scores": json.dumps(scores)})


def videos(cache, backend, pipe, reward, prompts, seeds, args, ledger):
    """M0's frames, latents and reward scores for each (prompt, seed): kept ones loaded, the others
    generated (in one call), scored and kept."""
    found = [cache.load(p, s) for p, s in zip(prompts, seeds)]
    missing = [i for i, f in enumerate(found) if f is None]
    if missing:
        todo_prompts, todo_seeds = [prompts[i] for i in missing], [seeds[i] for i in missing]
        with ledger.as_role("teacher"):
            frames, latents = backend.generate(pipe, todo_prompts, todo_seeds, args, return_latents=True)
        scores = reward.score(list(frames), todo_prompts)
        ledger.generated("teacher", len(missing)), ledger.scored(len(missing))
        for k, i in enumerate(missing):
            found[i] = (frames[k], latents[k], scores[k])
            cache.save(prompts[i], seeds[i], frames[k], latents[k], scores[k])
    return [f[0] for f in found], [f[1] for f in found], [f[2] for f in found]


def frames_and_scores(cache, backend, pipe, reward, prompts, seeds, args, ledger):
    """Frames and reward scores of each (prompt, seed): M0's through `cache` (made once a run), or,
    where `cache` is None, a student's, generated and scored here."""
    if cache is not None:
        frames, _, scores = videos(cache, backend, pipe, reward, prompts, seeds, args, ledger)
        return frames, scores
    frames = backend.generate(pipe, prompts, seeds, args)
    scores = reward.score(list(frames), prompts)
    ledger.generated("student", len(prompts)), ledger.scored(len(prompts))
    return frames, scores
