"""curvlinops' K-FAC and EK-FAC as preconditioners of the whole-network GGN solve, on the tiny GroupNorm CNN.

float64, 399 parameters: dense matrices from identity columns are the references.
"""

import pytest
import torch

from veil.errors import ConfigError
from veil.lightning_modules.models.classifier import AttributeClassifier, attribute_bce
from veil.lightning_modules.unlearning import curvature as C
from veil.lightning_modules.unlearning import curvlinops_kfac as L
from veil.lightning_modules.unlearning import influence as U

pytestmark = pytest.mark.usefixtures("single_thread")
F64 = torch.float64


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = AttributeClassifier(num_attributes=3, resolution=8, channels=(4, 4), norm_num_groups=2,
                                feature_dim=6).double()
    x = torch.randn(24, 3, 8, 8, dtype=F64)
    attrs = torch.randint(0, 2, (24, 3)).to(F64) * 2 - 1
    batches = U.iter_batches(x, attrs, 10)  # 10, 10, 4
    return model, batches


def _objective(model, l2):
    return U.Objective(model, U.select_parameter_names(model), attribute_bce, l2)


def _index(obj, names):
    starts = dict(zip(obj.names, [sum(obj.sizes[:i]) for i in range(len(obj.names))]))
    return torch.cat([torch.arange(starts[n], starts[n] + obj.sizes[obj.names.index(n)]) for n in names])


def test_curvlinops_kfac_is_our_kfac_and_ekfac_fits_the_ggn_better(tiny):
    """The library's K-FAC (type-2, expand, weight and bias joint) is the same matrix S (x) A as
    curvature.kfac_preconditioner's: ours without pi-damping at damping 1e-14 inverts to it up to the
    sqrt(1e-14) cross terms. EK-FAC keeps K-FAC's eigenbasis and re-fits the eigenvalues to the GGN's
    diagonal in it, the best approximation of each layer's GGN block in Frobenius norm among matrices
    diagonal in that basis (K-FAC is one of them): it must be at least as close to the GGN."""
    model, batches = tiny
    obj = _objective(model, {})
    vec = obj.flat()
    op, _, covered, fallback = L.kfac_operator(obj, vec, batches)
    assert fallback == ["trunk.1.weight", "trunk.1.bias", "trunk.4.weight", "trunk.4.bias"]  # the GroupNorms
    idx = _index(obj, covered)
    eye = torch.eye(len(idx), dtype=F64)
    lib = op @ eye
    ours = C.dense_operator(C.kfac_preconditioner(obj, vec, batches, damping=1e-14, pi_damping=False), len(vec),
                            vectorized=False)
    # the difference is the cross terms and shrinks as sqrt(damping): 1.1e-5 at 1e-10, 1.1e-7 at 1e-14 (max entry 0.08)
    torch.testing.assert_close(lib, torch.linalg.inv(ours[idx][:, idx]), rtol=0, atol=1e-5 * float(lib.abs().max()))

    ggn = C.dense_operator(C.make_ggn_vp(obj, vec, batches), len(vec))[idx][:, idx]
    ekfac = L.kfac_operator(obj, vec, batches, kind="ekfac")[0] @ eye
    starts = [0]
    for name in covered:
        if name.endswith("bias"):  # one block per layer: its weight and bias
            starts.append(int(_index(obj, covered[: covered.index(name) + 1]).numel()))
    for a, b in zip(starts, starts[1:]):
        blk = slice(a, b)
        k_err = (lib[blk, blk] - ggn[blk, blk]).norm()
        e_err = (ekfac[blk, blk] - ggn[blk, blk]).norm()
        assert e_err <= k_err * (1 + 1e-9), (a, b, float(e_err), float(k_err))
    assert (ekfac - ggn).norm() < (lib - ggn).norm()


@pytest.mark.parametrize("kind", L.KINDS)
def test_library_preconditioner_is_spd_and_preconditioned_cr_solves_the_ggn_system(tiny, kind):
    model, batches = tiny
    obj = _objective(model, {"head.weight": 0.01, "head.bias": 0.01})
    vec = obj.flat()
    m = C.dense_operator(L.library_preconditioner(obj, vec, batches, damping=0.01, kind=kind), len(vec),
                         vectorized=False)
    torch.testing.assert_close(m, m.T, rtol=0, atol=1e-10 * float(m.abs().max()))
    assert torch.linalg.eigvalsh(m)[0] > 0
    apply = C.make_ggn_vp(obj, vec, batches, damping=0.01)
    b = torch.randn(len(vec), generator=torch.Generator().manual_seed(3), dtype=F64)
    want = torch.linalg.solve(C.dense_operator(apply, len(vec)), b)
    x, info = C.conjugate_residual(apply, b, precondition=L.library_preconditioner(obj, vec, batches, damping=0.01,
                                                                                  kind=kind), max_iter=400, tol=1e-10)
    assert info.converged, info
    torch.testing.assert_close(x, want, rtol=1e-6, atol=1e-8 * float(want.abs().max()))


def test_library_preconditioner_refuses_what_it_cannot_do(tiny):
    model, batches = tiny
    obj = _objective(model, {})
    with pytest.raises(ConfigError, match="one process"):
        L.library_preconditioner(obj, obj.flat(), batches, damping=0.01, reduce=lambda t: 2 * t)
    with pytest.raises(ConfigError, match="damping"):  # no L2 on the convolutions: the factors can be singular
        L.library_preconditioner(obj, obj.flat(), batches, damping=0.0)
    other = U.Objective(model, obj.names, lambda z, a: (z - a).pow(2).mean(1), {})
    with pytest.raises(ConfigError, match="attribute_bce"):
        L.library_preconditioner(other, other.flat(), batches, damping=0.01)
    with pytest.raises(ConfigError, match="kind"):
        L.library_preconditioner(obj, obj.flat(), batches, damping=0.01, kind="shampoo")
