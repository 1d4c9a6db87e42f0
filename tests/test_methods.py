"""The factor-method registry (loraxs_cli/methods): one room per method, defaults in one place, and the
same factors, initial R, scaling and words as the code paths they replaced."""

from __future__ import annotations

import dataclasses
import json
import random

import pytest
import torch
import typer

from loraxs_cli import sb as sb_math
from loraxs_cli.cli import init_cmd
from loraxs_cli.data import collate, encode, label_names, pad_id_of, read_rows
from loraxs_cli.errors import BadInputError, UsageError
from loraxs_cli.factors import SVDSettings, compute_xs_factors
from loraxs_cli.initialize import FactorRequest, SBInit, ensure_factors, plan_factors, sb_request
from loraxs_cli.method_defaults import SB_DEFAULTS, XS_DEFAULTS
from loraxs_cli.methods import METHOD_NAMES, METHODS, SB, XS, Method, get_method, method_of
from loraxs_cli.methods.sb import grad_plan, parse_bytes
from loraxs_cli.models import backbone, head_kwargs, load_model, load_tokenizer
from loraxs_cli.sb import SBSettings, average_gradients, plan_groups, sb_factors

RANK = 4
EXACT = SVDSettings(backend="exact")
RECORD = {
    "data_sha256": "0123456789abcdef0123",
    "samples": 6,
    "eta": 3e-4,
    "task": "causal-lm",
    "batch_size": 2,
}


# ----------------------------------------------------------------------------- the registry


def test_registry_names_and_lookup():
    assert METHOD_NAMES == ("xs", "sb") and list(METHODS) == ["xs", "sb"]
    assert get_method("xs") is XS and get_method("sb") is SB
    assert all(isinstance(m, Method) and METHODS[m.name] is m for m in METHODS.values())
    assert (XS.title, SB.title) == ("LoRA-XS", "LoRA-SB")


@pytest.mark.parametrize("name", ["lora", "SB", "", None])
def test_unknown_method_is_one_clear_error(name):
    with pytest.raises(BadInputError, match=r"unknown --method .*: use xs or sb"):
        get_method(name)
    with pytest.raises(UsageError, match=r"use xs or sb"):
        get_method(name, error=UsageError)


def test_method_of_reads_records_leniently():
    assert method_of("sb") is SB and method_of("xs") is XS
    assert method_of(None) is XS and method_of("lora") is XS  # old or hand-made configs are read
    assert method_of(None, {"sb": RECORD}) is SB and method_of("xs", {}) is XS


def test_plan_factors_refuses_an_unknown_method(tiny_llama_dir):
    with pytest.raises(BadInputError, match="unknown --method 'lora': use xs or sb"):
        plan_factors(FactorRequest(model=str(tiny_llama_dir), rank=RANK, method="lora"))


# ----------------------------------------------------------------------------- defaults in one place


def test_sb_defaults_come_from_one_place():
    init = SBInit(data="d.jsonl", task="causal-lm")
    for field in ("samples", "eta", "batch_size", "max_length", "grad_mode", "accum_dtype", "step"):
        assert getattr(init, field) == getattr(SB_DEFAULTS, field), field
    assert init.max_grad_memory == parse_bytes(SB_DEFAULTS.max_grad_memory) == 2 << 30
    settings = SBSettings()
    assert (settings.eta, settings.eps, settings.step) == (SB_DEFAULTS.eta, SB_DEFAULTS.eps, SB_DEFAULTS.step)
    assert sb_math.DEFAULT_ETA == SB_DEFAULTS.eta == 3e-4 and SB.defaults is SB_DEFAULTS
    assert XS.defaults is XS_DEFAULTS
    with pytest.raises(dataclasses.FrozenInstanceError):
        SB_DEFAULTS.eta = 1.0  # type: ignore[misc]


def test_init_command_defaults_are_the_methods_defaults():
    app = typer.Typer()
    app.command()(init_cmd.init)
    params = {p.name: p.default for p in typer.main.get_command(app).params}
    assert params["samples"] == SB_DEFAULTS.samples and params["sb_lr"] == SB_DEFAULTS.eta
    assert params["batch_size"] == SB_DEFAULTS.batch_size and params["max_length"] == SB_DEFAULTS.max_length
    assert params["max_grad_memory"] == SB_DEFAULTS.max_grad_memory
    assert (params["sb_step"], params["sb_grad_mode"], params["sb_accum_dtype"]) == (
        SB_DEFAULTS.step,
        SB_DEFAULTS.grad_mode,
        SB_DEFAULTS.accum_dtype,
    )


# ----------------------------------------------------------------------------- scaling and initial R


def test_scaling_and_recorded_alpha():
    assert XS.scaling(8, None) == 1.0 and XS.scaling(8, 16) == 2.0
    assert SB.scaling(8, None) == 1.0 and SB.scaling(8, 16) == 1.0  # R0 = diag(S) carries the scale
    assert XS.adapter_alpha(8, None) == 8.0 and XS.adapter_alpha(8, 16) == 16.0
    assert SB.adapter_alpha(8, 16) == 8.0


def test_initial_R():
    S = torch.tensor([3.0, 2.0, 1.0])
    factors = {"m": {"A": torch.ones(3, 5), "B": torch.ones(7, 3), "S": S}}
    assert XS.initial_R(factors) is None  # inject draws R ~ N(0, init_std^2)
    assert torch.equal(SB.initial_R(factors)["m"], torch.diag(S))


# ----------------------------------------------------------------------------- the same factors as before


def test_xs_factors_are_the_truncated_svd_of_w(tiny_llama_dir):
    request = FactorRequest(model=str(tiny_llama_dir), rank=RANK, svd=EXACT)
    prepared, compute = XS.prepare(request)
    assert prepared is request and compute is None  # ensure_factors runs its default (XS.compute)
    with pytest.raises(TypeError):
        XS.prepare(request, SBInit(data="d", task="causal-lm"))
    plan = plan_factors(prepared)
    entry, hit = ensure_factors(plan)
    assert not hit and entry.meta["method"] == "xs"
    model = load_model(plan.base.resolved, head="base", dtype=plan.base.weights_dtype)
    reference = compute_xs_factors(backbone(model), plan.targets, RANK, EXACT)
    loaded = entry.load(RANK, plan.targets)
    for name in plan.targets:
        assert torch.equal(loaded[name]["A"], reference.tensors[f"{name}.A"])
        assert torch.equal(loaded[name]["B"], reference.tensors[f"{name}.B"])
    tensors, meta = XS.compute(plan)
    assert all(torch.equal(tensors[k], reference.tensors[k]) for k in reference.tensors)
    assert meta == {"stats": reference.stats}


def _arithmetic(path, count=6):
    rows = [{"prompt": f"{a} plus {a + 1} is", "response": f" {2 * a + 1}"} for a in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_sb_factors_are_the_svd_of_the_first_adamw_step(tiny_llama_dir, tmp_path):
    data = _arithmetic(tmp_path / "train.jsonl")
    sb = SBInit(data=data, task="causal-lm", samples=4, eta=1e-3, batch_size=2, max_length=32, seed=3)
    request = FactorRequest(model=str(tiny_llama_dir), rank=RANK, svd=EXACT)
    prepared, compute = SB.prepare(request, sb)
    with pytest.raises(TypeError):
        SB.prepare(request)
    again, _ = sb_request(request, sb)  # the name the library and train have used
    assert prepared == again and prepared.method == "sb"
    assert list(prepared.extra["sb"]) == [
        "data_sha256", "samples", "task", "labels", "seed", "batch_size", "max_length", "held_out_split",
        "eta", "eps", "weight_decay",
    ]  # fmt: skip
    assert prepared.extra["sb"]["samples"] == 4 and prepared.extra["sb"]["eta"] == 1e-3
    plan = plan_factors(prepared)
    entry, hit = ensure_factors(plan, compute=compute)
    assert not hit and entry.meta["method"] == "sb" and entry.meta["sb"]["gradient_passes"] == 1

    # The reference: the same seeded sample through the math of loraxs_cli/sb.py directly.
    rows = read_rows(data)
    chosen = sorted(random.Random(3).sample(range(len(rows)), 4))
    tokenizer = load_tokenizer(plan.base.resolved)
    labels = label_names(rows, "causal-lm")
    examples = encode([rows[i] for i in chosen], tokenizer, "causal-lm", max_length=32, labels=labels)
    torch.manual_seed(3)
    model = load_model(plan.base.resolved, dtype=plan.base.weights_dtype, **head_kwargs("causal-lm", labels))
    pad = pad_id_of(tokenizer)
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = pad

    def batches():
        for start in range(0, len(examples), 2):
            yield collate(examples[start : start + 2], pad, "causal-lm")

    core = backbone(model)
    gradients = average_gradients(model, core, plan.targets, batches, budget_bytes=2 << 30, seed=3)
    tensors, _ = sb_factors(gradients, core, RANK, SBSettings(eta=1e-3), EXACT)
    loaded = entry.load(RANK, plan.targets)
    for name in plan.targets:
        for part in ("A", "B", "S"):
            assert torch.allclose(loaded[name][part], tensors[f"{name}.{part}"], atol=1e-6), (name, part)
    initial = SB.initial_R(loaded)
    assert all(torch.equal(initial[n], torch.diag(loaded[n]["S"])) for n in plan.targets)
    with pytest.raises(UsageError, match="gradient sample"):
        SB.compute(plan)

    # The dry run's gradient-pass arithmetic (moved out of cli/init_cmd.py), at two budgets.
    shapes = plan.base.shapes(plan.targets)
    for budget in (2 << 30, max(m * n for m, n in shapes.values()) * 4):
        groups = plan_groups(shapes, budget, 4)
        fields = SB.plan_fields(plan, budget)
        assert fields["sb"] is plan.recipe.extra["sb"]
        assert (
            fields["gradient_passes"]
            == len(groups)
            == grad_plan(shapes, fields["sb"], budget)["gradient_passes"]
        )
        assert fields["accumulator_bytes"] == max(
            sum(4 * m * n for m, n in (shapes[t] for t in g)) for g in groups
        )
    bf16 = grad_plan(shapes, {"accum_dtype": "bfloat16"}, 2 << 30)
    assert bf16["accumulator_bytes"] == sum(2 * m * n for m, n in shapes.values())
    xs = XS.plan_fields(plan, None)  # the streamed compute's planned peak (tests/test_stream_init.py)
    assert set(xs) == {"planned_peak_bytes", "streamed", "largest_target"} and xs["streamed"] is True


# ----------------------------------------------------------------------------- how each says so


def test_words_are_the_same_as_before():
    assert SB.describe(RECORD) == "6 samples of 01234567, eta 0.0003"
    assert SB.describe(RECORD, "inspect") == "6 samples of data 0123456789ab, eta 0.0003"
    assert SB.describe(None) == XS.describe(RECORD) == ""
    assert SB.recompute_args(RECORD, "seq-cls") == [
        "--method", "sb", "--data", "DATA", "--task", "causal-lm",
        "--samples", "6", "--sb-lr", "0.0003", "--batch-size", "2",
    ]  # fmt: skip
    assert SB.recompute_args(None, "seq-cls") == ["--method", "sb", "--data", "DATA", "--task", "seq-cls"]
    assert XS.recompute_args(RECORD, "causal-lm") == []
    assert SB.data_note(RECORD) == (
        "; DATA is the training data, sha256 0123456789ab, or rerun the `loraxs train` that made them"
    )
    assert (
        SB.data_note(None).startswith("; DATA is the training data, sha256 ?,") and XS.data_note(RECORD) == ""
    )
    assert (
        SB.record({"sb": RECORD}) is RECORD and SB.record(None) is None and XS.record({"sb": RECORD}) is None
    )
    assert (
        SB.adapter_extra({"sb": RECORD}) == {"sb": RECORD}
        and SB.adapter_extra({}) == XS.adapter_extra({}) == {}
    )
    assert (XS.factor_of, SB.factor_of) == ("W", "dW")
    assert ("loraxs", *XS.adapter_tags) == ("loraxs", "lora-xs")
    assert ("loraxs", *SB.adapter_tags) == ("loraxs", "lora-xs", "lora-sb")
    assert (XS.card_tag, SB.card_tag) == ("lora-xs", "lora-sb")
    doc = {"base_dtype": "float32", "sb": {"samples": 6}, "accumulator_bytes": 2048, "gradient_passes": 2}
    xs_doc = {**doc, "planned_peak_bytes": 3 << 20, "streamed": True, "largest_target": [128, 64]}
    assert XS.memory_text(xs_doc) == (
        "~3.0 MiB peak beyond the libraries: one weight at a time from the checkpoint (largest 128 x 64), "
        "the next one read ahead"
    )
    assert SB.memory_text(doc) == (
        "a training step + 2.0 KiB of float32 gradient accumulators (2 pass(es) over 6 samples)"
    )
