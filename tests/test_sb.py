"""LoRA-SB factors against a brute-force reference that builds the full gradient matrices."""

from __future__ import annotations

import torch

from loraxs_cli.factors import SVDSettings
from loraxs_cli.models import backbone, linear_modules, weight_matrix
from loraxs_cli.sb import SBSettings, average_gradients, first_adamw_step, plan_groups, sb_factors
from models_for_tests import tiny_gpt2, tiny_llama

RANK = 4
EXACT = SVDSettings(backend="exact")


def _batches(vocab: int, seed: int = 0, count: int = 3):
    generator = torch.Generator().manual_seed(seed)
    data = [torch.randint(0, vocab, (2, 12), generator=generator) for _ in range(count)]
    return lambda: ({"input_ids": ids, "labels": ids} for ids in data)


def _reference_gradients(model, names, batches):
    """Every target's full gradient, by plain autograd, averaged over the batches."""
    modules = dict(backbone(model).named_modules())
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    sums = {n: torch.zeros_like(weight_matrix(modules[n]), dtype=torch.float32) for n in names}
    count = 0
    for batch in batches():
        weights = [modules[n].weight for n in names]
        for w in weights:
            w.requires_grad_(True)
        grads = torch.autograd.grad(model(**batch).loss, weights)
        for n, g in zip(names, grads, strict=True):
            sums[n] += g.t() if g.shape != sums[n].shape else g
        for w in weights:
            w.requires_grad_(False)
        count += 1
    return {n: s / count for n, s in sums.items()}


def _targets(model, suffixes):
    return [n for n in linear_modules(model) if n.endswith(suffixes)]


def test_factors_are_the_best_rank_r_approximation_of_the_first_adamw_step():
    model = tiny_llama(vocab_size=64)
    names = _targets(model, ("q_proj", "v_proj", "down_proj"))
    batches = _batches(64)
    settings = SBSettings(eta=1e-3)
    reference = _reference_gradients(model, names, batches)
    groups = average_gradients(model, backbone(model), names, batches, budget_bytes=1 << 40)
    tensors, _ = sb_factors(groups, backbone(model), RANK, settings, EXACT)
    for name in names:
        delta = first_adamw_step(reference[name], None, settings)
        u, s, vh = torch.linalg.svd(delta.double())
        best = (u[:, :RANK] * s[:RANK]) @ vh[:RANK]
        B, A, S = (tensors[f"{name}.{k}"].double() for k in "BAS")
        ours = B @ torch.diag(S) @ A
        assert torch.allclose(ours, best, atol=1e-6 * float(delta.abs().max()) * delta.shape[0]), name
        eye = torch.eye(RANK, dtype=torch.float64)
        assert torch.allclose(B.T @ B, eye, atol=1e-5) and torch.allclose(A @ A.T, eye, atol=1e-5)


def test_grouped_and_ungrouped_runs_are_identical():
    model = tiny_llama(vocab_size=64)
    names = _targets(model, ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
    batches = _batches(64, seed=1)
    one = dict(
        (n, g)
        for group in average_gradients(model, backbone(model), names, batches, budget_bytes=1 << 40)
        for n, g in group.items()
    )
    smallest = min(weight_matrix(dict(backbone(model).named_modules())[n]).numel() for n in names) * 4
    grouped_runs = list(average_gradients(model, backbone(model), names, batches, budget_bytes=smallest))
    assert len(grouped_runs) > 3
    many = {n: g for group in grouped_runs for n, g in group.items()}
    assert set(one) == set(many)
    for name in names:
        assert torch.allclose(one[name], many[name], atol=1e-7), name
    # Nothing is left behind: no gradients, trainability restored.
    assert all(p.grad is None for p in model.parameters())


def test_conv1d_gradients_are_in_the_out_by_in_convention():
    model = tiny_gpt2(vocab_size=64)
    names = _targets(model, ("c_attn", "c_fc"))
    batches = _batches(64, seed=2)
    reference = _reference_gradients(model, names, batches)
    ours = {
        n: g
        for group in average_gradients(model, backbone(model), names, batches, budget_bytes=1 << 40)
        for n, g in group.items()
    }
    for name in names:
        assert ours[name].shape == reference[name].shape
        assert torch.allclose(ours[name], reference[name], atol=1e-7)


def test_plan_groups_respects_the_budget():
    shapes = {"a": (10, 10), "b": (10, 10), "c": (20, 10)}
    assert plan_groups(shapes, 800) == [["a", "b"], ["c"]]
    assert plan_groups(shapes, 1) == [["a"], ["b"], ["c"]]  # a single oversized target still runs


def test_weight_decay_term_is_decoupled():
    gradient = torch.tensor([[0.5, -2.0]])
    weight = torch.tensor([[1.0, 3.0]])
    step = first_adamw_step(gradient, weight, SBSettings(eta=0.1, eps=0.0, weight_decay=0.01))
    assert torch.allclose(step, torch.tensor([[-0.1 - 0.001, 0.1 - 0.003]]))
