"""The train steps of `BiDoRAModel`: one function per phase.

With `w` the lower level's variables (each adapter's direction `lora_a`,
`lora_b`, and the task head) and `m` the magnitudes:

- **bi-level phase** (`bilevel_step`): a lower step, `w <- w - opt(grad_w
  L_low(w, m))` on a lower batch, where `L_low` is the task loss plus
  `direction_regularization` times the orthogonality penalty; and, on due
  steps, an upper step `m <- m - opt(h)` with `h` the hypergradient of the
  upper loss on an upper batch (`keras_bidora.training.hypergradients`),
  taken at the same `w` and reusing the lower gradient.
- **retrain phase** (`retrain_step`): the lower step alone, on all the
  data; `m` stays fixed.
- **joint phase** (`joint_step`, plain DoRA): one step of both levels'
  variables along the gradient of `L_low(w, m)`.

A step whose loss is not finite applies nothing. Each step is stateless:
it takes the model's state (trainable, non-trainable, optimizer and
metrics values) and returns `(logs, new_state)`, the way Keras's JAX
trainer does; the backend modules (`keras_bidora.training.backend`) give
the gradients and the conditional updates.
"""

import keras
from keras import ops

from keras_bidora import _keras_compat
from keras_bidora.layers.bidora_dense import direction_regularization
from keras_bidora.layers.bidora_dense import shared_column_scales
from keras_bidora.training import backend as backend_lib
from keras_bidora.training import hypergradients

# The phase -> step function map is at the end of the module.


def bilevel_step(model, state, data):
    """A lower step on the lower batch, then an upper step when due."""
    lower_batch, upper_batch, due = data
    due = due[0]
    step = _Step(model, state)
    reuse_m = model.hypergradient in hypergradients.NEEDS_LOWER_MAGNITUDE_GRADS
    loss, aux, lower_grads, lower_m_grads = lower_gradients(
        step, lower_batch, with_magnitudes=reuse_m
    )
    upper_loss, upper_grads = upper_gradients(
        step,
        lower_grads,
        lower_m_grads,
        lower_batch,
        upper_batch,
        due,
        dtype=loss.dtype,
    )
    finite = ops.logical_and(
        ops.isfinite(loss),
        ops.logical_or(ops.logical_not(due), ops.isfinite(upper_loss)),
    )
    new_w = step.apply("lower", finite, lower_grads)
    new_m = step.apply("upper", ops.logical_and(finite, due), upper_grads)
    return step.finish(
        finite, new_w, new_m, loss, aux, lower_batch, (upper_loss, due)
    )


def retrain_step(model, state, data):
    """The lower step alone: direction and head, the magnitudes fixed."""
    step = _Step(model, state)
    loss, aux, grads, _ = lower_gradients(step, data)
    finite = ops.isfinite(loss)
    new_w = step.apply("lower", finite, grads)
    return step.finish(finite, new_w, step.m, loss, aux, data)


def joint_step(model, state, data):
    """Plain DoRA: magnitudes and direction along one gradient."""
    step = _Step(model, state)
    loss, aux, lower_grads, upper_grads = joint_gradients(step, data)
    finite = ops.isfinite(loss)
    new_w = step.apply("lower", finite, lower_grads)
    new_m = step.apply("upper", finite, upper_grads)
    return step.finish(finite, new_w, new_m, loss, aux, data)


# The gradients of each level ----------------------------------------------


def lower_gradients(step, batch, with_magnitudes=False):
    """`L_low(w, m)`, its aux, `grad_w` and (if asked) `grad_m`.

    Only `grad_w` ever reaches the lower optimizer; `grad_m` is taken in the
    same backward pass for the estimators that reuse it.
    """
    n_w = len(step.w)

    def loss(params):
        m = params[n_w:] if with_magnitudes else step.m
        return step.loss(params[:n_w], m, batch, regularize=True)

    params = step.w + step.m if with_magnitudes else step.w
    (value, aux), grads = step.backend.value_and_grad(loss)(params)
    magnitude_grads = list(grads[n_w:]) if with_magnitudes else None
    return value, aux, list(grads[:n_w]), magnitude_grads


def upper_gradients(
    step,
    lower_grads,
    lower_magnitude_grads,
    lower_batch,
    upper_batch,
    due,
    dtype,
):
    """`(L_up, hypergradient)` when `due`, else zeros (no upper pass).

    The upper loss is returned in `dtype` (the lower loss's).
    """
    model = step.model
    estimator = hypergradients.get(model.hypergradient)
    problem = _Problem(
        lambda w, m, batch: step.loss(w, m, batch, regularize=True),
        lambda w, m, batch: step.loss(w, m, batch, regularize=False),
    )

    def upper_step():
        value, hypergradient = estimator(
            step.backend,
            problem,
            step.w,
            step.m,
            lower_grads,
            lower_batch,
            upper_batch,
            step.learning_rate(),
            terms=model.neumann_terms,
            lower_magnitude_grads=lower_magnitude_grads,
        )
        return ops.cast(value, dtype), list(hypergradient)

    def no_upper_step():
        return ops.zeros((), dtype=dtype), [ops.zeros_like(v) for v in step.m]

    return step.backend.cond(due, upper_step, no_upper_step)


def joint_gradients(step, batch):
    """`L_low(w, m)`, its aux, and its gradients in `w` and in `m`."""
    n_w = len(step.w)

    def loss(params):
        return step.loss(params[:n_w], params[n_w:], batch, regularize=True)

    (value, aux), grads = step.backend.value_and_grad(loss)(step.w + step.m)
    return value, aux, list(grads[:n_w]), list(grads[n_w:])


# Plumbing: the state in and out ------------------------------------------


class _Problem:
    """The two stateless losses the hypergradient estimators differentiate."""

    def __init__(self, lower_loss, upper_loss):
        self.lower_loss = lower_loss
        self.upper_loss = upper_loss


class _Step:
    """One step's state: the levels' values, losses, updates and logs."""

    def __init__(self, model, state):
        self.model = model
        self.backend = backend_lib.get()
        self.partition = model.partition
        (
            self.trainable,
            self.non_trainable,
            self.optimizer_values,
            self.metrics_values,
        ) = state
        self.w, self.m = self.partition.split(self.trainable)

    def loss(self, w, m, batch, regularize):
        """The task loss at `(w, m)` and `(y_pred, non-trainable updates)`.

        The adapted layers' column scales are computed once per group of
        same-shaped layers, for the forward pass and the penalty together
        (`shared_column_scales`).
        """
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        partition = self.partition
        mapping = list(
            zip(partition.trainable_variables, partition.assemble(w, m))
        )
        if self.non_trainable is not None:
            mapping += list(
                zip(partition.non_trainable_variables, self.non_trainable)
            )
        with (
            keras.StatelessScope(state_mapping=mapping) as scope,
            shared_column_scales(partition.adapted_layers),
        ):
            y_pred = model(x, training=True)
            loss = model.compute_loss(
                x=x, y=y, y_pred=y_pred, sample_weight=sample_weight
            )
            if regularize and model.direction_regularization:
                # As Keras's regularization losses: under a tf.distribute
                # strategy, divided by the number of replicas like the loss.
                loss = loss + _keras_compat.aggregate_additional_loss(
                    model,
                    model.direction_regularization
                    * direction_regularization(partition.adapted_layers),
                )
        updates = []
        for variable in partition.non_trainable_variables:
            value = scope.get_current_value(variable)
            if value is not None:
                updates.append((variable, value))
        return loss, (y_pred, updates)

    def learning_rate(self):
        """The lower optimizer's current learning rate (the `xi` of DARTS)."""
        mapping = list(
            zip(self.partition.optimizer_variables, self.optimizer_values)
        )
        with keras.StatelessScope(state_mapping=mapping):
            rate = ops.convert_to_tensor(
                self.model.lower_optimizer.learning_rate
            )
        return ops.cast(rate, self.w[0].dtype)

    def apply(self, level, pred, grads):
        """One step of the level's optimizer when `pred`; its new values."""
        model = self.model
        optimizer = (
            model.lower_optimizer if level == "lower" else model.upper_optimizer
        )
        old = self.w if level == "lower" else self.m
        variables = (
            self.partition.lower_variables
            if level == "lower"
            else self.partition.upper_variables
        )
        new, slots = self.backend.apply_gradients(
            pred,
            optimizer,
            list(grads),
            variables,
            old,
            self.partition.slots(level, self.optimizer_values),
        )
        self.optimizer_values = self.partition.replace_slots(
            level, self.optimizer_values, slots
        )
        return new

    def finish(self, finite, w, m, loss, aux, batch, upper=None):
        """Logs and the new state; `upper` is `(upper_loss, due)` or None."""
        y_pred, non_trainable_updates = aux
        optimizer_values = list(self.optimizer_values)
        # Keep the MultiOptimizer's own step counter in step.
        slot = self.partition.iterations_slot
        optimizer_values[slot] = optimizer_values[slot] + ops.cast(
            finite, optimizer_values[slot].dtype
        )
        logs, metrics_values = self._metrics(loss, y_pred, batch, upper)
        state = (
            self.partition.assemble(w, m),
            self._non_trainable(finite, non_trainable_updates),
            optimizer_values,
            metrics_values,
        )
        return logs, state

    def _metrics(self, loss, y_pred, batch, upper):
        model = self.model
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(batch)
        metrics_variables = self.partition.metrics_variables
        mapping = list(zip(metrics_variables, self.metrics_values))
        with keras.StatelessScope(state_mapping=mapping) as scope:
            batch_size = ops.shape(keras.tree.flatten(x)[0])[0]
            _keras_compat.loss_tracker(model).update_state(
                loss, sample_weight=batch_size
            )
            if upper is not None:
                upper_loss, due = upper
                model.upper_loss_tracker.update_state(
                    upper_loss, sample_weight=ops.cast(due, "float32")
                )
            logs = model.compute_metrics(x, y, y_pred, sample_weight)
        values = []
        for variable, value in zip(metrics_variables, self.metrics_values):
            current = scope.get_current_value(variable)
            values.append(value if current is None else current)
        return logs, values

    def _non_trainable(self, finite, updates):
        # The stateful backends pass no values in and assign the updates.
        if self.non_trainable is None:
            return updates
        updated = {id(v): value for v, value in updates}
        return [
            ops.where(finite, updated[id(v)], value)
            if id(v) in updated
            else value
            for v, value in zip(
                self.partition.non_trainable_variables, self.non_trainable
            )
        ]


STEPS = {"bilevel": bilevel_step, "retrain": retrain_step, "joint": joint_step}
