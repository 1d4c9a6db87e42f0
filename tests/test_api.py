"""The public Python API (loraxs_cli.api) inside the trainers people use: transformers' Trainer and TRL's
SFT, DPO and GRPO trainers, on the tiny Llama. Each run checks that only R trained (every base weight
bit-identical, every R moved) and that the adapter the callback saved is what `loraxs eval` measures:
the trainer's own eval loss on the same rows (Trainer, SFT), or the in-memory model's loss and logits
(DPO, GRPO, whose training losses need a reference model or rewards that `eval` has no notion of)."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from loraxs_cli import api
from loraxs_cli.adapter import CONFIG_FILE
from loraxs_cli.cli.app import app
from loraxs_cli.data import encode, pad_id_of, read_rows
from loraxs_cli.evaluate import evaluate_examples

pytestmark = pytest.mark.filterwarnings("ignore")

RANK = 4
TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "The cat sat on the mat; the dog sat on the log.",
    "What is two plus three? Two plus three is five.",
    "What is the capital of France? Paris is the capital.",
    "The team won the match after a late goal.",
    "A new phone and a faster chip were shown by the technology company.",
    "Hello, how are you? I am fine, thank you.",
    "Good morning and good night.",
]
QUESTIONS = [
    ("What is two plus three?", "Two plus three is five.", "Seven."),
    ("What is the capital of France?", "Paris is the capital.", "London."),
    ("How are you?", "I am fine, thank you.", "No."),
    ("Good morning?", "Good morning and good night.", "The dog sat on the log."),
]
# The tiny model's ChatML template with `{% generation %}` markers around each answer and its end-of-turn
# token: TRL's assistant-only loss and `loraxs train/eval` (data.py) then label the same tokens, both
# from transformers' return_assistant_tokens_mask.
MARKED_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Trainer/SFT eval loss against `loraxs eval`: the same float32 token-mean over the same labelled tokens
# (one eval batch, so the Trainer's mean over batches is the mean over tokens). What differs is float32
# rounding only: the order of the rows in the batch and the loss kernel (TRL's tiled log-probabilities,
# a full cross-entropy in loraxs). Measured: 1.4e-7 (Trainer) and 4e-8 (SFT) relative; 2e-6 leaves 10x
# for other CPUs' kernels and still fails a run in bfloat16 autocast (1.2e-5 relative off here).
LOSS_RTOL = 2e-6


def loraxs_json(*args) -> dict:
    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def load(model_dir: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(str(model_dir)), AutoTokenizer.from_pretrained(str(model_dir))


def snapshot(model) -> dict[str, torch.Tensor]:
    """Every parameter by its name in the plain model (an XSLinear's `.base.` left out), cloned."""
    return {name.replace(".base.", "."): p.detach().clone() for name, p in model.named_parameters()}


def assert_only_R_trained(model, base_before: dict, R_before: dict) -> None:
    now = snapshot(model)
    base_now = {name: value for name, value in now.items() if not name.endswith(".R")}
    assert base_now.keys() == base_before.keys()
    assert all(torch.equal(base_now[name], base_before[name]) for name in base_now), "a base weight moved"
    assert set(api.trainable_parameters(model)) == set(R_before)
    unchanged = [
        name for name, value in api.trainable_parameters(model).items() if torch.equal(value, R_before[name])
    ]
    assert not unchanged, f"R did not train: {unchanged[:3]}"


def attached(model_dir: Path):
    """The tiny Llama with LoRA-XS at rank 4 on, and what it held before (base weights, initial R)."""
    model, tokenizer = load(model_dir)
    base_before = snapshot(model)
    api.attach(model, rank=RANK)
    R_before = {name: p.detach().clone() for name, p in api.trainable_parameters(model).items()}
    return model, tokenizer, base_before, R_before


def in_memory_eval(model, model_dir: Path, data: Path) -> dict:
    """The in-memory model scored as `loraxs eval --batch-size 8` scores an adapter: the same examples
    (the base's own tokenizer as eval loads it), the same batches, the same loss (evaluate.py)."""
    from loraxs_cli.models import load_tokenizer, resolve_model

    tokenizer = load_tokenizer(resolve_model(str(model_dir)))
    examples = encode(read_rows(data), tokenizer, "causal-lm", max_length=512)
    return evaluate_examples(model, examples, "causal-lm", batch_size=8, pad_id=pad_id_of(tokenizer))


def assert_same_logits(model, model_dir: Path, adapter_dir: Path, tokenizer) -> None:
    """The saved adapter on a freshly loaded base gives the in-memory trained model's logits."""
    fresh, _ = load(model_dir)
    api.load_adapter(fresh, adapter_dir)
    batch = tokenizer(TEXTS[:4], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(**batch).logits, model(**batch).logits)


@pytest.fixture(scope="module")
def marked_llama_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny Llama's files with the marked chat template (the weights, so the fingerprint, unchanged)."""
    from transformers import AutoTokenizer

    target = tmp_path_factory.mktemp("marked") / "tiny-llama"
    shutil.copytree(tiny_llama_dir, target)
    tokenizer = AutoTokenizer.from_pretrained(str(target))
    tokenizer.chat_template = MARKED_TEMPLATE
    tokenizer.save_pretrained(str(target))
    return target


# ----------------------------------------------------------------------------------------------
# The API against the CLI


def test_attach_uses_the_cli_factor_entry_and_writes_the_adapter_train_writes(tiny_llama_dir, tmp_path):
    """attach + save_adapter give what `loraxs init` and `loraxs train` give: the same cache entry, and an
    adapter config with the same fields and the same base, factor, method and module records."""
    model, _ = load(tiny_llama_dir)
    api.attach(model, rank=RANK)
    assert not model.loraxs.cache_hit
    init = loraxs_json("init", tiny_llama_dir, "--rank", RANK)
    assert init["cache"] == "hit" and init["entry"] == model.loraxs.entry.id
    saved = api.save_adapter(model, tmp_path / "api", metrics={"steps": 0}, training={"lr": 1e-3})
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    loraxs_json(
        "train", tiny_llama_dir, "--data", data, "--rank", RANK, "--max-steps", 1, "--out", tmp_path / "run"
    )
    ours, theirs = (json.loads((d / CONFIG_FILE).read_text()) for d in (saved, tmp_path / "run" / "adapter"))
    assert ours.keys() == theirs.keys()
    for key in ("method", "rank", "alpha", "modules", "base", "factors", "task", "labels", "head"):
        assert ours[key] == theirs[key], key
    assert (saved / "README.md").read_text().startswith("---\n")
    with pytest.raises(Exception, match="no loraxs adapter"):
        api.save_adapter(load(tiny_llama_dir)[0], tmp_path / "none")


def test_merge_into_and_peft_export_compute_the_adapted_model(tiny_llama_dir, tmp_path):
    from peft import PeftModel

    model, tokenizer = load(tiny_llama_dir)
    api.attach(model, rank=RANK)
    with torch.no_grad():
        for param in api.trainable_parameters(model).values():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    batch = tokenizer(TEXTS[:2], return_tensors="pt", padding=True)
    model.eval()
    with torch.no_grad():
        adapted = model(**batch).logits
    api.export_peft_lora(model, tmp_path / "peft")
    api.merge_into(model)
    assert not api.trainable_parameters(model) and not hasattr(model, "loraxs")
    plain, _ = load(tiny_llama_dir)
    peft = PeftModel.from_pretrained(plain, str(tmp_path / "peft")).eval()
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, adapted, atol=1e-4)
        assert torch.allclose(peft(**batch).logits, adapted, atol=1e-4)


def test_merge_into_folds_gpt2s_transposed_conv1d_weights(tiny_gpt2_dir):
    model, tokenizer = load(tiny_gpt2_dir)
    batch = tokenizer(TEXTS[:1], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        plain = model(**batch).logits
    api.attach(model, rank=RANK)
    with torch.no_grad():
        for param in api.trainable_parameters(model).values():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(3))
        adapted = model(**batch).logits
        api.merge_into(model)
        assert torch.allclose(model(**batch).logits, adapted, atol=1e-4)
    assert not torch.allclose(plain, adapted, atol=1e-3)  # the adapter changed what the model computes


def test_a_classifier_trains_its_head_and_loraxs_eval_reads_it(tiny_bert_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir))
    api.attach(model, rank=RANK)
    trainable = api.trainable_parameters(model)
    assert {"classifier.weight", "classifier.bias"} <= set(trainable)
    assert model.loraxs.config.task == "seq-cls" and model.loraxs.config.labels == ["LABEL_0", "LABEL_1"]
    with torch.no_grad():
        for param in trainable.values():
            param.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    rows = [{"text": text, "label": f"LABEL_{i % 2}"} for i, text in enumerate(TEXTS)]
    data = write_jsonl(tmp_path / "test.jsonl", rows)
    saved = api.save_adapter(model, tmp_path / "cls")
    assert json.loads((saved / CONFIG_FILE).read_text())["head"] == ["classifier.bias", "classifier.weight"]
    measured = loraxs_json("eval", tiny_bert_dir, "-a", saved, "--data", data, "--batch-size", 8)
    measured = measured["results"][0]
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bert_dir))
    examples = encode(read_rows(data), tokenizer, "seq-cls", max_length=512, labels=["LABEL_0", "LABEL_1"])
    expected = evaluate_examples(model, examples, "seq-cls", batch_size=8, pad_id=pad_id_of(tokenizer))
    assert measured["loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert measured["accuracy"] == expected["accuracy"]


def test_lora_sb_through_the_api_is_the_entry_init_makes(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    model, _ = load(tiny_llama_dir)
    with pytest.raises(Exception, match="needs data="):
        api.attach(model, rank=RANK, method="sb")
    api.attach(model, rank=RANK, method="sb", data=str(data), sb={"samples": 4})
    init = loraxs_json(
        "init", tiny_llama_dir, "--rank", RANK, "--method", "sb", "--data", data, "--samples", 4
    )
    assert init["cache"] == "hit" and init["entry"] == model.loraxs.entry.id


# ----------------------------------------------------------------------------------------------
# The trainers


def test_hf_trainer_three_steps_and_loraxs_eval_agree(tiny_llama_dir, tmp_path, capsys):
    from datasets import load_dataset
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments

    data = write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in TEXTS])
    model, tokenizer, base_before, R_before = attached(tiny_llama_dir)
    rows = load_dataset("json", data_files=str(data), split="train")
    encoded = rows.map(lambda row: {**tokenizer(row["text"]), "labels": tokenizer(row["text"])["input_ids"]})
    encoded = encoded.remove_columns(["text"])
    loraxs_ids = [e.input_ids for e in encode(read_rows(data), tokenizer, "causal-lm", max_length=512)]
    assert (
        encoded["input_ids"] == loraxs_ids and encoded["labels"] == loraxs_ids
    )  # the same tokens, all learned
    args = TrainingArguments(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=len(TEXTS),  # one eval batch: the Trainer's mean is the token mean
        learning_rate=5e-3,
        logging_steps=1,
        save_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
    )
    callback = api.LoraXSCallback()
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=encoded,
        eval_dataset=encoded,
        data_collator=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
        callbacks=[callback],
    )
    trainer.train()
    reported = trainer.evaluate()["eval_loss"]
    assert_only_R_trained(model, base_before, R_before)
    final = tmp_path / "out" / "loraxs_adapter"
    assert (tmp_path / "out" / "checkpoint-2" / "loraxs_adapter" / CONFIG_FILE).is_file()
    assert callback.saved[-1] == final
    config = json.loads((final / CONFIG_FILE).read_text())
    assert config["extra"]["metrics"]["steps"] == 3 and config["extra"]["training"]["lr"] == 5e-3
    measured = loraxs_json("eval", tiny_llama_dir, "-a", final, "--data", data)["results"][0]["loss"]
    with capsys.disabled():
        print(f"\nTrainer: eval_loss {reported:.7f}, loraxs eval {measured:.7f}")
    assert math.isclose(measured, reported, rel_tol=LOSS_RTOL)


def test_trl_sft_three_steps_on_chat_and_loraxs_eval_agree(marked_llama_dir, tmp_path, capsys):
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a, _ in QUESTIONS
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", rows * 2)
    model, tokenizer, base_before, R_before = attached(marked_llama_dir)
    args = SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=3,
        per_device_train_batch_size=4,
        per_device_eval_batch_size=len(rows) * 2,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,  # SFTConfig's default gradient checkpointing stays on: R trains through it
        # TRL's configs default to bf16 autocast, which on a CPU runs the base's matmuls in bfloat16 (the
        # eval loss then moves by ~1e-5 relative); `loraxs eval` on a CPU computes in float32, so does this.
        bf16=False,
        assistant_only_loss=True,
        seed=0,
    )
    dataset = Dataset.from_list(rows * 2)
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[api.LoraXSCallback()],
    )
    loraxs_labels = [e.labels for e in encode(read_rows(data), tokenizer, "causal-lm", max_length=512)]
    assert trainer.train_dataset["labels"] == loraxs_labels  # TRL and loraxs learn the same tokens
    trainer.train()
    reported = trainer.evaluate()["eval_loss"]
    assert_only_R_trained(model, base_before, R_before)
    measured = loraxs_json(
        "eval", marked_llama_dir, "-a", tmp_path / "out" / "loraxs_adapter", "--data", data
    )
    measured = measured["results"][0]["loss"]
    with capsys.disabled():
        print(f"\nSFT: eval_loss {reported:.7f}, loraxs eval {measured:.7f}")
    assert math.isclose(measured, reported, rel_tol=LOSS_RTOL)


def test_trl_dpo_two_steps_adapter_is_the_trained_model(tiny_llama_dir, tmp_path, capsys):
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    pairs = [{"prompt": q, "chosen": " " + good, "rejected": " " + bad} for q, good, bad in QUESTIONS]
    model, tokenizer, base_before, R_before = attached(tiny_llama_dir)
    args = DPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        gradient_checkpointing=False,
        bf16=False,  # float32, as `loraxs eval` computes on a CPU: the logits are compared bit for bit
        max_length=64,
        seed=0,
    )
    # ref_model None: TRL loads the reference from model.name_or_path, the plain base (what R ~ 0 starts at)
    trainer = DPOTrainer(
        model=model,
        args=args,
        train_dataset=Dataset.from_list(pairs),
        processing_class=tokenizer,
        callbacks=[api.LoraXSCallback()],
    )
    trainer.train()
    reported = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry][-1]
    assert_only_R_trained(model, base_before, R_before)
    adapter_dir = tmp_path / "out" / "loraxs_adapter"
    what = f"DPO (last loss {reported:.4f})"
    assert_eval_is_in_memory(model, tiny_llama_dir, adapter_dir, tmp_path, tokenizer, what, capsys)


def test_trl_grpo_two_steps_adapter_is_the_trained_model(tiny_llama_dir, tmp_path, capsys):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    def reward(completions, **kwargs) -> list[float]:
        """A rule: longer answers score higher (the tiny random model's completions vary in length)."""
        return [float(len(text)) for text in completions]

    model, tokenizer, base_before, R_before = attached(tiny_llama_dir)
    args = GRPOConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=2,
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=8,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        gradient_checkpointing=False,
        bf16=False,  # float32, as `loraxs eval` computes on a CPU: the logits are compared bit for bit
        use_vllm=False,
        seed=0,
    )
    prompts = Dataset.from_list([{"prompt": q} for q, _, _ in QUESTIONS])
    trainer = GRPOTrainer(
        model=model,
        reward_funcs=reward,
        args=args,
        train_dataset=prompts,
        processing_class=tokenizer,
        callbacks=[api.LoraXSCallback()],
    )
    trainer.train()
    assert_only_R_trained(model, base_before, R_before)
    adapter_dir = tmp_path / "out" / "loraxs_adapter"
    assert_eval_is_in_memory(model, tiny_llama_dir, adapter_dir, tmp_path, tokenizer, "GRPO", capsys)


def assert_eval_is_in_memory(model, model_dir, adapter_dir, tmp_path, tokenizer, what, capsys) -> None:
    data = write_jsonl(tmp_path / "eval.jsonl", [{"text": t} for t in TEXTS])
    measured = loraxs_json("eval", model_dir, "-a", adapter_dir, "--data", data, "--batch-size", 8)
    measured = measured["results"][0]["loss"]
    in_memory = in_memory_eval(model, model_dir, data)["loss"]
    with capsys.disabled():
        print(f"\n{what}: loraxs eval {measured:.7f}, the in-memory model {in_memory:.7f}")
    assert measured == in_memory
    assert_same_logits(model, model_dir, adapter_dir, tokenizer)
