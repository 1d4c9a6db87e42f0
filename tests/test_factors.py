"""LoRA-XS factor computation: B orthonormal, A = S V^T, canonical signs, determinism, backend parity."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from loraxs_cli.errors import BadInputError
from loraxs_cli.factors import (
    SVDSettings,
    canonical_signs,
    captured_energy,
    check_rank,
    compute_xs_factors,
    reconstruction_error,
    truncated_svd,
)
from loraxs_cli.models import backbone, linear_modules, weight_matrix
from models_for_tests import tiny_gpt2, tiny_llama


def decaying_matrix(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A matrix with a clear spectral decay (like trained weights), so truncation is well defined."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, m, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    k = min(m, n)
    s = torch.logspace(1, -2, k)
    return (u[:, :k] * s) @ v[:, :k].T


@pytest.mark.parametrize("backend", ["torch", "sklearn", "exact"])
def test_b_orthonormal_a_is_s_vt(backend):
    w = decaying_matrix(48, 40)
    r = 8
    model = nn.Module()
    model.proj = nn.Linear(40, 48, bias=False)
    model.proj.weight.data = w.clone()
    result = compute_xs_factors(model, ["proj"], r, SVDSettings(backend=backend, niter=6))
    B, A = result.tensors["proj.B"], result.tensors["proj.A"]
    assert B.shape == (48, r) and A.shape == (r, 40)
    assert B.dtype == A.dtype == torch.float32
    torch.testing.assert_close(B.T @ B, torch.eye(r), atol=1e-5, rtol=0)
    # A = diag(S) V^T: its rows are orthogonal with norms equal to the singular values.
    s_true = torch.linalg.svdvals(w)[:r]
    torch.testing.assert_close(A @ A.T, torch.diag(s_true**2), atol=1e-3, rtol=1e-4)
    # B A is the best rank-r approximation (Eckart-Young): its error is the tail of the spectrum.
    tail = torch.linalg.svdvals(w)[r:].square().sum().sqrt() / torch.linalg.norm(w)
    assert float(torch.linalg.norm(w - B @ A) / torch.linalg.norm(w)) == pytest.approx(float(tail), rel=1e-3)
    assert result.stats["proj"]["shape"] == [48, 40]


def test_canonical_signs_make_largest_entry_of_each_b_column_positive():
    w = decaying_matrix(30, 20, seed=3)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    flips = torch.tensor([1.0, -1.0] * 10)
    cu, cs, cvh = canonical_signs(u * flips, s, vh * flips[:, None])
    pivot = cu.abs().argmax(dim=0)
    assert bool((cu[pivot, torch.arange(20)] > 0).all())
    # Flipping a pair leaves the product unchanged, and either starting sign gives the same result.
    torch.testing.assert_close((cu * cs) @ cvh, w, atol=1e-4, rtol=0)
    cu2, _, cvh2 = canonical_signs(u, s, vh)
    torch.testing.assert_close(cu, cu2)
    torch.testing.assert_close(cvh, cvh2)


@pytest.mark.parametrize("backend", ["torch", "sklearn"])
def test_same_input_same_factors_and_global_rng_untouched(backend):
    w = decaying_matrix(64, 32, seed=1)
    settings = SVDSettings(backend=backend)
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first = truncated_svd(w, 6, settings, "layers.0.q_proj")
    assert torch.equal(torch.get_rng_state(), before), "the SVD must use its own generator"
    torch.manual_seed(999)  # a different global seed changes nothing
    second = truncated_svd(w, 6, settings, "layers.0.q_proj")
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def test_module_seed_makes_factors_independent_of_visit_order():
    model = tiny_llama(vocab_size=64)
    core = backbone(model)
    names = [n for n in linear_modules(model) if n.endswith(("q_proj", "down_proj"))]
    settings = SVDSettings(niter=1, oversample=2)
    forward = compute_xs_factors(core, names, 4, settings)
    backward = compute_xs_factors(core, list(reversed(names)), 4, settings)
    for key, value in forward.tensors.items():
        assert torch.equal(value, backward.tensors[key]), key


def test_torch_sklearn_and_exact_agree_on_a_small_matrix():
    w = decaying_matrix(96, 64, seed=2)
    r = 10
    results = {
        b: truncated_svd(w, r, SVDSettings(backend=b, niter=10), "m") for b in ("torch", "sklearn", "exact")
    }
    u_ex, s_ex, vh_ex = results["exact"]
    for backend in ("torch", "sklearn"):
        u, s, vh = results[backend]
        torch.testing.assert_close(s, s_ex, atol=1e-4, rtol=1e-4)
        # With canonical signs the singular vectors themselves agree, not only the subspaces.
        torch.testing.assert_close(u, u_ex, atol=1e-3, rtol=0)
        torch.testing.assert_close(vh, vh_ex, atol=1e-3, rtol=0)
        err = reconstruction_error(w, u, s, vh)
        assert err == pytest.approx(reconstruction_error(w, u_ex, s_ex, vh_ex), rel=1e-4)


def test_full_rank_reconstructs_exactly():
    w = decaying_matrix(24, 16, seed=5)
    for backend in ("torch", "sklearn", "exact"):
        u, s, vh = truncated_svd(w, 16, SVDSettings(backend=backend), "m")
        assert reconstruction_error(w, u, s, vh) < 1e-5, backend


def test_captured_energy_formula():
    model = tiny_gpt2(vocab_size=64)
    core = backbone(model)
    names = [n for n in linear_modules(model) if n.startswith("h.0.")]
    result = compute_xs_factors(core, names, 16, SVDSettings(backend="exact"))
    modules = dict(core.named_modules())
    for name in names:
        w = weight_matrix(modules[name]).detach().float()
        s = torch.linalg.svdvals(w)
        stats = result.stats[name]
        assert stats["frobenius_sq"] == pytest.approx(float(w.square().sum()), rel=1e-5)
        for r in (1, 4, 16):
            expected = float(s[:r].square().sum() / w.square().sum())
            assert captured_energy(stats, r) == pytest.approx(expected, rel=1e-4)
        # Energy grows with the rank and never exceeds 1.
        energies = [captured_energy(stats, r) for r in range(1, 17)]
        assert energies == sorted(energies) and energies[-1] <= 1 + 1e-6
    # Conv1D stores (in, out); the factors are for W = weight^T: B is (out, r).
    assert result.tensors["h.0.mlp.c_fc.B"].shape == (256, 16)
    assert result.tensors["h.0.mlp.c_fc.A"].shape == (16, 64)


def test_check_rank_errors():
    shapes = {"a": (64, 32), "b": (16, 48)}
    check_rank(16, shapes)
    with pytest.raises(BadInputError, match="positive"):
        check_rank(0, shapes)
    with pytest.raises(BadInputError, match="positive"):
        check_rank(-3, shapes)
    with pytest.raises(BadInputError, match=r"--rank 17 .* min\(out, in\) = 16 of b \(16 x 48\)"):
        check_rank(17, shapes)


def test_bad_svd_settings():
    with pytest.raises(BadInputError, match="unknown --svd 'lapack'"):
        SVDSettings(backend="lapack")
    with pytest.raises(BadInputError, match="--niter"):
        SVDSettings(niter=-1)
    with pytest.raises(BadInputError, match="--oversample"):
        SVDSettings(oversample=-2)
