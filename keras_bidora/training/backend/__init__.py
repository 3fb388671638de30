"""Per-backend train-step pieces, picked by `keras.config.backend()`.

Each backend module provides the same five functions:

- `value_and_grad(fn, create_graph=False)`: returns a function that takes
  `(params, *args)`, where `params` is a list of tensors and
  `fn(params, *args)` returns `(value, aux)`, and gives back
  `((value, aux), grads)`. `create_graph=True` keeps the gradient
  differentiable (for Hessian-vector products).
- `apply_gradients(pred, optimizer, grads, variables, values,
  optimizer_values)`: applies one optimizer step to `variables` when the
  scalar `pred` is true and returns the new `(values, optimizer_values)`.
- `cond(pred, true_fn, false_fn)`: `keras.ops.cond`, except that under a
  `tf.distribute` strategy TensorFlow runs both branches and selects (a
  `tf.cond` branch may not sum across replicas).
- `frozen_key(tensors)`: a key that compares equal to a later key of the
  same tensors while their values are unchanged, or None where the backend
  cannot tell; `BiDoRADense` keeps what it computes from the frozen `W0`
  under it (eager torch only).
- `call_step(step, *args)`: `step(*args)`, called the way the backend runs
  a step best: eager torch runs every step's Python anew, from a frame
  with room of its own (`keras_bidora.training.frame_stack`); JAX and
  TensorFlow trace the step once and call it as it is.

Everything else of the bi-level step is written once, on top of these, in
`keras_bidora.training.hypergradients` and `keras_bidora.training.step`.
"""

import importlib

import keras


def get():
    """Returns the module with the current backend's train-step pieces."""
    name = keras.config.backend()
    if name not in ("jax", "tensorflow", "torch"):
        raise ValueError(
            "keras-bidora supports the jax, tensorflow and torch backends. "
            f"Received: KERAS_BACKEND={name}"
        )
    return importlib.import_module(f"keras_bidora.training.backend.{name}")
