import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def quick_jax_compilation():
    """Skips XLA's optimisation passes on JAX.

    The tests' tiny models cost mostly compilation (every initializer and
    every eager op compiles once per shape); XLA's optimisations do not pay
    for themselves on them. Benchmarks and users keep them.
    """
    if keras.config.backend() != "jax":
        yield
        return
    import jax

    previous = jax.config.read("jax_disable_most_optimizations")
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", previous)


@pytest.fixture(autouse=True)
def clear_session():
    keras.config.set_dtype_policy("float32")
    keras.utils.clear_session()
    yield
    keras.config.set_dtype_policy("float32")
