"""`train --packing` and `--group-by-length`: the packer, the loss and R's gradients of packed rows
against the same examples unpacked (tiny Llama, float32, sdpa and eager), the masks the model builds,
the refusal of an architecture that attends across packed examples, the length-grouped order, and a
packed run through the CLI that resumes exactly."""

from __future__ import annotations

import itertools
import json
import random

import pytest
import torch
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from loraxs_cli.data import IGNORE_INDEX, Example, collate
from loraxs_cli.errors import BadInputError
from loraxs_cli.layer import inject, xs_modules
from loraxs_cli.models import backbone
from loraxs_cli.objective import loss_sum, model_inputs
from loraxs_cli.packing import check_packed_attention, flattened, pack
from loraxs_cli.train.schedule import epoch_order, step_indices
from models_for_tests import tiny_llama

runner = CliRunner()
PAD = 2


def examples(count: int = 12, seed: int = 0, longest: int = 20) -> list[Example]:
    """Examples of varied length, some with a prompt that carries no loss (IGNORE_INDEX labels)."""
    rng = random.Random(seed)
    made = []
    for _ in range(count):
        size = rng.randint(2, longest)
        ids = [rng.randrange(3, 1000) for _ in range(size)]
        prompt = rng.randint(0, size - 2)
        made.append(Example(ids, labels=[IGNORE_INDEX] * prompt + ids[prompt:]))
    return made


def test_pack_fills_rows_with_every_example_once():
    items = examples(40, seed=1)
    rows = list(pack(items, 32))
    assert rows == list(pack(items, 32))  # no seed: the same rows every time
    assert all(len(r.input_ids) <= 32 for r in rows)
    pieces = []
    for row in rows:
        starts = [i for i, p in enumerate(row.position_ids) if p == 0] + [len(row.input_ids)]
        for a, b in itertools.pairwise(starts):
            assert row.position_ids[a:b] == list(range(b - a))
            assert row.labels[a] == IGNORE_INDEX  # never the target of the example before it
            pieces.append((tuple(row.input_ids[a:b]), tuple(row.labels[a + 1 : b])))
    assert sorted(pieces) == sorted((tuple(e.input_ids), tuple(e.labels[1:])) for e in items)
    assert sum(r.num_targets for r in rows) == sum(e.num_targets for e in items)
    # Best-fit decreasing: here as few rows as the tokens allow (40 examples of 2-20 tokens in 14)
    assert len(rows) == -(-sum(len(e.input_ids) for e in items) // 32) == 14
    windowed = list(pack(iter(items), 32, window=10))  # a stream, 10 examples at a time
    assert sorted(t for r in windowed for t in r.input_ids) == sorted(t for e in items for t in e.input_ids)


def _model(attention: str):
    model = tiny_llama(vocab_size=1000, attn_implementation=attention)
    generator = torch.Generator().manual_seed(1)
    factors = {}
    for name, module in backbone(model).named_modules():
        if isinstance(module, torch.nn.Linear):
            m, n = module.weight.shape
            factors[name] = (
                torch.randn(4, n, generator=generator) / n**0.5,
                torch.randn(m, 4, generator=generator),
            )
    R = {name: torch.randn(4, 4, generator=generator) * 0.3 for name in factors}
    inject(backbone(model), factors, scaling=1.0, R=R)
    return model.train()


def _loss_and_grads(model, batch) -> tuple[float, dict]:
    logits = model(**model_inputs(batch, "cpu")).logits
    summed, count = loss_sum(logits, batch["labels"], "causal-lm")
    model.zero_grad(set_to_none=True)
    (summed / count).backward()
    grads = {name: m.R.grad.clone() for name, m in xs_modules(backbone(model)).items()}
    return float(summed.detach()) / count, grads


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    """Where a query may attend (B, L, L), from sdpa's boolean mask or eager's additive one."""
    return (mask if mask.dtype == torch.bool else mask == 0)[:, 0]


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_loss_and_gradients_equal_unpacked(attention):
    model = _model(attention)
    items = examples()
    rows = list(pack(items, 32))
    assert len(rows) < len(items)
    plain_loss, plain_grads = _loss_and_grads(model, collate(items, PAD, "causal-lm"))
    masks = []
    attention_layer = model.model.layers[0].self_attn
    hook = attention_layer.register_forward_pre_hook(
        lambda module, args, kwargs: masks.append(kwargs["attention_mask"]), with_kwargs=True
    )
    batch = collate(rows, PAD, "causal-lm")
    assert "attention_mask" not in batch and batch["position_ids"].shape == batch["input_ids"].shape
    packed_loss, packed_grads = _loss_and_grads(model, batch)
    hook.remove()
    assert abs(packed_loss - plain_loss) < 1e-5, (packed_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6)
    # The mask the model built: causal within each example, nothing across, the pad tail on its own
    positions = batch["position_ids"]
    segment = (positions == 0).cumsum(-1)
    width = positions.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    expected = (segment[:, :, None] == segment[:, None, :]) & causal
    assert torch.equal(_allowed(masks[0]), expected)
    # One flattened row (flash attention's layout) gives the same loss
    flat_loss, _ = _loss_and_grads(model, collate(flattened(rows), PAD, "causal-lm"))
    assert abs(flat_loss - plain_loss) < 1e-5


def test_an_architecture_that_attends_across_packed_examples_is_refused():
    from transformers import OpenAIGPTConfig, OpenAIGPTLMHeadModel  # its own causal buffer, no masking_utils

    check_packed_attention(tiny_llama(vocab_size=1000), torch.device("cpu"))  # passes
    torch.manual_seed(0)
    gpt = OpenAIGPTLMHeadModel(
        OpenAIGPTConfig(n_embd=32, n_layer=1, n_head=2, vocab_size=1000, n_positions=64)
    )
    with pytest.raises(BadInputError, match="--packing: gpt lets packed examples attend"):
        check_packed_attention(gpt, torch.device("cpu"), "gpt")
    assert gpt.training  # its mode is restored


def test_group_by_length_orders_batches_and_covers_each_example_once():
    rng = random.Random(0)
    lengths = tuple(rng.randint(1, 500) for _ in range(1000))
    per_step, group = 8, 4
    steps = -(-len(lengths) // per_step)
    for epoch in range(2):
        seen = [
            i
            for s in range(steps)
            for i in step_indices(epoch * steps + s, 1000, per_step, 3, lengths, group)
        ]
        assert sorted(seen) == list(range(1000))  # each example once per epoch
    grouped = epoch_order(1000, 3, 0, lengths, group)
    assert grouped != epoch_order(1000, 3, 1, lengths, group)  # a fresh order per epoch
    assert grouped == epoch_order.__wrapped__(1000, 3, 0, lengths, group)  # deterministic
    assert lengths[grouped[0]] == max(lengths)  # the longest batch first
    shuffled = epoch_order(1000, 3, 0)
    assert sorted(shuffled) == sorted(grouped)  # the same permutation, grouped

    def padded(order) -> int:
        batches = [order[i : i + group] for i in range(0, len(order), group)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < padded(shuffled) / 10
    # within each mega-batch (50 batches) the lengths fall
    mega = grouped[group : 50 * group]
    assert [lengths[i] for i in mega] == sorted((lengths[i] for i in mega), reverse=True)


def _train(model, data, out, *extra):
    args = ["train", model, "--data", data, "--out", out, "--rank", "4", "--batch-size", "2",
            "--max-length", "48", "--log-every", "1", "--lr", "1e-2", "--json", *extra]  # fmt: skip
    return runner.invoke(app, [str(a) for a in args])


def test_packed_run_through_the_cli_resumes_exactly(tiny_llama_dir, tmp_path, monkeypatch):
    rows = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(6) for b in range(4)]
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    planned = _train(tiny_llama_dir, data, tmp_path / "plan", "--packing", "--dry-run", "--no-measure")
    assert planned.exit_code == 0, planned.output
    plan = json.loads(planned.stdout)
    assert plan["packing"] and 1 < plan["packed_rows"] < 24 and plan["steps"] == -(-plan["packed_rows"] // 2)
    common = ("--packing", "--max-steps", "4", "--save-every", "2")
    straight = _train(tiny_llama_dir, data, tmp_path / "straight", *common)
    assert straight.exit_code == 0, straight.output
    assert "--packing: 24 examples in" in straight.output
    steps = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    losses = [row["loss"] for row in steps if "loss" in row]
    assert len(losses) == 4 and all(row["tokens_per_s"] > 0 for row in steps if "loss" in row)

    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def interrupting_step(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", interrupting_step)
    broken = tmp_path / "broken"
    assert _train(tiny_llama_dir, data, broken, *common).exit_code == 130
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    resumed = _train(tiny_llama_dir, data, broken, *common)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    again = [json.loads(line) for line in (broken / "metrics.jsonl").read_text().splitlines()]
    assert [row["loss"] for row in again if "loss" in row] == pytest.approx(losses, rel=1e-6)
    config = (broken / "config.yaml").read_text()
    assert "packing: true" in config and "group_by_length: false" in config
    other = _train(tiny_llama_dir, data, broken, "--max-steps", "4")  # the same run without --packing
    assert other.exit_code == 3 and "other settings (packing)" in other.output


def test_packing_and_grouping_refusals(tiny_llama_dir, tiny_bert_dir, tmp_path):
    from loraxs_cli.train.config import TrainConfig, config_from_document, settings_document

    for settings in ({"packing": True}, {"group_by_length": True}):  # config.yaml's document round trip
        config = TrainConfig(model="m", data="d", out="o", **settings)
        assert config_from_document(settings_document(config)) == config
    data = tmp_path / "cls.jsonl"
    data.write_text("".join(json.dumps({"text": f"item {i}", "label": i % 2}) + "\n" for i in range(8)))
    refused = _train(tiny_bert_dir, data, tmp_path / "a", "--packing")
    assert refused.exit_code == 2 and "--packing is for causal-lm only, not seq-cls" in refused.output
    both = _train(tiny_llama_dir, data, tmp_path / "b", "--packing", "--group-by-length")
    assert both.exit_code == 2 and "pass one of them" in both.output
    grouped = _train(tiny_bert_dir, data, tmp_path / "c", "--group-by-length", "--max-steps", "2")
    assert grouped.exit_code == 0, grouped.output
