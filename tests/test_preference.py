"""`--task preference` (preference.py): DPO with the base as its own reference, checked against TRL's
DPOTrainer itself (its tokenisation, its collator, its loss and reward metrics), the adapter-off pass
against the base model, and the CLI: inference of the task, metrics rows, resume, eval, bad rows."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from loraxs_cli.data import IGNORE_INDEX, Row, encode
from loraxs_cli.layer import adapters_disabled, inject, set_fused, xs_modules
from loraxs_cli.models import backbone
from loraxs_cli.preference import METRICS, collate_pairs, pair_loss
from models_for_tests import chatml_tokenizer, tiny_llama

PLAIN = [
    {"prompt": "What is 2+3? ", "chosen": "5", "rejected": "7, I think"},
    {"prompt": "Say hi", "chosen": " hello there", "rejected": " go away"},
]
IMPLICIT = [  # whole conversations: the prompt is their common first turns (trl.extract_prompt)
    {
        "chosen": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "user", "content": "Sky colour?"}, {"role": "assistant", "content": "Green!"}],
    },
    {
        "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                   {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}],
        "rejected": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."},
                     {"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "11"}],
    },
]  # fmt: skip
EXPLICIT = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        "chosen": [{"role": "assistant", "content": "4"}],
        "rejected": [{"role": "assistant", "content": "22, obviously"}],
    },
    {
        "prompt": [{"role": "user", "content": "Name a fruit."}],
        "chosen": [{"role": "assistant", "content": "Apple."}],
        "rejected": [{"role": "assistant", "content": "Carrot."}],
    },
]


def rows(dicts: list[dict]) -> list[Row]:
    return [Row(d, f"pairs.jsonl:{i + 1}") for i, d in enumerate(dicts)]


def adapted(seed: int = 0):
    """The tiny Llama with LoRA-XS layers (rank 4, SVD factors) whose R is far from 0, and an untouched
    copy of the base."""
    model = tiny_llama(seed=seed)
    base = copy.deepcopy(model)
    core = backbone(model)
    modules = dict(core.named_modules())
    factors = {}
    for name in ("layers.0.self_attn.q_proj", "layers.0.self_attn.v_proj", "layers.1.mlp.down_proj"):
        U, S, Vh = torch.linalg.svd(modules[name].weight.detach(), full_matrices=False)
        factors[name] = (S[:4, None] * Vh[:4], U[:, :4])
    inject(core, factors, 1.0, init_std=0.3, seed=seed)
    return model, base


def trl_prepared(dicts: list[dict], tokenizer, out: Path, max_length: int = 64) -> list[dict]:
    """TRL's own tokenisation of the rows (DPOTrainer._prepare_dataset on a datasets.Dataset)."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(out), max_length=max_length, bf16=False, use_cpu=True, report_to=[])
    trainer = SimpleNamespace(_tokenizer=tokenizer)
    prepared = DPOTrainer._prepare_dataset(trainer, Dataset.from_list(dicts), tokenizer, args, "train")
    return [prepared[i] for i in range(len(prepared))]


@pytest.mark.parametrize("dicts", [PLAIN, IMPLICIT, EXPLICIT], ids=["texts", "implicit-chat", "chat"])
def test_tokenised_as_trl(dicts, tmp_path):
    """prompt / chosen / rejected token ids and completion masks exactly as TRL's DPOTrainer makes them
    (the end-of-sequence token on texts, the chat template on messages, the implicit prompt)."""
    tokenizer = chatml_tokenizer()
    ours = encode(rows(dicts), tokenizer, "preference", max_length=64)
    theirs = trl_prepared(dicts, tokenizer, tmp_path)
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    for example, item in zip(ours, theirs, strict=True):
        assert example.input_ids == item["prompt_ids"] + item["chosen_ids"]
        assert example.rejected_ids == item["prompt_ids"] + item["rejected_ids"]
        start = len(item["prompt_ids"])
        assert example.labels == [IGNORE_INDEX] * start + item["chosen_ids"]
        assert example.rejected_labels == [IGNORE_INDEX] * start + item["rejected_ids"]
    batch = collate_pairs(ours, tokenizer.pad_token_id)
    collated = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id, max_length=64)(theirs)
    assert torch.equal(batch["input_ids"], collated["input_ids"])
    assert torch.equal(batch["attention_mask"], collated["attention_mask"])
    assert torch.equal((batch["labels"] != IGNORE_INDEX).long(), collated["completion_mask"])


def test_dpo_loss_and_rewards_equal_trls(tmp_path):
    """DPOTrainer.compute_loss with the untouched base as its ref_model, and our pass with the adapter
    switched off as the reference, on the same batch: the same loss and the same reward metrics."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    tokenizer = chatml_tokenizer()
    policy, base = adapted()
    policy.train()
    examples = encode(rows(PLAIN), tokenizer, "preference", max_length=64)
    ours, parts = pair_loss(policy, collate_pairs(examples, tokenizer.pad_token_id), "cpu", 0.1)
    chosen, rejected = parts[1], parts[2]

    args = DPOConfig(
        output_dir=str(tmp_path), per_device_train_batch_size=2, max_length=64, beta=0.1, bf16=False,
        use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", dataset_num_proc=None,
    )  # fmt: skip
    trainer = DPOTrainer(
        model=policy,
        ref_model=base,
        args=args,
        train_dataset=Dataset.from_list(PLAIN),
        processing_class=tokenizer,
    )
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(PLAIN))])
    loss = trainer.compute_loss(policy, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    print(f"\nloss ours {float(ours) / 2:.8f} TRL {float(loss):.8f}")
    assert float(ours) / 2 == pytest.approx(float(loss), abs=1e-6)
    assert logged["rewards/chosen"] == pytest.approx(float(chosen.mean()), abs=1e-6)
    assert logged["rewards/rejected"] == pytest.approx(float(rejected.mean()), abs=1e-6)
    assert logged["rewards/margins"] == pytest.approx(float((chosen - rejected).mean()), abs=1e-6)
    assert logged["rewards/accuracies"] == float((chosen > rejected).float().mean())
    assert abs(float(chosen.mean())) > 1e-4  # the adapter does move the policy away from the reference


@pytest.mark.parametrize("fused", [True, False])
def test_adapter_off_is_the_base_model_exactly(fused):
    model, base = adapted()
    set_fused(model, fused)
    ids = torch.randint(3, 1000, (2, 12))
    with torch.no_grad():
        want = base(input_ids=ids).logits
        with adapters_disabled(model):
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
    assert torch.equal(off, want)
    assert not torch.allclose(on, want)  # and the adapter is back on after the block
    assert all(layer.enabled for layer in xs_modules(model).values())


# ----------------------------------------------------------------------------------------------
# The CLI


def pairs_file(path: Path, count: int, offset: int = 0) -> str:
    lines = []
    for i in range(offset, offset + count):
        a, b = i % 7 + 1, i % 5 + 2
        lines.append({"prompt": f"{a}+{b}=", "chosen": str(a + b), "rejected": str(a + b + 3)})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines))
    return str(path)


def invoke(*args):
    return CliRunner().invoke(app, [*map(str, args)])


def train_args(model: Path, data: str, held: str, out: Path, steps: int) -> list:
    return ["train", model, "--data", data, "--eval-data", held, "--rank", 4, "--out", out,
            "--max-steps", steps, "--batch-size", 2, "--grad-accum", 2, "--log-every", 1,
            "--save-every", 2, "--lr", 0.05, "--beta", 0.2, "--max-length", 32,
            "--schedule", "constant"]  # fmt: skip


def test_train_infers_preference_logs_rewards_and_resumes(tiny_llama_dir, tmp_path):
    data = pairs_file(tmp_path / "train.jsonl", 12)
    held = pairs_file(tmp_path / "held.jsonl", 4, offset=20)
    first = invoke(*train_args(tiny_llama_dir, data, held, tmp_path / "cut", 2))
    assert first.exit_code == 0, first.output
    assert "task: preference (inferred from rows with chosen/rejected" in first.output
    resumed = invoke(*train_args(tiny_llama_dir, data, held, tmp_path / "cut", 4))
    assert resumed.exit_code == 0, resumed.output
    assert "resuming from" in resumed.output
    straight = invoke(*train_args(tiny_llama_dir, data, held, tmp_path / "whole", 4))
    assert straight.exit_code == 0, straight.output

    from safetensors.torch import load_file

    cut, whole = (load_file(str(tmp_path / d / "adapter" / "adapter.safetensors")) for d in ("cut", "whole"))
    assert cut.keys() == whole.keys() and all(torch.equal(cut[k], whole[k]) for k in cut)
    metrics = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "loss" in m and "eval" not in m]
    assert [m["step"] for m in steps] == [1, 2, 3, 4]
    assert all(set(METRICS) <= set(m) for m in steps)
    assert steps[0]["loss"] == pytest.approx(0.6931, abs=0.02)  # R ~ 1e-5: the policy is the reference
    evaluated = [m["eval"] for m in metrics if "eval" in m][-1]
    assert set(METRICS) <= set(evaluated) and evaluated["examples"] == 4

    # eval on the adapter: the beta it was trained with, the same numbers as the run's last evaluation
    result = invoke(
        "eval", tiny_llama_dir, "--adapter", tmp_path / "whole" / "adapter", "--data", held, "--json"
    )
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)["results"][0]
    assert row["task"] == "preference"
    for key in ("loss", *METRICS):
        assert row[key] == pytest.approx(evaluated[key], abs=1e-6)
    # the base model is its own reference: every reward 0, the loss log 2
    base = json.loads(invoke("eval", tiny_llama_dir, "--data", held, "--json").stdout)["results"][0]
    assert base["rewards/margins"] == 0 and base["rewards/accuracies"] == 0
    assert base["loss"] == pytest.approx(0.693147, abs=1e-6)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"prompt": "a", "chosen": 3, "rejected": "b"}, "'chosen' and 'rejected' must both be strings"),
        ({"prompt": "a", "chosen": "b"}, "missing 'rejected'"),
        ({"prompt": "a", "chosen": [{"role": "assistant"}],
          "rejected": [{"role": "assistant", "content": "x"}]}, "chosen message 1: 'content' must be"),
        ({"prompt": "a", "chosen": [{"role": "assistant", "content": "x"}],
          "rejected": [{"role": "assistant", "content": "y"}]}, "'prompt' must be a list of messages"),
        ({"chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are the same"),
    ],
)  # fmt: skip
def test_bad_preference_row_is_one_line_at_its_place(tiny_llama_dir, tmp_path, row, expected):
    data = tmp_path / "pairs.jsonl"
    good = {"prompt": "1+1=", "chosen": "2", "rejected": "3"}
    data.write_text(json.dumps(good) + "\n" + json.dumps(row) + "\n")
    result = invoke("train", tiny_llama_dir, "--data", data, "--rank", 4, "--out", tmp_path / "run", "-q")
    assert result.exit_code == 3, result.output
    lines = [line for line in result.output.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and f"{data}:2:" in lines[0] and expected in lines[0], result.output


def test_task_and_rows_must_agree(tiny_llama_dir, tmp_path):
    pairs = pairs_file(tmp_path / "pairs.jsonl", 2)
    result = invoke("train", tiny_llama_dir, "--data", pairs, "--task", "causal-lm", "--rank", 4, "--out",
                    tmp_path / "a")  # fmt: skip
    assert result.exit_code == 3 and "use --task preference" in result.output
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "1+1=", "response": "2"}) + "\n")
    result = invoke("train", tiny_llama_dir, "--data", sft, "--task", "preference", "--rank", 4, "--out",
                    tmp_path / "b")  # fmt: skip
    assert (
        result.exit_code == 3 and "--task preference needs rows with 'chosen' and 'rejected'" in result.output
    )


def test_best_adapter_by_reward_accuracy_or_margin_keeps_the_higher():
    from loraxs_cli.objective import improves

    best = {"value": 0.5, "metrics": {"loss": 0.6}}
    assert improves("rewards/accuracies", {"rewards/accuracies": 0.75, "loss": 0.7}, best)
    assert not improves("rewards/margins", {"rewards/margins": 0.25, "loss": 0.5}, best)


# ----------------------------------------------------------------------------------------------
# Real weights: SmolLM2-135M-Instruct learns to prefer a polite answer to a rude one, on requests and
# phrasings it never saw in training


TOPICS = [
    "reset my password", "track my parcel", "change my address", "cancel my order", "get a refund",
    "update my card", "find the manual", "book a table", "renew my plan", "close my account",
    "print an invoice", "join the waitlist", "report a bug", "change my email", "pay a bill",
    "download my data", "move my booking", "add a user", "export a report", "unlock my phone",
]  # fmt: skip
POLITE = [
    " Of course! Here is how to do it, step by step.", " Happy to help: let me walk you through it.",
    " Sure, I can help with that right away.", " Certainly! I will guide you through it.",
    " Absolutely, thank you for asking. Let me explain.", " Gladly! It only takes a minute, here is how.",
    " With pleasure. I will show you what to do.", " Good question! I can sort that out for you.",
]  # fmt: skip
RUDE = [
    " No. Figure it out yourself.", " Not my problem, stop asking.", " Why would I help you with that?",
    " Ugh, that is a stupid question.", " Go away, I am busy.", " Read the manual, genius.",
    " Nobody cares. Try someone else.", " Seriously? Leave me alone.",
]  # fmt: skip


def polite_pairs(path: Path, count: int, seed: int, held_out: bool) -> str:
    """Training pairs: the first 14 requests and the first half of each phrasing list; held-out pairs:
    the other 6 requests and the other phrasings (only the preference itself carries over)."""
    import random

    rng = random.Random(seed)
    topics = TOPICS[14:] if held_out else TOPICS[:14]
    polite, rude = (POLITE[4:], RUDE[4:]) if held_out else (POLITE[:4], RUDE[:4])
    rows = [
        {"prompt": f"Customer: Can you help me {rng.choice(topics)}?\nAgent:", "chosen": rng.choice(polite),
         "rejected": rng.choice(rude)}
        for _ in range(count)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.real
@pytest.mark.slow
@pytest.mark.xdist_group("smollm2-text")  # the same rank-16 factors as the SmolLM2 text tests
def test_smollm2_learns_a_preference_that_carries_over(smollm2_path, in_real_home, tmp_path):
    """8 DPO steps of 4 pairs at the default lr (3e-3), beta 0.1. The base is its own reference, so before
    training every reward is 0 (accuracy 0, loss log 2: the run's first step logs it). Measured: held-out
    reward accuracy 0.97 (31 of 32), margin 1.18, loss 0.31 (README "Preference tuning"). Bar: 0.75,
    24 of 32 pairs, which an adapter that had learned nothing (each margin's sign a coin toss) reaches
    with probability 0.0035 (0.5 + 3 standard deviations of a binomial over 32 pairs)."""
    train = polite_pairs(tmp_path / "train.jsonl", 64, seed=1, held_out=False)
    held = polite_pairs(tmp_path / "held.jsonl", 32, seed=2, held_out=True)
    out = tmp_path / "run"
    result = invoke("train", smollm2_path, "--data", train, "--eval-data", held, "--rank", 16, "--out", out,
                    "--max-steps", 8, "--batch-size", 4, "--max-length", 32, "--save-every", 0,
                    "--log-every", 1, "--json")  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    first = next(m for m in metrics if "loss" in m and "eval" not in m)
    assert first["step"] == 1 and first["loss"] == pytest.approx(0.6931, abs=1e-3)
    after = [m["eval"] for m in metrics if "eval" in m][-1]
    print(f"\nheld-out after 8 steps: {after}")
    assert after["examples"] == 32
    assert after["rewards/accuracies"] >= 0.75
    assert after["rewards/margins"] > 0 and after["loss"] < 0.6
