"""PyTorch pieces of the bi-level train step: autograd and stateful updates."""

import torch


def value_and_grad(fn, create_graph=False):
    def wrapped(params, *args):
        params = [
            p if p.requires_grad else p.detach().requires_grad_(True)
            for p in params
        ]
        with torch.enable_grad():
            value, aux = fn(params, *args)
            grads = torch.autograd.grad(
                value,
                params,
                create_graph=create_graph,
                allow_unused=True,
            )
        grads = [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(params, grads)
        ]
        if not create_graph:
            value = value.detach()
        return (value, aux), grads

    return wrapped


def apply_gradients(
    pred, optimizer, grads, variables, values, optimizer_values
):
    if bool(pred):
        with torch.no_grad():
            optimizer.apply([g.detach() for g in grads], variables)
    return (
        [v.value for v in variables],
        [v.value for v in optimizer.variables],
    )


def cond(pred, true_fn, false_fn):
    return true_fn() if bool(pred) else false_fn()
