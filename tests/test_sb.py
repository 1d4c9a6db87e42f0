"""LoRA-SB factors against a brute-force reference that builds the full gradient matrices."""

from __future__ import annotations

import pytest
import torch

from loraxs_cli.errors import BadInputError
from loraxs_cli.factors import SVDSettings
from loraxs_cli.models import backbone, linear_modules, weight_matrix
from loraxs_cli.sb import (
    SBSettings,
    average_gradients,
    first_adamw_step,
    parse_accum_dtype,
    plan_groups,
    sb_factors,
)
from models_for_tests import tiny_bert, tiny_gpt2, tiny_llama

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


# ----------------------------------------------------------------------------------------------
# The official code's settings: train-mode pass (dropout), bfloat16 sums, sign step


def _cls_batches(vocab: int, seed: int = 0, count: int = 3):
    generator = torch.Generator().manual_seed(seed)
    data = [
        (
            torch.randint(0, vocab, (4, 10), generator=generator),
            torch.randint(0, 2, (4,), generator=generator),
        )
        for _ in range(count)
    ]
    return lambda: ({"input_ids": ids, "labels": labels} for ids, labels in data)


def _gradients(model, names, batches, **kwargs):
    groups = average_gradients(model, backbone(model), names, batches, budget_bytes=1 << 40, **kwargs)
    return {n: g for group in groups for n, g in group.items()}


def test_train_mode_with_dropout_gives_another_gradient_reproducibly():
    model = tiny_bert(vocab_size=64).eval()  # hidden and attention dropout 0.1
    names = _targets(model, ("query", "value", "output.dense"))
    batches = _cls_batches(64)
    evaluated = _gradients(model, names, batches)
    torch.manual_seed(123)
    rng_before = torch.get_rng_state()
    trained = _gradients(model, names, batches, mode="train", seed=7)
    assert torch.equal(torch.get_rng_state(), rng_before), "the caller's RNG must be left alone"
    assert not model.training and all(p.grad is None for p in model.parameters())
    for name in names:  # dropout on: another gradient, of the same scale
        assert not torch.allclose(trained[name], evaluated[name], atol=1e-6), name
        ratio = float(trained[name].norm() / evaluated[name].norm())
        assert 0.3 < ratio < 3, name
    # Seeded: the same seed gives the same masks, another seed other masks.
    again = _gradients(model, names, batches, mode="train", seed=7)
    other = _gradients(model, names, batches, mode="train", seed=8)
    assert all(torch.equal(trained[n], again[n]) for n in names)
    assert not all(torch.allclose(trained[n], other[n]) for n in names)
    # Grouped passes replay the same masks: identical to one pass.
    smallest = min(weight_matrix(dict(backbone(model).named_modules())[n]).numel() for n in names) * 4
    grouped = list(
        average_gradients(model, backbone(model), names, batches, budget_bytes=smallest, mode="train", seed=7)
    )
    assert len(grouped) > 3
    many = {n: g for group in grouped for n, g in group.items()}
    assert all(torch.equal(trained[n], many[n]) for n in names)


def test_train_mode_changes_nothing_without_dropout():
    """Llama-like models have no dropout by default: the official train-mode pass gives the eval gradient."""
    model = tiny_llama(vocab_size=64)
    names = _targets(model, ("q_proj", "down_proj"))
    batches = _batches(64, seed=4)
    evaluated = _gradients(model, names, batches)
    trained = _gradients(model, names, batches, mode="train")
    for name in names:
        assert torch.allclose(trained[name], evaluated[name], atol=1e-7), name


def test_bfloat16_sums_are_the_bfloat16_running_sum():
    model = tiny_llama(vocab_size=64)
    names = _targets(model, ("q_proj", "up_proj"))
    batches = _batches(64, seed=5, count=4)
    exact = _gradients(model, names, batches)
    ours = _gradients(model, names, batches, accum_dtype=torch.bfloat16)
    # Reference: per-batch gradients summed in bfloat16, as the official code does on a bf16 model.
    per_batch = [_reference_gradients(model, names, lambda b=b: iter([b])) for b in batches()]
    for name in names:
        running = torch.zeros_like(exact[name], dtype=torch.bfloat16)
        for grads in per_batch:
            running += grads[name].to(torch.bfloat16)
        reference = running.float() / len(per_batch)
        assert ours[name].dtype == torch.float32
        torch.testing.assert_close(ours[name], reference, rtol=1e-2, atol=1e-9)
        assert not torch.equal(ours[name], exact[name])  # the rounding is real
        assert float((ours[name] - exact[name]).norm() / exact[name].norm()) < 1e-2


def test_plan_groups_counts_the_accumulator_dtype():
    shapes = {"a": (10, 10), "b": (10, 10), "c": (20, 10)}
    assert plan_groups(shapes, 800, element_bytes=2) == [["a", "b", "c"]]
    assert plan_groups(shapes, 400, element_bytes=2) == [["a", "b"], ["c"]]


def test_sign_step_is_the_official_one():
    gradient = torch.tensor([[3e-3, -2e-6, 1e-9, 0.0]])
    eta = 1e-3
    sign = first_adamw_step(gradient, None, SBSettings(eta=eta, step="sign"))
    adam = first_adamw_step(gradient, None, SBSettings(eta=eta))
    assert torch.equal(sign, torch.tensor([[-eta, eta, -eta, 0.0]]))
    # Adam's G / (|G| + eps) is the sign where |G| >> eps, and smaller where |G| ~ eps.
    assert torch.allclose(adam[0, :2], sign[0, :2], rtol=1e-2)  # 1 - 1e-8 / (2e-6 + 1e-8) = 0.995
    assert float(adam[0, 2]) == pytest.approx(-eta / 11, rel=1e-5) and float(adam[0, 3]) == 0.0
    assert SBSettings().as_dict() == {"eta": 3e-4, "eps": 1e-8, "weight_decay": 0.0}  # the default's recipe
    assert SBSettings(step="sign").as_dict()["step"] == "sign"


def test_bad_sb_settings():
    with pytest.raises(BadInputError, match="unknown --sb-step 'rmsprop'"):
        SBSettings(step="rmsprop")
    with pytest.raises(BadInputError, match="unknown --sb-grad-mode 'dropout'"):
        next(
            iter(average_gradients(tiny_llama(vocab_size=64), None, [], list, budget_bytes=1, mode="dropout"))
        )
    with pytest.raises(BadInputError, match="unknown --sb-accum-dtype 'fp16'"):
        parse_accum_dtype("fp16")
    assert parse_accum_dtype("bf16") == "bfloat16" and parse_accum_dtype("FP32") == "float32"
