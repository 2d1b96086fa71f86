"""On PYTHONPATH of a test's `accelerate launch` of CPU processes: accelerate turns FSDP and DeepSpeed
on only for accelerator devices, though torch's FSDP2 runs on CPU processes over gloo and DeepSpeed
has a CPU accelerator. This lets accelerate's own FSDP and DeepSpeed paths (sharding, sharded
checkpoints, the full state dict) run on the CPU processes as they do on GPUs; the scripts and the
configs are the ones users launch."""
import os

import accelerate.state as state

if os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true":
    _init = state.AcceleratorState.__init__

    def __init__(self, *args, **kwargs):  # MULTI_CPU, as accelerate sets MULTI_GPU, becomes FSDP
        _init(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == state.DistributedType.MULTI_CPU:
            self.distributed_type = state.DistributedType.FSDP
            state.PartialState._shared_state["distributed_type"] = state.DistributedType.FSDP
            if self._mixed_precision != "no":
                plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = plugin

    state.AcceleratorState.__init__ = __init__

if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
    import torch

    _partial_init = state.PartialState.__init__

    def __init__(self, *args, **kwargs):  # DeepSpeed's CPU processes see one another, as on GPUs
        _partial_init(self, *args, **kwargs)
        if torch.distributed.is_initialized() and self.num_processes == 1 and torch.distributed.get_world_size() > 1:
            self.num_processes = torch.distributed.get_world_size()
            self.process_index = torch.distributed.get_rank()
            self.local_process_index = int(os.environ.get("LOCAL_RANK", 0))
            self.backend = torch.distributed.get_backend()

    state.PartialState.__init__ = __init__
