"""Each optimiser's update as the Numba backend's compiled loop runs it: its rule, lowered.

lower(optimizer) turns an optimiser object into a rule, a NamedTuple of its settings and state
arrays, or None where its exact type has no lowering here (the loop then declines the run).
update_rows(rule, ...) is what the loop calls for a block of a layer's rows; the rule's type
picks the implementation when the loop is compiled (UPDATES), so the loop itself names no
optimiser. To add one: a rule type, its update kernel, and an entry in LOWERED and UPDATES.
"""

from typing import NamedTuple

from numba import njit
from numba.extending import overload

from xpnet.backends.numba_kernels import product, sgd_update
from xpnet.nn.optim import SGD


class SGDRule(NamedTuple):
    """torch.optim.SGD's update (momentum, Nesterov, weight decay), with the layers' velocities."""

    momentum: float
    nesterov: bool
    weight_decay: float
    velocity_weights: tuple
    velocity_biases: tuple


def lower_sgd(optimizer):
    # Without momentum no velocity exists; the parameters stand in, typed alike and never read.
    velocities = optimizer.state.get("velocity") or [p.value for p in optimizer.parameters]
    momentum, weight_decay = float(optimizer.momentum), float(optimizer.weight_decay)
    return SGDRule(momentum, bool(optimizer.nesterov), weight_decay, tuple(velocities[0::2]), tuple(velocities[1::2]))


# Not cached on its own: a copy cached against this file would keep inlining numba_kernels as
# they were when it was built. The loop that calls it is cached, keyed by both files' digest.
@njit(nogil=True)
def sgd_update_rows(rule, blas, layer, w0, w1, W, grad_W, b, grad_b, grad_z, x, lr):
    """Rows w0:w1 of the layer's W and b, from grad_W = grad_z.T @ x (grad_z holds those rows'
    columns of the output gradient) and grad_b. Without momentum the update is the product's own:
    W <- (1 - lr * decay) * W - lr * grad_z.T @ x is one gemm with alpha -lr and beta 1 - lr * decay,
    so no gradient is written and read back, and no update pass runs."""
    if rule.momentum == 0:
        product(blas, grad_z, True, x, False, W[w0:w1], -lr, 1.0 - lr * rule.weight_decay)
    else:
        product(blas, grad_z, True, x, False, grad_W[w0:w1], 1.0, 0.0)
        for r in range(w0, w1):
            velocity = rule.velocity_weights[layer][r]
            sgd_update(W[r], grad_W[r], lr, velocity, rule.momentum, rule.nesterov, rule.weight_decay)
    velocity = rule.velocity_biases[layer][w0:w1]
    sgd_update(b[w0:w1], grad_b[w0:w1], lr, velocity, rule.momentum, rule.nesterov, rule.weight_decay)


# By exact type: a subclass may change the rule, so it is never lowered as its parent.
LOWERED = {SGD: lower_sgd}
UPDATES = {SGDRule: sgd_update_rows}


def lower(optimizer):
    """The optimiser's rule for the loop, or None where its exact type has no lowering."""
    lowering = LOWERED.get(type(optimizer))
    return None if lowering is None else lowering(optimizer)


def update_rows(rule, blas, layer, w0, w1, W, grad_W, b, grad_b, grad_z, x, lr):
    """Apply the rule to rows w0:w1 of a layer (compiled code only: see UPDATES)."""
    raise NotImplementedError("update_rows runs inside the compiled loop only")


@overload(update_rows)
def _update_rows_for(rule, blas, layer, w0, w1, W, grad_W, b, grad_b, grad_z, x, lr):
    update = UPDATES.get(getattr(rule, "instance_class", None))
    if update is not None:
        return lambda rule, blas, layer, w0, w1, W, grad_W, b, grad_b, grad_z, x, lr: update(
            rule, blas, layer, w0, w1, W, grad_W, b, grad_b, grad_z, x, lr
        )
