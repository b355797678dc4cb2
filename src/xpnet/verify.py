"""`xpnet verify`: every backend checked against the NumPy float64 reference, op by op, on
real data, at every training step.

At each step of the reference run every candidate runs each op on exactly the reference's inputs
rounded to its dtype, so every bound is a one-op bound. A result summing K terms may differ by
(K + 1) * eps * sum|terms|, the +1 for the final rounding; ops without arithmetic must match
exactly. Nothing is tuned. Why comparing from identical states suffices, and how each bound is
counted: docs/design.md, "Verification".
"""

import dataclasses
import math
from dataclasses import dataclass

import numpy

from xpnet.backends import deform, get_backend
from xpnet.backends.base import PRE_ACTIVATION, AdamRule, erf64
from xpnet.nn.config import TrainConfig, seed_lr
from xpnet.nn.train import Trainer


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


def check_step(step, candidate, dtype, reference_model, x, labels, lr, draw=None):
    """Each op of one SGD step of the candidate, fed the reference's inputs, against the reference;
    draw is the step's philox.Draw where the model has dropout."""
    ref, layers, checks = reference_model.backend, reference_model.linear_layers, []
    p = reference_model.dropout if draw is not None else 0.0
    rounded = lambda array: numpy.asarray(array, dtype=numpy.float64).astype(dtype).astype(numpy.float64)
    on_candidate = lambda array: candidate.asarray(array.astype(dtype))

    def check(op, got, expected, reduction_length, magnitude):
        got = candidate.to_numpy(got)
        checks.append(compare(step, op, candidate.name, got, expected, dtype, reduction_length, magnitude))

    # Inputs are rounded to the candidate's dtype once, so the reference sees what it sees.
    params = [(rounded(layer.W.value), rounded(layer.b.value)) for layer in layers]
    inputs, saved, x = [], [], rounded(x)  # saved: what each backward pass reads (y, or z for gelu)
    masks = {}  # each dropout layer's (the reference's mask, the candidate's), by layer
    for i, (layer, (W, b)) in enumerate(zip(layers, params)):
        z_ref = ref.linear_forward(x, W, b)
        y_ref = ref.linear_forward(x, W, b, layer.activation)
        y = candidate.linear_forward(on_candidate(x), on_candidate(W), on_candidate(b), layer.activation)
        magnitude = numpy.abs(x) @ numpy.abs(W).T + numpy.abs(b)
        bound = forward_bound(layer.activation, y_ref, magnitude, W.shape[1] + 1, z_ref)
        check(f"layer {i + 1} forward", y, y_ref, *bound)
        inputs.append(x)
        saved.append(rounded(z_ref if layer.activation in PRE_ACTIVATION else y_ref))
        x = rounded(y_ref)
        if p and i < len(layers) - 1:
            # The mask must match bit for bit; y * m rounds the scale 1 / (1 - p) and the product.
            y_ref, mask_ref = ref.dropout(x, p, draw._replace(layer=i))
            y, mask = candidate.dropout(on_candidate(x), p, draw._replace(layer=i))
            check(f"layer {i + 1} dropout mask", mask != 0, mask_ref != 0, 0, 0.0)
            check(f"layer {i + 1} dropout", y, y_ref, 1, numpy.abs(y_ref))
            masks[i] = mask_ref, mask
            x = rounded(y_ref)

    logits, (batch, classes) = x, x.shape
    loss_ref, grad_ref = ref.softmax_cross_entropy(logits, labels)
    loss, grad = candidate.softmax_cross_entropy(on_candidate(logits), candidate.asarray(labels))
    check("softmax cross-entropy loss", loss, loss_ref, batch + classes + 3, loss_magnitude(logits, labels))
    check("softmax cross-entropy grad", grad, grad_ref, classes + 3, numpy.abs(grad_ref) + 1.0 / batch)

    grad_y = rounded(grad_ref)
    for i in reversed(range(len(layers))):
        (W, b), x_in = params[i], inputs[i]
        if i in masks:
            grad_y_ref = ref.dropout_backward(grad_y, masks[i][0])
            got = candidate.dropout_backward(on_candidate(grad_y), masks[i][1])
            check(f"layer {i + 1} dropout backward", got, grad_y_ref, 1, numpy.abs(grad_y_ref))
            grad_y = rounded(grad_y_ref)
        activation = layers[i].activation
        grads_ref = _backward(ref, numpy.float64, x_in, W, grad_y, saved[i], activation, need_x=i > 0)
        on = map(on_candidate, (x_in, W, grad_y, saved[i]))
        grads = _backward(candidate, dtype, *on, activation=activation, need_x=i > 0)
        roundings, size = activation_grad_carried(activation, grad_y, saved[i])
        magnitudes = [size.T @ numpy.abs(x_in), size.sum(axis=0), size @ numpy.abs(W)]
        lengths = [batch + roundings, batch + roundings, W.shape[0] + roundings]
        for label, got, expected, k, m in zip(["grad W", "grad b", "grad x"], grads, grads_ref, lengths, magnitudes):
            check(f"layer {i + 1} backward {label}", got, expected, k, m)
        for label, p, g in (("W", W, rounded(grads_ref[0])), ("b", b, rounded(grads_ref[1]))):
            updated = on_candidate(p)
            candidate.sgd_update(updated, on_candidate(g), lr)
            check(f"layer {i + 1} update {label}", updated, p - lr * g, 2, numpy.abs(p) + lr * numpy.abs(g))
            check(f"layer {i + 1} adamw update {label}", *adam_step(ref, candidate, on_candidate, rounded, p, g))
        if i > 0:
            grad_y = rounded(grads_ref[2])
    return checks


# Adam's constants for verify's check (AdamW's decay, so that both of its terms are exercised),
# a rate of Adam's usual size, and the step checked: the third, after gradients g/2 and g/3.
ADAM_RULE = AdamRule(beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, decoupled=True)
ADAM_LR, ADAM_STEP = 1e-3, 3


def adam_step(ref, candidate, on_candidate, rounded, p, g):
    """(the candidate's parameter after one adam_update, the float64 reference's, the reduction
    length and magnitude of its bound), from moments that earlier gradients g/2 and g/3 left.
    Each of the update's quantities passes through at most 14 roundings (decay 2, each moment
    2 and the square 1, the root and its correction 2, eps 1, the step size 2, the product and
    quotient 2, the subtraction 1; sqrt and division are correctly rounded), each relative to
    |p| + lr * |m_hat| / (sqrt(v_hat) + eps), the size of what is summed."""
    b1, b2 = ADAM_RULE.beta1, ADAM_RULE.beta2
    m = rounded(b1 * ((1 - b1) * g / 2) + (1 - b1) * g / 3)
    v = rounded(b2 * ((1 - b2) * (g / 2) ** 2) + (1 - b2) * (g / 3) ** 2)
    arrays = [p, g, m, v]
    expected = [array.copy() for array in arrays]
    ref.adam_update(*expected, ADAM_LR, ADAM_STEP, ADAM_RULE)
    got = [on_candidate(array) for array in arrays]
    candidate.adam_update(*got, ADAM_LR, ADAM_STEP, ADAM_RULE)
    m_hat, v_hat = expected[2] / (1 - b1**ADAM_STEP), expected[3] / (1 - b2**ADAM_STEP)
    ratio = numpy.abs(m_hat) / (numpy.sqrt(v_hat) + ADAM_RULE.eps)
    return got[0], expected[0], 14, numpy.abs(p) + ADAM_LR * (ratio + ADAM_RULE.weight_decay * numpy.abs(p))


def loss_magnitude(logits, labels):
    """The mean over rows of log(sum exp(shifted)) + |shifted[label]|: what the loss's roundings scale with."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    per_row = numpy.log(numpy.exp(shifted).sum(axis=1)) + numpy.abs(shifted[numpy.arange(len(labels)), labels])
    return per_row.mean()


def _backward(backend, dtype, x, W, grad_y, saved, activation, need_x):
    """linear_backward's gradients, saved being the output y, or z for gelu (each reads its own)."""
    grad_x = backend.empty(x.shape, dtype) if need_x else None
    grads = backend.linear_backward(
        x, W, grad_y, grad_x=grad_x, activation=activation, output=saved, pre_activation=saved
    )
    return [g for g in grads if g is not None]


def gelu(z):
    """GELU in float64, erf's exact form: z * Phi(z)."""
    return 0.5 * z * (1 + erf64(z / math.sqrt(2)))


def gelu_derivative(z):
    """Phi(z) + z * phi(z), in float64."""
    density = numpy.exp(-0.5 * z * z) / math.sqrt(2 * math.pi)
    return 0.5 * (1 + erf64(z / math.sqrt(2))) + z * density


# Each activation in float64, and the roundings its own evaluation adds to a forward result: the
# documented maximum error of tanh is 2 ulp in glibc's libm (x86-64, "Known Maximum Errors in Math
# Functions") and in CUDA's tanh and tanhf (its Programming Guide's table of accuracy); sigmoid,
# 0.5 * tanh(z / 2) + 0.5, adds one rounding to that (its halvings are exact). GELU's count is of
# eps relative to |z|, not |y| (forward_bound): 0.5 * z * (1 + erf(z * c)) loses erf's relative
# accuracy in 1 + erf where erf nears -1. With erf's 2 ulp (glibc: 1; CUDA's erf and erff: 2), t = z
# * c's two roundings carried through erf (slope <= 1.13 at |t| e^-t^2 <= 0.43) and 1 + erf's,
# 1 + erf is within 7u, so y within 3.5u |z| + u |y| <= 2.25 eps |z|: 5 counts the candidate's and,
# in float64, the reference's own.
ACTIVATION_FUNCTIONS = {
    "identity": (lambda z: z, 0),
    "relu": (lambda z: numpy.maximum(z, 0), 0),
    "tanh": (numpy.tanh, 2),
    "sigmoid": (lambda z: 0.5 * numpy.tanh(0.5 * z) + 0.5, 3),
    "gelu": (gelu, 5),
}


def activation_grad(activation, grad_y, saved):
    """grad_y * f'(z) in float64, from what the backward pass keeps: the layer's output y = f(z),
    or for gelu the pre-activation z. What a backward pass's activation step gives (for relu
    exactly: a mask)."""
    if activation == "relu":
        return grad_y * (saved > 0)
    if activation == "tanh":
        return (1 - saved * saved) * grad_y
    if activation == "sigmoid":
        return (1 - saved) * saved * grad_y
    if activation == "gelu":
        return gelu_derivative(saved) * grad_y
    return grad_y


def activation_grad_bound(activation, grad_y, saved):
    """(reduction length, magnitude) of an activation step's bound: relu's mask is exact; tanh's
    and sigmoid's products and difference round three times, each relative to their terms.
    GELU's derivative d = Phi(z) + z phi(z) is within 6.6u (Phi's 1 + erf as in the forward pass,
    3.5u; z * phi(z), its exp's 2 ulp and four roundings, 1.9u; the sum, 1.2u), so g = grad_y * d
    within 7.7u |grad_y| < 4 eps |grad_y|: the candidate's and a float64 reference's, 8 counts."""
    if activation == "tanh":
        return 2, (1 + saved * saved) * numpy.abs(grad_y)
    if activation == "sigmoid":
        return 2, (1 + numpy.abs(saved)) * numpy.abs(saved) * numpy.abs(grad_y)
    if activation == "gelu":
        return 7, (1 + numpy.abs(gelu_derivative(saved))) * numpy.abs(grad_y)
    return 0, 0.0


def activation_grad_carried(activation, grad_y, output):
    """(roundings, size) that an activation step's g = grad_y * f'(z) carries into the sums
    taken over it: its own roundings (none for a mask) and the size they are relative to, at
    least |g|."""
    length, size = activation_grad_bound(activation, grad_y, output)
    if not length:
        return 0, numpy.abs(activation_grad(activation, grad_y, output))
    return length + 1, size


def forward_bound(activation, y, magnitude, terms, z=None):
    """(reduction length, magnitude) of a forward check of output y = f(z): the product's terms
    and bias, then the activation's own roundings, relative to |y| as well (to |z| for gelu,
    whose z must be passed)."""
    roundings = ACTIVATION_FUNCTIONS[activation][1]
    size = numpy.abs(z if activation in PRE_ACTIVATION else y)
    return terms + roundings, magnitude + (size if roundings else 0.0)


def verify(
    candidates,
    data,
    steps=5,
    dtype="float32",
    hidden=(200,),
    batch_size=512,
    seed=0,
    lr=None,
    activation="relu",
    dropout=0.0,
    augment="none",
):
    """All checks of every candidate over `steps` steps of a float64 NumPy training run on
    data (splits, as xpnet.load_dataset gives), from the run's state before each step."""
    lr = seed_lr(batch_size) if lr is None else lr
    settings = {"activation": activation, "dropout": dropout, "augment": augment}
    config = TrainConfig(batch_size=batch_size, lr=lr, hidden=hidden, seed=seed, dtype="float64", **settings)
    reference = Trainer(get_backend("numpy"), data, config)
    compiled = compiled_trainers(candidates, data, dataclasses.replace(config, dtype=dtype))
    checks = []
    deformed = DeformedBatches(reference, candidates, dtype)
    for step in range(1, steps + 1):
        x, y = reference.batch(reference.epoch_step)
        checks.extend(deformed.check(step))
        for candidate in candidates:
            draw = reference.draw_at(reference.epoch_step)
            checks.extend(check_step(step, candidate, dtype, reference.model, x, y, lr, draw))
        for trainer in compiled:
            checks.extend(check_compiled_step(step, trainer, reference.model, y))
        reference.run_steps(1)
    return checks


class DeformedBatches:
    """The deformation step of each candidate: the reference run's next batch deformed from its
    training images rounded to the candidate's dtype (moved to each candidate once), against
    deform.deform in float64 on the same rounded images, within deform.error_bound."""

    def __init__(self, reference, candidates, dtype):
        self.reference, self.dtype = reference, numpy.dtype(dtype)
        if reference.deformation is None:
            self.candidates = []
            return
        self.images = reference.backend.to_numpy(reference.train_x).astype(dtype)
        self.background = float(self.dtype.type(reference.background))
        self.candidates = [(candidate, candidate.asarray(self.images)) for candidate in candidates]

    def check(self, step):
        if not self.candidates:
            return []
        run, side = self.reference, math.isqrt(self.images.shape[1])
        rows = run.backend.to_numpy(run.rows(run.epoch_step))
        spec, seed, epoch = run.deformation, run.config.seed, run.epoch
        expected = numpy.array(
            [deform.deform(self.images[r].reshape(side, side), spec, seed, epoch, r, self.background) for r in rows]
        ).reshape(len(rows), -1)
        bound = deform.error_bound(self.dtype, expected, self.images[rows], self.background, spec)
        checks = []
        for candidate, images in self.candidates:
            got = candidate.deform_rows(images, candidate.asarray(rows), spec, seed, epoch, self.background)
            # compare's bound is (0 + 1) * eps * magnitude: the magnitude that makes it error_bound.
            magnitude = bound / numpy.finfo(self.dtype).eps
            checks.append(
                compare(
                    step, "deformed batch", candidate.name, candidate.to_numpy(got), expected, self.dtype, 0, magnitude
                )
            )
        return checks


def compiled_trainers(candidates, data, config):
    """A trainer for each candidate that compiles its steps. Made with the reference's seed, each
    draws the same batches in the same order as it does."""
    trainers = [Trainer(candidate, data, config) for candidate in candidates]
    return [trainer for trainer in trainers if trainer.compiled_steps is not None]


def check_compiled_step(step, trainer, reference_model, labels):
    """One compiled step from the reference's weights, checked op by op from what its buffers hold
    after it: each op's result against float64 arithmetic on the compiled step's own inputs to
    that op, within the same one-op bounds as above; the update by the trainer's own optimiser
    (its options and velocity) at its scheduled rate. The compiled loop cannot be fed the
    reference's inputs op by op; checking each op on its own inputs bounds each op alike."""
    backend, dtype, checks, optimizer = trainer.backend, trainer.model.dtype, [], trainer.optimizer
    host = lambda array: numpy.asarray(backend.to_numpy(array), dtype=numpy.float64)  # noqa: E731

    def check(op, got, expected, reduction_length, magnitude):
        checks.append(compare(step, f"compiled {op}", backend.name, got, expected, dtype, reduction_length, magnitude))

    before = []
    for mine, theirs in zip(trainer.model.parameters(), reference_model.parameters()):
        mine.value[...] = backend.asarray(theirs.value, dtype)
        before.append(host(mine.value))
    velocities = [host(v) for v in optimizer.state.get("velocity", [])]
    k, lr = trainer.epoch_step, optimizer.current_lr()
    own_x = host(trainer.batch(k)[0])  # the rows of the trainer's own data (normalised in its dtype)
    trainer.run_steps(1)
    buffers = trainer.compiled_steps.buffers
    after = [host(p.value) for p in trainer.model.parameters()]
    batch, layers = len(labels), trainer.model.linear_layers
    inputs = [host(buffers.inputs[:batch]), *(host(out[:batch]) for out in buffers.outputs)]
    check("gather", inputs[0], own_x, 0, 0.0)
    for i, layer in enumerate(layers):
        W, b, x = before[2 * i], before[2 * i + 1], inputs[i]
        magnitude = numpy.abs(x) @ numpy.abs(W).T + numpy.abs(b)
        expected = ACTIVATION_FUNCTIONS[layer.activation][0](x @ W.T + b)
        bound = forward_bound(layer.activation, expected, magnitude, W.shape[1] + 1)
        check(f"layer {i + 1} forward", inputs[i + 1], expected, *bound)

    logits, classes = inputs[-1], inputs[-1].shape[1]
    loss_ref, grad_ref = reference_model.backend.softmax_cross_entropy(logits, labels)
    loss = host(trainer.step_losses[k : k + 1])[0]
    check("softmax cross-entropy loss", loss, loss_ref, batch + classes + 3, loss_magnitude(logits, labels))
    grad_y = host(buffers.grads_y[-1][:batch])
    check("softmax cross-entropy grad", grad_y, grad_ref, classes + 3, numpy.abs(grad_ref) + 1.0 / batch)

    for i in reversed(range(len(layers))):
        W, b, x = before[2 * i], before[2 * i + 1], inputs[i]
        activation = layers[i].activation
        grad_z = activation_grad(activation, grad_y, inputs[i + 1])
        roundings, grad_z_size = activation_grad_carried(activation, grad_y, inputs[i + 1])
        if activation != "identity":
            bound = activation_grad_bound(activation, grad_y, inputs[i + 1])
            check(f"layer {i + 1} backward {activation} gradient", host(buffers.grads_z[i][:batch]), grad_z, *bound)
        if i > 0:
            grad_y = host(buffers.grad_x(i)[:batch])
            magnitude = grad_z_size @ numpy.abs(W)
            check(f"layer {i + 1} backward grad x", grad_y, grad_z @ W, W.shape[0] + roundings, magnitude)
        gradients = {
            "W": (grad_z.T @ x, grad_z_size.T @ numpy.abs(x)),
            "b": (grad_z.sum(0), grad_z_size.sum(0)),
        }
        for j, (name, (grad, grad_magnitude)) in zip((2 * i, 2 * i + 1), gradients.items()):
            velocity = velocities[j] if velocities else None
            expected, magnitude, new_velocity = sgd_reference(optimizer, before[j], grad, grad_magnitude, lr, velocity)
            # The gradient's roundings (batch terms, and grad_z's own) and the update's, at most eight.
            check(f"layer {i + 1} update {name}", after[j], expected, batch + roundings + 8, magnitude)
            if new_velocity is not None:
                got, (expected, magnitude) = host(optimizer.state["velocity"][j]), new_velocity
                check(f"layer {i + 1} velocity {name}", got, expected, batch + roundings + 8, magnitude)
    return checks


def sgd_reference(optimizer, param, grad, grad_magnitude, lr, velocity):
    """torch.optim.SGD's update of param in float64 with the optimiser's options, the magnitude
    its roundings scale with, and (the new velocity, its magnitude) with momentum, else None."""
    momentum, decay = optimizer.momentum, optimizer.weight_decay
    step, magnitude = grad + decay * param, grad_magnitude + decay * numpy.abs(param)
    new_velocity = None
    if momentum:
        velocity, velocity_magnitude = momentum * velocity + step, momentum * numpy.abs(velocity) + magnitude
        new_velocity = velocity, velocity_magnitude
        if optimizer.nesterov:
            step, magnitude = step + momentum * velocity, magnitude + momentum * velocity_magnitude
        else:
            step, magnitude = velocity, velocity_magnitude
    return param - lr * step, numpy.abs(param) + lr * magnitude, new_velocity


def summarize(checks):
    """One Check per (op, backend): the worst over all steps."""
    worst = {}
    for check in checks:
        key = (check.op, check.backend)
        if key not in worst or check.bound_used > worst[key].bound_used:
            worst[key] = check
    return list(worst.values())
