"""The adapter directory: save/load roundtrip, R only by default or self-contained with embedded factors,
refusal of another base or factor set (exit 4), and `loraxs inspect ADAPTER_DIR`."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from loraxs_cli.adapter import (
    CONFIG_FILE,
    EMBEDDED_FACTORS_FILE,
    WEIGHTS_FILE,
    adapter_factors,
    check_base,
    load_adapter,
    new_config,
    save_adapter,
)
from loraxs_cli.cache import FactorCache
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError, IncompatibleError, MissingFactorsError
from loraxs_cli.initialize import FactorRequest, ensure_factors, plan_factors

runner = CliRunner()
RANK = 4


@pytest.fixture(scope="module")
def computed(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama's factors, computed once for the module into a cache of its own."""
    cache = FactorCache(tmp_path_factory.mktemp("module-cache") / "factors")
    plan = plan_factors(FactorRequest(str(tiny_llama_dir), rank=RANK), cache=cache)
    entry, _ = ensure_factors(plan, cache=cache)
    return plan, cache, entry.id


@pytest.fixture
def trained(computed, loraxs_home):
    """(plan, entry, R, head) as training would leave them: factors in this test's cache, random R."""
    plan, cache, entry_id = computed
    shutil.copytree(cache.root, loraxs_home / "factors")
    entry = FactorCache().get(entry_id)
    g = torch.Generator().manual_seed(7)
    R = {m: torch.randn(RANK, RANK, generator=g) for m in plan.targets}
    head = {"score.weight": torch.randn(3, 64, generator=g)}
    return plan, entry, R, head


def save(plan, entry, R, out, *, head=None, embed=False, **config):
    cfg = new_config(plan.base, entry, rank=RANK, task="seq-cls", labels=["a", "b", "c"], **config)
    factors = entry.load(RANK, plan.targets) if embed else None
    return save_adapter(out, cfg, R, head=head, factors=factors)


def test_roundtrip(trained, tmp_path):
    plan, entry, R, head = trained
    out = save(plan, entry, R, tmp_path / "adapter", head=head, alpha=8.0, extra={"data": "train.jsonl"})
    adapter = load_adapter(out)
    config = adapter.config
    assert (config.method, config.rank, config.alpha, config.scaling) == ("xs", RANK, 8.0, 2.0)
    assert (
        config.modules == sorted(plan.targets)
        and config.task == "seq-cls"
        and config.labels == ["a", "b", "c"]
    )
    assert (
        config.base["fingerprint"] == plan.base.fingerprint and config.base["spec"] == plan.base.resolved.spec
    )
    identity = {k: config.factors[k] for k in ("id", "sha256", "r_max", "method")}
    assert identity == {"id": entry.id, "sha256": entry.sha256, "r_max": RANK, "method": "xs"}
    assert config.factors["recipe"]["svd"] == entry.meta["recipe"]["svd"]  # to recompute a lost entry
    assert config.extra == {"data": "train.jsonl"} and config.head == ["score.weight"]
    assert set(adapter.R) == set(R)
    for name, value in R.items():
        assert adapter.R[name].dtype == torch.float32 and torch.equal(adapter.R[name], value)
    assert torch.equal(adapter.head["score.weight"], head["score.weight"])
    assert adapter.num_params == 14 * RANK * RANK and adapter.head_params == 3 * 64
    card = (out / "README.md").read_text()
    assert "library_name: loraxs" in card and "not a PEFT LoRA" in card


def test_r_only_by_default(trained, tmp_path):
    plan, entry, R, _ = trained
    out = save(plan, entry, R, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == sorted([CONFIG_FILE, WEIGHTS_FILE, "README.md"])
    assert not (out / "adapter_config.json").exists(), "PEFT would load it as a plain LoRA and ignore R"
    with safe_open(str(out / WEIGHTS_FILE), framework="pt") as handle:
        keys = list(handle.keys())
        assert handle.metadata()["format"] == "loraxs"
    assert sorted(keys) == sorted(f"{m}.R" for m in plan.targets)
    # r^2 float32 numbers per module plus the safetensors header: nothing of size m or n.
    payload = 14 * RANK * RANK * 4
    assert payload < (out / WEIGHTS_FILE).stat().st_size < payload + 4096
    assert load_adapter(out).factors is None


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o002])
def test_every_file_of_an_adapter_gets_the_umask_mode(trained, tmp_path, umask):
    """safetensors creates its files 0600 whatever the umask; an adapter directory's files (weights,
    factors, config, card) all get 0666 & ~umask, the directory 0777 & ~umask, and a replaced one too."""
    plan, entry, R, head = trained
    previous = os.umask(umask)
    try:
        out = save(plan, entry, R, tmp_path / "adapter", head=head, embed=True)
        modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()}
        assert set(modes) == {CONFIG_FILE, WEIGHTS_FILE, EMBEDDED_FACTORS_FILE, "README.md"}
        assert modes == dict.fromkeys(modes, 0o666 & ~umask), {k: oct(v) for k, v in modes.items()}
        assert stat.S_IMODE(out.stat().st_mode) == 0o777 & ~umask
        save(plan, entry, R, out)  # replaced in place (force is the default)
        assert {stat.S_IMODE(p.stat().st_mode) for p in out.iterdir()} == {0o666 & ~umask}
    finally:
        os.umask(previous)


def test_embedded_factors_make_the_adapter_self_contained(trained, tmp_path):
    plan, entry, R, _ = trained
    plain = save(plan, entry, R, tmp_path / "plain")
    embedded = save(plan, entry, R, tmp_path / "embedded", embed=True)
    assert (embedded / EMBEDDED_FACTORS_FILE).is_file()
    from_cache = adapter_factors(load_adapter(plain))
    FactorCache().remove(entry)
    own = adapter_factors(load_adapter(embedded))
    assert set(own) == set(plan.targets)
    for name, parts in from_cache.items():
        assert torch.equal(own[name]["A"], parts["A"]) and torch.equal(own[name]["B"], parts["B"])
    missing = rf"not in the cache \(LORAXS_HOME=.*loraxs init .* --rank {RANK}"
    with pytest.raises(MissingFactorsError, match=missing):
        adapter_factors(load_adapter(plain))


def test_refuses_another_base(trained, tmp_path, tiny_bert_dir):
    plan, entry, R, _ = trained
    out = save(plan, entry, R, tmp_path / "adapter")
    with pytest.raises(IncompatibleError) as error:
        check_base(load_adapter(out), "0" * 16, "other-model")
    message = str(error.value)
    assert plan.base.fingerprint in message and "0" * 16 in message
    assert plan.base.resolved.spec in message and "other-model" in message
    result = runner.invoke(
        app, ["merge", str(tiny_bert_dir), "--adapter", str(out), "--out", str(tmp_path / "m"), "--dry-run"]
    )
    assert result.exit_code == 4 and result.stderr.count("\n") == 1, result.stderr
    assert plan.base.fingerprint in result.stderr and str(tiny_bert_dir) in result.stderr


def test_refuses_another_factor_set(trained, tmp_path):
    """The cache entry the adapter names now holds other (intact) factors: refuse, naming both sets."""
    plan, entry, R, _ = trained
    out = save(plan, entry, R, tmp_path / "adapter")
    tensors = {k: v.clone() for k, v in entry.load(RANK).items() for k, v in
               {f"{k}.{p}": t for p, t in v.items()}.items()}  # fmt: skip
    tensors = {k: (-v if k.endswith(".B") else v) for k, v in tensors.items()}
    save_file(tensors, str(entry.file))
    from loraxs_cli.fingerprint import sha256_file

    meta = json.loads((entry.path / "meta.json").read_text())
    meta["sha256"] = new_sha = sha256_file(entry.file)
    (entry.path / "meta.json").write_text(json.dumps(meta))
    assert FactorCache().get(entry.id).verify() is None  # an intact entry, just not this adapter's
    with pytest.raises(IncompatibleError) as error:
        adapter_factors(load_adapter(out))
    assert entry.sha256[:12] in str(error.value) and new_sha[:12] in str(error.value)
    result = runner.invoke(
        app, ["merge", str(plan.base.resolved.path), "--adapter", str(out), "--out", str(tmp_path / "merged")]
    )
    assert result.exit_code == 4 and result.stderr.count("\n") == 1, result.stderr
    assert entry.sha256[:12] in result.stderr and new_sha[:12] in result.stderr
    assert not (tmp_path / "merged").exists()


def test_inspect_adapter_dir(trained, tmp_path):
    plan, entry, R, head = trained
    out = save(plan, entry, R, tmp_path / "adapter", head=head)
    result = runner.invoke(app, ["inspect", str(out), "--json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert (doc["method"], doc["rank"], doc["modules"]) == ("xs", RANK, 14)
    assert doc["params"] == 14 * RANK * RANK and doc["head_params"] == 3 * 64
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    assert doc["files"] == sizes and doc["bytes"] == sum(sizes.values())
    assert doc["base"]["fingerprint"] == plan.base.fingerprint
    assert doc["factors"]["id"] == entry.id and doc["factors"]["sha256"] == entry.sha256
    assert doc["factors"]["in_cache"] is True and doc["factors"]["embedded"] is False

    text = runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"})
    assert text.exit_code == 0
    for fragment in ("LoRA-XS adapter, rank 4", "224 in 14 modules", plan.base.fingerprint, "(in the cache)"):
        assert fragment in text.stdout, fragment

    FactorCache().remove(entry)
    gone = runner.invoke(app, ["inspect", str(out), "--json"])
    assert json.loads(gone.stdout)["factors"]["in_cache"] is False
    assert "(missing)" in runner.invoke(app, ["inspect", str(out)], env={"COLUMNS": "200"}).stdout


def test_inspect_in_a_real_process(trained, tmp_path):
    plan, entry, R, _ = trained
    out = save(plan, entry, R, tmp_path / "adapter", embed=True)
    run = subprocess.run(
        [sys.executable, "-m", "loraxs_cli", "inspect", str(out), "--json"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert run.returncode == 0, run.stderr
    doc = json.loads(run.stdout)
    assert doc["factors"]["embedded"] is True and doc["factors"]["in_cache"] is True
    assert EMBEDDED_FACTORS_FILE in doc["files"]


def test_damaged_adapters_are_bad_input(trained, tmp_path):
    plan, entry, R, _ = trained
    out = save(plan, entry, R, tmp_path / "adapter")
    with pytest.raises(BadInputError, match="no such adapter directory"):
        load_adapter(tmp_path / "absent")
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    with pytest.raises(BadInputError, match="a PEFT adapter: import it with `loraxs convert"):
        load_adapter(peft)
    config = json.loads((out / CONFIG_FILE).read_text())
    (out / CONFIG_FILE).write_text(json.dumps({**config, "format_version": 99}))
    with pytest.raises(BadInputError, match="unsupported adapter format version 99"):
        load_adapter(out)
    (out / CONFIG_FILE).write_text(json.dumps({**config, "rank": RANK + 1}))
    with pytest.raises(BadInputError, match="lacks a 5x5 R"):
        load_adapter(out)
    (out / CONFIG_FILE).write_text(json.dumps(config))
    (out / WEIGHTS_FILE).write_bytes(b"\x00" * 10)
    with pytest.raises(BadInputError, match="damaged adapter weights"):
        load_adapter(out)
    result = runner.invoke(app, ["inspect", str(out)])
    assert (
        result.exit_code == 3
        and result.stderr.count("\n") == 1
        and "damaged adapter weights" in result.stderr
    )


# ----------------------------------------------------------------------------- the model card


def _card_config(base: dict, data: dict, task: str = "seq-cls"):
    """An adapter config as `train` records it (a held-out evaluation), without a model."""
    from loraxs_cli.adapter import AdapterConfig

    metrics = {"steps": 100, "train_loss": 0.31, "eval_loss": 0.2, "eval_accuracy": 0.9, "eval_examples": 120}
    return AdapterConfig(
        method="xs",
        rank=8,
        alpha=8.0,
        modules=[f"layers.{i}.self_attn.{m}" for i in range(2) for m in ("q_proj", "v_proj")],
        base={"spec": "x", "fingerprint": "0123456789abcdef", "repo_id": None, "commit": None, **base},
        factors={
            "id": "tiny--0123/xs-r8",
            "sha256": "f" * 64,
            "r_max": 8,
            "method": "xs",
            "targets": "q_proj,v_proj",
        },
        task=task,
        labels=["neg", "pos"] if task == "seq-cls" else None,
        extra={"data": data, "metrics": metrics},
    )


def test_card_names_the_base_by_hub_id_and_the_data_in_words(tmp_path):
    """The card is huggingface_hub's ModelCard: its metadata reads back (model-index included when the
    data is a Hub dataset), base_model is a hub id (from a cache snapshot path too) or left out."""
    from huggingface_hub import ModelCard

    from loraxs_cli.adapter import default_card

    commit = "0" * 40
    snapshot = f"{tmp_path}/hf/hub/models--org--base/snapshots/{commit}"
    hub_data = {
        "path": "org/reviews",
        "kind": "hub",
        "id": "org/reviews",
        "config": "en",
        "split": "train",
        "rows": 1080,
        "examples": 1080,
        "eval_examples": 120,
        "eval_split": 0.1,
    }
    card = ModelCard(
        default_card(_card_config({"spec": snapshot}, hub_data), head_params=130, repo_id="me/r")
    )
    meta = card.data.to_dict()
    assert (meta["base_model"], meta["base_model_relation"], meta["library_name"]) == (
        "org/base",
        "adapter",
        "loraxs",
    )
    assert meta["pipeline_tag"] == "text-classification" and meta["datasets"] == ["org/reviews"]
    assert {"loraxs", "lora-xs", "text-classification"} <= set(meta["tags"])
    results = {r.metric_type: r for r in card.data.eval_results}
    assert set(results) == {"loss", "accuracy"} and results["accuracy"].metric_value == 0.9
    assert (results["loss"].dataset_type, results["loss"].dataset_config) == ("org/reviews", "en")
    assert meta["model-index"][0]["name"] == "me/r"
    text = card.text
    assert str(tmp_path) not in card.content
    assert (
        "- training data: the Hugging Face dataset org/reviews (config en, split train), "
        "1,080 rows trained on, 120 held out (10%)" in text
    )
    assert "- trainable numbers: 256 in R (4 modules x 8x8) + 130 in the task head" in text
    assert "- target modules: q_proj,v_proj (4 modules)" in text
    assert "| eval_accuracy | 0.9 | accuracy on the held-out data |" in text
    assert "loraxs eval org/base -a me/r --data" in text

    file_data = {
        "path": f"{tmp_path}/data/train.jsonl",
        "file": "train.jsonl",
        "sha256": "ab" * 32,
        "rows": 1080,
    }
    local = ModelCard(
        default_card(
            _card_config(
                {"spec": f"{tmp_path}/models/mine"}, {**file_data, "eval_split": 0.1, "eval_examples": 120}
            )
        )
    )
    assert (
        "base_model" not in local.data.to_dict() and local.data.eval_results is None
    )  # a file: the table only
    assert "- base model: mine (a local model: no Hugging Face Hub id is known" in local.text
    assert (
        "- training data: train.jsonl (sha256 abababababab), 1,080 rows trained on, 120 held out (10%)"
        in local.text
    )
    assert str(tmp_path) not in local.content and "loraxs eval BASE_DIR -a ADAPTER_DIR" in local.text
