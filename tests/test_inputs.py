"""Bad numbers and bad data through the real CLI (issue 16, sections 3 and 4).

Section 3: a non-finite or out-of-range option value is a usage error (exit 2) in one line that names
the flag, from the command line or a --config file, for every command, checked by one mechanism
(cli/options.py: a Bounds callback on every int and float option), before anything is read or written;
`--head-lr 0` is a frozen head; an adapter holding NaN or inf is never written.

Section 4: malformed data is exit 3 with its file and row (deep nesting, huge integer labels), never an
internal error; a bogus --device is exit 3 on every command; and what should work works: whole-number
float labels, a CSV with a byte-order mark, adapter paths with '=', output names near the 255-byte limit,
a --max-length beyond the model's positions (cut there, with a note).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.main import get_command
from typer.testing import CliRunner

from loraxs_cli.adapter import load_adapter, save_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.cli.options import SEED_MAX, Bounds
from loraxs_cli.errors import BadInputError, DivergedError
from loraxs_cli.paths import NAME_MAX, split_name, temp_sibling
from loraxs_cli.train import DEFAULTS
from models_for_tests import make_adapter

runner = CliRunner()
LM_ROWS = [{"prompt": f"{i} plus {i} is", "response": f" {2 * i}"} for i in range(6)]
CLS_ROWS = [{"text": f"{w} film number {i}", "label": lab} for i in range(4)
            for w, lab in (("great", 1), ("awful", 0))]  # fmt: skip
SMALL = ("--rank", "2", "--batch-size", "2", "--max-length", "16", "--max-steps", "1", "--save-every", "0")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def error_line(result, code: int) -> str:
    """The one `error:` line of a failed command with the documented exit code (never a bug)."""
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert result.exit_code == code and len(errors) == 1, result.output
    assert "internal error" not in errors[0] and "Traceback" not in result.output, result.output
    return errors[0]


def nothing_in(directory: Path) -> bool:
    return not directory.exists() or not any(directory.iterdir())


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("inputs-adapters")  # embedded factors: the cache is per test
    return make_adapter(tiny_llama_dir, root / "alice", seed=1, r_std=0.3, embed_factors=True)


# ----------------------------------------------------------------------------------------------
# 3. Non-finite and out-of-range numbers: usage errors, one mechanism for every command

NUMBER_CASES = [
    # (command, flag, value, expected text): train
    ("train", "--lr", "inf", "--lr must be a positive number"),
    ("train", "--lr", "nan", "--lr must be a positive number"),
    ("train", "--max-grad-norm", "nan", "--max-grad-norm must be a finite number, got nan"),
    ("train", "--epochs", "nan", "--epochs must be a finite number"),
    ("train", "--epochs", "inf", "--epochs must be a finite number"),
    ("train", "--log-every", "0", "--log-every must be positive, got 0"),
    ("train", "--alpha", "nan", "--alpha must be a finite number"),
    ("train", "--alpha", "0", "--alpha must be positive"),
    ("train", "--head-lr", "-1", "--head-lr must be >= 0, got -1.0"),
    ("train", "--weight-decay", "-inf", "--weight-decay must be a finite number"),
    ("train", "--warmup-ratio", "nan", "--warmup-ratio must be a finite number"),
    ("train", "--warmup-ratio", "1", "--warmup-ratio must be in [0, 1), got 1.0"),
    ("train", "--eval-split", "1", "--eval-split must be in [0, 1)"),
    ("train", "--init-std", "inf", "--init-std must be a finite number"),
    ("train", "--sb-lr", "nan", "--sb-lr must be a finite number"),
    ("train", "--seed", str(SEED_MAX + 1), f"--seed must be in [0, {SEED_MAX}], got {SEED_MAX + 1}"),
    ("train", "--seed", "-1", "--seed must be in [0,"),
    ("train", "--batch-size", str(2**64), "--batch-size must be at most"),
    ("train", "--keep-checkpoints", "0", "--keep-checkpoints must be positive"),
    # generate, eval, init, convert, inspect
    ("generate", "--temperature", "inf", "--temperature must be a finite number"),
    ("generate", "--top-p", "nan", "--top-p must be a finite number"),
    ("generate", "--top-p", "0", "--top-p must be in (0, 1]"),
    ("generate", "--seed", str(2**40), "--seed must be in [0,"),
    ("eval", "--seed", str(SEED_MAX + 1), "--seed must be in [0,"),
    ("eval", "--limit", "0", "--limit must be positive"),
    ("init", "--sb-lr", "inf", "--sb-lr must be a finite number"),
    ("init", "--seed", str(SEED_MAX + 1), "--seed must be in [0,"),
    ("init", "--niter", "-1", "--niter must be >= 0"),
    ("convert", "--pad-rank", "0", "--pad-rank must be positive"),
    ("inspect", "--users", "-1", "--users must be >= 0"),
]


def command_line(command: str, world: dict) -> list:
    out = world["tmp"] / "out"
    return {
        "train": ["train", world["llama"], "--data", world["lm"], "--out", out, *SMALL],
        "generate": ["generate", world["llama"], "-p", world["prompts"], "-a", world["adapter"], "-o", out],
        "eval": ["eval", world["llama"], "--data", world["lm"]],
        "init": ["init", world["llama"], "--rank", "2"],
        "convert": ["convert", world["adapter"], "--to", "peft-lora", "--out", out],
        "inspect": ["inspect", world["llama"]],
    }[command]


@pytest.fixture
def world(tiny_llama_dir, adapter, tmp_path) -> dict:
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"adapter": "alice", "prompt": "1 plus 1 is"}])
    return {"llama": tiny_llama_dir, "adapter": adapter, "tmp": tmp_path, "prompts": prompts,
            "lm": write_jsonl(tmp_path / "lm.jsonl", LM_ROWS)}  # fmt: skip


@pytest.mark.parametrize(("command", "flag", "value", "expected"), NUMBER_CASES)
def test_bad_numbers_are_usage_errors_naming_the_flag(world, loraxs_home, command, flag, value, expected):
    result = invoke(*command_line(command, world), flag, value)
    line = error_line(result, 2)
    assert expected in line, line
    assert nothing_in(world["tmp"] / "out") and nothing_in(loraxs_home)


@pytest.mark.parametrize(
    ("suffix", "text", "expected"),
    [
        (".yaml", "max-grad-norm: .nan\n", "--max-grad-norm must be a finite number, got nan (in --config"),
        (".yaml", "epochs: .inf\n", "--epochs must be a finite number, got inf (in --config"),
        (".yaml", "lr: .nan\n", "--lr must be a positive number or 'auto', not 'nan' (in --config"),
        (".json", json.dumps({"seed": SEED_MAX + 1}), "--seed must be in [0, 4294967295]"),
        (".json", json.dumps({"head_lr": -0.5}), "--head-lr must be >= 0, got -0.5 (in --config"),
        (".json", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ],
)
def test_config_file_values_pass_the_same_validation(world, suffix, text, expected):
    config = world["tmp"] / f"run{suffix}"
    config.write_text(text)
    result = invoke(*command_line("train", world), "--config", config)
    line = error_line(result, 2)
    assert expected in line and str(config) in line, line
    assert nothing_in(world["tmp"] / "out")


RANKS = {"rank", "lora_rank", "vera_rank"}  # checked against the model by the core: exit 3


def test_every_number_option_of_every_command_has_bounds():
    def walk(command, path):
        for name, sub in getattr(command, "commands", {}).items():
            yield from walk(sub, [*path, name])
        if not hasattr(command, "commands"):
            yield " ".join(path), command

    unchecked, checked = [], 0
    for path, command in walk(get_command(app), []):
        for param in command.params:
            annotation = param.type_descriptor.annotation
            if annotation not in (int, float) or param.name in RANKS or getattr(param, "count", False):
                continue  # a rank is the core's to check; a count (-v -v) takes no value
            if getattr(param.callback, "bounds", None) is None:
                unchecked.append(f"{path} {param.opts[0]}")
            checked += 1
    assert not unchecked, unchecked
    assert checked >= 40  # 43 now: train, init, eval, generate, convert, inspect


def test_bounds_describe_and_check_every_kind_of_range():
    assert Bounds(gt=0, what="positive").problem("--lr", 0.0) == "--lr must be positive, got 0.0"
    assert Bounds(ge=0, lt=1).problem("--x", 1.0) == "--x must be in [0, 1), got 1.0"
    assert Bounds(gt=0, le=1).problem("--x", 0.0) == "--x must be in (0, 1], got 0.0"
    assert Bounds(le=5).problem("--x", 6) == "--x must be <= 5, got 6"
    assert Bounds(lt=5).problem("--x", 5) == "--x must be < 5, got 5"
    assert Bounds().problem("--x", float("-inf")) == "--x must be a finite number, got -inf"
    assert Bounds().problem("--x", -(2**63)).startswith("--x must be at least")
    for value in (0.0, 0.5):
        assert Bounds(ge=0, lt=1).problem("--x", value) is None
    assert Bounds(ge=0).check("--x", None) is None


def test_pad_rank_beyond_the_weights_is_refused_before_any_allocation(adapter, tmp_path):
    out = tmp_path / "peft"
    line = error_line(invoke("convert", adapter, "--to", "peft-lora", "--out", out, "--pad-rank", 10**9), 2)
    assert "--pad-rank 1000000000 is above 32, the smallest side of an adapted weight" in line
    assert not out.exists()
    assert invoke("convert", adapter, "--to", "peft-lora", "--out", out, "--pad-rank", 32).exit_code == 0


def test_head_lr_zero_is_a_frozen_head(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    initial = {k: v for k, v in load_file(tiny_bert_dir / "model.safetensors").items() if "classifier" in k}
    heads = {}
    for head_lr in ("0", None):
        run = tmp_path / f"run-{head_lr}"
        extra = ("--head-lr", head_lr) if head_lr else ()
        args = ("--rank", "2", "--batch-size", "4", "--max-length", "16", "--max-steps", "3", "--lr", "5e-2")
        result = invoke(
            "train", tiny_bert_dir, "--data", data, "--task", "seq-cls", "--out", run, *args, *extra
        )
        assert result.exit_code == 0, result.output
        trained = load_adapter(run / "adapter")
        default = DEFAULTS[("seq-cls", "xs")]["head_lr"]
        assert trained.config.extra["training"]["head_lr"] == (0.0 if head_lr else default)
        assert any(r.abs().max() > 1e-3 for r in trained.R.values())  # R itself did train
        heads[head_lr] = trained.head
    assert set(heads["0"]) == set(initial)
    for name, value in initial.items():
        assert torch.equal(heads["0"][name], value), name  # not one step on the head
    assert any(not torch.equal(heads[None][n], v) for n, v in initial.items())  # the default trains it


@pytest.mark.parametrize(("trained", "error"), [(True, DivergedError), (False, BadInputError)])
def test_an_adapter_holding_nan_or_inf_is_never_written(tiny_llama_dir, adapter, tmp_path, trained, error):
    good = load_adapter(adapter)
    config = new_config_like(good, trained)
    out = tmp_path / "bad"
    for poison in (float("nan"), float("inf")):
        R = {k: v.clone() for k, v in good.R.items()}
        R[next(iter(R))][0, 0] = poison
        with pytest.raises(error, match="NaN or infinite values"):
            save_adapter(out, config, R)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".bad")]
    save_adapter(out, config, good.R)  # the same adapter, finite, is written
    assert load_adapter(out).R.keys() == good.R.keys()


def new_config_like(adapter, trained: bool):
    """The adapter's config as `train` records it (a `training` section) or as an import does (none)."""
    return dataclasses.replace(adapter.config, extra={"training": {"lr": 1.0}} if trained else {})


# ----------------------------------------------------------------------------------------------
# 4. Malformed data: exit 3 with file and row; what should work, works


def test_deeply_nested_json_is_bad_input_at_its_row(tiny_llama_dir, tmp_path):
    data = tmp_path / "deep.jsonl"
    data.write_text(json.dumps(LM_ROWS[0]) + "\n" + '{"prompt": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    for command in (
        ("train", tiny_llama_dir, "--data", data, "--out", tmp_path / "run", *SMALL),
        ("eval", tiny_llama_dir, "--data", data),
        ("generate", tiny_llama_dir, "--prompts", data, "-o", tmp_path / "gen.jsonl"),
    ):
        line = error_line(invoke(*command), 3)
        assert f"{data}:2: JSON nested too deeply" in line, line
    assert not (tmp_path / "run").exists() and not (tmp_path / "gen.jsonl").exists()


@pytest.mark.parametrize(
    ("task", "label", "expected"),
    [
        ("seq-cls", 10**30, "class index 1000000000000000000000000000000 is too large"),
        ("seq-cls", 2**63, "is too large"),
        ("regression", int("9" * 400), "regression label must be a finite number"),
        ("regression", 1e39, "is beyond float32's range"),
    ],
)
def test_integer_labels_beyond_int64_or_float_are_bad_input(tiny_bert_dir, tmp_path, task, label, expected):
    rows = [{"text": "fine", "label": 1}, {"text": "huge", "label": label}]
    data = tmp_path / "labels.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    result = invoke("train", tiny_bert_dir, "--data", data, "--task", task, "--out", tmp_path / "run", *SMALL)
    line = error_line(result, 3)
    assert f"{data}:2:" in line and expected in line and len(line) < 300, line
    assert not (tmp_path / "run").exists()


def test_whole_number_float_labels_are_class_indices(tiny_bert_dir, tmp_path):
    runs = {}
    for kind, cast in (("float", float), ("int", int)):
        rows = [{**r, "label": cast(r["label"])} for r in CLS_ROWS]
        data = write_jsonl(tmp_path / f"{kind}.jsonl", rows)
        runs[kind] = tmp_path / f"run-{kind}"
        result = invoke(
            "train", tiny_bert_dir, "--data", data, "--task", "seq-cls", "--out", runs[kind], *SMALL
        )
        assert result.exit_code == 0, result.output
    labels = {kind: load_adapter(run / "adapter").config.labels for kind, run in runs.items()}
    assert labels["float"] == labels["int"] == ["0", "1"]
    result = invoke("eval", tiny_bert_dir, "-a", runs["int"] / "adapter", "--data", tmp_path / "float.jsonl")
    assert result.exit_code == 0, result.output


def test_a_csv_with_a_byte_order_mark_reads_its_first_column(tiny_bert_dir, tmp_path):
    data = tmp_path / "excel.csv"
    lines = ["text,label"] + [f"{r['text']},{'pos' if r['label'] else 'neg'}" for r in CLS_ROWS]
    data.write_text("\n".join(lines) + "\n", encoding="utf-8-sig")
    assert data.read_bytes().startswith(b"\xef\xbb\xbf")
    run = tmp_path / "run"
    result = invoke("train", tiny_bert_dir, "--data", data, "--out", run, *SMALL)
    assert result.exit_code == 0, result.output
    assert load_adapter(run / "adapter").config.labels == ["neg", "pos"]
    assert invoke("eval", tiny_bert_dir, "-a", run / "adapter", "--data", data).exit_code == 0


def test_max_length_beyond_the_models_positions_is_cut_there_with_a_note(tiny_bert_dir, tmp_path):
    rows = [{"text": "word " * 600, "label": i % 2} for i in range(4)]  # 600 tokens, 256 positions
    data = write_jsonl(tmp_path / "long.jsonl", rows)
    run = tmp_path / "run"
    args = ("--rank", "2", "--batch-size", "2", "--max-steps", "1", "--max-length", "100000")
    result = invoke("train", tiny_bert_dir, "--data", data, "--out", run, *args)
    assert result.exit_code == 0, result.output
    assert "--max-length 100000: the model takes 256 tokens; using 256" in result.output
    result = invoke("eval", tiny_bert_dir, "-a", run / "adapter", "--data", data, "--max-length", "100000")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("device", ["bogus", "cuda:99", "meta"])
def test_a_bogus_device_is_bad_input_on_every_command(world, tiny_llama_dir, device):
    for command in ("train", "eval", "generate", "init"):
        line = error_line(invoke(*command_line(command, world), "--device", device), 3)
        assert f"--device {device}" in line.replace("'", ""), (command, line)
    assert not (world["tmp"] / "out").exists()


def test_a_seed_beyond_32_bits_is_refused_before_sklearn_sees_it(tiny_bert_dir, tmp_path):
    data = write_jsonl(tmp_path / "cls.jsonl", CLS_ROWS)
    for extra in (("--eval-split", "0.25"), ("--svd", "sklearn")):
        result = invoke("train", tiny_bert_dir, "--data", data, "--out", tmp_path / "run", *SMALL, *extra,
                        "--seed", str(2**32))  # fmt: skip
        assert "--seed must be in [0, 4294967295]" in error_line(result, 2)
    result = invoke("train", tiny_bert_dir, "--data", data, "--out", tmp_path / "run", *SMALL,
                    "--eval-split", "0.25", "--seed", str(SEED_MAX))  # fmt: skip
    assert result.exit_code == 0, result.output  # the largest seed works


def test_adapter_paths_with_an_equals_sign(tiny_llama_dir, adapter, tmp_path, monkeypatch):
    import shutil

    monkeypatch.chdir(tmp_path)
    nested = tmp_path / "runs" / "lr=1e-3" / "adapter"
    shutil.copytree(adapter, nested)
    shutil.copytree(adapter, tmp_path / "a=b")
    rows = [{"adapter": name, "prompt": "1 plus 1 is"} for name in ("lr=1e-3", "a=b", "carol")]
    prompts = write_jsonl(tmp_path / "p.jsonl", rows)
    result = invoke("generate", tiny_llama_dir, "-p", prompts, "--max-new-tokens", "2",
                    "-a", nested, "-a", "a=b", "-a", f"carol={nested}")  # fmt: skip
    assert result.exit_code == 0, result.output
    names = [json.loads(line)["adapter"] for line in result.output.splitlines() if line.startswith("{")]
    assert names == ["lr=1e-3", "a=b", "carol"]
    assert split_name("alice=runs/x=y") == ("alice", "runs/x=y")
    assert split_name("runs/lr=1e-3/adapter") == (None, "runs/lr=1e-3/adapter")
    assert split_name("a=b") == (None, "a=b")  # an existing directory
    assert split_name("pack.safetensors::x") == (None, "pack.safetensors::x")
    assert split_name("__x=y") == (None, "__x=y")
    # not a valid name, but an existing directory after '=': NAME=DIR, and the name check says why not
    assert split_name(f"a/b={nested}") == ("a/b", str(nested))
    pack = tmp_path / "p.safetensors"
    for spec in (f"a/b={nested}", nested):  # the run's name 'lr=1e-3' cannot name a member either
        assert "cannot name a pack member" in error_line(invoke("pack", spec, "--out", pack), 2)
    assert invoke("pack", f"lr3={nested}", "--out", pack).exit_code == 0  # NAME=PATH-with-'='


def test_output_names_near_the_file_name_limit(tiny_llama_dir, adapter, tmp_path):
    prompts = write_jsonl(tmp_path / "p.jsonl", [{"adapter": "alice", "prompt": "1 plus 1 is"}])
    (tmp_path / "outs").mkdir()
    out = tmp_path / "outs" / ("o" * (NAME_MAX - len(".jsonl")) + ".jsonl")
    result = invoke(
        "generate", tiny_llama_dir, "-p", prompts, "-a", adapter, "--max-new-tokens", "2", "-o", out
    )
    assert result.exit_code == 0, result.output
    assert out.is_file() and [p.name for p in out.parent.iterdir()] == [out.name]  # no temporary left
    # an adapter directory written under such a name (train's RUN/adapter, unpack's OUT/NAME, convert)
    long_dir = tmp_path / "outs" / ("é" * 127)  # 254 bytes
    save_adapter(long_dir, load_adapter(adapter).config, load_adapter(adapter).R)
    save_adapter(long_dir, load_adapter(adapter).config, load_adapter(adapter).R)  # replaced: .old twin
    assert load_adapter(long_dir).R.keys() == load_adapter(adapter).R.keys()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted([out.name, long_dir.name])


@pytest.mark.parametrize("name", ["x", "o" * 255, "é" * 127, "日本" * 40, "a" * 200 + ".safetensors"])
def test_temp_siblings_fit_the_name_limit_and_stay_unique(tmp_path, name):
    target = tmp_path / name
    twins = {temp_sibling(target) for _ in range(20)} | {temp_sibling(target, "old") for _ in range(20)}
    assert len(twins) == 40
    for twin in twins:
        assert len(twin.name.encode()) <= NAME_MAX and twin.parent == tmp_path
        twin.mkdir()  # the file system takes it
        assert twin.name.startswith(".")
    if len(name.encode()) < 200:  # a short name keeps the documented form, .NAME.tmp-PID-HEX
        assert all(t.name.startswith((f".{name}.tmp-", f".{name}.old-")) for t in twins)


def test_malformed_messages_in_eval_name_file_and_line(tiny_llama_dir, tmp_path):
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    bad = {"messages": [{"role": "user", "content": 7}, {"role": "assistant", "content": "2"}]}
    data = write_jsonl(tmp_path / "chat.jsonl", [good, bad])
    for extra in ((), ("--generate", "--max-new-tokens", "2")):
        line = error_line(invoke("eval", tiny_llama_dir, "--data", data, *extra), 3)
        assert f"{data}:2: message 1 (user): 'content' must be a string" in line, line


def test_the_tokenizer_carries_the_models_position_limit(tiny_gpt2_dir, tiny_llama_dir):
    from loraxs_cli.data import Row, check_generation_fits, token_limit
    from loraxs_cli.models import load_tokenizer, resolve_model

    for model in (tiny_gpt2_dir, tiny_llama_dir):  # n_positions, max_position_embeddings
        tokenizer = load_tokenizer(resolve_model(str(model)))
        assert token_limit(tokenizer) == 256
    row = Row({"prompt": "word " * 300}, "p.jsonl:4")
    with pytest.raises(
        BadInputError, match=r"p\.jsonl:4: the prompt has \d+ tokens; with --max-new-tokens 8"
    ):
        check_generation_fits(row, row.fields["prompt"], tokenizer, 8)
    check_generation_fits(row, "word " * 10, tokenizer, 8)


def test_a_prompt_past_the_models_positions_is_bad_input_in_generate_and_eval(tiny_gpt2_dir, tmp_path):
    """GPT-2's learned positions end at 256: a longer prompt (plus --max-new-tokens) is refused at its
    row in `generate` and `eval --generate`, not an IndexError deep in the model (exit 1)."""
    long = {"prompt": "word " * 300, "response": " 2"}
    data = write_jsonl(tmp_path / "long.jsonl", [{"prompt": "1 plus 1 is", "response": " 2"}, long])
    gen = error_line(invoke("generate", tiny_gpt2_dir, "--prompts", data, "--max-new-tokens", "4"), 3)
    ev = error_line(invoke("eval", tiny_gpt2_dir, "--data", data, "--generate", "--max-new-tokens", "4"), 3)
    for line in (gen, ev):
        assert f"{data}:2: the prompt has" in line and "--max-new-tokens 4" in line, line
