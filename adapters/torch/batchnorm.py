"""BatchNorm statistics after pruning steps.

Zeroing filters changes the input distribution of every BatchNorm downstream, but the
running statistics that eval mode uses still describe the network before the step: a
soft-pruned model evaluated right after `step()` can fall to chance although training
mode is fine (`benchmarks/RESULTS.md`). Recomputing the statistics on a few training
batches, forward only, fixes that without changing any parameter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch


def _first(batch):
    """A batch is an input tensor, or a (inputs, targets, ...) tuple as a DataLoader yields."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_batchnorm(model: torch.nn.Module, batches: Iterable,
                          max_batches: int | None = None,
                          inputs: Callable = _first) -> int:
    """Reset every BatchNorm's running statistics and recompute them as the plain average
    over `batches` (training-mode forward passes, no gradients, no parameter updates).
    `inputs(batch)` gives the model's input (a tensor or a tuple of tensors). Returns the
    number of batches used."""
    norms = [m for m in model.modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    momenta = {m: m.momentum for m in norms}
    was_training = model.training
    device = next(model.parameters()).device
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: the plain mean over batches
    model.train()
    count = 0
    try:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            x = inputs(batch)
            x = tuple(t.to(device) for t in x) if isinstance(x, (tuple, list)) else (x.to(device),)
            model(*x)
            count += 1
    finally:
        for m, momentum in momenta.items():
            m.momentum = momentum
        model.train(was_training)
    if norms and not count:
        raise ValueError("recalibrate_batchnorm needs at least one batch")
    return count
