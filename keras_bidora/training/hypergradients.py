"""Hypergradient estimators for the BiDoRA upper level.

The upper level trains the magnitudes `m` on the upper split, along how the
upper loss changes with `m` once the direction `w` has adapted to `m`. Each
estimator takes a `problem` with two stateless losses,

- `problem.lower_loss(w, m, batch) -> (loss, aux)`,
- `problem.upper_loss(w, m, batch) -> (loss, aux)`,

(`w` and `m` lists of tensors) and returns `(upper_loss, hypergradient)`.
They are written once with `keras.ops` on top of the backend's
`value_and_grad` (see `keras_bidora.training.backend`). Every estimator
takes the same arguments; `lower_magnitude_grads` (`grad_m L_low(w, m)`,
which the lower step then computes along with `g`) is used only by the
estimators in `NEEDS_LOWER_MAGNITUDE_GRADS` and ignored by the others.

Cost per upper step, in forward+backward passes of the model:

| estimator       | passes                                   |
|-----------------|------------------------------------------|
| `first_order`   | 1 (upper)                                |
| `darts`         | 3 (upper at the virtual step, lower at   |
|                 | w + eps*v and w - eps*v)                 |
| `darts_forward` | 2 (upper at the virtual step, lower at   |
|                 | w + eps*v)                               |
| `neumann`       | 1 + (terms + 1) double-backward passes   |

The lower gradient `g = grad_w L_low(w, m)` is computed by the lower step and
reused, never recomputed; so is `grad_m L_low(w, m)` for `darts_forward`
(the same backward pass, differentiated in `m` as well).

Reference:
    - [Liu et al., 2019. DARTS: Differentiable Architecture Search](
      https://arxiv.org/abs/1806.09055), equations 7-8.
    - [Lorraine et al., 2020. Optimizing Millions of Hyperparameters by
      Implicit Differentiation](https://arxiv.org/abs/1911.02590).
"""

from keras import ops

from keras_bidora.config import HYPERGRADIENTS

# Estimators that take `lower_magnitude_grads` from the lower step.
NEEDS_LOWER_MAGNITUDE_GRADS = ("darts_forward",)


def _dot(a, b):
    return sum(ops.sum(x * y) for x, y in zip(a, b))


def first_order(
    backend,
    problem,
    w,
    m,
    lower_grads,
    lower_batch,
    upper_batch,
    learning_rate,
    terms=None,
    lower_magnitude_grads=None,
):
    """Gradient of the upper loss in `m` at the current direction `w`."""
    del lower_grads, lower_batch, learning_rate, terms, lower_magnitude_grads

    def loss(m_values):
        return problem.upper_loss(w, m_values, upper_batch)

    (upper_loss, _), grads = backend.value_and_grad(loss)(m)
    return upper_loss, list(grads)


def darts(
    backend,
    problem,
    w,
    m,
    lower_grads,
    lower_batch,
    upper_batch,
    learning_rate,
    terms=None,
    lower_magnitude_grads=None,
):
    """The DARTS second-order approximation of the unrolled hypergradient.

    With `xi` the lower learning rate and `w' = w - xi * g` one plain SGD
    step along the lower gradient `g`, the exact one-step hypergradient is
    `d/dm L_up(w', m) = dL_up/dm(w', m) - xi * d2L_low/dm dw (w, m) . v`,
    `v = dL_up/dw(w', m)`. The mixed second derivative is replaced by the
    central finite difference
    `(dL_low/dm(w + eps v, m) - dL_low/dm(w - eps v, m)) / (2 eps)`,
    `eps = 0.01 / ||v||`.
    """
    del terms, lower_magnitude_grads
    upper_loss, v, direct, eps = _virtual_step(
        backend, problem, w, m, lower_grads, upper_batch, learning_rate
    )
    plus = _lower_grad_m(backend, problem, w, v, eps, m, lower_batch)
    minus = _lower_grad_m(backend, problem, w, v, -eps, m, lower_batch)
    hypergradient = [
        d - learning_rate * (p - q) / (2.0 * eps)
        for d, p, q in zip(direct, plus, minus)
    ]
    return upper_loss, hypergradient


def darts_forward(
    backend,
    problem,
    w,
    m,
    lower_grads,
    lower_batch,
    upper_batch,
    learning_rate,
    terms=None,
    lower_magnitude_grads=None,
):
    """`darts` with a one-sided (forward) finite difference: one pass fewer.

    The mixed second derivative is replaced by
    `(dL_low/dm(w + eps v, m) - dL_low/dm(w, m)) / eps`, `eps = 0.01 / ||v||`
    as in `darts`, where `dL_low/dm(w, m)` is `lower_magnitude_grads`, from
    the lower step's own backward pass. Its error is O(eps) (against
    O(eps^2) for the central difference of `darts`), for 2 passes instead
    of 3 on an upper step.
    """
    del terms
    if lower_magnitude_grads is None:
        raise ValueError(
            "darts_forward reuses the lower step's gradient in the "
            "magnitudes: pass lower_magnitude_grads, grad_m L_low(w, m)."
        )
    upper_loss, v, direct, eps = _virtual_step(
        backend, problem, w, m, lower_grads, upper_batch, learning_rate
    )
    plus = _lower_grad_m(backend, problem, w, v, eps, m, lower_batch)
    hypergradient = [
        d - learning_rate * (p - ops.stop_gradient(q)) / eps
        for d, p, q in zip(direct, plus, lower_magnitude_grads)
    ]
    return upper_loss, hypergradient


def _virtual_step(backend, problem, w, m, lower_grads, upper_batch, rate):
    """The upper pass at `w' = w - rate * g`: `(loss, v, dL_up/dm, eps)`."""
    virtual = [
        wi - rate * ops.stop_gradient(gi) for wi, gi in zip(w, lower_grads)
    ]
    n_w = len(w)

    def upper(params):
        return problem.upper_loss(params[:n_w], params[n_w:], upper_batch)

    (upper_loss, _), grads = backend.value_and_grad(upper)(virtual + list(m))
    v, direct = list(grads[:n_w]), list(grads[n_w:])
    v_norm = ops.sqrt(_dot(v, v))
    eps = 0.01 / ops.maximum(v_norm, 1e-12)
    return upper_loss, v, direct, eps


def _lower_grad_m(backend, problem, w, v, step, m, lower_batch):
    """`grad_m L_low(w + step * v, m)`: one pass."""
    shifted = [wi + step * vi for wi, vi in zip(w, v)]

    def loss(m_values):
        return problem.lower_loss(shifted, m_values, lower_batch)

    return list(backend.value_and_grad(loss)(m)[1])


def neumann(
    backend,
    problem,
    w,
    m,
    lower_grads,
    lower_batch,
    upper_batch,
    learning_rate,
    terms=3,
    lower_magnitude_grads=None,
):
    """Implicit differentiation with a truncated Neumann series.

    `dL_up/dm - d2L_low/dm dw . H^-1 v`, `v = dL_up/dw`, `H = d2L_low/dw2`,
    with `H^-1 ~ xi * sum_{j=0..terms} (I - xi H)^j` (`xi` the lower learning
    rate). Each term is one Hessian-vector product; the mixed products come
    out of the same double-backward passes.
    """
    del lower_grads
    n_w = len(w)

    def upper(params):
        return problem.upper_loss(params[:n_w], params[n_w:], upper_batch)

    (upper_loss, _), grads = backend.value_and_grad(upper)(list(w) + list(m))
    v, direct = list(grads[:n_w]), list(grads[n_w:])

    def products(p):
        # d/d(w, m) of <dL_low/dw, p>: (H p, mixed p) in one pass.
        def inner(params):
            def lower(w_values):
                return problem.lower_loss(w_values, params[n_w:], lower_batch)

            grad_w = backend.value_and_grad(lower, create_graph=True)(
                params[:n_w]
            )[1]
            return _dot(grad_w, [ops.stop_gradient(x) for x in p]), ()

        result = backend.value_and_grad(inner)(list(w) + list(m))[1]
        return list(result[:n_w]), list(result[n_w:])

    p = v
    mixed_sum = [ops.zeros_like(x) for x in m]
    for term in range(terms + 1):
        hessian_p, mixed_p = products(p)
        mixed_sum = [a + b for a, b in zip(mixed_sum, mixed_p)]
        if term < terms:
            p = [pi - learning_rate * hi for pi, hi in zip(p, hessian_p)]
    hypergradient = [d - learning_rate * s for d, s in zip(direct, mixed_sum)]
    return upper_loss, hypergradient


def get(name):
    """Returns the estimator function named `name`."""
    estimators = {
        "first_order": first_order,
        "darts": darts,
        "darts_forward": darts_forward,
        "neumann": neumann,
    }
    if name not in estimators:
        raise ValueError(
            f"hypergradient must be one of {HYPERGRADIENTS}. "
            f"Received: hypergradient={name!r}"
        )
    return estimators[name]
