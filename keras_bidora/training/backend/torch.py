"""PyTorch pieces of the bi-level train step: autograd and stateful updates."""

import torch

from keras_bidora.training.frame_stack import call_with_room


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


def call_step(step, *args):
    """`step(*args)` from a frame with room for the step's calls.

    Eager torch runs the step's Python (about 10^5 calls through Keras's
    layers) on every step; `call_with_room` keeps those calls from mapping
    and unmapping a frame-stack chunk each (see `frame_stack`).
    """
    return call_with_room(step, *args)


def frozen_key(tensors):
    """A key equal to a later one while `tensors` are unchanged, or None.

    Torch updates variables in place and counts each in-place change in a
    tensor's `_version`, so the same tensor objects at the same versions
    hold the same values. None (cache nothing) where a tensor needs a
    gradient, under `torch.inference_mode` (whose tensors cannot be saved
    for a later backward pass) or while `torch.compile` is tracing.
    """
    if torch.compiler.is_compiling() or torch.is_inference_mode_enabled():
        return None
    for tensor in tensors:
        if not isinstance(tensor, torch.Tensor) or tensor.requires_grad:
            return None
    return _FrozenKey(tensors)


class _FrozenKey:
    def __init__(self, tensors):
        # Holding the tensors keeps their ids from being reused.
        self.tensors = tuple(tensors)
        self.versions = tuple(tensor._version for tensor in self.tensors)

    def __eq__(self, other):
        return (
            isinstance(other, _FrozenKey)
            and len(self.tensors) == len(other.tensors)
            and all(a is b for a, b in zip(self.tensors, other.tensors))
            and self.versions == other.versions
        )

    __hash__ = None
