import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER" in os.environ:  # -n 2: the workers share the cores; a thread each, scripts included
    os.environ.setdefault("OMP_NUM_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


def model_args(*argv):
    """The model and reward sections of a config, as the scripts parse them."""
    import rewards
    import stage

    return stage.parse_config(list(argv), "test", {"model": stage.MODEL_OPTIONS, "reward": rewards.OPTIONS})


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny AnimateDiff folders (SD layout + motion adapter), built once per test session."""
    from backends import animatediff

    root = tmp_path_factory.mktemp("tiny models")  # a space, as users' paths have
    animatediff.build_tiny(model_args("--pretrained_model_name_or_path", str(root / "sd"), "--motion_adapter",
                                      str(root / "motion_adapter")))
    return root


@pytest.fixture()
def tiny_args(tiny_dir):
    args = model_args("--pretrained_model_name_or_path", str(tiny_dir / "sd"), "--motion_adapter",
                      str(tiny_dir / "motion_adapter"))
    args.num_frames, args.height, args.width, args.num_inference_steps = 8, 64, 64, 4
    return args


@pytest.fixture(scope="session")
def tiny_reward(tiny_dir):
    import videoscore

    return videoscore.build_tiny(str(tiny_dir / "videoscore"))


@pytest.fixture(scope="session")
def tiny_videoreward(tiny_dir):
    import videoreward_tiny

    return videoreward_tiny.build_tiny(str(tiny_dir / "videoreward"))


FAST = {  # the tiny config, cut down so a whole stage takes seconds
    "model": {"build_tiny": False, "num_frames": 4, "height": 64, "width": 64, "num_inference_steps": 3,
              "guidance_scale": 7.5, "generation_batch_size": 4},
    "reward": {"reward_num_frames": 4, "reward_batch_size": 8},
    "prune": {"num_prune_prompts": 2, "num_blocks": 1},
    "curate": {"max_prompts": 4, "tau_p": -1000.0},
    "train": {"max_train_steps": 4, "checkpointing_steps": 2, "train_batch_size": 2, "logging_steps": 1,
              "learning_rate": 1.0e-4, "lr_warmup_steps": 0},
    "eval": {"num_eval_prompts": 2, "latency_runs": 1},
}


@pytest.fixture(scope="session")
def fast_config(tiny_dir, tiny_reward, tiny_videoreward, tmp_path_factory):
    """configs/tiny.yaml pointed at the session's tiny models, with FAST's overrides: a path."""
    return loop_config("tiny", tmp_path_factory.mktemp("config") / "fast config.yaml", fast_except=(),
                       model={"pretrained_model_name_or_path": str(tiny_dir / "sd"),
                              "motion_adapter": str(tiny_dir / "motion_adapter")},
                       reward={"reward_model": tiny_reward, "videoreward_model": tiny_videoreward})


def loop_config(name, path, fast_except=None, **sections):
    """configs/<name>.yaml with FAST's overrides but the keys in `fast_except` (none if it is None),
    then `sections`' (section -> values), its prompt files as absolute paths, written to `path`."""
    import yaml

    config = yaml.safe_load((ROOT / "configs" / f"{name}.yaml").read_text())
    for section, values in FAST.items() if fast_except is not None else ():
        config[section].update({k: v for k, v in values.items() if k not in fast_except})
    for section, values in sections.items():
        config[section].update(values)
    for section, key in (("prune", "prune_prompts"), ("curate", "curation_prompts"), ("eval", "eval_prompts")):
        config[section][key] = str(ROOT / config[section][key])
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


@pytest.fixture(scope="session")
def tiny_stage(fast_config, tmp_path_factory):
    """A pruned student and its curated pairs (prune.py and curate.py run in-process), made once."""
    from accelerate.state import AcceleratorState, PartialState

    import curate
    import prune

    root = tmp_path_factory.mktemp("tiny stage")
    for script, extra in ((prune, []), (curate, ["--student", str(root / "prune" / "student"),
                                                 "--ranking", str(root / "prune" / "ranking.json")])):
        AcceleratorState._reset_state(True)
        PartialState._reset_state()
        script.main(script.parse_args(["--config", fast_config, "--output_dir", str(root / script.__name__), *extra]))
    return root


@pytest.fixture(autouse=True)
def fresh_accelerator():
    """Accelerator state is a process-wide singleton: scripts called in-process each get a new one."""
    from accelerate.state import AcceleratorState, PartialState

    AcceleratorState._reset_state(True)
    PartialState._reset_state()
    yield
    AcceleratorState._reset_state(True)
    PartialState._reset_state()


def run_script(*args, env=None, check=True, timeout=600):
    """Run a script of the repo as a user does; returns the CompletedProcess."""
    import subprocess

    full_env = {**os.environ, **(env or {})}
    out = subprocess.run(list(args), cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=timeout)
    if check and out.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {out.returncode}:\n{out.stderr[-3000:]}")
    return out


PLAIN_DIFFUSERS = """
import importlib.util, json, sys, torch
assert not any(importlib.util.find_spec(m) for m in ("common", "stage", "provenance", "export", "backends")), "vip found"
from diffusers import DiffusionPipeline
folder, call, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
pipe = DiffusionPipeline.from_pretrained(folder)
pipe.set_progress_bar_config(disable=True)
generators = [torch.Generator("cpu").manual_seed(s) for s in call.pop("seeds")]
latents = pipe(**call, generator=generators, output_type="latent").frames
denoiser = getattr(pipe, "transformer", None) or pipe.unet
torch.save({"latents": latents, "keys": sorted(denoiser.state_dict()), "pipeline": type(pipe).__name__,
            "params": sum(p.numel() for p in denoiser.parameters())}, out)
"""


def plain_diffusers(folder, call, tmp_path):
    """An exported folder as its users load it: DiffusionPipeline.from_pretrained in a process where
    no vip module can be imported, then a call for `call`'s prompts and seeds. Returns its latents,
    the denoiser's tensor names and parameter count, and the pipeline's class."""
    import json
    import subprocess

    import torch

    out, cwd = tmp_path / "plain.pt", tmp_path / "elsewhere"
    cwd.mkdir(exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-c", PLAIN_DIFFUSERS, str(folder), json.dumps(call), str(out)], cwd=cwd,
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out, weights_only=True)
