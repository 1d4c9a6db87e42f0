"""The benchmark scripts run end to end in their tiny modes (tiny random models, a couple of steps) and
print the table or JSON they promise. Figures are checked for shape and sign only: no timed tests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
TINY_LLAMA_TARGETS = 2 * 7  # the --quick model: 2 layers x 7 projections
TINY_BERT_TARGETS = 2 * 4  # tiny_bert: 2 layers x (query, value, attention output, FFN output)


def run_script(name: str, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, str(BENCHMARKS / name), *args], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def table_rows(text: str, names: tuple[str, ...]) -> dict[str, list[str]]:
    split = [line.split() for line in text.splitlines()]
    return {words[0]: words for words in split if words and words[0] in names}


def test_train_step_measures_every_variant():
    """The default mode: each variant in its own worker process, steps taken round-robin."""
    result = run_script("bench_train_step.py", "--quick", "--threads", "1", "--json")
    doc = json.loads(result.stdout)
    rows = {row["variant"]: row for row in doc["rows"]}
    assert list(rows) == ["base", "loraxs", "unfused", "lora", "psoft"]
    assert rows["unfused"]["trainable_params"] == rows["loraxs"]["trainable_params"]
    if "skipped" in rows["psoft"]:  # an older PEFT: the reason is printed instead of a row
        assert "PsoftConfig" in rows["psoft"]["skipped"] and "skipped" in result.stderr
        del rows["psoft"]
    else:
        assert rows["psoft"]["trainable_params"] == rows["loraxs"]["trainable_params"]  # both r x r only
    for row in rows.values():
        assert row["tokens_per_s"] > 0 and row["step_seconds"] > 0 and row["peak_bytes"] >= 0, row
    rank = doc["settings"]["rank"]
    assert rows["base"]["trainable_params"] == 0
    assert rows["loraxs"]["trainable_params"] == TINY_LLAMA_TARGETS * rank * rank
    assert rows["lora"]["trainable_params"] > rows["loraxs"]["trainable_params"]
    assert rows["base"]["tokens_vs_base"] == 1.0 and rows["lora"]["tokens_vs_lora"] == 1.0
    assert rows["loraxs"]["tokens_vs_lora"] > 0 and rows["loraxs"]["memory_vs_lora"] is not None
    assert doc["targets"] is None  # targets are judged on CUDA only
    table = table_rows(result.stderr, tuple(rows))
    assert set(table) == set(rows), result.stderr
    for name, words in table.items():
        assert int(words[1].replace(",", "")) == rows[name]["trainable_params"]
        assert float(words[2].replace(",", "")) > 0  # tokens/s
    assert table["base"][3] == "1.000" and "on CPU only the ratios are printed" in result.stderr


def test_ablation_json_and_tables(tiny_bert_dir):
    result = run_script(
        "ablation_minilm.py", "--quick", "--model", str(tiny_bert_dir), "--threads", "1", "--json"
    )
    doc = json.loads(result.stdout)
    xs, lora = doc["comparison"]
    assert (xs["method"], lora["method"]) == ("loraxs", "lora") and xs["rank"] == lora["rank"] == 8
    head = 64 * 5 + 5  # tiny_bert hidden 64, 5 BBC topics
    assert xs["adapter_params"] == TINY_BERT_TARGETS * 8 * 8
    assert xs["trainable_params"] == xs["adapter_params"] + head
    assert lora["trainable_params"] == lora["adapter_params"] + head > xs["trainable_params"]
    rows = {(r["rank"], r["init"]): r for r in doc["ablation"]}
    assert set(rows) == {(rank, init) for rank in (4, 8, 16) for init in ("svd", "random")}
    for (rank, _), row in rows.items():
        assert row["trainable_params"] == TINY_BERT_TARGETS * rank * rank + head
    for row in [xs, lora, *rows.values()]:
        assert 0.0 <= row["accuracy"] <= 1.0 and row["loss"] > 0, row
    assert doc["data"] == {"train": 20, "test": 10, "fit": 15, "val": 5}
    for heading in ("(1) LoRA-XS vs PEFT LoRA", "(2) frozen factors"):
        assert heading in result.stderr


def test_ablation_random_factors_replace_the_svd_ones():
    """The ablation's random factors follow nn.Linear's init bounds and leave no SVD factor behind."""
    import math

    import torch

    sys.path.insert(0, str(BENCHMARKS))
    from ablation_minilm import random_kaiming_factors

    from loraxs_cli.layer import inject, xs_modules
    from loraxs_cli.models import backbone
    from models_for_tests import tiny_bert

    model = tiny_bert(num_labels=5)
    core = backbone(model)
    names = [n for n, _ in core.named_modules() if n.endswith(("query", "value", "intermediate.dense"))]
    svd = {}
    for name in names:
        weight = dict(core.named_modules())[name].weight.detach()
        u, s, vh = torch.linalg.svd(weight, full_matrices=False)
        svd[name] = ((s[:4, None] * vh[:4]).contiguous(), u[:, :4].contiguous())
    inject(core, {name: (A.clone(), B.clone()) for name, (A, B) in svd.items()}, scaling=1.0)
    assert random_kaiming_factors(model, seed=0) == len(names)
    for name, layer in xs_modules(core).items():
        for buffer, fan_in, before in ((layer.A, layer.A.shape[1], svd[name][0]), (layer.B, 4, svd[name][1])):
            assert buffer.abs().max() <= 1 / math.sqrt(fan_in) + 1e-6
            assert not torch.allclose(buffer, before)


def test_multi_adapter_benchmark_prints_both_phases():
    result = run_script("bench_multi.py", "--rows", "4", "--layers", "1", "--repeats", "1",
                        "--memory-adapters", "0", "--loop-adapters", "2")  # fmt: skip
    for phase in ("decode", "prefill"):
        line = next(line for line in result.stdout.splitlines() if line.startswith(phase))
        times = [float(part.split()[1]) for part in line.split(": ", 1)[1].split(", ")]
        assert len(times) == 5 and all(t > 0 for t in times), line  # base, shared, multi, naive, loop
    assert result.stdout.count("multi vs base") == 2


def test_gpu_check_cpu_variant_runs_every_section():
    """benchmarks/gpu_check.sh --cpu: every correctness check and benchmark at CPU sizes, one JSON document;
    the GPU targets are not judged on the CPU."""
    script = BENCHMARKS / "gpu_check.sh"
    result = subprocess.run(["bash", str(script), "--cpu"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    doc = json.loads(result.stdout)
    assert doc["mode"] == "cpu" and doc["targets"] is None and doc["all_checks_ok"] is True
    sections = {"correctness.layer", "correctness.checkpointing", "correctness.init_device",
                "correctness.merge_verify", "train_step", "svd", "multi"}  # fmt: skip
    assert set(doc["results"]) == sections
    assert all(section["ok"] for section in doc["results"].values()), doc["results"]
    layer = doc["results"]["correctness.layer"]
    assert layer["fused"]["path_fused"] is True and layer["unfused"]["path_fused"] is False
    assert layer["max_error"] <= layer["tolerance"]
    assert doc["results"]["correctness.checkpointing"]["recomputed"] is True
    assert doc["results"]["correctness.init_device"]["bitwise_equal"] is True
    assert 0 < doc["results"]["train_step"]["flop_floor"] < 1
    assert doc["results"]["svd"]["matrices"] == 14 and doc["results"]["multi"]["decode_vs_shared"] > 0
