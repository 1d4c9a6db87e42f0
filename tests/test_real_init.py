"""`loraxs init` on the real MiniLM and SmolLM2 weights at rank 16: sane captured energy, then a cache hit."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import pytest
import torch
from typer.testing import CliRunner

from loraxs_cli import factors as factors_module
from loraxs_cli.cache import FactorCache
from loraxs_cli.cli.app import app
from loraxs_cli.factors import captured_energy

pytestmark = pytest.mark.real
runner = CliRunner()
RANK = 16


@functools.lru_cache
def gaussian_energy(m: int, n: int, rank: int) -> float:
    """Share of ||W||_F^2 in the top `rank` singular values of a random Gaussian matrix of that shape:
    what a weight without structure would keep."""
    w = torch.randn(m, n, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(w)
    return float(s[:rank].square().sum() / s.square().sum())


def check_energies(doc: dict, expected_modules: int) -> None:
    """Every share in (0, 1); trained weights keep clearly more than unstructured ones on average,
    and no module falls far below that baseline (which would point at a broken SVD)."""
    modules = doc["modules"]
    assert len(modules) == expected_modules
    energies = [m["energy"] for m in modules]
    baselines = [gaussian_energy(*m["shape"], RANK) for m in modules]
    assert all(0 < e < 1 for e in energies)
    assert sum(energies) / len(energies) > 1.2 * sum(baselines) / len(baselines)
    for m, e, b in zip(modules, energies, baselines, strict=True):
        assert e > 0.5 * b, (m["name"], e, b)


def test_minilm(minilm_path, monkeypatch):
    run = subprocess.run(
        [sys.executable, "-m", "loraxs_cli", "init", str(minilm_path), "--rank", str(RANK), "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["cache"] == "miss" and doc["method"] == "xs" and doc["rank"] == RANK
    check_energies(doc, 6 * 4)  # query, value, attention.output.dense, output.dense (FFN out) x 6 layers
    assert {tuple(m["shape"]) for m in doc["modules"]} == {(384, 384), (384, 1536)}

    # The randomized SVD's energy is that of the exact SVD, to within 1%.
    entry = FactorCache().get(doc["entry"])
    stats = entry.meta["stats"]["encoder.layer.0.attention.self.query"]
    from safetensors import safe_open

    with safe_open(str(minilm_path / "model.safetensors"), framework="pt") as handle:
        key = next(k for k in handle.keys() if k.endswith("layer.0.attention.self.query.weight"))  # noqa: SIM118
        w = handle.get_tensor(key).float()
    s = torch.linalg.svdvals(w)
    exact = float(s[:RANK].square().sum() / s.square().sum())
    assert captured_energy(stats, RANK) == pytest.approx(exact, rel=0.01)

    calls = []
    monkeypatch.setattr(factors_module, "truncated_svd", lambda *a, **k: calls.append(a) or None)
    again = runner.invoke(app, ["init", str(minilm_path), "--rank", str(RANK), "--json"])
    assert again.exit_code == 0, again.stderr
    hit = json.loads(again.stdout)
    assert hit["cache"] == "hit" and hit["entry"] == doc["entry"] and calls == []
    assert [m["energy"] for m in hit["modules"]] == [m["energy"] for m in doc["modules"]]


def test_smollm2(smollm2_path, monkeypatch):
    first = runner.invoke(app, ["init", str(smollm2_path), "--rank", str(RANK), "--json"])
    assert first.exit_code == 0, first.stderr
    doc = json.loads(first.stdout)
    assert doc["cache"] == "miss"
    check_energies(doc, 30 * 7)
    by_kind: dict[str, list[float]] = {}
    for m in doc["modules"]:
        by_kind.setdefault(m["name"].rsplit(".", 1)[-1], []).append(m["energy"])
    assert set(by_kind) == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}

    calls = []
    monkeypatch.setattr(factors_module, "truncated_svd", lambda *a, **k: calls.append(a) or None)
    again = runner.invoke(app, ["init", str(smollm2_path), "--rank", str(RANK), "--json"])
    assert again.exit_code == 0, again.stderr
    hit = json.loads(again.stdout)
    assert hit["cache"] == "hit" and hit["entry"] == doc["entry"] and calls == []
    # A smaller rank from the same entry keeps less energy in every module.
    smaller = json.loads(runner.invoke(app, ["init", str(smollm2_path), "--rank", "8", "--json"]).stdout)
    assert smaller["cache"] == "hit" and calls == []
    for low, high in zip(smaller["modules"], doc["modules"], strict=True):
        assert low["name"] == high["name"] and low["energy"] < high["energy"]
