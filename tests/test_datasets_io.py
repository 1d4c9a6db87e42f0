"""Data through the `datasets` library (datasources.py): every source kind made by `datasets` itself
(save_to_disk directories, to_parquet, the Arrow files it writes, a hub id in its own cache, made by
load_dataset and read back offline), the alpaca / ShareGPT / OpenAI layouts and --columns, `train
--streaming` with exact resume, and the tokenisation cache (tokenized.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraxs_cli import data as datamod
from loraxs_cli import datasources
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError, UsageError
from loraxs_cli.train import latest_checkpoint

datasets = pytest.importorskip("datasets")

ROWS = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(4) for b in range(3)]


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def train_args(model: Path, data, out: Path, *extra) -> list:
    return ["train", model, "--data", data, "--out", out, "--rank", "2", "--batch-size", "2",
            "--max-length", "32", "--lr", "1e-2", "--save-every", "0", *extra]  # fmt: skip


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """publish(name, {split: rows}) -> NAME, a hub dataset id that `datasets` resolves from its own cache
    offline: the rows written as parquet in a hub repository's layout (data/SPLIT-00000-of-00001.parquet),
    loaded once with datasets.load_dataset on that folder (which writes the cache entry NAME/default/...),
    the folder then removed, so only the cache can serve the id."""
    cache = tmp_path / "hf-datasets"
    monkeypatch.setenv("HF_DATASETS_CACHE", str(cache))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    assert datasets.config.HF_HUB_OFFLINE  # tests/conftest.py: HF_HUB_OFFLINE=1

    def publish(name: str, splits: dict[str, list[dict]]) -> str:
        repo = tmp_path / "repos" / name
        (repo / "data").mkdir(parents=True)
        for split, rows in splits.items():
            datasets.Dataset.from_list(rows).to_parquet(
                str(repo / "data" / f"{split}-00000-of-00001.parquet")
            )
        datasets.load_dataset(str(repo))
        for file in (repo / "data").iterdir():
            file.unlink()
        return name

    return publish


def fields(rows) -> list[dict]:
    return [row.fields for row in rows]


def test_every_source_kind_made_by_datasets_reads_the_same_rows(tmp_path, hub):
    dataset = datasets.Dataset.from_list(ROWS)
    dataset.save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": dataset, "test": dataset.select(range(3))}).save_to_disk(
        str(tmp_path / "dict")
    )
    dataset.to_parquet(str(tmp_path / "rows.parquet"))
    arrow = next((tmp_path / "one").glob("data-*.arrow"))  # the Arrow file save_to_disk wrote
    name = hub("loraxs_tiny_sums", {"train": ROWS, "test": ROWS[:3]})
    places = {
        str(tmp_path / "one"): f"{tmp_path / 'one'} row 1",
        str(tmp_path / "dict"): f"{tmp_path / 'dict'}[train] row 1",
        f"{tmp_path / 'dict'}[test]": f"{tmp_path / 'dict'}[test] row 1",
        str(tmp_path / "rows.parquet"): f"{tmp_path / 'rows.parquet'}:row 1",
        str(arrow): f"{arrow}:row 1",
        name: f"{name}[train] row 1",
        f"{name}[test]": f"{name}[test] row 1",
        str(write_jsonl(tmp_path / "rows.jsonl", ROWS)): f"{tmp_path / 'rows.jsonl'}:1",
    }
    for source, first in places.items():
        rows = datasources.read_rows(source)
        assert fields(rows) == (ROWS[:3] if source.endswith("[test]") else ROWS), source
        assert rows[0].where == first
    assert fields(datasources.read_rows(datasources.DataSpec(name, split="test"))) == ROWS[:3]
    assert datasources.open_source(str(tmp_path / "dict")).describe()["split"] == "train"
    record = datasources.open_source(name).describe()
    assert record["kind"] == "hub" and record["id"] == name and record["split"] == "train"
    assert record["config"] == "default" and record["fingerprint"]
    # what cannot be read is one line that says why
    with pytest.raises(
        BadInputError, match=r"no split 'validation' in this DatasetDict \(splits: train, test\)"
    ):
        datasources.read_rows(datasources.DataSpec(str(tmp_path / "dict"), split="validation"))
    with pytest.raises(BadInputError, match=r"nor a dataset in the datasets cache .* HF_HUB_OFFLINE is set"):
        datasources.read_rows("nobody/loraxs_not_cached")
    with pytest.raises(
        BadInputError, match=r"loraxs_tiny_sums\[validation\]: cannot load this dataset: Unknown split"
    ):
        datasources.read_rows(f"{name}[validation]")
    with pytest.raises(BadInputError, match="no such data file"):
        datasources.read_rows(str(tmp_path / "missing.jsonl"))
    with pytest.raises(UsageError, match="apply to datasets, not a single file"):
        datasources.read_rows(datasources.DataSpec(str(tmp_path / "rows.jsonl"), split="test"))


def test_layouts_and_columns(tmp_path):
    alpaca = [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "hi"},
    ]
    rows = datasources.read_rows(str(write_jsonl(tmp_path / "alpaca.jsonl", alpaca)))
    prompt = datasources.ALPACA_PROMPT["prompt_input"].format(instruction="Add the numbers.", input="2 and 3")
    assert rows[0].fields == {"prompt": prompt, "response": "5"}
    assert rows[1].fields["prompt"].endswith("### Instruction:\nSay hi.\n\n### Response:")
    assert "### Input" not in rows[1].fields["prompt"]
    sharegpt = {
        "system": "Be brief.",
        "conversations": [{"from": "human", "value": "2+3?"}, {"from": "gpt", "value": "5"}],
    }
    openai = {"messages": [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": "5"}]}
    chat = datasets.Dataset.from_list([sharegpt])
    chat.save_to_disk(str(tmp_path / "chat"))
    (row,) = datasources.read_rows(str(tmp_path / "chat"))
    assert row.fields == {"messages": [{"role": "system", "content": "Be brief."}, *openai["messages"]]}
    assert datasources.shaped(datamod.Row(openai, "x")).fields == openai  # OpenAI style: as it is
    bad = {"conversations": [{"from": "narrator", "value": "once"}]}
    with pytest.raises(BadInputError, match=r"bad.jsonl:1: conversation turn 1: unknown speaker 'narrator'"):
        datasources.read_rows(str(write_jsonl(tmp_path / "bad.jsonl", [bad])))
    # --columns renames; a missing column is an error at the row (a file) or at the dataset
    qa = [{"question": "2+3?", "answer_text": "5", "id": 7}]
    spec = datasources.DataSpec(
        str(write_jsonl(tmp_path / "qa.jsonl", qa)), columns="prompt=question,response=answer_text"
    )
    assert datasources.read_rows(spec)[0].fields == {"id": 7, "prompt": "2+3?", "response": "5"}
    with pytest.raises(BadInputError, match=r"qa.jsonl:1: --columns response=output: no column 'output'"):
        datasources.read_rows(datasources.DataSpec(spec.source, columns="prompt=question,response=output"))
    datasets.Dataset.from_list(qa).save_to_disk(str(tmp_path / "qa"))
    with pytest.raises(
        BadInputError, match=r"qa: --columns response=output: no column 'output' \(columns: question"
    ):
        datasources.read_rows(datasources.DataSpec(str(tmp_path / "qa"), columns="response=output"))
    for columns, message in (("reply=output", "unknown field 'reply'"), ("prompt", "write FIELD=COLUMN"),
                             ("text=a,text=b", "'text' given twice")):  # fmt: skip
        with pytest.raises(UsageError, match=message):
            datasources.DataSpec("x.jsonl", columns=columns)


def test_missing_datasets_library_names_the_extra(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)
    with pytest.raises(UsageError, match=r"org/name: no such file or directory; a hub dataset id needs the "
                       r"datasets package: pip install 'loraxs\[data\]'"):  # fmt: skip
        datasources.read_rows("org/name")


def test_command_line_refuses_bad_columns_and_streaming_without_steps(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    refused = [
        (["--columns", "reply=output"], 2, "--columns: unknown field 'reply'"),
        (["--columns", "prompt=question"], 3, "train.jsonl:1: --columns prompt=question: no column"),
        (["--streaming"], 2, "--streaming needs --max-steps"),
        (["--streaming", "--max-steps", "2", "--eval-split", "0.2"], 2, "combined with --eval-split"),
    ]  # fmt: skip
    for extra, code, message in refused:
        result = invoke(*train_args(tiny_llama_dir, data, tmp_path / "run", *extra))
        assert result.exit_code == code, result.output
        assert message in result.output and len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_train_on_a_cached_hub_dataset_records_it_and_names_a_bad_row(tiny_llama_dir, tmp_path, hub):
    chats = [{"conversations": [{"from": "human", "value": f"{a}+1?"}, {"from": "gpt", "value": str(a + 1)}]}
             for a in range(6)]  # fmt: skip
    name = hub("loraxs_tiny_chat", {"train": chats, "test": chats[:2]})
    run = tmp_path / "run"
    result = invoke(
        *train_args(
            tiny_llama_dir,
            name,
            run,
            "--eval-data",
            f"{name}[test]",
            "--max-steps",
            "2",
            "--max-length",
            "64",
        )
    )
    assert result.exit_code == 0, result.output
    config = json.loads((run / "adapter" / "loraxs_config.json").read_text())
    data = config["extra"]["data"]
    assert data["kind"] == "hub" and data["id"] == name and data["split"] == "train"
    assert data["config"] == "default" and data["fingerprint"] and data["sha256"] is None
    assert data["rows"] == 6 and data["eval_examples"] == 2
    evaluated = invoke("eval", tiny_llama_dir, "-a", run / "adapter", "--data", name, "--data-split", "test",
                       "--max-length", "64", "--json")  # fmt: skip
    assert evaluated.exit_code == 0, evaluated.output
    assert json.loads(evaluated.stdout)["results"][0]["examples"] == 2
    generated = invoke("generate", tiny_llama_dir, "-a", run / "adapter", "--prompts", f"{name}[test]",
                       "--max-new-tokens", "2")  # fmt: skip
    assert generated.exit_code == 0, generated.output
    assert [json.loads(line)["row"] for line in generated.stdout.splitlines()] == [0, 1]
    broken = [
        *chats[:2],
        {"conversations": [{"from": "narrator", "value": "3"}, {"from": "gpt", "value": "4"}]},
    ]
    bad = hub("loraxs_tiny_bad", {"train": broken})
    result = invoke(*train_args(tiny_llama_dir, bad, tmp_path / "bad", "--max-steps", "1"))
    assert result.exit_code == 3
    assert f"{bad}[train] row 3: conversation turn 1: unknown speaker 'narrator'" in result.output


def test_tokenisation_is_cached_across_runs(tiny_llama_dir, tmp_path, loraxs_home, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    held = write_jsonl(tmp_path / "held.jsonl", ROWS[:4])
    real_encode, calls = datamod.encode, []

    def counting(rows, *args, **kwargs):
        calls.append(len(rows))
        return real_encode(rows, *args, **kwargs)

    monkeypatch.setattr(datamod, "encode", counting)

    def train(out: str) -> dict:
        extra = ("--eval-data", held, "--max-steps", "1", "--json")
        result = invoke(*train_args(tiny_llama_dir, data, tmp_path / out, *extra))
        assert result.exit_code == 0, result.output
        return json.loads(result.stdout)

    first = train("first")
    assert calls == [len(ROWS), 4]  # the training rows and the held-out rows
    entries = sorted((loraxs_home / "tokenized").glob("*.safetensors"))
    assert len(entries) == 2
    calls.clear()
    second = train("second")
    assert calls == []  # nothing tokenised: both sets came from the cache
    assert second["final_loss"] == first["final_loss"] and second["eval"] == first["eval"]
    for entry in entries:  # a damaged entry is ignored and rewritten, never an error
        entry.write_bytes(entry.read_bytes()[:-7])
    third = train("third")
    assert calls == [len(ROWS), 4] and third["final_loss"] == first["final_loss"]
    calls.clear()
    train("fourth")
    assert calls == []


def test_streaming_interrupted_and_resumed_matches_an_uninterrupted_run(
    tiny_llama_dir, tmp_path, monkeypatch
):
    # Texts of 1 to 3 blocks of 16 tokens (6 row examples an epoch), 8 steps of 2 examples: the run goes
    # into its third epoch, and step 7 begins inside a row of epoch 2 (checked below).
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "saw", "many", "dogs", "run", "past"] * 3
    rows = [{"text": " ".join(words[:n])} for n in (4, 14, 28, 6, 20, 3)]
    data = write_jsonl(tmp_path / "text.jsonl", rows)
    common = ("--streaming", "--shuffle-buffer", "3", "--max-steps", "8", "--save-every", "3",
              "--max-length", "16", "--schedule", "constant", "--log-every", "1")  # fmt: skip
    real_step, real_encode = torch.optim.AdamW.step, datamod.encode
    done, encoded, stop_at = [0], [], [None]

    def step(self, *args, **kwargs):
        if done[0] + 1 == stop_at[0]:
            raise KeyboardInterrupt  # Ctrl-C during that step: the checkpoint of the step before it
        result = real_step(self, *args, **kwargs)
        done[0] += 1
        return result

    def encode(rows, *args, **kwargs):
        encoded.append((done[0], rows[0].where))  # (steps done, the row tokenised)
        return real_encode(rows, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    monkeypatch.setattr(datamod, "encode", encode)
    straight, broken = tmp_path / "straight", tmp_path / "broken"
    assert invoke(*train_args(tiny_llama_dir, data, straight, *common)).exit_code == 0
    straight_encoded, done[0], stop_at[0] = list(encoded), 0, 7
    assert invoke(*train_args(tiny_llama_dir, data, broken, *common)).exit_code == 130
    found = latest_checkpoint(broken)
    assert found[1]["step"] == 6
    position = found[1]["data_position"]
    assert position["streaming"] and (position["epoch"], position["rows"], position["taken"]) == (1, 1, 1)

    encoded.clear()
    stop_at[0] = None
    resumed = invoke(*train_args(tiny_llama_dir, data, broken, *common, "--json"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 6
    # The used-up row of epoch 2 was passed over untokenised; the partly used one was tokenised again, then
    # exactly the rows the uninterrupted run tokenised in its steps 7 and 8.
    before = [where for steps, where in straight_encoded if steps < 6]
    after = [where for steps, where in straight_encoded if steps >= 6]
    assert [where for _, where in encoded] == [before[-1], *after]
    a = {k: v for k, v in load_file(straight / "adapter" / "adapter.safetensors").items() if k.endswith(".R")}
    b = {k: v for k, v in load_file(broken / "adapter" / "adapter.safetensors").items() if k.endswith(".R")}
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
               if "loss" in r] for run in (straight, broken)]  # fmt: skip
    assert losses[0] == losses[1] and len(losses[0]) == 8
    data_record = json.loads((straight / "adapter" / "loraxs_config.json").read_text())["extra"]["data"]
    assert data_record["streaming"] is True and data_record["rows"] is None


def test_streaming_dry_run_and_lora_sb_sample_from_the_first_rows(tiny_llama_dir, tmp_path):
    data = write_jsonl(tmp_path / "train.jsonl", ROWS)
    stream = ("--streaming", "--shuffle-buffer", "0", "--max-steps", "2")
    plan = invoke(
        *train_args(tiny_llama_dir, data, tmp_path / "plan", *stream, "--dry-run", "--no-measure", "--json")
    )
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["train_examples"] is None and json.loads(plan.stdout)["steps"] == 2
    run = tmp_path / "sb"
    result = invoke(*train_args(tiny_llama_dir, data, run, *stream, "--method", "sb", "--sb-samples", "3"))
    assert result.exit_code == 0, result.output
    sb = json.loads((run / "adapter" / "loraxs_config.json").read_text())["extra"]["sb"]
    assert sb["samples"] == 3 and sb["sample"] == "first rows of the stream"
    assert sb["data_sha256"] == datamod.file_sha256(data)
