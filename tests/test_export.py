"""export.py on its own: the folder, the model card as the hub reads it, a rerun that skips, an
upload with no network, and students it must refuse before it writes anything. (Each family's
folder, loaded by plain diffusers after a loop, is checked beside that family's loop test.)
Run: python -m pytest -q tests/test_export.py"""
import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import yaml

import common
import export
from conftest import ROOT, run_script


@pytest.fixture(scope="module")
def exported(fast_config, tiny_stage, tmp_path_factory):
    out = tmp_path_factory.mktemp("export") / "tiny-vip"
    export.main(export.parse_args(["--config", fast_config, "--student", str(tiny_stage / "prune" / "student"),
                                   "--output_dir", str(out)]))
    return out


def test_the_folder_and_its_card(exported, tiny_stage):
    names = set(os.listdir(exported))
    assert {"model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "README.md", "config.yaml",
            "provenance.json"} <= names and not any(n.startswith(".") and n != ".lock" for n in names)
    card = huggingface_hub.ModelCard.load(exported / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "text-to-video"
    assert "base_model" not in card.data.to_dict()  # a local base is no hub id to link
    removed = json.loads((tiny_stage / "prune" / "student" / "student.json").read_text())["removed_blocks"]
    assert f"Removed: `{removed[0]}`." in card.text and "No evaluation of this student was found" in card.text
    assert "DiffusionPipeline.from_pretrained(" in card.text and f"--output_dir {exported}\n" in card.text
    assert json.loads((exported / "provenance.json").read_text())["outputs"]["README.md"] > 0


def test_a_rerun_skips_and_an_upload_without_network_is_one_line(exported, fast_config, tiny_stage):
    before = {p: p.stat().st_mtime_ns for p in exported.rglob("*") if p.is_file() and not p.name.startswith(".")}
    result = run_script(sys.executable, "export.py", "--config", fast_config, "--student",
                        str(tiny_stage / "prune" / "student"), "--output_dir", str(exported), "--push_to_hub",
                        "--hub_model_id", "someone/tiny-vip", env={"HF_HUB_OFFLINE": "1"}, check=False)
    assert "skipping" in result.stdout and result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"error: {exported}: complete and ready to upload, but the upload to someone/tiny-vip "
                                f"failed (") and lines[-1].endswith(f"hf upload someone/tiny-vip {exported}")
    assert "Traceback" not in result.stderr
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_a_student_it_cannot_export_is_one_line_before_anything_is_written(fast_config, tiny_stage, tmp_path):
    other = tmp_path / "other base"
    shutil.copytree(tiny_stage / "prune" / "student", other)
    meta = json.loads((other / "student.json").read_text())
    (other / "student.json").write_text(json.dumps({**meta, "pretrained_model_name_or_path": "/elsewhere/sd"}))
    half = tmp_path / "half"
    shutil.copytree(tiny_stage / "prune" / "student", half)
    (half / "student.safetensors").unlink()
    for student, message in ((other, "pretrained_model_name_or_path is '/elsewhere/sd' but the config's is"),
                             (half, "student.safetensors: cannot read"),
                             (tmp_path / "none", "student.json: missing")):
        out = tmp_path / f"out {student.name}"
        result = run_script(sys.executable, "export.py", "--config", fast_config, "--student", str(student),
                            "--output_dir", str(out), check=False)
        assert result.returncode == 2 and message in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
        assert "Traceback" not in result.stderr and not out.exists()
