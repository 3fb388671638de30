"""TensorFlow pieces of the bi-level train step: tapes and stateful updates."""

import tensorflow as tf


def value_and_grad(fn, create_graph=False):
    # Nested tapes record each other, so create_graph needs nothing extra.
    del create_graph

    def wrapped(params, *args):
        params = list(params)
        with tf.GradientTape() as tape:
            tape.watch(params)
            value, aux = fn(params, *args)
        grads = tape.gradient(
            value, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        return (value, aux), grads

    return wrapped


def apply_gradients(pred, optimizer, grads, variables, values, optimizer_values):
    def update():
        optimizer.apply(grads, variables)
        return tf.constant(True)

    def keep():
        return tf.constant(False)

    tf.cond(pred, update, keep)
    return (
        [v.value for v in variables],
        [v.value for v in optimizer.variables],
    )
