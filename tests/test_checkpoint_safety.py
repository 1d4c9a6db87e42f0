"""No pickles: checkpoints are JSON + safetensors, and a crafted pickle anywhere loraxs reads one (an old
`state.pt`, a PEFT `adapter_model.bin`, a base model's `pytorch_model.bin`) is refused with exit 3 before
its payload can run."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from loraxs_cli.checkpoint import STATE_FILE, TENSORS_FILE, load_state, rng_state, save_state, set_rng_state
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError
from loraxs_cli.train import checkpoint_dirs, latest_checkpoint

runner = CliRunner()
ROWS = [{"prompt": f"{i} plus {i} is", "response": f" {2 * i}"} for i in range(8)]


class Payload:
    """Unpickling this object creates `marker`: what a hostile file would do with a shell instead."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').close()",))


def crafted_pickle(path: Path, marker: Path, shape: dict) -> Path:
    """A torch.save file shaped like `shape` with the payload inside; checked to be live on a copy."""
    torch.save({**shape, "payload": Payload(marker)}, path)
    probe = path.with_name(path.name + ".probe")
    shutil.copy(path, probe)
    torch.load(probe, weights_only=False)  # the unsafe load an older loraxs did: the payload runs
    assert marker.is_file()
    marker.unlink()
    probe.unlink()
    return path


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def error_line(result) -> str:
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert "internal error" not in errors[0], errors[0]
    return errors[0]


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    return path


def train_args(model, data, out, *extra):
    return ("train", model, "--data", data, "--out", out, "--rank", 2, "--batch-size", 2, "--max-length", 32,
            "--max-steps", 3, "--save-every", 1, "--keep-checkpoints", 3, *extra)  # fmt: skip


@pytest.mark.parametrize("extra", [(), ("--dry-run",), ("--resume",), ("--no-resume",)])
def test_crafted_pickle_checkpoint_is_refused_and_never_unpickled(tiny_llama_dir, data, tmp_path, extra):
    run, marker = tmp_path / "run", tmp_path / "MARKER"
    step = run / "checkpoints" / "step-2"
    step.mkdir(parents=True)
    crafted_pickle(step / "state.pt", marker, {"step": 2, "R": {}, "identity": {}})
    result = invoke(*train_args(tiny_llama_dir, data, run, *extra))
    assert result.exit_code == 3, result.output
    line = error_line(result)
    assert "older loraxs in pickle format" in line and "not loaded for safety" in line and str(step) in line
    assert not marker.exists()
    assert list(step.iterdir()) == [step / "state.pt"]  # nothing written over the old run


def test_checkpoints_are_json_and_safetensors_and_resume_exactly(tiny_llama_dir, data, tmp_path):
    run = tmp_path / "run"
    result = invoke(*train_args(tiny_llama_dir, data, run))
    assert result.exit_code == 0, result.output
    dirs = checkpoint_dirs(run)
    assert [p.name for p in dirs] == ["step-1", "step-2", "step-3"]
    for path in dirs:
        assert sorted(p.name for p in path.iterdir()) == sorted([STATE_FILE, TENSORS_FILE])
        document = json.loads((path / STATE_FILE).read_text())
        assert document["format"] == "loraxs-checkpoint" and document["state"]["step"] == int(path.name[5:])
        keys = set(load_file(path / TENSORS_FILE))
        assert "rng/torch" in keys and any(k.startswith("R/") for k in keys)
        assert {k.rsplit("/", 1)[-1] for k in keys if k.startswith("optimizer/state/")} == {
            "step",
            "exp_avg",
            "exp_avg_sq",
        }
    # no pickle (protocol marker 0x80) nor torch.save zip anywhere in the run directory
    for path in run.rglob("*"):
        if path.is_file() and path.suffix != ".png":
            head = path.read_bytes()[:2]
            assert head[:1] != b"\x80" and head != b"PK", path
    # the dry run reads the newest checkpoint; a resume from step 2 ends where the whole run ended
    plan = invoke(*train_args(tiny_llama_dir, data, run, "--dry-run", "--json"))
    assert plan.exit_code == 0, plan.output
    assert "step-3" in json.loads(plan.stdout)["resume"]
    shutil.rmtree(dirs[-1])
    shutil.rmtree(run / "adapter")
    resumed = invoke(*train_args(tiny_llama_dir, data, run, "--json"))
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["resumed_from"] == 2
    reference = tmp_path / "reference"
    assert invoke(*train_args(tiny_llama_dir, data, reference)).exit_code == 0
    a, b = (
        load_file(run / "adapter" / "adapter.safetensors"),
        load_file(reference / "adapter" / "adapter.safetensors"),
    )
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-7)


def test_state_round_trip_keeps_types(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 3))
    optimizer = torch.optim.AdamW([param], lr=1e-2, betas=(0.8, 0.95))
    param.grad = torch.randn(3, 3)
    optimizer.step()
    random.seed(5)
    torch.manual_seed(5)
    state = {
        "step": 7,
        "optimizer": optimizer.state_dict(),
        "rng": rng_state(),
        "best": {"step": 3, "metric": "loss", "value": 0.25, "metrics": {"loss": 0.25, "inf": math.inf}},
        "odd": {
            "__tensor__": "not a reference",
            3: (1, [2.5, None, True]),
            "bf16": torch.ones(2, dtype=torch.bfloat16),
        },
    }
    save_state(tmp_path, state)
    expected = (random.random(), torch.rand(2))
    back = load_state(tmp_path)
    assert back["step"] == 7 and back["best"] == state["best"]
    assert back["odd"]["__tensor__"] == "not a reference" and back["odd"][3] == (1, [2.5, None, True])
    assert back["odd"]["bf16"].dtype == torch.bfloat16
    assert back["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.95)
    fresh = torch.optim.AdamW([param], lr=1e-2, betas=(0.8, 0.95))
    fresh.load_state_dict(back["optimizer"])
    for name in ("exp_avg", "exp_avg_sq", "step"):
        assert torch.equal(fresh.state[param][name], optimizer.state[param][name])
    set_rng_state(back["rng"])
    assert random.random() == expected[0] and torch.equal(torch.rand(2), expected[1])


def test_a_damaged_checkpoint_is_skipped_for_the_one_before(tiny_llama_dir, data, tmp_path):
    run = tmp_path / "run"
    assert invoke(*train_args(tiny_llama_dir, data, run)).exit_code == 0
    newest = checkpoint_dirs(run)[-1]
    blob = bytearray((newest / TENSORS_FILE).read_bytes())
    blob[-1] ^= 0xFF
    (newest / TENSORS_FILE).write_bytes(bytes(blob))
    with pytest.raises(BadInputError, match="sha256"):
        load_state(newest)
    path, state = latest_checkpoint(run)
    assert path.name == "step-2" and state["step"] == 2
    (path / STATE_FILE).write_text("{not json")
    assert latest_checkpoint(run)[0].name == "step-1"


def test_crafted_peft_adapter_bin_is_refused(tiny_llama_dir, tmp_path):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir)),
        peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
    )
    honest = tmp_path / "honest"
    model.save_pretrained(honest, safe_serialization=False)  # PEFT's own pickle format
    assert (honest / "adapter_model.bin").is_file() and not (honest / "adapter_model.safetensors").exists()
    ok = invoke("convert", honest, "--from", "peft-lora", "--model", tiny_llama_dir, "--out", tmp_path / "ok")
    assert ok.exit_code == 0, ok.output  # plain tensors load with weights_only=True
    hostile, marker = tmp_path / "hostile", tmp_path / "MARKER"
    shutil.copytree(honest, hostile)
    weights = torch.load(honest / "adapter_model.bin", weights_only=True)
    crafted_pickle(hostile / "adapter_model.bin", marker, weights)
    result = invoke(
        "convert", hostile, "--from", "peft-lora", "--model", tiny_llama_dir, "--out", tmp_path / "x"
    )
    assert result.exit_code == 3, result.output
    assert "adapter_model.bin" in error_line(result) and "not loaded" in error_line(result)
    assert not marker.exists() and not (tmp_path / "x").exists()


def test_crafted_base_pytorch_model_bin_is_refused(tiny_llama_dir, data, tmp_path):
    base, marker = tmp_path / "base", tmp_path / "MARKER"
    shutil.copytree(tiny_llama_dir, base)
    weights = load_file(base / "model.safetensors")
    (base / "model.safetensors").unlink()
    crafted_pickle(base / "pytorch_model.bin", marker, weights)
    for args in (("init", base, "--rank", 2), ("train", base, "--data", data, "--out", tmp_path / "run")):
        result = invoke(*args)
        assert result.exit_code == 3, result.output
        line = error_line(result)
        assert ".bin weights file is a pickle" in line and "not loaded" in line
        assert not marker.exists()
