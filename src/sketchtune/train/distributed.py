"""Fully sharded codebook training (FSDP2, ``torch.distributed.fsdp.fully_shard``) for ``torchrun`` runs.

Data parallelism (DDP) already works through ``Trainer``: every rank holds the whole sketched model and the
codebook gradients are all-reduced. FSDP shards the codebooks (and their fp32 Adam state) across ranks
instead. The packed uint8 codes cannot be sharded by FSDP — its all-gather buffers are floating point and
``fully_shard`` on them aborts — and they are frozen anyway, so they are left out of the sharding
(``ignored_params``) and stay whole on every rank, like a frozen base in QLoRA-FSDP. Each decoder layer is
its own FSDP unit (gathered just before it runs, freed after), the rest is the root unit.

The model is sharded before ``Trainer`` prepares it, and accelerate is kept from wrapping the sharded model
in DDP (:func:`keep_sharded_model`).
"""

from __future__ import annotations

import torch
from torch import nn

from ..architecture import find_decoder_layers
from ..sketched_linear import SketchedLinear


def keep_sharded_model(accelerator) -> None:
    """Make ``accelerator.prepare`` leave an already ``fully_shard``-ed model as it is.

    accelerate enables its own FSDP only on accelerators; on CPU (gloo) it would wrap the model in DDP, whose
    parameter broadcast DTensors do not support. Preparing the model as a single-process run keeps
    everything else accelerate does (device placement, autocast) while FSDP does the gradient reduction.
    """
    from accelerate.utils import DistributedType
    from torch.distributed.fsdp import FSDPModule

    original = accelerator.prepare_model

    def prepare_model(model, *args, **kwargs):
        if not isinstance(model, FSDPModule):
            return original(model, *args, **kwargs)
        state = accelerator.state
        saved = state.distributed_type
        state.distributed_type = DistributedType.NO
        try:
            return original(model, *args, **kwargs)
        finally:
            state.distributed_type = saved

    accelerator.prepare_model = prepare_model


def shard_codebooks(model: nn.Module) -> None:
    """``fully_shard`` every decoder layer and the root, codebooks sharded and packed codes left whole.

    Needs the default process group (``Trainer`` starts it from ``torchrun``'s environment).
    """
    from torch.distributed.fsdp import fully_shard

    whole = {p for p in model.parameters() if not p.is_floating_point()}  # packed codes: frozen, not shardable
    _, layers = find_decoder_layers(model, sketched=True)
    for layer in layers:
        fully_shard(layer, ignored_params=whole)
    fully_shard(model, ignored_params=whole)


def full_codebooks(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every codebook whole, on the CPU. A collective under FSDP: every rank must call it, in step."""
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, SketchedLinear):
            book = module.codebook.detach()
            if hasattr(book, "full_tensor"):  # a DTensor shard
                book = book.full_tensor()
            out[name] = book.cpu()
    return out


def end_process_group() -> None:
    """Destroy the default process group, if one was started (``Trainer`` starts it under ``torchrun``).

    Why: a process that exits with the group alive tears gloo's worker threads down during interpreter
    finalization, and about one ``torchrun`` run in 25 here died there with SIGABRT ("terminate called
    without an active exception", pytorch/pytorch#190489) after training had finished — a failed run for
    ``torchrun``, its adapter written or not. Every collective of a run is over when the command returns, so
    this is local to the rank and needs no barrier.
    """
    import gc

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        gc.collect()  # the run's FSDP model and DTensors hold the group: free them while Python still runs
        dist.destroy_process_group()
