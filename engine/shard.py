"""A fully fine-tuned reader's LLM sharded over the processes with PyTorch FSDP2
(``torch.distributed.fsdp.fully_shard``), the way VoCo's training step uses it.

A VoCo step runs each decoder layer several times before one backward (the compression with
gradients, then the reading of the KV block it wrote) and calls the embeddings on their own.
The compression's gradient reaches a layer through that KV block, not through the layer's
output, so FSDP's own hooks see a layer's backward once and, by default, free its gathered
weights before the compression's part of the backward needs them. Hence:

- every decoder layer, the two embeddings (unless tied), the decoder stack and the LLM are
  each a unit; their weights are gathered at the start of a step, in one fixed order on every
  process, and stay gathered until every micro-batch's backward has run
  (``reshard_after_forward=False``, ``set_reshard_after_backward(False)``): whole weights
  during the step, gradients and AdamW state sharded (ZeRO-2's memory);
- the micro-batches' backward passes accumulate gradients locally (no collective) and one
  reduce-scatter per unit ends the step (``set_manual_backward_finalization``,
  ``finalize_backward``), so processes may hold different numbers of micro-batches; each must
  run at least one backward (a process without samples runs a zero-weighted one);
- gradients are summed over the processes, not averaged, as the rest of step 7 sums them.

The checkpoint is gathered to full tensors (``full_state`` of ``Learned``), so a run resumes
under any number of processes, sharded or not.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch


class Sharding:
    """``fully_shard`` over a causal LM's units; ``step()`` wraps one training step's
    forward and backward passes."""

    def __init__(self, llm, device: torch.device, world: int):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        emb, head = llm.get_input_embeddings(), llm.get_output_embeddings()
        tied = head is not None and head.weight is emb.weight
        units = list(llm.model.layers) + ([] if tied else [emb, head]) + [llm.model, llm]
        mesh = init_device_mesh(device.type, (world,))
        for unit in units:
            fully_shard(unit, mesh=mesh, reshard_after_forward=False)
        for unit in units:
            unit.set_reshard_after_backward(False)
            unit.set_reduce_scatter_unused_params(True)   # every process reduces every unit
            unit.set_gradient_divide_factor(1.0)           # a sum over processes
            unit.set_force_sum_reduction_for_comms(True)   # (gloo has no PREMUL_SUM)
        # FSDP's set-up, which would run at the root's first forward, made now: VoCo calls the
        # embeddings first, which would otherwise make them a root of their own
        llm._get_fsdp_state()._lazy_init()
        llm.set_manual_backward_finalization(True)
        self.llm, self.units = llm, units

    @contextmanager
    def step(self):
        """Gather every unit's weights (one all-gather each, in a fixed order), run the
        step's forward and backward passes with gradients kept local, then reduce-scatter
        them (one collective per unit) and free the gathered weights."""
        for unit in self.units:
            unit.unshard()
        self.llm.set_requires_gradient_sync(False)
        yield
        self.llm.set_requires_gradient_sync(True)
        self.llm.finalize_backward()
        for unit in self.units:
            unit.reshard()


def is_sharded(p: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor
    return isinstance(p, DTensor)


def clip_grad_norm(params: list, max_norm: float, active: bool) -> float:
    """torch's ``clip_grad_norm_`` (coefficient max_norm / (norm + 1e-6), at most 1) over
    plain and sharded gradients together: a sharded gradient's squares are summed over the
    processes (one all-reduce), a plain one's are the same in every process. Returns the norm."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    local = [g.to_local() if is_sharded(g) else g for g in grads]
    shard = torch.zeros((), dtype=torch.float64, device=local[0].device)
    whole = torch.zeros_like(shard)
    for g, x in zip(grads, local):
        sq = x.double().pow(2).sum()
        if is_sharded(g):
            shard += sq
        else:
            whole += sq
    if active:
        torch.distributed.all_reduce(shard)
    norm = (shard + whole).sqrt()
    coef = (max_norm / (norm + 1e-6)).clamp(max=1.0)
    for x in local:
        x.mul_(coef.to(x.dtype))
    return float(norm)


class Learned(torch.nn.Module):
    """The weights the optimiser updates, by name ("/" for "."), as one module: its full
    state and its optimiser's are the checkpoint's, whether the weights are sharded or not."""

    def __init__(self, named: dict[str, torch.nn.Parameter]):
        super().__init__()
        self.weights = torch.nn.ParameterDict({n.replace(".", "/"): p for n, p in named.items()})


def full_state(module: torch.nn.Module, opt=None) -> tuple[dict, dict | None]:
    """(the module's full state, its optimiser's, keyed by parameter name) on the CPU, in the
    main process; a collective when the module is sharded (every process calls it)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                         get_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model = get_model_state_dict(module, options=options)
    return model, (None if opt is None else get_optimizer_state_dict(module, opt, options=options))


def load_full_state(module: torch.nn.Module, opt, model: dict, optim: dict) -> None:
    """``full_state``'s inverse: every process loads the full tensors (its shards taken)."""
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, model, options=options)
    set_optimizer_state_dict(module, opt, optim, options=options)
