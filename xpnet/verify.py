"""`xpnet verify`: every backend checked against the NumPy float64 reference, op by op, on
real data, at every training step.

Method. The reference (NumPy, float64) trains for N steps from the seed. At each step, every
candidate backend runs each op of that step (each layer's forward, the loss, each layer's
backward, each update) on exactly the reference's inputs rounded to the candidate's dtype,
and its result is compared with the reference's. Comparing each step from identical states,
rather than letting each backend train on its own, keeps every bound a one-op bound: float32
runs drift apart step by step through chaotic training, and a bound for that drift would
need a model of the whole trajectory. Since every backend runs the same layer code, ops that
agree at every step on real states mean the runs agree.

Tolerance. A result that sums K terms obeys |computed - exact| <= K * u * sum|terms|
(u = eps / 2, whatever the summation order). Each check passes K and that magnitude
(|x| @ |W|.T + |b| for a forward, and so on) and allows (K + 1) * eps * magnitude, the +1
for the final rounding. Nothing here is tuned: the bound follows from the dtype and the
sums. Ops without arithmetic (gathers, masks) must match exactly.
"""

import dataclasses
from dataclasses import dataclass

import numpy

from xpnet.backends import get_backend
from xpnet.nn.train import TrainConfig, Trainer, seed_lr


def error_bound(dtype, reduction_length, magnitude):
    """The largest error allowed for a result summing reduction_length terms of the given magnitude."""
    return (reduction_length + 1) * numpy.finfo(dtype).eps * numpy.asarray(magnitude, dtype=numpy.float64)


@dataclass
class Check:
    step: int
    op: str
    backend: str
    max_abs: float
    max_rel: float
    bound_used: float  # worst |error| / bound over the elements: <= 1 passes
    tolerance: float  # the bound at that worst element

    @property
    def passed(self):
        return self.bound_used <= 1.0


def compare(step, op, backend_name, got, ref, dtype, reduction_length, magnitude):
    got = numpy.asarray(got, dtype=numpy.float64)
    error = numpy.abs(got - ref)
    bound = error_bound(dtype, reduction_length, magnitude)
    with numpy.errstate(divide="ignore", invalid="ignore"):
        ratio = numpy.where(error == 0, 0.0, error / bound)
        rel = numpy.where(error == 0, 0.0, error / numpy.abs(ref))
    if got.shape != numpy.shape(ref) or not numpy.all(numpy.isfinite(got)):
        ratio = numpy.full(numpy.shape(ref), numpy.inf)
    worst = numpy.unravel_index(numpy.argmax(ratio), numpy.shape(ratio)) if numpy.ndim(ratio) else ()
    return Check(
        step,
        op,
        backend_name,
        float(error.max(initial=0)),
        float(numpy.max(rel, initial=0)),
        float(numpy.max(ratio)),
        float(numpy.broadcast_to(bound, numpy.shape(ratio))[worst]),
    )


def check_step(step, candidate, dtype, reference_model, x, labels, lr):
    """Each op of one SGD step of the candidate, fed the reference's inputs, against the reference."""
    ref, layers, checks = reference_model.backend, reference_model.net.layers, []
    rounded = lambda array: numpy.asarray(array, dtype=numpy.float64).astype(dtype).astype(numpy.float64)
    on_candidate = lambda array: candidate.asarray(array.astype(dtype))

    def check(op, got, expected, reduction_length, magnitude):
        got = candidate.to_numpy(got)
        checks.append(compare(step, op, candidate.name, got, expected, dtype, reduction_length, magnitude))

    # Inputs are rounded to the candidate's dtype once, so the reference sees what it sees.
    params = [(rounded(layer.W.value), rounded(layer.b.value)) for layer in layers]
    inputs, outputs, x = [], [], rounded(x)
    for i, (layer, (W, b)) in enumerate(zip(layers, params)):
        y_ref = ref.linear_forward(x, W, b, layer.relu)
        y = candidate.linear_forward(on_candidate(x), on_candidate(W), on_candidate(b), layer.relu)
        check(f"layer {i + 1} forward", y, y_ref, W.shape[1] + 1, numpy.abs(x) @ numpy.abs(W).T + numpy.abs(b))
        inputs.append(x)
        outputs.append(rounded(y_ref))
        x = outputs[-1]

    logits, (batch, classes) = x, x.shape
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits, labels)
    loss, grad = candidate.softmax_cross_entropy(on_candidate(logits), candidate.asarray(labels))
    shifted = logits - logits.max(axis=1, keepdims=True)
    per_row = numpy.log(numpy.exp(shifted).sum(axis=1)) + numpy.abs(shifted[numpy.arange(batch), labels])
    check("softmax cross-entropy loss", loss, loss_ref, batch + classes + 3, per_row.mean())
    check("softmax cross-entropy grad", grad, grad_ref, classes + 3, numpy.abs(grad_ref) + 1.0 / batch)

    grad_y = rounded(grad_ref)
    for i in reversed(range(len(layers))):
        (W, b), x_in = params[i], inputs[i]
        relu_output = outputs[i] if layers[i].relu else None
        grads_ref = _backward(ref, numpy.float64, x_in, W, grad_y, relu_output, need_x=i > 0)
        candidate_relu = None if relu_output is None else on_candidate(relu_output)
        grads = _backward(candidate, dtype, *map(on_candidate, (x_in, W, grad_y)), candidate_relu, need_x=i > 0)
        masked = numpy.abs(grad_y) * (relu_output > 0) if relu_output is not None else numpy.abs(grad_y)
        magnitudes = [masked.T @ numpy.abs(x_in), masked.sum(axis=0), masked @ numpy.abs(W)]
        for label, got, expected, k, m in zip(
            ["grad W", "grad b", "grad x"], grads, grads_ref, [batch, batch, W.shape[0]], magnitudes
        ):
            check(f"layer {i + 1} backward {label}", got, expected, k, m)
        for label, p, g in (("W", W, rounded(grads_ref[0])), ("b", b, rounded(grads_ref[1]))):
            updated = on_candidate(p)
            candidate.sgd_update(updated, on_candidate(g), lr)
            check(f"layer {i + 1} update {label}", updated, p - lr * g, 2, numpy.abs(p) + lr * numpy.abs(g))
        if i > 0:
            grad_y = rounded(grads_ref[2])
    return checks


def _backward(backend, dtype, x, W, grad_y, relu_output, need_x):
    grad_x = backend.empty(x.shape, dtype) if need_x else None
    grads = backend.linear_backward(x, W, grad_y, grad_x=grad_x, relu_output=relu_output)
    return [g for g in grads if g is not None]


def verify(candidates, data, steps=5, dtype="float32", hidden=(200,), batch_size=512, seed=0, lr=None):
    """All checks of every candidate over `steps` steps of a float64 NumPy training run on
    data (splits, as xpnet.load_dataset gives), from the run's state before each step."""
    lr = seed_lr(batch_size) if lr is None else lr
    config = TrainConfig(batch_size=batch_size, lr=lr, hidden=hidden, seed=seed, dtype="float64")
    reference = Trainer(get_backend("numpy"), data, config)
    twins = compiled_twins(candidates, data, dataclasses.replace(config, dtype=dtype))
    checks = []
    for step in range(1, steps + 1):
        x, y = reference.batch(reference.epoch_step)
        for candidate in candidates:
            checks.extend(check_step(step, candidate, dtype, reference.model, x, y, lr))
        checks.extend(check_compiled_step(step, twins, reference.model, dtype))
        reference.run_steps(1)
    return checks


def compiled_twins(candidates, data, config):
    """For each candidate that compiles its steps: a trainer that does, and one that runs the
    reference loop on the same backend. Made with the reference's seed, they draw the same
    batches in the same order as it does."""
    twins = []
    for candidate in candidates:
        compiled = Trainer(candidate, data, config)
        if compiled.compiled_steps is not None:
            twins.append((compiled, Trainer(candidate, data, config, compiled=False)))
    return twins


def check_compiled_step(step, twins, reference_model, dtype):
    """One compiled step from the reference's state against the candidate's own op-by-op step
    from the same state. The compiled loop calls the same kernels and the same BLAS routines
    with the same arguments, so the two must agree exactly: the op-by-op step's every op is
    checked against the reference above, and this extends that check to the compiled one."""
    checks = []
    for compiled, stepwise in twins:
        for trainer in (compiled, stepwise):
            for mine, theirs in zip(trainer.model.parameters(), reference_model.parameters()):
                mine.value[...] = trainer.backend.asarray(theirs.value, dtype)
            trainer.run_steps(1)
        for got, expected in zip(compiled.model.parameters(), stepwise.model.parameters()):
            got, expected = (compiled.backend.to_numpy(p.value).astype(numpy.float64) for p in (got, expected))
            checks.append(compare(step, "compiled step (exact)", compiled.backend.name, got, expected, dtype, 0, 0.0))
    return checks


def summarize(checks):
    """One Check per (op, backend): the worst over all steps."""
    worst = {}
    for check in checks:
        key = (check.op, check.backend)
        if key not in worst or check.bound_used > worst[key].bound_used:
            worst[key] = check
    return list(worst.values())
