"""Room on Python's frame stack for a deep call that runs every step.

CPython (3.11 on) keeps Python frames in chunks of 16 KiB and, before the
fix of python/cpython#142183 (a cached chunk, backported to 3.13 and 3.14
in March 2026), frees a chunk as soon as the first frame in it returns.
A loop whose calls cross the end of a chunk then maps and unmaps a chunk on
every call (an `mmap`, a page fault and a `munmap`). An eager torch train
step makes some 100,000 Python calls through Keras's layers; depending only
on the depth it starts at, up to about 2,000 of them a step crossed a
chunk's end (a MiniLM `first_order` step inside `fit`: about 500-1,200, a
quarter of its time at batch 1 x 8 on 2 CPU cores).

`call_with_room(fn, *args)` calls `fn` from a frame of 64 KiB. No 16 KiB
chunk can hold it, so CPython gives it a fresh chunk of 128 KiB, and the
frames `fn` pushes have the other 64 KiB to themselves, whatever the depth
of the caller: they cross no chunk's end unless they need more room (a
MiniLM train step needs less than 32 KiB). Each call maps one chunk.
"""

# 8-byte slots: 64 KiB. The frame reserves them as evaluation-stack space,
# which CPython neither initializes nor touches beyond what the code uses.
ROOM_SLOTS = 8192


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


_call.__code__ = _call.__code__.replace(co_stacksize=ROOM_SLOTS)


def call_with_room(fn, *args, **kwargs):
    """Returns `fn(*args, **kwargs)`, called at the start of a 128 KiB chunk.

    Args:
        fn: any callable.
        *args: its positional arguments.
        **kwargs: its keyword arguments.

    Returns:
        What `fn` returns; what it raises propagates unchanged.

    Example:

    >>> call_with_room(max, 3, 7)
    7
    """
    return _call(fn, *args, **kwargs)
