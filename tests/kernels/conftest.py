"""Fixtures of the DP kernel tests, and the switch that lets Triton kernels run without a GPU.

``TRITON_INTERPRET=1`` must be in the environment before any ``@triton.jit`` kernel is decorated,
so it is set here, at import time, before a test module imports ``veil.kernels.*``. Under the
interpreter the kernels run on CPU tensors (slowly: shapes stay small). On a GPU machine run the
compiled kernels with

    TRITON_INTERPRET=0 pytest tests/kernels -m gpu

The ``triton_device`` fixture gives "cpu" (interpreter, default run) or "cuda" (marked ``gpu``,
skipped without CUDA or under the interpreter, which cannot read CUDA tensors through pointer tables).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

INTERPRET = os.environ["TRITON_INTERPRET"] == "1"
HAS_CUDA = torch.cuda.is_available()

gpu_only = [
    pytest.mark.gpu,
    pytest.mark.skipif(not HAS_CUDA or INTERPRET, reason="needs CUDA and TRITON_INTERPRET=0"),
]
interpreter_only = pytest.mark.skipif(not INTERPRET, reason="Triton on CPU tensors needs TRITON_INTERPRET=1")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]

# Shapes of per-sample gradients (without the batch dimension) and a batch size, chosen to hit
# the kernels' edges: batch 1, sizes that are not powers of two, many tiny tensors in one launch,
# one tensor that spans several blocks, and a UNet-like aligned list.
SHAPE_CASES = {
    "batch1-odd": (1, [(3,), (5, 7), (2, 3, 3, 3), (17,)]),
    "many-small": (5, [(k,) for k in range(1, 21)] + [(k, 3) for k in range(1, 21)]),
    "one-large": (3, [(1021, 131), (131,)]),
    "unet-like": (6, [(32, 16, 3, 3), (32,), (64, 32), (64,), (8,), (16, 8, 1, 1)]),
}


@pytest.fixture(params=[pytest.param("cpu", marks=interpreter_only), pytest.param("cuda", marks=gpu_only)],
                ids=["interpreter", "cuda"])
def triton_device(request) -> torch.device:
    """Where the Triton kernels run in this test."""
    return torch.device(request.param)


@pytest.fixture(
    params=[
        pytest.param(("reference", "cpu")),
        pytest.param(("triton", "cpu"), marks=interpreter_only),
        pytest.param(("reference", "cuda"), marks=gpu_only),
        pytest.param(("triton", "cuda"), marks=gpu_only),
    ],
    ids=["reference-cpu", "triton-interpreter", "reference-cuda", "triton-cuda"],
)
def backend_device(request) -> tuple[str, torch.device]:
    """(optimizer backend, device) pairs: the reference path and the Triton kernels, CPU and CUDA."""
    backend, device = request.param
    return backend, torch.device(device)


@pytest.fixture(params=list(SHAPE_CASES), ids=list(SHAPE_CASES))
def shape_case(request) -> tuple[int, list[tuple[int, ...]]]:
    """(batch, per-parameter shapes)."""
    return SHAPE_CASES[request.param]


@pytest.fixture(params=DTYPES, ids=[str(d).removeprefix("torch.") for d in DTYPES])
def dtype(request) -> torch.dtype:
    return request.param


def make_grad_samples(batch, shapes, *, dtype, device, seed=0) -> list[torch.Tensor]:
    """Per-sample gradients (B, *shape) with per-sample scales spread over two decades, so that
    some samples are clipped and some are not."""
    gen = torch.Generator().manual_seed(seed)
    scale = torch.logspace(-1, 1, max(batch, 1))[:batch]
    grads = []
    for shape in shapes:
        g = torch.randn((batch, *shape), generator=gen) * scale.view(-1, *([1] * len(shape)))
        grads.append(g.to(device=device, dtype=dtype))
    return grads


@pytest.fixture
def grad_samples_factory():
    """``make_grad_samples`` as a fixture, for test modules (conftest is not imported directly)."""
    return make_grad_samples
