"""The backend interface: every op the layers need, written once in terms of ``self.xp``.

A backend is an object, so several live in one process (that is how the parity tests compare
them). NumPy and CuPy run this code as it is, with their own ``xp``; a faster backend overrides
only the private ``_op`` methods it fuses. Each public op checks its arguments first, here and
so identically on every backend, then calls its ``_op``, which may trust them.

Contracts, the same on every backend (tests/test_backends.py checks their behaviour):

- An op writes only into the arguments it names as outputs: ``out`` and ``grad_out``, the
  ``grad_*`` buffers of ``linear_backward``, ``param`` and ``velocity`` of ``sgd_update`` (and
  ``params`` and ``velocities`` of ``sgd_update_all``), ``param``, ``exp_avg`` and ``exp_avg_sq``
  of ``adam_update``, ``mask_out`` of ``dropout``. Every other argument is left as it was. An
  output left as None is allocated and returned.
- ``asarray`` and ``to_numpy`` always copy: a backend's array never shares memory with a host
  array its caller holds, so writing to one never changes the other.
- An activation is named: "identity" (none), "relu", "tanh", "sigmoid" or "gelu" (ACTIVATIONS);
  a backend fuses it into the layer's forward and backward ops. relu's, tanh's and sigmoid's
  derivatives are known from the output y, which is all their backward pass keeps: y > 0,
  1 - y * y, y * (1 - y). (sigmoid is computed as 0.5 * tanh(z / 2) + 0.5, the same function
  without exp's overflow.) GELU's is not (GELU is not one-to-one): its forward pass also writes
  the pre-activation z into ``pre_out``, and its backward pass reads it (PRE_ACTIVATION).
- Shapes must fit, and the floating arrays of one op share one dtype, float32 or float64:
  nothing is cast silently (cast with ``asarray(a, dtype)``). Labels and row indices are
  integer arrays within [0, classes) and [0, rows). A fault is an ArgumentError (a ValueError)
  naming the argument; on the CPU it is raised by the call, on the GPU by the next read from
  the device (``to_numpy`` or ``synchronize``), since checking sooner would make every step wait.
- Any strided view is accepted (``W.T`` included): a kernel that needs contiguous memory
  handles the others by the base code or a contiguous copy.
- ``count_correct`` counts a row with any NaN logit as wrong: NaN is no prediction.
- ``dropout`` draws its mask from Philox4x32-10 at a ``philox.Draw`` (seed, epoch, step,
  layer), element e from the draw's word e in C order: the same bits on every backend.
"""

import math
from typing import NamedTuple

import numpy

import xpnet.backends.deform as deform
import xpnet.backends.philox as philox
from xpnet.backends.philox import Draw
from xpnet.errors import ArgumentError

FLOAT_DTYPES = (numpy.dtype(numpy.float32), numpy.dtype(numpy.float64))
# The activations a layer's ops fuse, by name; a kernel takes a name's index here as its code.
ACTIVATIONS = ("identity", "relu", "tanh", "sigmoid", "gelu")
# Those whose derivative needs the pre-activation z = x @ W.T + b, not only the output y.
PRE_ACTIVATION = ("gelu",)
# GELU's constants, as every backend's kernels write them: 1 / sqrt(2) and 1 / sqrt(2 pi).
SQRT_HALF, INV_SQRT_2PI = 0.7071067811865476, 0.3989422804014327
_erf = numpy.frompyfunc(math.erf, 1, 1)


def erf64(values):
    """erf of each value in float64: libm's, element by element (NumPy has no erf)."""
    return _erf(values).astype(numpy.float64)


def check_activation(name):
    """name, if it names one of ACTIVATIONS; else ArgumentError listing them."""
    if name not in ACTIVATIONS:
        raise ArgumentError(f"unknown activation {name!r}: choose one of {', '.join(ACTIVATIONS)}")
    return name


def activation_code(name):
    """An activation's code in a kernel (Numba's and CUDA's alike): its index in ACTIVATIONS."""
    return ACTIVATIONS.index(name)


class AdamRule(NamedTuple):
    """Adam's constants, as torch.optim.Adam names them; decoupled: AdamW's weight decay (param
    scaled by 1 - lr * weight_decay), else Adam's (weight_decay * param added to the gradient)."""

    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decoupled: bool


class Declined(NamedTuple):
    """What compile_steps returns for a run its compiled path does not lower, with the reason."""

    reason: str


def _shape_text(shape):
    return "(" + ", ".join(map(str, shape)) + ")"


class Backend:
    """The ops the layers need, in ``self.xp`` code; with xp = numpy, the reference backend."""

    name = "numpy"
    xp = numpy
    # Rows per forward pass when a whole split is evaluated (accuracy, predictions): a chunk's
    # activations stay in a host cache; a GPU backend takes more at once.
    eval_rows = 2048

    # -- placement ------------------------------------------------------------------------
    def asarray(self, host_array, dtype=None):
        """A copy of host_array on this backend, in dtype when given (never an alias of it)."""
        return self.xp.array(host_array, dtype=dtype, copy=True)

    def to_numpy(self, array):
        """A host copy of array, which the caller owns: the only way out, so copies are never silent."""
        return numpy.array(array, copy=True)

    def empty(self, shape, dtype):
        """A new uninitialised array on this backend."""
        return self.xp.empty(shape, dtype=dtype)

    def synchronize(self):
        """Wait until queued work is done; timers call this before reading the clock."""

    def prepare(self, dtype):
        """Compile whatever this backend compiles for dtype; returns the seconds it took."""
        return 0.0

    def compile_steps(self, model, optimizer, data, batch_size):
        """Many training steps in one call: a backends.steps.CompiledSteps for this model,
        optimiser and data (a backends.steps.TrainingData) at this batch size, or Declined, with
        the reason, where this backend has no compiled path or it does not lower this run. The
        trainer then runs the reference loop: the layers calling these ops a step at a time."""
        return Declined(f"the {self.name} backend has no compiled path")

    # -- argument checks: one place, so every backend refuses the same things ---------------
    def _check_range(self, name, values, stop):
        """values must be integers in [0, stop): a kernel indexes with them."""
        if values.size and self._outside(values, stop):
            low, high = int(values.min()), int(values.max())
            raise ArgumentError(f"{name} must lie in [0, {stop}), got values from {low} to {high}")

    def _outside(self, values, stop):
        """Whether any of the (non-empty) values lies outside [0, stop)."""
        return int(values.min()) < 0 or int(values.max()) >= stop

    @staticmethod
    def _check(name, array, shape=None, dtype=None, ndim=None, kind=None):
        """array has the given shape (None entries match anything), dtype, ndim or dtype kind.
        Written for speed: it runs for every argument of every op, a few times per step."""
        try:
            array_dtype, array_shape = array.dtype, array.shape
        except AttributeError:
            raise ArgumentError(f"{name} must be an array, got {type(array).__name__}") from None
        if dtype is not None:
            if array_dtype != dtype:
                raise ArgumentError(
                    f"{name} is {array_dtype} but the op's other arrays are {dtype}; "
                    "nothing is cast silently: convert with backend.asarray(array, dtype)"
                )
        elif kind == "float" and array_dtype not in FLOAT_DTYPES:
            raise ArgumentError(f"{name} must be float32 or float64, got {array_dtype}")
        elif kind == "int" and array_dtype.kind not in "iu":
            raise ArgumentError(f"{name} must hold integers, got {array_dtype}")
        if shape is not None:
            ndim = len(shape)
        if ndim is not None and len(array_shape) != ndim:
            raise ArgumentError(f"{name} must have {ndim} dimensions, got shape {_shape_text(array_shape)}")
        if shape is not None:
            for want, got in zip(shape, array_shape):
                if want is not None and want != got:
                    wanted = _shape_text("*" if want is None else want for want in shape)
                    raise ArgumentError(f"{name} must have shape {wanted}, got {_shape_text(array_shape)}")
        return array

    def _output(self, name, out, shape, dtype):
        """The given output buffer, checked, or a new one."""
        if out is None:
            return self.empty(shape, dtype)
        return self._check(name, out, shape, dtype)

    # -- the ops: check, then compute ------------------------------------------------------
    def take_rows(self, source, indices, out=None):
        """out[i] = source[indices[i]]: the mini-batch gather, done where the data lives."""
        self._check("indices", indices, ndim=1, kind="int")
        if source.ndim < 1:
            raise ArgumentError("source must have at least one dimension (its rows)")
        self._check_range("indices", indices, len(source))
        out = self._output("out", out, (len(indices), *source.shape[1:]), source.dtype)
        return self._take_rows(source, indices, out)

    def _take_rows(self, source, indices, out):
        return self.xp.take(source, indices, axis=0, out=out)

    def linear_forward(self, x, W, b, activation="identity", out=None, pre_out=None):
        """y = f(x @ W.T + b), f the named activation (so a backend may fuse the two); pre_out,
        where given, receives z = x @ W.T + b (for an activation in PRE_ACTIVATION, the array its
        backward pass needs; for the others it is left alone)."""
        n_out, n_in = self._check("W", W, ndim=2, kind="float").shape
        self._check("x", x, (None, n_in), W.dtype)
        self._check("b", b, (n_out,), W.dtype)
        check_activation(activation)
        out = self._output("out", out, (len(x), n_out), W.dtype)
        if pre_out is not None:
            self._check("pre_out", pre_out, out.shape, W.dtype)
        return self._linear_forward(x, W, b, activation, out, pre_out if activation in PRE_ACTIVATION else None)

    def _linear_forward(self, x, W, b, activation, out, pre_out):
        if activation == "gelu":
            z = out if pre_out is None else pre_out
            self.xp.matmul(x, W.T, out=z)
            z += b
            return self._gelu(z, out)
        self.xp.matmul(x, W.T, out=out)
        out += b
        if activation == "relu":
            self.xp.maximum(out, 0, out=out)
        elif activation == "tanh":
            self.xp.tanh(out, out=out)
        elif activation == "sigmoid":
            out *= 0.5
            self.xp.tanh(out, out=out)
            out *= 0.5
            out += 0.5
        return out

    def linear_backward(
        self,
        x,
        W,
        grad_y,
        grad_W=None,
        grad_b=None,
        grad_x=None,
        activation="identity",
        output=None,
        grad_z=None,
        pre_activation=None,
    ):
        """grad_W = g.T @ x, grad_b = sum over rows of g, grad_x = g @ W, with g = grad_z = grad_y * f'(z).

        f is the layer's named activation and output its result y = f(z), from which f' is
        known (relu: y > 0, tanh: 1 - y * y, sigmoid: y * (1 - y)); gelu's comes from
        pre_activation z instead (Phi(z) + z * phi(z), Phi and phi the normal distribution's
        and density); identity needs neither and takes g = grad_y. grad_x is computed only when
        a buffer is passed (the first layer's input gradient has no use); grad_z receives g
        (allocated when None). Returns (grad_W, grad_b, grad_x), grad_x None unless asked for.
        """
        n_out, n_in = self._check("W", W, ndim=2, kind="float").shape
        batch = len(self._check("x", x, (None, n_in), W.dtype))
        self._check("grad_y", grad_y, (batch, n_out), W.dtype)
        grad_W = self._output("grad_W", grad_W, (n_out, n_in), W.dtype)
        grad_b = self._output("grad_b", grad_b, (n_out,), W.dtype)
        if grad_x is not None:
            self._check("grad_x", grad_x, (batch, n_in), W.dtype)
        saved = None  # what f' is computed from: the output, or the pre-activation
        if check_activation(activation) == "identity":
            grad_z = grad_y
        else:
            name, saved = ("pre_activation", pre_activation) if activation in PRE_ACTIVATION else ("output", output)
            if saved is None:
                raise ArgumentError(f"the {activation} layer's backward pass needs its {name.replace('_', '-')}")
            self._check(name, saved, (batch, n_out), W.dtype)
            grad_z = self._output("grad_z", grad_z, (batch, n_out), W.dtype)
        self._linear_backward(x, W, grad_y, grad_W, grad_b, grad_x, activation, saved, grad_z)
        return grad_W, grad_b, grad_x

    def _linear_backward(self, x, W, grad_y, grad_W, grad_b, grad_x, activation, saved, grad_z):
        if activation == "gelu":
            self._gelu_grad(saved, grad_y, grad_z)
        elif activation == "relu":
            self._relu_backward(saved, grad_y, grad_z)
        elif activation == "tanh":  # grad_z = grad_y * (1 - y * y)
            self.xp.multiply(saved, saved, out=grad_z)
            self.xp.subtract(1, grad_z, out=grad_z)
            grad_z *= grad_y
        elif activation == "sigmoid":  # grad_z = grad_y * y * (1 - y)
            self.xp.subtract(1, saved, out=grad_z)
            grad_z *= saved
            grad_z *= grad_y
        self.xp.matmul(grad_z.T, x, out=grad_W)
        self.xp.sum(grad_z, axis=0, out=grad_b)
        if grad_x is not None:
            self.xp.matmul(grad_z, W, out=grad_x)

    def _gelu(self, z, out):
        """out = GELU(z) = z * Phi(z) = 0.5 * z * (1 + erf(z / sqrt(2))), erf's exact form (torch's
        approximate='none'); out may be z."""
        t = z * z.dtype.type(SQRT_HALF)
        self._erf(t, t)
        t += 1
        self.xp.multiply(z, 0.5, out=out)
        out *= t
        return out

    def _gelu_grad(self, z, grad_y, grad_z):
        """grad_z = grad_y * (Phi(z) + z * phi(z)): GELU's derivative, phi(z) = exp(-z^2 / 2) / sqrt(2 pi)."""
        cdf = z * z.dtype.type(SQRT_HALF)
        self._erf(cdf, cdf)
        cdf += 1
        cdf *= 0.5
        pdf = z * z
        pdf *= -0.5
        self.xp.exp(pdf, out=pdf)
        pdf *= z.dtype.type(INV_SQRT_2PI)
        pdf *= z
        cdf += pdf
        return self.xp.multiply(grad_y, cdf, out=grad_z)

    def _erf(self, t, out):
        """out = erf(t) elementwise: libm's, in float64, rounded to t's dtype (NumPy has none; CuPy's
        kernels call CUDA's erf themselves)."""
        out[...] = erf64(t)
        return out

    def relu(self, z, out=None):
        """a = max(z, 0)."""
        self._check("z", z, kind="float")
        return self.xp.maximum(z, 0, out=self._output("out", out, z.shape, z.dtype))

    def relu_backward(self, a, grad_a, out=None):
        """grad_z = grad_a * (a > 0), with a the ReLU's output (a > 0 exactly where z > 0)."""
        self._check("a", a, kind="float")
        self._check("grad_a", grad_a, a.shape, a.dtype)
        return self._relu_backward(a, grad_a, self._output("out", out, a.shape, a.dtype))

    def _relu_backward(self, a, grad_a, out):
        return self.xp.multiply(grad_a, a > 0, out=out)

    def softmax_cross_entropy(self, logits, labels, grad_out=None):
        """Mean cross-entropy of softmax(logits) and its gradient grad = (softmax - onehot) / n.

        Stable for any finite logits: each row's maximum is subtracted before exp, so exp never
        overflows and the log-sum-exp is at least 0. Returns (loss as a 0-d array, grad).
        """
        rows, classes = self._check("logits", logits, ndim=2, kind="float").shape
        self._check("labels", labels, (rows,), kind="int")
        self._check_range("labels", labels, classes)
        grad = self._output("grad_out", grad_out, logits.shape, logits.dtype)
        return self._softmax_cross_entropy(logits, labels, grad), grad

    def _softmax_cross_entropy(self, logits, labels, grad):
        xp = self.xp
        n = logits.shape[0]
        rows = xp.arange(n)
        shifted = logits - logits.max(axis=1, keepdims=True)
        xp.exp(shifted, out=grad)
        sums = grad.sum(axis=1, keepdims=True)
        loss = (xp.log(sums[:, 0]) - shifted[rows, labels]).mean()
        grad /= sums
        grad[rows, labels] -= 1
        grad /= n
        return loss

    def count_correct(self, logits, labels):
        """How many rows' largest logit is at the label, as a 0-d array (stays on the device).
        A row holding a NaN is never correct."""
        rows, classes = self._check("logits", logits, ndim=2, kind="float").shape
        self._check("labels", labels, (rows,), kind="int")
        self._check_range("labels", labels, classes)
        return self._count_correct(logits, labels)

    def _count_correct(self, logits, labels):
        xp = self.xp
        return ((logits.argmax(axis=1) == labels) & ~xp.isnan(logits).any(axis=1)).sum()

    def dropout(self, x, p, draw, out=None, mask_out=None):
        """y = x * m with m = 1 / (1 - p) where the draw's word for the element is at least
        floor(p * 2**32), else 0 (philox.words, C order): inverted dropout, each element of x
        dropped with probability p in [0, 1), the expectation kept. draw is a philox.Draw;
        mask_out receives m, which the backward pass multiplies by. Returns (y, m)."""
        self._check("x", x, kind="float")
        if not (isinstance(p, (float, int, numpy.floating, numpy.integer)) and not isinstance(p, bool) and 0 <= p < 1):
            raise ArgumentError(f"the dropout probability p must be a number in [0, 1), got {p!r}")
        if not isinstance(draw, Draw):
            raise ArgumentError(f"draw must be a philox.Draw (seed, epoch, step, layer), got {type(draw).__name__}")
        draw.check()
        if x.size > philox.MAX_ELEMENTS:
            raise ArgumentError(f"dropout numbers at most {philox.MAX_ELEMENTS} elements a draw, got {x.size}")
        out = self._output("out", out, x.shape, x.dtype)
        mask = self._output("mask_out", mask_out, x.shape, x.dtype)
        self._dropout(x, philox.keep_threshold(p), philox.keep_scale(p, x.dtype), draw, out, mask)
        return out, mask

    def _dropout(self, x, threshold, scale, draw, out, mask):
        keep = philox.words(draw, x.size).reshape(x.shape) >= threshold
        mask[...] = self.xp.asarray(numpy.where(keep, scale, scale.dtype.type(0)))
        return self.xp.multiply(x, mask, out=out)

    def deform_rows(self, source, rows, spec, seed, epoch, background, out=None):
        """out[i] = source[rows[i]] deformed: each row a square image, deformed as deform.deform
        draws it for that image (its row index) in this epoch of a run with this seed, bilinear,
        reading background outside the image. spec is a deform.Deformation. The gather the
        trainer's batches take with deformations."""
        self._check("source", source, ndim=2, kind="float")
        side = math.isqrt(source.shape[1])
        if side * side != source.shape[1] or side > deform.MAX_SIDE:
            raise ArgumentError(
                f"deformations take square images of at most {deform.MAX_SIDE}x{deform.MAX_SIDE} pixels, "
                f"as rows; got rows of {source.shape[1]}"
            )
        self._check("rows", rows, ndim=1, kind="int")
        self._check_range("rows", rows, len(source))
        if not isinstance(spec, deform.Deformation):
            raise ArgumentError(f"spec must be a deform.Deformation, got {type(spec).__name__}")
        spec.check()
        Draw(seed, epoch, 0).check()
        out = self._output("out", out, (len(rows), source.shape[1]), source.dtype)
        return self._deform_rows(source, rows, spec, seed, epoch, float(background), out)

    def _deform_rows(self, source, rows, spec, seed, epoch, background, out):
        images, side = self.to_numpy(source[rows]), math.isqrt(source.shape[1])  # the rows asked for only
        deformed = [
            deform.deform(image.reshape(side, side), spec, seed, epoch, int(row), background).reshape(-1)
            for image, row in zip(images, self.to_numpy(rows))
        ]
        out[...] = self.xp.asarray(numpy.array(deformed, dtype=out.dtype).reshape(out.shape))
        return out

    def dropout_backward(self, grad_y, mask, out=None):
        """grad_x = grad_y * m: y = x * m is linear in x, so the forward pass's mask is the derivative."""
        self._check("grad_y", grad_y, kind="float")
        self._check("mask", mask, grad_y.shape, grad_y.dtype)
        return self.xp.multiply(grad_y, mask, out=self._output("out", out, grad_y.shape, grad_y.dtype))

    def sgd_update(self, param, grad, lr, velocity=None, momentum=0.0, nesterov=False, weight_decay=0.0):
        """param -= lr * step, in place, where g = grad + weight_decay * param and step = g
        (plain), v = momentum * v + g then step = v (momentum) or g + momentum * v (Nesterov),
        as torch.optim.SGD defines them. velocity is needed, and updated in place, only when
        momentum is above 0. grad is left as it was.
        """
        self._check_sgd_arguments(param, grad, velocity, momentum)
        self._sgd_update(param, grad, lr, velocity, momentum, nesterov, weight_decay)

    def _check_sgd_arguments(self, param, grad, velocity, momentum, dtype=None):
        """A param of a float dtype (dtype's, where given: the update's others'), and its grad
        and velocity (with momentum) of its shape and dtype."""
        self._check("param", param, kind="float")
        if dtype is not None:
            self._check("param", param, dtype=dtype)
        self._check("grad", grad, param.shape, param.dtype)
        if momentum:
            if velocity is None:
                raise ArgumentError("momentum needs a velocity buffer shaped like each param (zeros to start)")
            self._check("velocity", velocity, param.shape, param.dtype)

    def sgd_update_all(self, params, grads, lr, velocities=None, momentum=0.0, nesterov=False, weight_decay=0.0):
        """sgd_update of each params[i] from grads[i] (and velocities[i], with momentum), all at
        one rate: a model's whole update, which a backend may take in one launch. The params
        share one dtype."""
        velocities = [None] * len(params) if velocities is None else velocities
        if not len(params) == len(grads) == len(velocities):
            raise ArgumentError(f"{len(params)} params need as many grads and velocities")
        for param, grad, velocity in zip(params, grads, velocities):
            self._check_sgd_arguments(param, grad, velocity, momentum, getattr(params[0], "dtype", None))
        self._sgd_update_all(params, grads, lr, velocities, momentum, nesterov, weight_decay)

    def _sgd_update_all(self, params, grads, lr, velocities, momentum, nesterov, weight_decay):
        for param, grad, velocity in zip(params, grads, velocities):
            self._sgd_update(param, grad, lr, velocity, momentum, nesterov, weight_decay)

    def _sgd_update(self, param, grad, lr, velocity, momentum, nesterov, weight_decay):
        step = grad + weight_decay * param if weight_decay else grad
        if momentum:
            velocity *= momentum
            velocity += step
            step = step + momentum * velocity if nesterov else velocity
        param -= lr * step

    def adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, step, rule):
        """param -= lr * m_hat / (sqrt(v_hat) + eps), in place, where g = grad (+ weight_decay *
        param for Adam; AdamW first scales param by 1 - lr * weight_decay), m = beta1 * m + (1 -
        beta1) * g and v = beta2 * v + (1 - beta2) * g * g (exp_avg and exp_avg_sq, updated in
        place), m_hat = m / (1 - beta1 ** step), v_hat = v / (1 - beta2 ** step), step counted
        from 1: torch.optim.Adam and AdamW, in their order of operations. rule is an AdamRule.
        """
        self._check("param", param, kind="float")
        for name, array in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
            self._check(name, array, param.shape, param.dtype)
        if not (isinstance(step, (int, numpy.integer)) and step >= 1):
            raise ArgumentError(f"step counts Adam's updates from 1, got {step!r}")
        self._adam_update(param, grad, exp_avg, exp_avg_sq, lr, int(step), rule)

    def _adam_update(self, param, grad, exp_avg, exp_avg_sq, lr, step, rule):
        xp = self.xp
        if rule.weight_decay and rule.decoupled:
            param *= 1 - lr * rule.weight_decay
        g = grad + rule.weight_decay * param if rule.weight_decay and not rule.decoupled else grad
        exp_avg *= rule.beta1
        exp_avg += (1 - rule.beta1) * g
        exp_avg_sq *= rule.beta2
        exp_avg_sq += (1 - rule.beta2) * g * g
        denominator = xp.sqrt(exp_avg_sq) / math.sqrt(1 - rule.beta2**step) + rule.eps
        param -= (lr / (1 - rule.beta1**step)) * exp_avg / denominator
