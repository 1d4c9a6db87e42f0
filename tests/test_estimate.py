"""The parameter arithmetic must reproduce the LoRA-XS paper's numbers exactly."""

from __future__ import annotations

import pytest

from loraxs_cli.errors import BadInputError
from loraxs_cli.estimate import (
    FULL,
    LORA,
    LORA_XS,
    PRESETS,
    VERA,
    ModuleShape,
    bytes_for_users,
    estimate,
    find_preset,
    human_bytes,
)


def by_method(estimates):
    return {e.method: e for e in estimates}


def test_gpt3_serving_example():
    """Intro: GPT-3, r=16 on q and v: 144MB per LoRA checkpoint, 144TB vs 96GB for 1M users."""
    p = find_preset("gpt3")
    est = by_method(estimate(p.shapes(["q", "v"]), 16, dtype_bytes=2, total_params=p.total_params))
    lora, xs = est[LORA], est[LORA_XS]
    assert lora.params == 96 * 2 * 16 * (12288 + 12288) == 75_497_472
    assert lora.bytes == 150_994_944 == 144 * 2**20
    assert human_bytes(lora.bytes) == "144.0 MiB"
    assert xs.params == 96 * 2 * 16 * 16
    assert xs.bytes == 98_304 == 96 * 2**10
    assert human_bytes(xs.bytes) == "96.0 KiB"
    users = 1_000_000
    assert bytes_for_users(lora, users) == 144 * 2**20 * 10**6
    assert bytes_for_users(xs, users) == 96 * 2**10 * 10**6
    assert human_bytes(bytes_for_users(lora, users)) == "137.3 TiB"
    assert bytes_for_users(lora, users) // bytes_for_users(xs, users) == 1536
    assert bytes_for_users(lora, users) % bytes_for_users(xs, users) == 0
    assert est[FULL].params == p.total_params and est[FULL].rank is None


def test_roberta_large_table1():
    p = find_preset("roberta-large")
    assert by_method(estimate(p.shapes(["q", "v"]), 8))[LORA].params == 786_432  # "800K"
    assert by_method(estimate(p.shapes(["query", "value"]), 256))[VERA].params == 61_440  # "61K"
    four = p.shapes(["query", "value", "attention.output.dense", "intermediate.dense"])
    assert len(four) == 96
    assert by_method(estimate(four, 25))[LORA_XS].params == 60_000  # "60K"
    assert by_method(estimate(four, 20))[LORA_XS].params == 38_400  # "38.4K"
    assert by_method(estimate(four, 16))[LORA_XS].params == 24_576  # "24.6K"
    # The official GLUE targets use the FFN output instead: same count, r^2 per module.
    alt = p.shapes(["query", "value", "attn-out", "output.dense"])
    assert by_method(estimate(alt, 25))[LORA_XS].params == 60_000


def test_separate_ranks_per_method():
    """One call compares the paper's operating points: LoRA r=8, VeRA r=256, LoRA-XS r=16."""
    p = find_preset("roberta-large")
    est = by_method(estimate(p.shapes(["q", "v"]), 16, lora_rank=8, vera_rank=256))
    assert (est[LORA].rank, est[VERA].rank, est[LORA_XS].rank) == (8, 256, 16)
    assert (est[LORA].params, est[VERA].params, est[LORA_XS].params) == (786_432, 61_440, 12_288)


def test_section3_formulas_square():
    """Eqs. (5)-(7) with L=24, q=2, n=1024, r=16."""
    est = by_method(estimate(find_preset("roberta-large").shapes(["q", "v"]), 16))
    assert est[LORA].params == 1_572_864
    assert est[LORA_XS].params == 12_288
    assert est[VERA].params == 24 * 2 * (1024 + 16)


def test_vera_counts_out_features_not_in():
    """VeRA trains b (length m = out) and d (length r): a 4096 x 1024 layer costs r + 4096."""
    est = by_method(estimate([ModuleShape("fc", 4096, 1024)], 8, vera_rank=256))
    assert est[VERA].params == 256 + 4096
    assert est[LORA].params == 8 * (4096 + 1024)


def test_mistral_and_gemma_table2():
    m = find_preset("mistralai/Mistral-7B-v0.1")
    shapes = m.shapes(m.default_targets)
    assert len(shapes) == 32 * 7
    assert shapes[0].name == "model.layers.0.self_attn.q_proj"
    assert (shapes[1].out_features, shapes[1].in_features) == (1024, 4096)  # k_proj, 8 kv heads
    est = by_method(estimate(shapes, 64))
    assert est[LORA_XS].params == 917_504
    assert est[LORA].params == 167_772_160
    g = find_preset("google/gemma-7b")
    assert by_method(estimate(g.shapes(["all-linear"]), 64))[LORA_XS].params == 802_816 == 28 * 7 * 64 * 64
    q, k, v, o = g.shapes(None)[:4]
    assert (q.out_features, q.in_features) == (4096, 3072)
    assert (k.out_features, v.out_features) == (4096, 4096)
    assert (o.out_features, o.in_features) == (3072, 4096)


def test_full_finetuning_counts():
    shapes = [ModuleShape("a", 4, 3), ModuleShape("b", 2, 5)]
    est = by_method(estimate(shapes, 2, dtype_bytes=4))
    assert est[FULL].params == 22 and est[FULL].bytes == 88
    assert by_method(estimate(shapes, 2, total_params=1000))[FULL].params == 1000
    assert [e.method for e in estimate(shapes, 2)] == [FULL, LORA, VERA, LORA_XS]


def test_preset_total_params():
    assert PRESETS["mistral-7b"].total_params == 7_241_732_096
    assert PRESETS["roberta-large"].total_params == 355_359_744
    assert abs(PRESETS["gpt3-175b"].total_params - 175e9) / 175e9 < 0.01
    # Transformer-block linears must fit inside the whole-model count.
    for p in PRESETS.values():
        linear = sum(s.out_features * s.in_features for s in p.shapes(["all-linear"]))
        assert 0.5 * p.total_params < linear < p.total_params, p.name


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (512, "512 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (98_304, "96.0 KiB"),
        (150_994_944, "144.0 MiB"),
        (2**20 - 1, "1.0 MiB"),
        (98_304 * 10**6, "91.6 GiB"),
        (150_994_944 * 10**6, "137.3 TiB"),
        (-2048, "-2.0 KiB"),
    ],
)
def test_human_bytes(n, text):
    assert human_bytes(n) == text


@pytest.mark.parametrize(
    "name",
    [
        "gpt3",
        "GPT-3-175B",
        "roberta-large",
        "FacebookAI/roberta-large",
        "mistral-7b",
        "mistralai/Mistral-7B-v0.1",
        "gemma-7b",
        "google/gemma-7b",
        "Llama-2-7B",
        "meta-llama/Llama-2-7b-hf",
    ],
)
def test_find_preset_aliases(name):
    assert find_preset(name) is not None


def test_find_preset_unknown():
    assert find_preset("bert-base-uncased") is None
    assert find_preset("/models/some/path/mistral-7b") is None
    assert find_preset("someorg/mistral-7b").name == "Mistral-7B-v0.1"


def test_unknown_target_lists_valid_names():
    with pytest.raises(BadInputError, match=r"unknown target 'qkv'.*q_proj, k_proj"):
        find_preset("mistral-7b").shapes(["q_proj", "qkv"])


def test_bad_inputs():
    shapes = [ModuleShape("x", 8, 8)]
    with pytest.raises(BadInputError, match="rank"):
        estimate(shapes, 0)
    with pytest.raises(BadInputError, match="exceeds"):
        estimate(shapes, 9)
    with pytest.raises(BadInputError, match="no target"):
        estimate([], 4)
    with pytest.raises(BadInputError, match="users"):
        bytes_for_users(estimate(shapes, 4)[0], -1)


def test_targets_deduplicated_in_table_order():
    p = find_preset("roberta-base")
    names = [s.name for s in p.shapes(["v", "query", "value"])[:2]]
    assert names == [
        "roberta.encoder.layer.0.attention.self.query",
        "roberta.encoder.layer.0.attention.self.value",
    ]
