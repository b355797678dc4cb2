"""`xpnet bench`: run the measurements of xpnet.bench and present them as a table, JSON and
Markdown. The JSON schema (version "xpnet-bench/1") is documented in bench/README.md."""

import importlib.util
import json
import os
import platform
import sys

from rich.markup import escape
from rich.table import Table

from xpnet.atomic import write_text
from xpnet.bench import N_SAMPLES, SGD_RELU, Result, agreement, backend_contender, floor_contender, measure
from xpnet.bench_peers import GPU_ONLY_PEERS, TORCH_COMPILE_MODES, TORCH_STEP_GRAPH, jax_contenders, torch_peer
from xpnet.commands import console as wide_console

SCHEMA = "xpnet-bench/1"
COLUMNS = [
    "name",
    "hidden",
    "batch",
    "samples/s",
    "epoch ms",
    "spread",
    "x numpy",
    "of floor",
    "epoch alloc MiB",
    "compile s",
    "loss rel diff",
    "weight rel diff",
]


def machine():
    """What the figures depend on, BLAS's kernel included: OPENBLAS_CORETYPE, set on some
    machines for old OpenBLAS builds' sake, can pick a slower kernel than the CPU supports."""
    import numpy
    from threadpoolctl import threadpool_info

    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "blas": [
            f"{pool['internal_api']} {pool.get('version')} {pool.get('architecture')}" for pool in threadpool_info()
        ],
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "gpu": gpu_name(),
    }


def gpu_name():
    """The first GPU CuPy sees, with its driver's CUDA version; None without CuPy or a GPU."""
    try:
        import cupy

        properties = cupy.cuda.runtime.getDeviceProperties(0)
        name = properties["name"]
        name = name.decode() if isinstance(name, bytes) else name
        return f"{name}, CUDA driver {cupy.cuda.runtime.driverGetVersion()}, cupy {cupy.__version__}"
    except Exception:  # no CuPy, or no device answering: either way no GPU to name
        return None


def torch_devices():
    try:
        import torch
    except ImportError:
        return []
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def torch_runs(torch_peers, devices, log=print):
    """(device, peer name) of each PyTorch row: each peer on each device torch has, the CUDA-graph
    peers (GPU_ONLY_PEERS) on CUDA only. Says what is left out and why."""
    gpu_only = [name for name in torch_peers if name in GPU_ONLY_PEERS]
    if torch_peers and not devices:
        log("torch is not installed: PyTorch rows left out (pip install torch to add them)")
    elif gpu_only and "cuda" not in devices:
        log(f"torch sees no CUDA device: the {', '.join(gpu_only)} rows (CUDA graphs) left out")
    return [
        (device, name) for device in devices for name in torch_peers if device == "cuda" or name not in GPU_ONLY_PEERS
    ]


def collect(
    backends, batch_sizes, hiddens, dtype, repeats, peers, agreement_steps, log=print, threads=None, rule=SGD_RELU
):
    """The results of every row. peers names those to time, from xpnet.bench_peers.PEERS: "torch" (eager,
    on each device torch has), "torch-compile" (torch.compile, likewise), "torch-graphs" (its
    CUDA-graph mode, on a GPU only), "torch-step-graph" (the whole step captured, a GPU only) and "jax"."""
    results = []
    torch_peers = [name for name in (*TORCH_COMPILE_MODES, TORCH_STEP_GRAPH) if name in peers]
    runs = torch_runs(torch_peers, torch_devices() if torch_peers else [], log)
    with_jax = "jax" in peers and importlib.util.find_spec("jax") is not None
    if "jax" in peers and not with_jax:
        log("jax is not installed: JAX rows left out (pip install 'xpnet[peers]' to add them)")
    compile_seconds = {b.name: b.prepare(dtype) for b in backends}  # first call: the real cost
    for hidden in hiddens:
        agreements = {b.name: agreement(b, dtype, steps=agreement_steps, hidden=hidden, rule=rule) for b in backends}
        for batch_size in batch_sizes:
            contenders = [floor_contender(batch_size, hidden, dtype)]
            for backend in backends:
                contender = backend_contender(backend, batch_size, hidden, dtype, threads=threads, rule=rule)
                contender.compile_seconds += compile_seconds[backend.name]
                contender.extra["loss_rel_diff"], contender.extra["weight_rel_diff"] = agreements[backend.name]
                contenders.append(contender)
                if contender.extra["compiled"]:  # what the compiled loop buys over the same kernels called one by one
                    op_by_op = backend_contender(
                        backend, batch_size, hidden, dtype, compiled=False, threads=threads, rule=rule
                    )
                    contenders.append(op_by_op)
            contenders += [torch_peer(name, device, batch_size, hidden, dtype, rule) for device, name in runs]
            contenders += jax_contenders(batch_size, hidden, dtype, rule=rule) if with_jax else []
            results += measure(contenders, batch_size, hidden, dtype, repeats, log)
    return results


def rows(results):
    """Table rows: each result with its speedup over numpy and its fraction of the floor."""
    # A rule other than SGD and ReLU ends every name: " [adam, tanh]" (StepRule.label).
    reference = {(r.hidden, r.batch_size): r.samples_per_second for r in results if r.name.split(" [")[0] == "numpy"}
    floor = {(r.hidden, r.batch_size): r.samples_per_second for r in results if r.name.startswith("floor")}
    for r in results:
        key = (r.hidden, r.batch_size)
        speedup = r.samples_per_second / reference[key] if key in reference else None
        of_floor = r.samples_per_second / floor[key] if key in floor and not r.name.startswith("floor") else None
        loss_diff, weight_diff = r.extra.get("loss_rel_diff"), r.extra.get("weight_rel_diff")
        alloc = r.extra.get("epoch_alloc_mib")
        yield [
            r.name,
            "-".join(map(str, r.hidden)),
            str(r.batch_size),
            f"{r.samples_per_second:,.0f}",
            epoch_milliseconds(r.samples_per_second),
            f"{r.spread[0]:,.0f}-{r.spread[1]:,.0f}",
            f"{speedup:.2f}" if speedup else "",
            f"{of_floor:.0%}" if of_floor else "",
            f"{alloc:.2f}" if alloc is not None else "n/a",
            f"{r.compile_seconds:.3f}" if r.compile_seconds else "",
            f"{loss_diff:.1e}" if loss_diff is not None else "",
            f"{weight_diff:.1e}" if weight_diff is not None else "",
        ]


def epoch_milliseconds(samples_per_second):
    """An MNIST epoch (N_SAMPLES rows) at this rate, in milliseconds: three digits below 100."""
    milliseconds = 1e3 * N_SAMPLES / samples_per_second
    return f"{milliseconds:,.0f}" if milliseconds >= 99.95 else f"{milliseconds:.3g}"


def markdown(table_rows, title):
    lines = [f"{title}", "", "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows]
    return "\n".join(lines) + "\n"


def plot(results, path):
    """Throughput against batch size, one line per backend, the floor dashed; one panel per
    architecture. Needs matplotlib (pip install 'xpnet[plot]')."""
    from xpnet.plots import pyplot, save_figure

    plt = pyplot()
    hiddens = sorted({r.hidden for r in results})
    figure, axes = plt.subplots(1, len(hiddens), figsize=(6 * len(hiddens), 4.5), squeeze=False)
    for axis, hidden in zip(axes[0], hiddens):
        for name in dict.fromkeys(r.name for r in results):
            points = sorted(
                (r.batch_size, r.samples_per_second) for r in results if r.name == name and r.hidden == hidden
            )
            style = {"linestyle": "--", "color": "black"} if name.startswith("floor") else {"marker": "o"}
            axis.plot(*zip(*points), label=name, **style)
        axis.set(
            xscale="log",
            yscale="log",
            xlabel="batch size",
            ylabel="samples/s",
            title=f"784-{'-'.join(map(str, hidden))}-10",
        )
        axis.grid(True, which="both", alpha=0.3)
        axis.legend()
    save_figure(figure, path)


def run_report(
    backends,
    batch_sizes,
    hiddens,
    dtype,
    repeats,
    peers,
    json_path,
    markdown_path,
    agreement_steps,
    plot_path=None,
    threads=None,
    rule=SGD_RELU,
):
    console = wide_console(width=170)  # bench's table has twelve columns
    results = collect(
        backends, batch_sizes, hiddens, dtype, repeats, peers, agreement_steps, console.print, threads, rule
    )
    title = (
        f"Training throughput, {dtype}, {rule.optimizer} and {rule.activation}, 50,000-sample epochs, "
        f"median of {repeats} (agreement: {agreement_steps} steps vs NumPy float64)"
    )
    table = Table(title=title)
    for column in COLUMNS:
        table.add_column(column, justify="left" if column in ("name", "hidden") else "right")
    table_rows = list(rows(results))
    for row in table_rows:
        table.add_row(*map(escape, row))  # a name's " [adam]" is text, not rich's markup
    console.print(table)
    launched = sys.argv[0].endswith(("xpnet", os.path.join("xpnet", "__main__.py")))  # xpnet, or python -m xpnet
    command = "xpnet " + " ".join(sys.argv[1:]) if launched else "xpnet bench"
    if json_path:
        document = {
            "schema": SCHEMA,
            "command": command,
            "machine": machine(),
            "rule": rule._asdict(),
            "results": [r.to_json() for r in results],
        }
        write_text(json_path, json.dumps(document, indent=2))
    if markdown_path:
        write_text(markdown_path, markdown(table_rows, f"{title}\n\nMachine: {machine()}\n\nCommand: `{command}`"))
    if plot_path:
        plot(results, plot_path)
    return 0


def load_results(path):
    """Read a JSON file written by --json back into Result objects."""
    with open(path) as f:
        document = json.load(f)
    if document.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not an {SCHEMA} file")
    return [Result(**{**r, "hidden": tuple(r["hidden"]), "spread": tuple(r["spread"])}) for r in document["results"]]
