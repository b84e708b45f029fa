"""Fully sharded training (``fsdp=True``): FSDP2's ``fully_shard`` under torchrun, one unit per transformer block.

Each process keeps only its shard of every parameter, gradient and AdamW moment; a block's full weights exist
only while it runs. The trainer's arithmetic is the DDP path's: FSDP averages the reduce-scattered gradients
over the processes as DDP averages its all-reduced ones, so the same ``real targets / world_size`` divisor
undoes it (a sum over all processes' real targets divides the summed loss). Device and precision are
parameters: float32 on CPU (gloo), bf16 parameters and compute with float32 gradient reductions on CUDA.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from .processes import under_torchrun

LAUNCH_COMMAND = "torchrun --nproc_per_node=N your_script.py"


def require_launch() -> None:
    """``fsdp=True`` shards over processes that torchrun starts; refuse a plain Python process before any work."""
    if under_torchrun() or (dist.is_available() and dist.is_initialized()):
        return
    raise ValueError(f"fsdp=True shards the model across processes, and this process was not started by torchrun. "
                     f"Launch the script with `{LAUNCH_COMMAND}` (N = the number of GPUs; on CPU, processes), or pass "
                     "fsdp=False to train on one device (a notebook cell runs one process).")


def transformer_blocks(model: nn.Module) -> list[nn.Module]:
    """The blocks that become their own FSDP units: the children of the outermost ``nn.ModuleList``s (HF decoders
    keep their layers in one: ``transformer.h``, ``model.layers``). None found: the whole model is one unit."""
    blocks, inside = [], set()
    for module in model.modules():
        if id(module) in inside:
            continue
        if isinstance(module, nn.ModuleList):
            blocks.extend(module)
            inside.update(id(m) for m in module.modules())
    return blocks


def mixed_precision_policy(device: torch.device, precision: str | None) -> MixedPrecisionPolicy:
    """On CUDA with bf16: parameters and compute in bf16, gradients reduced in float32. Otherwise float32."""
    if device.type == "cuda" and precision == "bf16":
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()


def check_precision(device: torch.device, precision: str | None, asked: str | None) -> str | None:
    """The precision an FSDP run uses. fp16 needs a GradScaler over sharded gradients, which this package does not
    have: asked for, it is refused; chosen by "auto" (a GPU without bf16), the run trains in float32 and says so."""
    if device.type != "cuda":
        return None  # mixed_precision_policy casts only on CUDA: float32 elsewhere, and results say so
    if precision != "fp16":
        return precision
    if asked == "fp16":
        raise ValueError("precision='fp16' (use_amp=True) is not supported with fsdp=True: pass precision='bf16' on "
                         "a GPU that has it (A100, H100, L4), or precision='fp32'.")
    return None


def shard_model(model: nn.Module, device: torch.device, precision: str | None) -> nn.Module:
    """Shard ``model`` in place: each transformer block a unit, the root (embeddings, head, the rest) last."""
    policy = mixed_precision_policy(device, precision)
    for block in transformer_blocks(model):
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def set_gradient_sync(model: nn.Module, last_micro_batch: bool) -> None:
    """Accumulation: micro-batches before the last keep their gradients unsharded and their blocks' weights gathered
    (no reduce-scatter, no re-gather per micro-batch); the last reduces and reshards."""
    model.set_requires_gradient_sync(last_micro_batch)
    model.set_reshard_after_backward(last_micro_batch)


def replicated_value(tensor: torch.Tensor) -> torch.Tensor:
    """A plain tensor of a replicated DTensor result (``clip_grad_norm_`` over shards); no communication."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def local_weights_of(state_dict: dict) -> dict:
    """This process's shards of a state dict's tensors, copied to the CPU."""
    return {name: (value.to_local() if isinstance(value, DTensor) else value).detach().to("cpu", copy=True)
            for name, value in state_dict.items()}


def local_weights(model: nn.Module) -> dict:
    """This process's shards of the weights (all of them, unsharded), copied to the CPU (what
    ``load_best_model_at_end`` keeps)."""
    return local_weights_of(model.state_dict())


@torch.no_grad()
def load_local_weights(model: nn.Module, weights: dict) -> None:
    """Copy :func:`local_weights` back into the model's shards."""
    for name, value in model.state_dict().items():
        (value.to_local() if isinstance(value, DTensor) else value).copy_(weights[name])


def restore_weights(model: nn.Module, weights: dict) -> None:
    """Weights from :func:`local_weights` (or a checkpoint's, for an unsharded model) back into the model."""
    if is_sharded(model):
        load_local_weights(model, weights)
    else:
        model.load_state_dict(weights)


def gathered_state_dict(model: nn.Module) -> dict:
    """The full (unsharded) weights on every process, on the CPU: a sharded model's ``state_dict()`` holds shards.
    A collective: every process calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    if not is_sharded(model):
        return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True))
    return {k: v.to("cpu", copy=True) for k, v in full.items()}
