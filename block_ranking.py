"""Block rankings that generate no video (prune.py's `scan` other than `videos`). Each candidate is
scored from single denoiser calls on M0's own latents (the teacher cache holds them), noised to
timesteps the sampler visits (as the pipeline's scheduler spaces them), with the same noise for
every candidate. The noise is drawn from each video's own seed, as its starting noise was, so that
x_t lies near the path the sampler took to that video:

- `output_change`: how much the denoiser's output moves when the block alone is removed,
  ||f_without(x_t) - f(x_t)||^2 / ||f(x_t)||^2, averaged over latents and timesteps. One call with
  every block a noised latent, and one a candidate.
- `block_influence`: how much the block changes what flows through it, from forward hooks on the
  calls with every block: ||output - the stand-in's output|| / ||input||. One call a noised latent,
  whatever the number of candidates. For a block whose stand-in is the identity (a motion module,
  a Wan block) this is the size of its update to the residual stream; ShortGPT's block influence
  measures the angle between the same two. For a residual branch (Wan's sub-layers, whose stand-in
  outputs zeros) it is the branch's output over its own input, the normalised and modulated hidden
  states, before the block's gate scales it into the stream: the three kinds of branch are then
  not on one scale, which docs/cost.md's DiT rows show.

The larger the value, the more the block matters; prune.py removes the smallest.
"""

import contextlib

import torch

import models

MEASURES = ("output_change", "block_influence")


def scan_timesteps(scheduler, num_inference_steps, k):
    """`k` of the timesteps the sampler visits at `num_inference_steps`, evenly spread over them (the
    middle one for k = 1), in the scheduler's own units (DDPM's integers, flow matching's 1000 sigma)."""
    scheduler = type(scheduler).from_config(scheduler.config)  # the pipeline's own is left as it was
    scheduler.set_timesteps(num_inference_steps)
    visited = scheduler.timesteps
    k = min(k, len(visited))
    return visited[[int((i + 0.5) * len(visited) / k) for i in range(k)]]


def per_sample_norm(x, batch_size):
    """||x|| of each of `batch_size` samples; a module that folds frames into its batch (B*F, ...)
    is measured over all of a sample's frames together."""
    return x.float().reshape(batch_size, -1).norm(dim=1)


def relative_change(new, old):
    """||new - old||^2 / ||old||^2 per sample: the output change of removing a block."""
    b = old.shape[0]
    return per_sample_norm(new - old, b) ** 2 / per_sample_norm(old, b).clamp_min(1e-12) ** 2


def update_size(output, stand_in, inputs, batch_size):
    """||output - stand_in|| / ||inputs|| per sample: what a block adds to what flows through it."""
    return per_sample_norm(output - stand_in, batch_size) / per_sample_norm(inputs, batch_size).clamp_min(1e-12)


def _hidden(output):
    """A module's hidden states, whatever it returns (a tensor, a tuple, an output with .sample)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    return getattr(output, "sample", output)


@contextlib.contextmanager
def influence_hooks(backend, model, names, batch_size, sink):
    """Append each named block's update_size, per sample, to sink[name] on every forward call."""
    stand_in = getattr(backend, "STAND_IN", models.RemovedBlock)()

    def hook(name):
        def record(module, args, kwargs, output):
            inputs = args[0] if args else kwargs["hidden_states"]
            removed = _hidden(stand_in(*args, **kwargs))
            sink[name].append(update_size(_hidden(output), removed, inputs, batch_size))
        return record

    handles = [model.get_submodule(n).register_forward_hook(hook(n), with_kwargs=True) for n in names]
    try:
        yield sink
    finally:
        for h in handles:
            h.remove()


def noised(objective, latents, timestep, seeds):
    """The latents (B, ...) noised to one timestep, and the timestep for each. Latent i's noise is drawn
    from `seeds[i]`, the seed its video was generated from: the same noise at every timestep and for
    every candidate."""
    noise = torch.stack([torch.randn(l.shape, generator=torch.Generator().manual_seed(s), dtype=torch.float32)
                         for l, s in zip(latents, seeds)]).to(latents.device, latents.dtype)
    t = timestep.to(latents.device).repeat(len(latents))
    return objective.add_noise(latents, noise, t), t


@torch.no_grad()
def measure(kind, backend, model, names, objective, timesteps, latents, text, seeds):
    """{block: [value of each latent]}: `kind` (one of MEASURES) for each named block, averaged over
    the timesteps, for M0's `latents` (B, ...) of prompts whose embeddings are `text` (B, ...). One
    timestep a call: a call's batch is never larger than the generation's."""
    values = {n: torch.zeros(len(latents)) for n in names}
    for timestep in timesteps:
        x, t = noised(objective, latents, timestep, seeds)
        sink = {n: [] for n in names}
        hooks = influence_hooks(backend, model, names, len(latents), sink) if kind == "block_influence" else \
            contextlib.nullcontext()
        with hooks:
            full = backend.predict(model, x, t, text)
        for name in names:
            if kind == "block_influence":
                v = torch.stack(sink[name]).mean(0)  # a block called more than once a forward: its mean
            else:
                with models.blocks_removed(backend, model, [name]):
                    v = relative_change(backend.predict(model, x, t, text), full)
            values[name] += v.cpu() / len(timesteps)
    return {n: v.tolist() for n, v in values.items()}
