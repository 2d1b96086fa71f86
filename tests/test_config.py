"""Config: YAML sections + CLI overrides, unknown keys rejected. Run: python -m pytest -q tests/test_config.py"""
import subprocess
import sys

import pytest
import yaml

import common
import stage
from common import ConfigError
from stage import parse_config
from conftest import ROOT

SECTIONS = {"model": stage.MODEL_OPTIONS, "train": {"learning_rate": (1e-5, "lr"), "max_train_steps": (100, "steps"),
                                                    "gradient_checkpointing": (False, "gc"), "output_dir": (None, "out")}}


def write(tmp_path, text):
    path = tmp_path / "cfg.yaml"
    path.write_text(text)
    return str(path)


def test_precedence_cli_over_yaml_over_default(tmp_path):
    path = write(tmp_path, "model:\n  num_frames: 8\ntrain:\n  learning_rate: 1e-4\n  max_train_steps: 7\n"
                           "prune:\n  anything: 1\n")  # another stage's section is not this script's business
    args = parse_config(["--config", path, "--max_train_steps", "9", "--gradient_checkpointing", "true"], "t", SECTIONS)
    assert args.num_frames == 8 and args.height == 512  # YAML, default
    assert args.learning_rate == pytest.approx(1e-4) and isinstance(args.learning_rate, float)
    assert args.max_train_steps == 9 and args.gradient_checkpointing is True
    assert stage.config_dict(args)["train"] == {"learning_rate": 1e-4, "max_train_steps": 9,
                                                 "gradient_checkpointing": True, "output_dir": None}


def test_resolved_config_round_trips(tmp_path):
    args = parse_config(["--config", write(tmp_path, "model:\n  width: 96\n"), "--output_dir", "a b/c"], "t", SECTIONS)
    stage.save_config(args, tmp_path / "out" / "config.yaml")
    again = parse_config(["--config", str(tmp_path / "out" / "config.yaml")], "t", SECTIONS)
    assert stage.config_dict(again) == stage.config_dict(args)
    assert again.output_dir == "a b/c" and again.width == 96


@pytest.mark.parametrize("text, message", [
    ("train:\n  learnig_rate: 1\n", "unknown key 'train.learnig_rate'; valid keys: learning_rate, max_train_steps"),
    ("trian:\n  x: 1\n", "unknown section 'trian'; valid sections: model, reward, prune, curate, train, eval, export"),
    ("train:\n  max_train_steps: 1.5\n", "train.max_train_steps: expected int, got 1.5"),
    ("model:\n  build_tiny: maybe\n", "model.build_tiny: expected true or false"),
    ("- a\n- b\n", "expected a mapping of sections"),
    ("model: [1, 2\n", "not valid YAML"),
])
def test_bad_config_names_file_and_field(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as e:
        parse_config(["--config", path], "t", SECTIONS)
    assert str(e.value).startswith(path) and message in str(e.value)


def test_bad_cli_value_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="--max_train_steps: expected int"):
        parse_config(["--max_train_steps", "ten"], "t", SECTIONS)
    with pytest.raises(ConfigError, match="nope.yaml: cannot read config"):
        parse_config(["--config", str(tmp_path / "nope.yaml")], "t", SECTIONS)


def test_run_main_prints_one_line_and_exits_2(tmp_path):
    code = ("import common\n"
            "def main(a): raise common.ConfigError('x.yaml: unknown key train.foo')\n"
            "common.run_main(main, lambda: None)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=common.__file__.rsplit("/", 1)[0],
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr == "error: x.yaml: unknown key train.foo\n"


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.json"
    with pytest.raises(RuntimeError):
        with common.atomic_path(target) as tmp:
            open(tmp, "w").write("half")
            raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
    common.atomic_write_json(target, {"a": 1})
    assert target.read_text() == '{\n  "a": 1\n}\n' and len(list(tmp_path.iterdir())) == 1


def test_prompts_from_text_jsonl_and_csv(tmp_path):
    (tmp_path / "p.txt").write_text("a cat runs\n\n  two   dogs  swim \n")
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat runs", "id": 1}\n\n{"prompt": "two dogs swim"}\n')
    (tmp_path / "p.csv").write_text('id,prompt,user\n1,"a cat runs",x\n2,"two dogs swim, fast",y\n')
    assert stage.read_prompts(tmp_path / "p.txt") == ["a cat runs", "two dogs swim"]
    assert stage.read_prompts(tmp_path / "p.jsonl") == ["a cat runs", "two dogs swim"]
    assert stage.read_prompts(tmp_path / "p.csv") == ["a cat runs", "two dogs swim, fast"]
    assert len(stage.read_prompts(common.__file__.replace("common.py", "configs/prompts/curation.txt"))) == 320


@pytest.mark.parametrize("name, text, message", [
    ("e.txt", "\n \n", "e.txt: no prompts; expected one prompt a line"),
    ("b.jsonl", '{"prompt": "ok"}\n{"text": "no prompt key"}\n', "b.jsonl:2: expected a JSON object with a 'prompt' string"),
    ("c.csv", "id,text\n1,hello\n", "c.csv: expected a CSV header with a 'prompt' column"),
])
def test_bad_prompt_files(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=message):
        stage.read_prompts(tmp_path / name)
    with pytest.raises(ConfigError, match="cannot read prompts"):
        stage.read_prompts(tmp_path / "missing.txt")


@pytest.mark.parametrize("name,kind", [("single_gpu", "NO"), ("multi_gpu", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED"),
                                       ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")])
def test_accelerate_configs_load_as_accelerate_reads_them(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))  # unknown keys raise
    assert str(config.distributed_type).rsplit(".", 1)[-1] == kind and config.mixed_precision == "bf16"
    if kind == "DEEPSPEED":  # must equal the training config's, or DeepSpeed and the script disagree
        train = yaml.safe_load((ROOT / "configs" / "animatediff.yaml").read_text())["train"]
        assert config.deepspeed_config["zero_stage"] == int(name[-1])
        assert config.deepspeed_config["gradient_accumulation_steps"] == train["gradient_accumulation_steps"]
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2  # per-parameter: part of the model is frozen
        assert config.fsdp_config["fsdp_auto_wrap_policy"] == "TRANSFORMER_BASED_WRAP"  # the family's blocks
