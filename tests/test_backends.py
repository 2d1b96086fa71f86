"""Backends: a model family is one module with one interface, found by name in one place.
Run: python -m pytest -q tests/test_backends.py"""
import ast
import json
import os
import pkgutil
import subprocess
import sys

import pytest
import yaml

import common
import curate
import evaluate
import export
import prune
import stage
import train_redpo
from conftest import ROOT, run_script

BACKENDS = sorted(m.name for m in pkgutil.iter_modules([str(ROOT / "backends")]))


def test_every_backend_has_the_whole_interface():
    assert BACKENDS == ["animatediff", "videocrafter2", "wan", "wan_sublayers", "world", "world_wan",
                        "world_wan_sublayers"]
    for name in BACKENDS:
        backend = stage.load_backend(name)
        assert all(hasattr(backend, n) for n in stage.BACKEND_NAMES), name
        assert set(backend.TABLE) == {"blocks", "blocks_are", "denoiser"} and backend.TRAINABLE


def test_an_unknown_backend_is_one_line_that_lists_them(tmp_path):
    result = run_script(sys.executable, "prune.py", "--backend", "nosuch", "--output_dir", str(tmp_path / "out"),
                        check=False)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == (
        "error: model.backend: no backend 'nosuch'; backends: animatediff, videocrafter2, wan, wan_sublayers, world, "
        "world_wan, world_wan_sublayers (or a module on the path)")
    with pytest.raises(common.ConfigError, match="model.backend: json is not a backend: it lacks OPTIONS"):
        stage.load_backend("json")


def test_no_script_or_shared_module_tests_a_backend_by_name_or_class():
    """Outside backends/, no comparison with a backend's name or a class name: the backend decides."""
    names = set(BACKENDS)
    for path in [p for p in ROOT.glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare):
                for side in [node.left, *node.comparators]:
                    if isinstance(side, ast.Constant) and side.value in names - {"world"}:
                        raise AssertionError(f"{path.name}:{node.lineno}: compares with backend name {side.value!r}")
                    if isinstance(side, ast.Attribute) and side.attr in ("backend", "__name__"):
                        raise AssertionError(f"{path.name}:{node.lineno}: compares {ast.unparse(side)}")


def test_a_new_backend_is_one_module_and_one_config(fast_config, tmp_path):
    """A throwaway family (AnimateDiff under another name and table title) in a folder of its own on
    the path, and a config naming it: a stage of the loop runs on it, and no file of the project changes."""
    before = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True).stdout
    plugins = tmp_path / "plugins" / "backends"  # backends/ is a namespace package: every such folder on the path adds to it
    plugins.mkdir(parents=True)
    (plugins / "throwaway.py").write_text(
        '"""AnimateDiff under another name: a backend made for a test."""\n'
        "from backends.animatediff import *  # noqa: F401,F403\n"
        "from backends.animatediff import TABLE as _TABLE\n\n"
        'TABLE = {**_TABLE, "blocks": "Throwaway params"}\n')
    config = yaml.safe_load(open(fast_config))
    config["model"]["backend"] = "throwaway"
    path = tmp_path / "throwaway.yaml"
    path.write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    env = {"CONFIG": str(path), "RUN_DIR": str(run), "PYTHONPATH": str(tmp_path / "plugins")}
    run_script("bash", "vip_loop.sh", "tiny", "1", env=env)
    assert json.loads((run / "stage_1" / "train" / "student" / "student.json").read_text())["backend"] == "throwaway"
    assert "| Throwaway params |" in (run / "eval" / "eval.md").read_text()
    result = run_script(sys.executable, "prune.py", "--backend", "nosuch", "--output_dir", str(tmp_path / "x"),
                        env={"PYTHONPATH": str(tmp_path / "plugins")}, check=False)
    assert "backends: animatediff, throwaway, videocrafter2, wan," in result.stderr  # found where it lives
    assert subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True,
                          text=True).stdout == before
    assert not os.path.exists(ROOT / "backends" / "throwaway.py")


@pytest.mark.parametrize("config", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_shipped_config_parses_in_every_script(config):
    """Unknown keys are errors: a config the scripts would reject fails here, before anyone's GPU run."""
    for script in (prune, curate, train_redpo, evaluate, export):
        args = script.parse_args(["--config", str(ROOT / "configs" / config), "--output_dir", "unused"])
        stage.load_backend(args.backend)
