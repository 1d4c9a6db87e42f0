"""Adapter specs (sources.py): DIR, NAME=DIR, PACK and PACK::NAME work in every command that takes
adapters (eval, generate, inspect, merge, convert, pack); a missing member is a one-line error."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from hub_for_tests import FakeHub, isolate, serving
from typer.testing import CliRunner

from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError, UsageError
from loraxs_cli.pack import pack_adapters
from loraxs_cli.sources import (
    default_name,
    input_paths,
    is_adapter_spec,
    load_adapters,
    load_one,
    parse_specs,
    spec_path,
)
from models_for_tests import make_adapter

runner = CliRunner()
ROWS = [{"prompt": f"{a} plus {b} is", "response": f" {a + b}"} for a in range(3) for b in range(2)]


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def ok_json(*args) -> dict:
    result = invoke(*args, "--json")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def one_line_error(result, code: int, *fragments: str) -> None:
    assert result.exit_code == code, (result.exit_code, result.output)
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, (fragment, result.stderr)


@pytest.fixture(scope="module")
def made(tiny_llama_dir, tmp_path_factory) -> dict[str, Path]:
    """Two adapters with embedded factors (no cache needed later), a pack of both and one of one."""
    root = tmp_path_factory.mktemp("sources")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(root / "home"))  # never the user's cache
        alice = make_adapter(tiny_llama_dir, root / "runs" / "alice" / "adapter", seed=1, embed_factors=True)
        bob = make_adapter(tiny_llama_dir, root / "bob", seed=2, r_std=0.3, embed_factors=True)
    pack = root / "team.safetensors"
    pack_adapters([("alice", str(alice)), ("bob", str(bob))], pack)
    solo = root / "solo.safetensors"
    pack_adapters([("bob", str(bob))], solo)
    data = root / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return {"alice": alice, "bob": bob, "pack": pack, "solo": solo, "data": data, "root": root}


# ----------------------------------------------------------------------------- the layer itself


def test_parse_specs_every_form(made):
    pack = made["pack"]
    specs = [str(made["alice"]), f"b={made['bob']}", str(pack), f"x={pack}::bob"]
    assert [(s.name, s.spec) for s in parse_specs(specs, unique=False)] == [
        ("alice", str(made["alice"])),  # a run's adapter/ is named by the run
        ("b", str(made["bob"])),
        ("alice", f"{pack}::alice"),  # a pack stands for all its members
        ("bob", f"{pack}::bob"),
        ("x", f"{pack}::bob"),
    ]
    with pytest.raises(UsageError, match="two adapters are named 'alice'"):
        parse_specs([str(made["alice"]), str(pack)])
    assert len(parse_specs([str(made["alice"]), str(pack)], unique=False)) == 3
    assert [s.name for s in parse_specs([f"{pack}::bob", f"x={pack}::alice"])] == ["bob", "x"]
    assert default_name(f"{pack}::bob") == "bob" and spec_path(f"x={pack}::bob") == pack
    assert spec_path(f"b={made['bob']}") == made["bob"]
    labels = input_paths([str(pack)])
    assert labels["the adapter 'alice'"] == pack and "the factor cache" in labels
    with pytest.raises(UsageError, match="NAME= names one adapter"):
        parse_specs([f"t={pack}"])


def test_load_every_form_gives_the_same_adapter(made):
    pack = made["pack"]
    names, adapters = load_adapters([str(pack), f"carol={made['alice']}"])
    assert names == ["alice", "bob", "carol"]
    assert adapters[0].config.to_json() == adapters[2].config.to_json()
    assert str(adapters[1].path) == f"{pack}::bob"
    assert load_one(f"{pack}::bob").config.to_json() == load_one(made["bob"]).config.to_json()
    assert load_one(made["solo"]).config.to_json() == load_one(f"b={made['bob']}").config.to_json()
    with pytest.raises(UsageError, match=r"holds 2 adapters .*name one with"):
        load_one(pack)
    with pytest.raises(BadInputError, match="no adapter named 'carol' in this pack"):
        load_one(f"{pack}::carol")
    with pytest.raises(BadInputError, match="no such adapter pack"):
        load_one(f"{made['root']}/absent.safetensors::bob")
    not_a_pack = made["root"] / "plain.safetensors"
    not_a_pack.write_bytes(b"not safetensors")
    with pytest.raises(BadInputError, match="not a readable safetensors file"):
        load_one(not_a_pack)
    assert is_adapter_spec(pack) and is_adapter_spec(f"{pack}::bob") and is_adapter_spec(made["bob"])
    assert not is_adapter_spec(made["data"]) and not is_adapter_spec("gpt3-175b")


# ----------------------------------------------------------------------------- every command


def test_eval_takes_every_form(tiny_llama_dir, made):
    pack, data = made["pack"], made["data"]
    alone = ok_json("eval", tiny_llama_dir, "--data", data, "-a", made["alice"], "-a", made["bob"])["results"]
    packed = ok_json("eval", tiny_llama_dir, "--data", data, "-a", pack)["results"]
    assert [r["adapter"] for r in packed] == [f"{pack}::alice", f"{pack}::bob"]
    for a, b in zip(alone, packed, strict=True):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    member = ok_json("eval", tiny_llama_dir, "--data", data, "-a", f"{pack}::bob")["results"]
    named = ok_json("eval", tiny_llama_dir, "--data", data, "-a", f"b={made['bob']}")["results"]
    assert member[0]["loss"] == pytest.approx(named[0]["loss"], rel=1e-5) == pytest.approx(alone[1]["loss"])
    missing = invoke("eval", tiny_llama_dir, "--data", data, "-a", f"{pack}::carol")
    one_line_error(missing, 3, "no adapter named 'carol'", "alice")


def test_generate_takes_every_form(tiny_llama_dir, made, tmp_path):
    pack = made["pack"]
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        "".join(json.dumps({"adapter": n, "prompt": "2 plus 1 is"}) + "\n" for n in ("alice", "bob", None))
    )

    def outputs(*specs) -> list[str]:
        args = [a for spec in specs for a in ("-a", spec)]
        result = invoke("generate", tiny_llama_dir, "-p", prompts, "--max-new-tokens", 4, *args)
        assert result.exit_code == 0, result.output
        rows = sorted((json.loads(line) for line in result.stdout.splitlines()), key=lambda r: r["row"])
        return [r["output"] for r in rows]

    expected = outputs(made["alice"], f"bob={made['bob']}")
    assert outputs(pack) == expected
    assert outputs(f"{pack}::alice", f"{pack}::bob") == expected
    assert outputs(f"alice={pack}::alice", made["bob"]) == expected
    missing = invoke("generate", tiny_llama_dir, "-p", prompts, "-a", f"{pack}::carol")
    one_line_error(missing, 3, "no adapter named 'carol'")


def test_inspect_takes_members_and_single_packs(made):
    pack = made["pack"]
    doc = ok_json("inspect", f"{pack}::bob")
    assert doc["path"] == f"{pack}::bob" and doc["method"] == "xs" and doc["factors"]["embedded"] is True
    assert doc["files"] == {pack.name: pack.stat().st_size}
    assert ok_json("inspect", made["solo"])["params"] == ok_json("inspect", made["bob"])["params"]
    one_line_error(invoke("inspect", pack), 2, "holds 2 adapters", "::NAME")
    one_line_error(invoke("inspect", f"{pack}::carol"), 3, "no adapter named 'carol'")


def test_merge_and_convert_take_members(tiny_llama_dir, made, tmp_path):
    pack = made["pack"]
    plan = ok_json("merge", tiny_llama_dir, "-a", f"{pack}::bob", "--out", tmp_path / "m", "--dry-run")
    assert plan["adapter"] == f"{pack}::bob" and plan["target_modules"] > 0
    named = ok_json("merge", tiny_llama_dir, "-a", f"b={made['bob']}", "--out", tmp_path / "m", "--dry-run")
    assert named["target_modules"] == plan["target_modules"]
    missing = invoke("merge", tiny_llama_dir, "-a", f"{pack}::carol", "--out", tmp_path / "m")
    one_line_error(missing, 3, "carol")
    exported = ok_json("convert", f"{pack}::bob", "--to", "peft-lora", "--out", tmp_path / "peft")
    direct = ok_json("convert", made["bob"], "--to", "peft-lora", "--out", tmp_path / "peft2")
    assert exported["params"] == direct["params"] and exported["modules"] == direct["modules"]
    missing = invoke("convert", f"{pack}::carol", "--to", "peft-lora", "--out", tmp_path / "p3")
    one_line_error(missing, 3, "carol")
    # an --out inside what the spec reads is refused, NAME= or not
    overlap = invoke("merge", tiny_llama_dir, "-a", f"b={made['bob']}", "--out", made["bob"] / "m")
    one_line_error(overlap, 3, "lies inside the adapter")


def test_pack_takes_every_form(made, tmp_path):
    pack = made["pack"]
    doc = ok_json("pack", pack, f"carol={pack}::bob", "--out", tmp_path / "re.safetensors")
    assert doc["adapters"] == 3
    listed = ok_json("unpack", tmp_path / "re.safetensors", "--out", tmp_path / "x", "--list")
    assert listed["adapters"] == ["alice", "bob", "carol"]
    missing = invoke("pack", f"{pack}::carol", "--out", tmp_path / "no.safetensors")
    one_line_error(missing, 3, "no adapter named 'carol'")


# ----------------------------------------------------------------------------- adapters on the Hub


def test_hub_adapters_resolve_through_huggingface_hubs_cache(
    tiny_llama_dir, tiny_bert_dir, made, tmp_path, monkeypatch
):
    """ORG/NAME[@REV] and NAME=ORG/NAME@REV: huggingface_hub downloads them from a stand-in Hub into its
    own cache (scan_cache_dir reads that cache back), then they resolve offline from it, load as the
    directories they came from, pass the base check, and a local path of the same name wins."""
    from huggingface_hub import scan_cache_dir

    cache = isolate(tmp_path / "hf-home", monkeypatch)
    hub = FakeHub()
    main = hub.add("team/xs", made["alice"])
    v2 = hub.add("team/xs", made["bob"], branch="v2")
    peft = tmp_path / "peft"
    peft.mkdir()
    (peft / "adapter_config.json").write_text("{}")
    hub.add("team/peft", peft)
    with serving(hub, monkeypatch):
        assert load_one("team/xs").config.to_json() == load_one(made["alice"]).config.to_json()
        assert load_one("team/xs@v2").config.to_json() == load_one(made["bob"]).config.to_json()
        with pytest.raises(BadInputError, match=r"has no loraxs_config.json: not a loraxs adapter \(a PEFT"):
            load_one("team/peft")
    repos = {r.repo_id: r for r in scan_cache_dir(cache).repos}
    revisions = {rev.commit_hash: rev for rev in repos["team/xs"].revisions}
    assert repos["team/xs"].repo_type == "model" and set(revisions) == {main, v2}
    assert set(revisions[main].refs) == {"main"} and set(revisions[v2].refs) == {"v2"}
    assert {f.file_name for f in revisions[main].files} >= {"loraxs_config.json", "adapter.safetensors"}

    # offline (HF_HUB_OFFLINE=1, the tests' default): from the cache only
    sources = parse_specs(["team/xs", "b=team/xs@v2", f"team/xs@{main}"], unique=False)
    assert [(s.name, s.origin) for s in sources] == [
        ("xs", "team/xs"),
        ("b", "team/xs@v2"),
        ("xs", f"team/xs@{main}"),
    ]
    assert sources[0].path == cache / "models--team--xs" / "snapshots" / main == spec_path("team/xs")
    data = made["data"]
    hub_losses = ok_json("eval", tiny_llama_dir, "--data", data, "-a", "team/xs", "-a", "b=team/xs@v2")[
        "results"
    ]
    local = ok_json("eval", tiny_llama_dir, "--data", data, "-a", made["alice"], "-a", made["bob"])["results"]
    assert [r["loss"] for r in hub_losses] == pytest.approx([r["loss"] for r in local], rel=1e-6)
    one_line_error(
        invoke("eval", tiny_llama_dir, "--data", data, "-a", "team/absent"),
        3,
        "team/absent: no such adapter directory; as a Hugging Face repo: not in the Hugging Face cache",
        "HF_HUB_OFFLINE is set",
    )
    one_line_error(
        invoke("eval", tiny_llama_dir, "--data", data, "-a", "team/xs@v9"),
        3,
        "team/xs@v9",
        "at revision 'v9'",
    )
    plan = ok_json("merge", tiny_llama_dir, "-a", "team/xs@v2", "--out", tmp_path / "m", "--dry-run")
    assert plan["target_modules"] > 0
    pushed = ok_json("push", "team/xs@v2", "me/copy", "--dry-run")
    assert {f["path"] for f in pushed["files"]} == {
        "loraxs_config.json",
        "adapter.safetensors",
        "factors.safetensors",
        "README.md",
    }
    wrong_base = invoke("eval", tiny_bert_dir, "--data", data, "-a", "team/xs")
    assert wrong_base.exit_code == 4 and "adapter team/xs was trained on base" in wrong_base.stderr

    # a local path that exists always wins over the hub id it looks like
    monkeypatch.chdir(tmp_path)
    shutil.copytree(made["bob"], tmp_path / "team" / "xs")
    assert parse_specs(["team/xs"])[0].origin is None
    assert load_one("team/xs").config.to_json() == load_one(made["bob"]).config.to_json()
