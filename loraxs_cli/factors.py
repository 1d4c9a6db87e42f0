"""Frozen factors: truncated SVD of each target weight (LoRA-XS), computed layer by layer.

Conventions (README "Conventions and choices"): for W (m, n) ~ U_r S_r V_r^T, B = U_r and A = S_r V_r^T,
always in float32, with canonical signs so that the same weights give the same factors on every
run and every device.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .errors import BadInputError
from .models import weight_matrix

SVD_BACKENDS = ("torch", "sklearn", "exact")
# (niter, oversample) when not given. sklearn: the official LoRA-XS call, TruncatedSVD(n_iter=10) with
# TruncatedSVD's own default of 10 oversamples (config/reconstruct_config.yaml, utils/svd_utils.py).
BACKEND_DEFAULTS: dict[str, tuple[int, int]] = {"torch": (4, 16), "sklearn": (10, 10), "exact": (4, 16)}
# The official code's random_state for every module; `--svd sklearn` uses OFFICIAL_RANDOM_STATE + --seed.
OFFICIAL_RANDOM_STATE = 42


@dataclass(frozen=True)
class SVDSettings:
    """How the truncated SVD is computed. Part of the recipe, so part of the cache key."""

    backend: str = "torch"
    niter: int = 4
    oversample: int = 16
    seed: int = 0

    def __post_init__(self):
        if self.backend not in SVD_BACKENDS:
            raise BadInputError(f"unknown --svd {self.backend!r}: use {' or '.join(SVD_BACKENDS)}")
        if self.niter < 0 or self.oversample < 0:
            raise BadInputError("--niter and --oversample must be >= 0")
        if self.backend == "sklearn" and not 0 <= OFFICIAL_RANDOM_STATE + self.seed < 2**32:
            raise BadInputError(f"--svd sklearn: --seed must be in [-42, 2^32 - 43], got {self.seed}")

    @classmethod
    def for_backend(
        cls, backend: str, niter: int | None = None, oversample: int | None = None, seed: int = 0
    ) -> SVDSettings:
        """Settings with the backend's own defaults for what is not given (None)."""
        if backend not in BACKEND_DEFAULTS:
            raise BadInputError(f"unknown --svd {backend!r}: use {' or '.join(SVD_BACKENDS)}")
        default_niter, default_oversample = BACKEND_DEFAULTS[backend]
        return cls(
            backend,
            default_niter if niter is None else niter,
            default_oversample if oversample is None else oversample,
            seed,
        )

    def as_dict(self) -> dict:
        return asdict(self)


def module_seed(seed: int, name: str) -> int:
    """A per-module seed, so the result does not depend on the order modules are visited."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


def randomized_svd(
    matrix: torch.Tensor, rank: int, *, niter: int, oversample: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Halko-Martinsson-Tropp randomized SVD (what torch.svd_lowrank does), with a local generator.

    The Gaussian test matrix is drawn on the CPU from its own generator so results are the same
    on every device and never touch the global RNG; power iterations re-orthonormalize with QR,
    which keeps them stable in float32 where the plain iteration loses the small singular values.
    Returns U (m, r), S (r,), Vh (r, n).
    """
    m, n = matrix.shape
    q = min(rank + oversample, m, n)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    omega = torch.randn(n, q, generator=generator, dtype=matrix.dtype).to(matrix.device)
    basis = torch.linalg.qr(matrix @ omega).Q
    for _ in range(niter):
        basis = torch.linalg.qr(matrix.mT @ basis).Q
        basis = torch.linalg.qr(matrix @ basis).Q
    u_small, s, vh = torch.linalg.svd(basis.mT @ matrix, full_matrices=False)
    return (basis @ u_small)[:, :rank], s[:rank], vh[:rank]


def official_sklearn_factors(
    matrix: torch.Tensor, rank: int, *, niter: int, oversample: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B, A and S exactly as the official LoRA-XS code computes them, with sklearn on the CPU.

    utils/svd_utils.py of the official code fits `TruncatedSVD(n_components=r, n_iter=10,
    random_state=42)` on `weight.T` (in x out) and utils/initialization_utils.py sets
    lora_B = components_^T (out x r) and lora_A = transform(weight.T)^T = B^T W (r x in).
    """
    from sklearn.decomposition import TruncatedSVD

    transposed = matrix.detach().cpu().numpy().T
    svd = TruncatedSVD(n_components=rank, n_iter=niter, n_oversamples=oversample, random_state=seed)
    svd.fit(transposed)
    b = torch.from_numpy(svd.components_.T.copy())
    a = torch.from_numpy(svd.transform(transposed).T.copy())
    s = torch.from_numpy(svd.singular_values_.copy())
    return b.to(matrix.device), a.to(matrix.device), s.to(matrix.device)


def sklearn_svd(
    matrix: torch.Tensor, rank: int, *, niter: int, oversample: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official call as an SVD: U = B, S, Vh = A / S (see official_sklearn_factors)."""
    b, a, s = official_sklearn_factors(matrix, rank, niter=niter, oversample=oversample, seed=seed)
    return b, s, a / torch.where(s > 0, s, torch.ones_like(s))[:, None]


def exact_svd(
    matrix: torch.Tensor, rank: int, *, niter: int, oversample: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Full SVD, truncated: the reference for tests and small matrices (slow for 7B-sized weights)."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank], s[:rank], vh[:rank]


_BACKENDS = {"torch": randomized_svd, "sklearn": sklearn_svd, "exact": exact_svd}


def _backend_seed(settings: SVDSettings, name: str) -> int:
    if settings.backend == "sklearn":
        return (
            OFFICIAL_RANDOM_STATE + settings.seed
        )  # one random_state for every module, as the official code
    return module_seed(settings.seed, name)


def truncated_svd(matrix: torch.Tensor, rank: int, settings: SVDSettings, name: str = ""):
    """Rank-r SVD of a float32 matrix with canonical signs."""
    backend = _BACKENDS[settings.backend]
    seed = _backend_seed(settings, name)
    u, s, vh = backend(matrix, rank, niter=settings.niter, oversample=settings.oversample, seed=seed)
    return canonical_signs(u, s, vh)


def xs_factor_pair(
    matrix: torch.Tensor, rank: int, settings: SVDSettings, name: str = ""
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-XS's B = U_r, A = S_r V_r^T and S_r of W, with canonical signs.

    `--svd sklearn` returns the official code's B and A exactly (A = B^T W as it computes it, not S Vh).
    The canonical flip is then a no-op with scikit-learn >= 1.5, whose TruncatedSVD flips each
    component so its largest-magnitude entry is positive: the same rule on the same vectors (B's
    columns). Older versions (the official requirements pin 0.24) flip by the other side; flipping a pair
    (a column of B and the matching row of A) leaves B A unchanged and maps an adapter's R to D R D (D
    the +-1 flips), so the function an adapter computes and a merged weight are the same.
    """
    if settings.backend == "sklearn":
        b, a, s = official_sklearn_factors(
            matrix,
            rank,
            niter=settings.niter,
            oversample=settings.oversample,
            seed=_backend_seed(settings, name),
        )
        signs = canonical_flips(b)
        return b * signs, a * signs[:, None], s
    u, s, vh = truncated_svd(matrix, rank, settings, name)
    return u, s[:, None] * vh, s


def canonical_flips(u: torch.Tensor) -> torch.Tensor:
    """+-1 per column of U so that the largest-magnitude entry of each column becomes positive."""
    pivot = u.abs().argmax(dim=0)
    signs = torch.sign(u.gather(0, pivot[None, :])).squeeze(0)
    signs[signs == 0] = 1
    return signs


def canonical_signs(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor):
    """Flip each singular pair so the largest-magnitude entry of each column of U is positive."""
    signs = canonical_flips(u)
    return u * signs, s, vh * signs[:, None]


def check_rank(rank: int, shapes: dict[str, tuple[int, int]]) -> None:
    if rank <= 0:
        raise BadInputError(f"--rank must be a positive integer, got {rank}")
    name, (m, n) = min(shapes.items(), key=lambda item: min(item[1]))
    if rank > min(m, n):
        raise BadInputError(f"--rank {rank} is larger than min(out, in) = {min(m, n)} of {name} ({m} x {n})")


@dataclass
class FactorResult:
    """What a factor computation produces: tensors by key, and per-module statistics."""

    tensors: dict[str, torch.Tensor]  # "<module>.A" (r, n), "<module>.B" (m, r) [, "<module>.S" (r,)]
    stats: dict[str, dict]  # module -> {"shape": [m, n], "energy": float}


def compute_xs_factors(
    backbone: nn.Module,
    names: Sequence[str],
    rank: int,
    settings: SVDSettings,
    *,
    device: str | torch.device | None = None,
    on_module: Callable[[str], None] | None = None,
) -> FactorResult:
    """LoRA-XS factors for each named module of `backbone`, one weight on the device at a time."""
    modules = dict(backbone.named_modules())
    weights = ((name, weight_matrix(modules[name]).detach()) for name in names)
    return xs_factors_of(weights, rank, settings, device=device, on_module=on_module)


def xs_factors_of(
    weights: Iterable[tuple[str, torch.Tensor]],
    rank: int,
    settings: SVDSettings,
    *,
    device: str | torch.device | None = None,
    on_module: Callable[[str], None] | None = None,
) -> FactorResult:
    """LoRA-XS factors of (name, W (out, in)) pairs, one weight on the device at a time: the one loop
    behind a loaded model (compute_xs_factors) and a checkpoint read weight by weight (weights.py)."""
    tensors: dict[str, torch.Tensor] = {}
    stats: dict[str, dict] = {}
    for name, weight in weights:
        work = weight.to(device=device or weight.device, dtype=torch.float32)
        del weight  # a streamed weight's stored copy goes now (a loaded model's stays in the model)
        b, a, s = xs_factor_pair(work, rank, settings, name)
        total = work.square().sum()
        tensors[f"{name}.B"] = b.contiguous().cpu()
        tensors[f"{name}.A"] = a.contiguous().cpu()
        stats[name] = {
            "shape": list(work.shape),
            "frobenius_sq": float(total),
            "singular_values": [round(v, 7) for v in s.tolist()],
        }
        del work, b, a, s
        if on_module:
            on_module(name)
    return FactorResult(tensors, stats)


def captured_energy(module_stats: dict, rank: int) -> float:
    """Share of ||W||_F^2 kept by the rank-r part: sum(S_i^2, i < r) / ||W||_F^2."""
    total = module_stats["frobenius_sq"]
    kept = sum(v * v for v in module_stats["singular_values"][:rank])
    return kept / total if total > 0 else 0.0


def reconstruction_error(weight: torch.Tensor, u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> float:
    """||W - U S V^T||_F / ||W||_F."""
    approx = (u * s) @ vh
    return float(torch.linalg.norm(weight - approx) / torch.linalg.norm(weight))
