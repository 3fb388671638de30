"""TensorFlow pieces of the bi-level train step: tapes and stateful updates.

Under a `tf.distribute` strategy (the step runs once per replica, in
`strategy.run`), these pieces keep the step equal to single-device
training: Keras divides each replica's loss by the number of replicas, so
`value_and_grad` sums values and gradients across replicas and every
replica sees the global batch's loss and gradients (as in a JAX program
sharded by `keras.distribution`), and the hypergradient built on them is
the single-device one.
"""

import tensorflow as tf


def _replica_context():
    """The replica context of a `tf.distribute` strategy, or None."""
    if not tf.distribute.has_strategy():
        return None
    if tf.distribute.in_cross_replica_context():
        return None
    return tf.distribute.get_replica_context()


def value_and_grad(fn, create_graph=False):
    # Nested tapes record each other, so create_graph needs nothing extra.

    def wrapped(params, *args):
        params = list(params)
        with tf.GradientTape() as tape:
            tape.watch(params)
            value, aux = fn(params, *args)
        grads = tape.gradient(
            value, params, unconnected_gradients=tf.UnconnectedGradients.ZERO
        )
        context = _replica_context()
        # A gradient kept for differentiating again stays per replica: the
        # outer `value_and_grad` sums the result.
        if context is not None and not create_graph:
            value, grads = context.all_reduce(
                tf.distribute.ReduceOp.SUM, (value, list(grads))
            )
        return (value, aux), grads

    return wrapped


def cond(pred, true_fn, false_fn):
    """`tf.cond`; under a strategy, both branches and a select.

    A branch of `tf.cond` may not sum across replicas (a `merge_call`), and
    the upper step's gradients do.
    """
    if _replica_context() is None:
        return tf.cond(pred, true_fn, false_fn)
    return tf.nest.map_structure(
        lambda a, b: tf.where(pred, a, b), true_fn(), false_fn()
    )


def apply_gradients(
    pred, optimizer, grads, variables, values, optimizer_values
):
    def keep():
        return tf.constant(False)

    context = _replica_context()
    if context is None:

        def update():
            optimizer.apply(grads, variables)
            return tf.constant(True)

        tf.cond(pred, update, keep)
    else:
        # The gradients are already summed across replicas and
        # `optimizer.apply` sums them again.
        scale = 1.0 / context.num_replicas_in_sync
        grads = [g * tf.cast(scale, g.dtype) for g in grads]

        def cross_replica(strategy, pred, grads):
            # As Keras's LossScaleOptimizer: the cond runs in the
            # cross-replica context, since `optimizer.apply` merges.
            # `pred` is the same on every replica (losses are summed).
            pred = strategy.experimental_local_results(pred)[0]

            def update():
                strategy.extended.call_for_each_replica(
                    optimizer.apply, args=(grads, variables)
                )
                return tf.constant(True)

            tf.cond(pred, update, keep)

        context.merge_call(cross_replica, args=(pred, grads))
    return (
        [v.value for v in variables],
        [v.value for v in optimizer.variables],
    )


def frozen_key(tensors):
    """None: values computed from frozen variables are not kept here.

    Inside a `tf.function` the values are symbolic, and a `tf.Variable`
    changed in place gives no cheap sign of it.
    """
    del tensors
    return None


def call_step(step, *args):
    """`step(*args)`: its Python runs only while the step is traced."""
    return step(*args)
