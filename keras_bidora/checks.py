"""Argument checks shared by the layer, the model, the recipe and the data.

Each refuses a bad value with a `ValueError` that names the argument and
quotes what it received, before anything is changed.
"""

import numbers


def check_count(name, value, minimum, allow_none=False):
    """Returns `value` as an `int` if it is an integer of at least `minimum`.

    Python and NumPy integers are counts; bools, floats and strings are not
    (`True` is not 1 epoch).

    Args:
        name: the argument's name, for the error.
        value: what was received.
        minimum: the smallest count allowed.
        allow_none: whether None is allowed too (and returned as is).

    Returns:
        `int(value)`, or None where `value` is None and that is allowed.

    Raises:
        ValueError: naming `name` and quoting `value`, otherwise.

    Example:

    >>> import numpy as np
    >>> check_count("rank", np.int64(8), 1)
    8
    >>> check_count("limit", None, 1, allow_none=True) is None
    True
    """
    if value is None and allow_none:
        return None
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Integral)
        or value < minimum
    ):
        expected = f"an integer >= {minimum}"
        if allow_none:
            expected += " or None"
        raise ValueError(
            f"{name} must be {expected}. Received: {name}={value!r}"
        )
    return int(value)
