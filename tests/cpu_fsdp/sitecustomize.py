"""On PYTHONPATH of a test's `accelerate launch` of CPU processes: accelerate turns FSDP on only
for accelerator devices (MULTI_GPU, ...), never for MULTI_CPU, though torch's FSDP2 runs on CPU with
gloo. This lets accelerate's own FSDP path (fully_shard, sharded checkpoints, the full state dict)
run on the CPU processes as it does on GPUs; the scripts and the config are the ones users launch."""
import os

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    import accelerate.state as state

    _init = state.AcceleratorState.__init__

    def __init__(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = state.DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin

    state.AcceleratorState.__init__ = __init__
