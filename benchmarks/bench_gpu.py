"""meProp on a GPU: dense backward vs the Triton path (meprop.kernels.triton_ops), side by side.

Three tables, on one CUDA device (its model printed in the header):

1. The linear layer's backward alone (dx, dW, db from the output gradient g): dense (the GEMMs
   nn.Linear's backward runs) against each mode, per_example (Triton kernels) and unified
   (float32 column scores in Triton, then compacted cuBLAS GEMMs), and against the same modes
   with PyTorch ops (``backend="torch"``: GEMMs on the gradient compacted to the union of the
   selected columns). Shapes: 500->500 at batch 100 and 1000; 4096->4096 and 8192->8192 at
   batch 1024, k = 32, 64, 128.
2. Forward + backward of one layer through autograd: ``nn.Linear`` vs ``SparseLinear``.
3. A training step (forward, backward, Adam) of the MNIST MLP 784-500-500-10 at batch 100:
   dense vs meProp on both hidden layers.

Tables 2 and 3 run ``backend="triton"`` where meprop.config lists it, else ``"torch"`` (said
in the header). Times are medians over CUDA-event-timed calls after a warm-up (every call's
own start and end events; calls that sync with the host, like a row-sparse dW's distinct
rows, include that wait).

    python benchmarks/bench_gpu.py                      # float32 and bfloat16
    python benchmarks/bench_gpu.py --dtype bfloat16 --quick

Targets (issue 20): unified backward >= 20x dense at 8192->8192, k=64, B=1024; per_example
>= 5x there; the MLP step at batch 100 no slower than dense.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from torch import nn

# (batch, in, out, ks)
LAYERS = [
    (100, 500, 500, (20, 32, 64, 128)),
    (1000, 500, 500, (20, 32, 64, 128)),
    (1024, 4096, 4096, (32, 64, 128)),
    (1024, 8192, 8192, (32, 64, 128)),
]
QUICK = [(100, 500, 500, (20,)), (1024, 4096, 4096, (64,)), (1024, 8192, 8192, (64,))]
DEVICE = "cuda"  # (the tests run the tables on CPU tensors in Triton's interpreter)
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def gpu_time(fn, min_time: float = 0.2, min_calls: int = 10, warmup: int = 3) -> float:
    """Median milliseconds of one call of ``fn``, each call timed by CUDA events."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    start = time.perf_counter()
    while len(times) < min_calls or time.perf_counter() - start < min_time:
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return statistics.median(times)


def header(dtypes) -> str:
    import meprop
    from meprop.config import BACKENDS
    from meprop.kernels import triton_ops

    dev = torch.cuda.current_device()
    p = torch.cuda.get_device_properties(dev)
    triton_v = "not installed"
    if triton_ops.available():
        import triton

        triton_v = triton.__version__
    return "\n".join(
        [
            f"# GPU: {p.name} ({p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs, "
            f"capability {p.major}.{p.minor}); CUDA {torch.version.cuda}",
            f"# torch {torch.__version__}, triton {triton_v}, meprop {meprop.__version__}",
            f"# dtypes: {', '.join(str(d).removeprefix('torch.') for d in dtypes)}; "
            f"autograd tables use backend={autograd_backend(BACKENDS)!r}",
        ]
    )


def autograd_backend(backends) -> str:
    return "triton" if "triton" in backends else "torch"


def layer_backward_table(shapes, dtype, sparse_grad: bool) -> None:
    from meprop import ops
    from meprop.kernels import triton_ops

    have_triton = triton_ops.available()
    print(f"\n## layer backward, {str(dtype).removeprefix('torch.')}, sparse_grad={sparse_grad}")
    cols = ["B", "in", "out", "k", "dense ms"]
    for mode in ("per_example", "unified"):
        cols += [f"{mode} triton ms", "x dense", f"{mode} torch ms", "x dense"]
    print(" | ".join(cols))
    for m, d, n, ks in shapes:
        x = torch.randn(m, d, device=DEVICE, dtype=dtype)
        w = torch.randn(n, d, device=DEVICE, dtype=dtype) / d**0.5
        g = torch.randn(m, n, device=DEVICE, dtype=dtype)

        def dense(g=g, x=x, w=w):
            return g @ w, g.t() @ x, g.sum(0)

        t_dense = gpu_time(dense)
        for k in ks:
            row = [str(m), str(d), str(n), str(k), f"{t_dense:.3f}"]
            for mode in ("per_example", "unified"):
                args = (g, x, w, k, mode, True, True, sparse_grad, True)
                for impl in ((triton_ops.backward,) if have_triton else (None,)) + (
                    ops.IMPLEMENTATIONS["torch"],
                ):
                    if impl is None:
                        row += ["-", "-"]
                        continue
                    t = gpu_time(lambda impl=impl, args=args: impl(*args))
                    row += [f"{t:.3f}", f"{t_dense / t:.1f}"]
            print(" | ".join(row))


def layer_autograd_table(shapes, dtype, backend: str) -> None:
    from meprop import MePropConfig, SparseLinear

    print(f"\n## layer forward + backward (autograd), {str(dtype).removeprefix('torch.')}")
    print("B | in | out | k | nn.Linear ms | per_example ms | x | unified ms | x")
    for m, d, n, ks in shapes:
        x = torch.randn(m, d, device=DEVICE, dtype=dtype, requires_grad=True)
        g = torch.randn(m, n, device=DEVICE, dtype=dtype)
        dense = nn.Linear(d, n, device=DEVICE, dtype=dtype)

        def step(layer, x=x, g=g):
            x.grad = None
            layer.zero_grad(set_to_none=True)
            layer(x).backward(g)

        t_dense = gpu_time(lambda dense=dense: step(dense))
        for k in ks:
            row = [str(m), str(d), str(n), str(k), f"{t_dense:.3f}"]
            for mode in ("per_example", "unified"):
                cfg = MePropConfig(k=k, mode=mode, backend=backend)
                layer = SparseLinear(d, n, config=cfg, device=DEVICE, dtype=dtype)
                t = gpu_time(lambda layer=layer: step(layer))
                row += [f"{t:.3f}", f"{t_dense / t:.1f}"]
            print(" | ".join(row))


def mlp_step_table(backend: str, ks=(20, 80), batch: int = 100) -> None:
    from meprop import MePropConfig
    from meprop.convert import hidden_layers, sparsify_
    from meprop.experiments.tasks.mnist import build_mlp

    print(f"\n## MNIST MLP 784-500-500-10 training step (Adam), batch {batch}, float32")
    print("model | ms | x dense")
    x = torch.randn(batch, 784, device=DEVICE)
    y = torch.randint(0, 10, (batch,), device=DEVICE)
    loss_fn = nn.CrossEntropyLoss()
    rows = [("dense", None)] + [
        (f"{mode} k={k}", MePropConfig(k=k, mode=mode, backend=backend))
        for mode in ("per_example", "unified")
        for k in ks
    ]
    t_dense = None
    for label, cfg in rows:
        torch.manual_seed(0)
        model = build_mlp(784, [500, 500], 10).to(DEVICE)
        if cfg is not None:
            sparsify_(model, cfg, hidden_layers(model))  # the output layer stays dense
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)

        def step(model=model, opt=opt):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(x), y).backward()
            opt.step()

        t = gpu_time(step)
        t_dense = t_dense or t
        print(f"{label} | {t:.3f} | {t_dense / t:.2f}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=[*DTYPES, "all"], default="all")
    ap.add_argument("--quick", action="store_true", help="three shapes, one k each")
    ap.add_argument("--sparse-grad", action="store_true", help="row-sparse dW in table 1")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "bench_gpu.py needs a CUDA device: torch.cuda.is_available() is False here "
            f"(torch {torch.__version__}). Run it on a machine with an NVIDIA GPU, a CUDA build "
            "of torch and triton (pip install -e '.[gpu]').",
            file=sys.stderr,
        )
        return 2
    from meprop.config import BACKENDS

    dtypes = [torch.float32, torch.bfloat16] if args.dtype == "all" else [DTYPES[args.dtype]]
    shapes = QUICK if args.quick else LAYERS
    backend = autograd_backend(BACKENDS)
    print(header(dtypes))
    for dtype in dtypes:
        layer_backward_table(shapes, dtype, args.sparse_grad)
    for dtype in dtypes:
        layer_autograd_table(shapes, dtype, backend)
    mlp_step_table(backend)
    return 0


if __name__ == "__main__":
    sys.exit(main())
