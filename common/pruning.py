"""Data-free pruning with SynFlow: which coordinates DP-ZOSO trains.

SynFlow (Tanaka et al., NeurIPS 2020) scores parameters without data: replace every weight by
its absolute value, feed an all-ones input, and take

    R = 1^T f(1; |theta|),    score(theta_j) = |theta_j * dR/dtheta_j|,

the contribution of each weight to the total "synaptic flow" through the network. DP-ZOSO trains
only the top r% (r = 1 in the paper). Because no data is touched the mask costs no privacy; it is
computed once, in float64, and stored in the update log, so every party uses the same mask
rather than recomputing it (float results could differ across machines). For a transformer the
all-ones input is given as the input embedding, so token-embedding tables score zero and are not
trained; tensors the task's forward never reaches also score zero and are never selected.
(The DP-ZOSO authors' code scored a zeroth-order Hessian-gradient product on token id 1 instead.)
"""

from __future__ import annotations

import copy
import fnmatch
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch import nn


def synflow_scores(
    module: nn.Module, output: Callable[[nn.Module], torch.Tensor]
) -> OrderedDict[str, torch.Tensor]:
    """|theta * dR/dtheta| for every parameter of ``module``, flat, keyed by canonical name.

    ``output(m)`` runs ``m`` on an all-ones input; R is the sum of what it returns. The module
    is not touched: the computation runs on a float64 copy with |theta| in place of theta.
    """
    module = copy.deepcopy(module).double()  # deepcopy keeps tied weights tied
    named = OrderedDict(module.named_parameters())
    with torch.no_grad():
        for param in named.values():
            param.abs_()
            param.requires_grad_(True)
    with torch.enable_grad():
        output(module).sum().backward()
    scores = OrderedDict()
    for name, param in named.items():
        grad = param.grad if param.grad is not None else torch.zeros_like(param)
        scores[name] = (param.detach() * grad).abs().reshape(-1)
    return scores


def synflow_mask(
    module: nn.Module,
    output: Callable[[nn.Module], torch.Tensor],
    ratio: float,
    always: tuple[str, ...] = (),
) -> OrderedDict[str, torch.Tensor | None]:
    """The top ``ratio`` of coordinates by SynFlow score, as sorted flat indices per tensor.

    Parameters whose names match a pattern in ``always`` (fnmatch, e.g. ``"classifier.*"``) are
    trained in full on top of that budget. Ties are broken by parameter order, then index, so
    the mask is deterministic. Coordinates scoring zero are never selected.
    """
    if ratio == 0:  # nothing ranked: no need to score
        return OrderedDict((name, None) for name, _ in module.named_parameters()
                           if any(fnmatch.fnmatchcase(name, p) for p in always))
    scores = synflow_scores(module, output)
    names = list(scores)
    forced = {name for name in names if any(fnmatch.fnmatchcase(name, p) for p in always)}
    ranked = [name for name in names if name not in forced]
    flat = torch.cat([scores[name] for name in ranked]) if ranked else torch.zeros(0, dtype=torch.float64)
    budget = min(int(round(ratio * sum(scores[n].numel() for n in names))), int((flat > 0).sum()))
    order = torch.argsort(-flat, stable=True)[:budget]
    mask: OrderedDict[str, torch.Tensor | None] = OrderedDict()
    offset = 0
    chosen = torch.sort(order).values
    for name in names:
        if name in forced:
            mask[name] = None
            continue
        size = scores[name].numel()
        lo, hi = torch.searchsorted(chosen, torch.tensor([offset, offset + size]))
        if hi > lo:
            mask[name] = chosen[lo:hi] - offset
        offset += size
    return mask
