"""Wan2.1 as backends/wan.py loads and calls it, its pruning candidates the transformer blocks'
sub-layers instead of whole blocks: each block's self-attention (`blocks.{i}.attn1`), cross-attention
(`blocks.{i}.attn2`) and feed-forward (`blocks.{i}.ffn`), 90 candidates for the 1.3B's 30 blocks.

Each sub-layer is a residual branch: the block adds its output (the self-attention's and the
feed-forward's scaled by a gate from the time embedding) to the hidden states. So a removed one is
a zero update (`models.RemovedBranch`), exactly the branch gone; the block's norms and modulation
stay. On the tiny random Wan, sub-layers are the better-graded set: at a third of the blocks'
parameters removed, the transformer's output changes by 0.065 against 0.327 for whole blocks
(`python benchmarks/wan_candidates.py`, README "Wan2.1").

    model:
      backend: wan_sublayers      # in place of `backend: wan`
"""

import sys

import backends.wan as wan
import common
import models

STAND_IN = models.RemovedBranch
SUBLAYERS = ("attn1", "attn2", "ffn")
OPTIONS, STUDENT_KEYS, TRAINABLE, FSDP_WRAP = wan.OPTIONS, wan.STUDENT_KEYS, wan.TRAINABLE, wan.FSDP_WRAP
TABLE = {"blocks": "Sub-layer params", "blocks_are": "the transformer blocks' sub-layers", "denoiser": "transformer"}
required_models, build_tiny, load_denoiser, load_text_encoder = (wan.required_models, wan.build_tiny, wan.load_denoiser,
                                                                 wan.load_text_encoder)
encode_prompts, load_pipeline, with_denoiser, generate = wan.encode_prompts, wan.load_pipeline, wan.with_denoiser, wan.generate
objective, enable_checkpointing, predict, denoise_inputs = (wan.objective, wan.enable_checkpointing, wan.predict,
                                                            wan.denoise_inputs)


def prunable_blocks(transformer):
    return [f"{block}.{layer}" for block in wan.prunable_blocks(transformer) for layer in SUBLAYERS]


def export(args, transformer, out_dir, load_pipeline=load_pipeline):
    """Write the student as a WanPipeline folder whose transformer has every block, each removed
    sub-layer with its weights zero (WanTransformerBlock cannot drop one): the student's outputs,
    at the full model's cost; vip's loader (its student.json) runs without them."""
    dtype = common.weight_dtype(args.mixed_precision)  # the dtype vip generates in
    exported = models.with_blocks_zeroed(sys.modules[__name__], transformer, dtype=dtype)
    load_pipeline(args, exported, dtype=dtype).save_pretrained(out_dir)
    return {"denoiser": exported, "pipeline": "WanPipeline", "runs_removed": True,
            "form": "a WanTransformer3DModel of every block, each removed sub-layer's weights zero: the student's "
                    "outputs exactly, but at the full model's cost (diffusers' block cannot drop a sub-layer); "
                    "vip's loader runs the student without them"}
