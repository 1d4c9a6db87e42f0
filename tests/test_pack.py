"""`loraxs pack` / `unpack`: many adapters in one safetensors file; members usable as adapters."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

from loraxs_cli.adapter import load_adapter, save_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError
from loraxs_cli.pack import load_member, pack_adapters, pack_names
from loraxs_cli.sources import load_one
from models_for_tests import make_adapter

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def same_adapter(a, b) -> None:
    assert a.config.to_json() == b.config.to_json()
    assert a.R.keys() == b.R.keys() and all(torch.equal(a.R[k], b.R[k]) for k in a.R)
    assert a.head.keys() == b.head.keys() and all(torch.equal(a.head[k], b.head[k]) for k in a.head)
    assert (a.factors is None) == (b.factors is None)
    if a.factors is not None:
        assert all(torch.equal(a.factors[m][p], b.factors[m][p]) for m in a.factors for p in a.factors[m])


def test_pack_round_trip_and_members_as_adapters(tiny_llama_dir, tiny_bert_dir, tmp_path):
    dirs = {
        "plain": make_adapter(tiny_llama_dir, tmp_path / "plain", seed=1),
        "embedded": make_adapter(tiny_llama_dir, tmp_path / "embedded", seed=2, embed_factors=True),
        "classifier": make_adapter(tiny_bert_dir, tmp_path / "cls", task="seq-cls", labels=["a", "b"]),
    }
    pack = tmp_path / "team.safetensors"
    result = invoke(
        "pack", dirs["plain"], dirs["embedded"], f"classifier={dirs['classifier']}", "--out", pack, "--json"
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["adapters"] == 3
    assert pack_names(pack) == ["plain", "embedded", "classifier"]
    for name, directory in dirs.items():
        member = load_one(f"{pack}::{name}")  # accepted wherever a directory is
        same_adapter(member, load_adapter(directory))
        assert str(member.path) == f"{pack}::{name}"
    listed = invoke("unpack", pack, "--out", tmp_path / "x", "--list", "--json")
    assert json.loads(listed.stdout)["adapters"] == ["plain", "embedded", "classifier"]
    result = invoke("unpack", pack, "--out", tmp_path / "back")
    assert result.exit_code == 0, result.output
    for name, directory in dirs.items():
        same_adapter(load_adapter(tmp_path / "back" / name), load_adapter(directory))
    result = invoke("unpack", pack, "--out", tmp_path / "back", "--name", "plain")
    assert result.exit_code == 3 and "exists; pass --force" in result.output


def test_eval_with_a_pack_member_equals_the_directory(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "one", seed=4)
    pack = tmp_path / "p.safetensors"
    pack_adapters([("one", str(adapter))], pack)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i} and", "response": f" {i}"}) + "\n" for i in range(6)))
    rows = []
    for source in (adapter, f"{pack}::one"):
        result = invoke("eval", tiny_llama_dir, "--data", data, "-a", source, "--json")
        assert result.exit_code == 0, result.output
        rows.append(json.loads(result.stdout)["results"][0])
    assert rows[0]["loss"] == rows[1]["loss"]


def test_a_thousand_adapters_in_one_pack(tiny_llama_dir, tmp_path):
    template = load_adapter(make_adapter(tiny_llama_dir, tmp_path / "template"))
    gen = torch.Generator().manual_seed(0)
    named = []
    for i in range(1000):
        R = {m: torch.randn(r.shape, generator=gen) for m, r in template.R.items()}
        named.append(
            (f"user{i:04d}", str(save_adapter(tmp_path / "many" / f"user{i:04d}", template.config, R)))
        )
    pack = tmp_path / "thousand.safetensors"
    started = time.perf_counter()
    summary = pack_adapters(named, pack)
    pack_seconds = time.perf_counter() - started
    assert summary["adapters"] == 1000 and len(pack_names(pack)) == 1000
    with safe_open(str(pack), framework="pt") as handle:
        assert len(list(handle.keys())) == 1000 * len(template.R)
    for i in (0, 517, 999):
        same_adapter(load_member(pack, f"user{i:04d}"), load_adapter(named[i][1]))
    # Every member can be stacked into one model at once: a pack file stands for all its members.
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(
        "".join(json.dumps({"adapter": f"user{i:04d}", "prompt": "hi"}) + "\n" for i in (3, 998))
    )
    result = invoke("generate", tiny_llama_dir, "-p", prompts, "-a", pack, "--max-new-tokens", "2")
    assert result.exit_code == 0, result.output
    assert [json.loads(line)["adapter"] for line in result.stdout.splitlines()] == ["user0003", "user0998"]
    print(f"packed 1000 adapters in {pack_seconds:.2f} s, {summary['bytes']:,} bytes")


def test_damaged_member_is_refused(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a", seed=1)
    pack = tmp_path / "p.safetensors"
    pack_adapters([("a", str(adapter))], pack)
    raw = bytearray(pack.read_bytes())
    raw[-3] ^= 0xFF  # a byte of the last tensor's data
    pack.write_bytes(bytes(raw))
    with pytest.raises(BadInputError, match="sha256 mismatch"):
        load_member(pack, "a")
    result = invoke("eval", tiny_llama_dir, "--data", tmp_path / "none.jsonl", "-a", f"{pack}::a")
    assert result.exit_code == 3 and "sha256 mismatch" in result.output


def test_pack_bad_input(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "a")
    pack = tmp_path / "p.safetensors"
    cases = [
        (("pack", adapter, "--out", tmp_path / "p.bin"), 2, "must end in .safetensors"),
        (("pack", f"x={adapter}", f"x={adapter}", "--out", pack), 2, "two adapters are named 'x'"),
        (("pack", f"a/b={adapter}", "--out", pack), 2, "cannot name a pack member"),
        (("pack", tmp_path / "missing", "--out", pack), 3, "no such adapter directory"),
        (
            ("unpack", adapter / "adapter.safetensors", "--out", tmp_path / "o"),
            3,
            "not a loraxs adapter pack",
        ),
    ]
    for args, code, message in cases:
        result = invoke(*args)
        assert result.exit_code == code and message in result.output, (args, result.output)
    assert invoke("pack", adapter, "--out", pack).exit_code == 0
    result = invoke("pack", adapter, "--out", pack)
    assert result.exit_code == 3 and "exists; pass --force" in result.output
    result = invoke("unpack", pack, "--out", tmp_path / "o", "--name", "zed")
    assert result.exit_code == 3 and "no adapter named 'zed'" in result.output
    result = invoke("eval", tiny_llama_dir, "--data", tmp_path / "d.jsonl", "-a", f"{pack}::zed")
    assert result.exit_code == 3 and "no adapter named 'zed'" in result.output


def test_pack_in_a_real_process(tiny_llama_dir, tmp_path):
    adapter = make_adapter(tiny_llama_dir, tmp_path / "solo")
    pack = tmp_path / "solo.safetensors"
    command = [sys.executable, "-m", "loraxs_cli", "pack", str(adapter), "--out", str(pack), "--json"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["adapters"] == 1
    same_adapter(load_member(pack, "solo"), load_adapter(adapter))
