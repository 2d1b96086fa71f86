import os
import sys
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # no test touches the network
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Tiny AnimateDiff folders (SD layout + motion adapter), built once per test session."""
    import common

    root = tmp_path_factory.mktemp("tiny models")  # a space, as users' paths have
    common.build_tiny_animatediff(str(root / "sd"), str(root / "motion_adapter"))
    return root


@pytest.fixture()
def tiny_args(tiny_dir):
    import common

    args = common.parse_config([], "test", {"model": common.MODEL_OPTIONS, "reward": common.REWARD_OPTIONS})
    args.pretrained_model_name_or_path = str(tiny_dir / "sd")
    args.motion_adapter = str(tiny_dir / "motion_adapter")
    args.num_frames, args.height, args.width, args.num_inference_steps = 8, 64, 64, 4
    return args
