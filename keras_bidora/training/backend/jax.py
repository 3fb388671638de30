"""JAX pieces of the bi-level train step: stateless throughout."""

import jax


def value_and_grad(fn, create_graph=False):
    del create_graph  # JAX gradients are always differentiable.
    return jax.value_and_grad(fn, has_aux=True)


def apply_gradients(
    pred, optimizer, grads, variables, values, optimizer_values
):
    def update():
        return optimizer.stateless_apply(optimizer_values, grads, values)

    def keep():
        return list(values), list(optimizer_values)

    new_values, new_optimizer_values = jax.lax.cond(pred, update, keep)
    return list(new_values), list(new_optimizer_values)


def cond(pred, true_fn, false_fn):
    return jax.lax.cond(pred, true_fn, false_fn)


def frozen_key(tensors):
    """None: values computed from frozen variables are not kept here.

    Inside `jax.jit` (where training runs) the values are tracers, and XLA
    compiles the whole step anyway.
    """
    del tensors
    return None


def call_step(step, *args):
    """`step(*args)`: its Python runs only while the step is traced."""
    return step(*args)
