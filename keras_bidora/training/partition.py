"""Which variables and optimizer slots belong to which level."""


class Partition:
    """The two levels' share of a `BiDoRAModel`'s variables, computed once.

    The upper level owns the magnitudes; the lower level every other
    trainable variable (each adapter's `lora_a`, `lora_b`, and the task
    head). The model's optimizer is a `keras.optimizers.MultiOptimizer`
    whose `variables` hold its own step counter, then the lower optimizer's
    slots, then the upper one's; a stateless train step receives them as
    one flat list, and each level's optimizer takes only its own slice.

    It also keeps the model's variable lists and adapted layers, which a
    Keras model gathers by walking all its layers on every access: a step
    reads them from here, so that an eager (torch) step does not pay for
    the walks.

    Built when the model's optimizer is built, and again at the start of
    each `fit` and whenever `compile` makes a new optimizer, so that a
    train step never recomputes it.

    Args:
        trainable_variables: the model's trainable variables, in order.
        magnitudes: the upper level's variables (a subset).
        optimizer_variables: the `MultiOptimizer`'s variables, in order.
        lower_optimizer: the lower level's optimizer (built).
        upper_optimizer: the upper level's optimizer (built), or None.
        iterations: the `MultiOptimizer`'s own step counter.
        non_trainable_variables: the model's non-trainable variables.
        metrics_variables: the model's metrics' variables.
        adapted_layers: the model's `BiDoRADense` layers.
    """

    def __init__(
        self,
        trainable_variables,
        magnitudes,
        optimizer_variables,
        lower_optimizer,
        upper_optimizer,
        iterations,
        non_trainable_variables=(),
        metrics_variables=(),
        adapted_layers=(),
    ):
        self.trainable_variables = list(trainable_variables)
        self.non_trainable_variables = list(non_trainable_variables)
        self.metrics_variables = list(metrics_variables)
        self.optimizer_variables = list(optimizer_variables)
        self.adapted_layers = list(adapted_layers)
        upper_ids = {id(v) for v in magnitudes}
        self.lower = []
        self.upper = []
        for i, variable in enumerate(trainable_variables):
            (self.upper if id(variable) in upper_ids else self.lower).append(i)
        if not self.lower:
            raise ValueError(
                "The model has no trainable variable for the lower level "
                "(the adapters' directions and the task head)."
            )
        self.size = len(trainable_variables)
        positions = {id(v): i for i, v in enumerate(optimizer_variables)}
        self.lower_slots = [positions[id(v)] for v in lower_optimizer.variables]
        self.upper_slots = (
            [positions[id(v)] for v in upper_optimizer.variables]
            if upper_optimizer is not None
            else []
        )
        self.iterations_slot = positions[id(iterations)]
        self.lower_variables = [self.trainable_variables[i] for i in self.lower]
        self.upper_variables = [self.trainable_variables[i] for i in self.upper]

    def split(self, values):
        """`(w, m)`: the lower and upper levels' entries of `values`."""
        return [values[i] for i in self.lower], [values[i] for i in self.upper]

    def assemble(self, w, m):
        """The inverse of `split`: one list in the model's variable order."""
        values = [None] * self.size
        for i, value in zip(self.lower, w):
            values[i] = value
        for i, value in zip(self.upper, m):
            values[i] = value
        return values

    def slots(self, level, optimizer_values):
        """The `"lower"` or `"upper"` optimizer's slice of the values."""
        return [optimizer_values[i] for i in self._slot_indices(level)]

    def replace_slots(self, level, optimizer_values, new_values):
        """`optimizer_values` with the level's slice replaced."""
        values = list(optimizer_values)
        for i, value in zip(self._slot_indices(level), new_values):
            values[i] = value
        return values

    def _slot_indices(self, level):
        return self.lower_slots if level == "lower" else self.upper_slots
