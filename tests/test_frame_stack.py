"""Tests of `keras_bidora.training.frame_stack` and the backends' `call_step`.

The reference is CPython's own behaviour, counted in minor page faults: a
loop of calls that cross the end of a frame-stack chunk maps (and faults
on) a fresh chunk per call on the CPython versions without the fix of
python/cpython#142183; called through `call_with_room`, the same loop at
the same caller depth maps one chunk per call of the wrapper.
"""

import resource
import sys

import keras
import pytest

from keras_bidora.training import backend as backend_lib
from keras_bidora.training.frame_stack import call_with_room

LOOP = 1000
# Caller depths to scan: the loop's calls cross a chunk's end at one of
# them at least (a chunk is 16 KiB; these frames take about 100 bytes).
DEPTHS = range(0, 240)


def _faults():
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _add(a, b):
    return a + b


def _loop(n):
    total = 0
    for i in range(n):
        total = _add(total, i)
    return total


def _down(depth, n):
    return _loop(n) if depth == 0 else _down(depth - 1, n)


def _most_faults(call):
    """The most page faults of `LOOP` calls at any caller depth in DEPTHS."""
    most = 0
    for depth in DEPTHS:
        before = _faults()
        total = call(_down, depth, LOOP)
        most = max(most, _faults() - before)
        assert total == LOOP * (LOOP - 1) // 2
    return most


def _plain(fn, *args):
    return fn(*args)


def test_returns_what_the_function_returns():
    assert call_with_room(divmod, 17, 5) == (3, 2)
    assert call_with_room(sorted, [3, 1, 2], reverse=True) == [3, 2, 1]
    assert call_with_room(_down, 100, 10) == 45


def test_raises_what_the_function_raises():
    def fail(value):
        raise KeyError(value)

    with pytest.raises(KeyError, match="missing"):
        call_with_room(fail, "missing")


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts Linux page faults"
)
def test_a_loop_at_any_depth_maps_no_chunk_per_call():
    baseline = _most_faults(_plain)
    with_room = _most_faults(call_with_room)
    if sys.version_info[:2] in ((3, 11), (3, 12)):
        # Without the fix, one of the depths maps a chunk on every call:
        # the workload reaches what `call_with_room` is for.
        assert baseline >= LOOP // 2, baseline
    # One 128 KiB chunk per call of the wrapper: a few pages, never a page
    # per call of the loop.
    assert with_room < 50, (with_room, baseline)


def test_call_step_calls_the_step():
    call_step = backend_lib.get().call_step
    assert call_step(_down, 30, 10) == 45
    assert call_step(divmod, 17, 5) == (3, 2)


@pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="counts Linux page faults"
)
def test_eager_torch_runs_a_step_with_room():
    if keras.config.backend() != "torch":
        pytest.skip("JAX and TensorFlow run a step's Python once, traced")
    assert _most_faults(backend_lib.get().call_step) < 50
