"""The exact-reward world's DiT teacher (backends/world_wan.py), its pruning candidates the
transformer blocks' sub-layers (backends/wan_sublayers.py): each block's self-attention, cross-attention
and feed-forward, 12 for the teacher's 4 blocks. A whole block is a quarter of that teacher: removing
any one leaves nothing a student could be trained back from (docs/world.md, "The world on a DiT").

    model:
      backend: world_wan_sublayers      # in place of `backend: world_wan`
"""

import backends.wan_sublayers as wan_sublayers
import backends.world_wan as world_wan

OPTIONS, STUDENT_KEYS, TRAINABLE, FSDP_WRAP = (world_wan.OPTIONS, world_wan.STUDENT_KEYS, world_wan.TRAINABLE,
                                              world_wan.FSDP_WRAP)
TABLE, STAND_IN, prunable_blocks = wan_sublayers.TABLE, wan_sublayers.STAND_IN, wan_sublayers.prunable_blocks
required_models, build_tiny, load_denoiser, load_text_encoder = (world_wan.required_models, world_wan.build_tiny,
                                                                 world_wan.load_denoiser, world_wan.load_text_encoder)
encode_prompts, load_pipeline, with_denoiser, generate = (world_wan.encode_prompts, world_wan.load_pipeline,
                                                          world_wan.with_denoiser, world_wan.generate)
vae_scale_factor = world_wan.vae_scale_factor


def export(args, transformer, out_dir):
    info = wan_sublayers.export(args, transformer, out_dir, load_pipeline=load_pipeline)
    return {**info, "needs": world_wan.WORLD_VAE}
objective, enable_checkpointing, predict, denoise_inputs = (world_wan.objective, world_wan.enable_checkpointing,
                                                            world_wan.predict, world_wan.denoise_inputs)
