"""Bad input through the real CLI: every command, hostile files and file systems, one line and an exit code.

The whole matrix runs once against shared fixtures; each case is then checked on its own. A full disk
(RLIMIT_FSIZE) needs a process of its own: those cases run as subprocesses, one at a time beside the
rest, which run in process (CliRunner: the same exit code, stdout and stderr, at no torch import each).
Pre-existing valid outputs and the factor cache are hashed before and after: no case may change a byte
of them.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from hardening_util import (
    assert_one_line_error,
    changed_files,
    flip_byte,
    limit_file_size,
    not_a_directory,
    run_cli,
    run_inprocess,
    sha256_tree,
    truncate,
)
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loraxs_cli.cache import FactorCache
from loraxs_cli.cli.app import app
from models_for_tests import make_adapter

OK_ROWS = [{"prompt": f"{i} plus {i} is", "response": f" {2 * i}"} for i in range(6)]


@dataclass(frozen=True)
class Case:
    name: str
    args: tuple[str, ...]  # {placeholders} name paths of the world
    code: int
    home: str = "main"  # which LORAXS_HOME: main (intact cache), empty, damaged
    file_limit: int | None = None  # RLIMIT_FSIZE in bytes: a full disk
    report: str | None = None  # a command that reports (exit code, this word on stdout) rather than fails


def case(name, command, code, **kwargs) -> Case:
    return Case(name, tuple(command.split()), code, **kwargs)


CASES = [
    # models: missing, not a model, garbage, damaged shards
    case("init-missing-model", "init {nope} --rank 4", 3),
    case("init-not-a-model", "init {notmodel} --rank 4", 3),
    case("init-garbage-config", "init {garbage_model} --rank 4", 3),
    case("train-missing-model", "train {nope} --data {ok} --rank 4 --out {fresh}/t", 3),
    case("eval-not-a-model", "eval {notmodel} --data {ok}", 3),
    case("merge-missing-model", "merge {nope} --adapter {adapter} --out {fresh}/m", 3),
    case(
        "convert-from-peft-missing-model", "convert {peft} --from peft-lora --model {nope} --out {fresh}/c", 3
    ),
    case("inspect-missing-target", "inspect {nope} --rank 4", 3),
    case("generate-missing-model", "generate {nope} --prompts {prompts}", 3),
    case("eval-truncated-merged-shard", "eval {merged_truncated} --data {ok}", 3),
    case("init-flipped-merged-shard-header", "init {merged_flipped} --rank 4", 3),
    # rank out of range, targets the model does not have
    case("init-rank-zero", "init {llama} --rank 0", 3),
    case("init-rank-too-large", "init {llama} --rank 100000", 3),
    case("train-rank-negative", "train {llama} --data {ok} --rank -1 --out {fresh}/r0", 3),
    case("init-unknown-targets", "init {llama} --rank 4 --targets query,value", 3),
    # malformed data
    case("train-invalid-json", "train {llama} --data {invalid_json} --rank 4 --out {fresh}/d1", 3),
    case("train-missing-field", "train {llama} --data {missing_field} --rank 4 --out {fresh}/d2", 3),
    case(
        "train-label-wrong-type",
        "train {llama} --data {list_label} --task seq-cls --rank 4 --out {fresh}/d3",
        3,
    ),
    case(
        "train-regression-text-label",
        "train {llama} --data {text_label} --task regression --rank 4 --out {fresh}/d4",
        3,
    ),
    case("train-empty-file", "train {llama} --data {empty} --rank 4 --out {fresh}/d5", 3),
    case("train-enormous-line", "train {llama} --data {enormous} --rank 4 --out {fresh}/d6", 3),
    case(
        "train-csv-missing-column",
        "train {llama} --data {bad_csv} --task seq-cls --rank 4 --out {fresh}/d7",
        3,
    ),
    case("eval-invalid-json", "eval {llama} --adapter {adapter} --data {invalid_json}", 3),
    case("generate-prompt-not-an-object", "generate {llama} --prompts {prompt_list} -a {adapter}", 3),
    # adapters: other base, other task, factors gone, damaged weights and packs
    case("eval-adapter-of-another-base", "eval {other_llama} --adapter {adapter} --data {ok}", 4),
    case("merge-adapter-of-another-base", "merge {other_llama} --adapter {adapter} --out {fresh}/m2", 4),
    case("eval-task-does-not-fit-adapter", "eval {llama} --adapter {adapter} --data {cls} --task seq-cls", 4),
    case("eval-adapter-factors-gone", "eval {llama} --adapter {adapter} --data {ok}", 3, home="empty"),
    case("eval-truncated-adapter", "eval {llama} --adapter {adapter_truncated} --data {ok}", 3),
    case("merge-bit-flipped-adapter", "merge {llama} --adapter {adapter_flipped} --out {fresh}/m3", 3),
    case("convert-bit-flipped-adapter", "convert {adapter_flipped} --to peft-lora --out {fresh}/c2", 3),
    case("inspect-bit-flipped-adapter", "inspect {adapter_flipped}", 3),
    case("pack-truncated-adapter", "pack {adapter_truncated} --out {fresh}/p.safetensors", 3),
    case("unpack-list-truncated-pack", "unpack {pack_truncated} --list", 3),
    case("unpack-bit-flipped-pack", "unpack {pack_flipped} --out {fresh}/u", 3),
    case("eval-damaged-cache-entry", "eval {llama} --adapter {adapter} --data {ok}", 3, home="damaged"),
    case("init-hit-on-damaged-cache-entry", "init {llama} --rank 4", 3, home="damaged"),
    case("cache-verify-damaged-entry", "cache verify", 3, home="damaged", report="DAMAGED"),
    # outputs that cannot be created (their parent is a regular file)
    case("train-out-not-a-directory", "train {llama} --data {ok} --rank 4 --out {blocked}", 3),
    case("merge-out-not-a-directory", "merge {llama} --adapter {adapter} --out {blocked}", 3),
    case("pack-out-not-a-directory", "pack {adapter} --out {blocked}/p.safetensors", 3),
    case("unpack-out-not-a-directory", "unpack {pack} --out {blocked}", 3),
    case("generate-out-not-a-directory", "generate {llama} --prompts {prompts} --out {blocked}/g.jsonl", 3),
    # a full disk (RLIMIT_FSIZE), over pre-existing valid outputs where the command can replace one
    case("init-full-disk", "init {llama} --rank 4", 3, home="empty", file_limit=4096),
    case(
        "train-resume-full-disk",
        "train {llama} --data {ok} --rank 4 --out {run} --max-steps 2 --save-every 1",
        3,
        file_limit=512,
    ),
    case(
        "merge-force-full-disk",
        "merge {llama} --adapter {adapter} --out {merged} --force",
        3,
        file_limit=1 << 20,
    ),
    case("pack-force-full-disk", "pack {adapter} --out {pack} --force", 3, file_limit=1000),
    case(
        "convert-force-full-disk", "convert {adapter} --to peft-lora --out {peft} --force", 3, file_limit=1000
    ),
    case("unpack-force-full-disk", "unpack {pack} --out {unpacked} --force", 3, file_limit=500),
    case(
        "generate-full-disk",
        "generate {llama} --prompts {prompts} -a {adapter} --max-new-tokens 2 --out {generated}",
        3,
        file_limit=10,
    ),
    case(
        "generate-bad-prompts-keeps-old-output",
        "generate {llama} --prompts {invalid_json} --out {generated}",
        3,
    ),
]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def other_base(llama: Path, out: Path) -> Path:
    """The same architecture and tokenizer with one target weight changed: another fingerprint."""
    shutil.copytree(llama, out)
    weights = out / "model.safetensors"
    tensors = load_file(str(weights))
    key = next(k for k in tensors if k.endswith("q_proj.weight"))
    tensors[key] = tensors[key] + 0.01
    save_file(tensors, str(weights), metadata={"format": "pt"})
    return out


def damaged_copy(src: Path, dst: Path, damage) -> Path:
    if src.is_dir():
        shutil.copytree(src, dst)
        for file in dst.glob("*.safetensors"):
            damage(file)
    else:
        shutil.copy(src, dst)
        damage(dst)
    return dst


def flip_header(path: Path) -> None:
    flip_byte(path, 12)  # inside the JSON header


def flip_data(path: Path) -> None:
    flip_byte(path, path.stat().st_size - 7)  # inside the last tensor's bytes


def halve(path: Path) -> None:
    truncate(path, path.stat().st_size // 2)


def make_data(root: Path) -> dict[str, Path]:
    data = root / "data"
    data.mkdir()
    enormous = data / "enormous.jsonl"
    with open(enormous, "w") as handle:
        handle.write('{"text": "' + "a" * (65 << 20) + '", "label": 0}\n')
    return {
        "ok": write_jsonl(data / "ok.jsonl", OK_ROWS),
        "prompts": write_jsonl(data / "prompts.jsonl", [{"adapter": None, "prompt": "1 plus 1 is"}]),
        "cls": write_jsonl(data / "cls.jsonl", [{"text": "a b", "label": "x"}, {"text": "c", "label": "y"}]),
        "invalid_json": write_jsonl(data / "invalid.jsonl", [OK_ROWS[0], '{"prompt": "a", "respo']),
        "missing_field": write_jsonl(data / "missing.jsonl", [{"prompt": "no response here"}]),
        "list_label": write_jsonl(data / "list_label.jsonl", [{"text": "a", "label": [1, 2]}]),
        "text_label": write_jsonl(data / "text_label.jsonl", [{"text": "a", "label": "high"}]),
        "prompt_list": write_jsonl(data / "prompt_list.jsonl", [["not", "an", "object"]]),
        "empty": write_jsonl(data / "empty.jsonl", []),
        "enormous": enormous,
        "bad_csv": _write(data / "bad.csv", "text,label\nfine,1\nno label column here\n"),
    }


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def invoke_ok(*args) -> None:
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """Valid inputs and outputs built in-process, damaged copies of them, and hostile paths."""
    root = tmp_path_factory.mktemp("hardening")
    w: dict[str, Path] = {"llama": tiny_llama_dir, "root": root, **make_data(root)}
    homes = {"main": root / "home", "empty": root / "home-empty", "damaged": root / "home-damaged"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(homes["main"]))
        w["adapter"] = make_adapter(tiny_llama_dir, root / "adapter")
        w["merged"] = root / "merged"
        invoke_ok("merge", tiny_llama_dir, "--adapter", w["adapter"], "--out", w["merged"])
        w["peft"] = root / "peft"
        invoke_ok("convert", w["adapter"], "--to", "peft-lora", "--out", w["peft"])
        w["pack"] = root / "pack.safetensors"
        invoke_ok("pack", w["adapter"], "--out", w["pack"])
        w["unpacked"] = root / "unpacked"
        invoke_ok("unpack", w["pack"], "--out", w["unpacked"])
        w["run"] = root / "run"
        invoke_ok("train", tiny_llama_dir, "--data", w["ok"], "--rank", 4, "--out", w["run"],
                  "--max-steps", 2, "--save-every", 1)  # fmt: skip
    shutil.copytree(homes["main"], homes["damaged"])
    entry = next(FactorCache(homes["damaged"] / "factors").entries())
    flip_data(entry.file)
    w["blocked"] = not_a_directory(_mkdir(root / "blocked-out"))
    w["generated"] = write_jsonl(root / "generated.jsonl", [{"row": 0, "adapter": None, "output": "kept"}])
    w["other_llama"] = other_base(tiny_llama_dir, root / "other-llama")
    w["adapter_truncated"] = damaged_copy(w["adapter"], root / "adapter-truncated", halve)
    w["adapter_flipped"] = damaged_copy(w["adapter"], root / "adapter-flipped", flip_data)
    w["pack_truncated"] = damaged_copy(w["pack"], root / "pack-truncated.safetensors", halve)
    w["pack_flipped"] = damaged_copy(w["pack"], root / "pack-flipped.safetensors", flip_data)
    w["merged_truncated"] = damaged_copy(w["merged"], root / "merged-truncated", halve)
    w["merged_flipped"] = damaged_copy(w["merged"], root / "merged-flipped", flip_header)
    w["notmodel"] = _mkdir(root / "not-a-model")
    (w["notmodel"] / "notes.txt").write_text("no config.json here\n")
    w["garbage_model"] = _mkdir(root / "garbage-model")
    (w["garbage_model"] / "config.json").write_text("{this is not json")
    w["nope"] = root / "does-not-exist"
    w["fresh"] = _mkdir(root / "fresh")
    w["homes"] = homes
    return w


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def valid_outputs(w: dict) -> dict[str, str]:
    """Hashes of everything valid a failed command must leave alone (lock files are not state)."""
    tree = sha256_tree(
        w["homes"]["main"] / "factors",
        w["llama"],
        w["adapter"],
        w["merged"],
        w["peft"],
        w["pack"],
        w["unpacked"],
        w["run"],
        w["generated"],
    )
    return {path: digest for path, digest in tree.items() if "/.locks/" not in path}


@pytest.fixture(scope="module")
def outcomes(world):
    """Run the whole matrix once; returns (results by case name, valid outputs before, after)."""
    before = valid_outputs(world)
    with ThreadPoolExecutor(max_workers=1) as pool:  # the full-disk processes, beside the rest
        in_processes = {c.name: pool.submit(run_case, c, world) for c in CASES if c.file_limit}
        results = {c.name: run_case(c, world) for c in CASES if not c.file_limit}
        results.update({name: future.result() for name, future in in_processes.items()})
    return results, before, valid_outputs(world)


def run_case(c: Case, w: dict):
    args = [a.format(**{k: v for k, v in w.items() if isinstance(v, Path)}) for a in c.args]
    if c.file_limit:  # a file size limit holds for a whole process
        return run_cli(args, w["homes"][c.home], preexec=limit_file_size(c.file_limit))
    return run_inprocess(args, w["homes"][c.home])


@pytest.mark.parametrize("c", CASES, ids=[c.name for c in CASES])
def test_bad_input_gives_one_line_and_its_exit_code(outcomes, c):
    result = outcomes[0][c.name]
    if c.report:
        assert result.returncode == c.code and c.report in result.stdout, result.describe()
        assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.describe()
        return
    assert_one_line_error(result, c.code)
    assert result.error_lines[0].strip() != "error:", result.describe()


def test_no_valid_output_or_cache_entry_changed(outcomes):
    _, before, after = outcomes
    assert len(before) > 20
    assert changed_files(before, after) == []


def test_full_disk_init_left_no_entry_and_cache_verifies(outcomes, world):
    assert outcomes[0]["init-full-disk"].returncode == 3
    home = world["homes"]["empty"]
    assert list(FactorCache(home / "factors").entries()) == []
    result = run_inprocess(["cache", "verify", "--json"], home)
    assert result.returncode == 0, result.describe()


def test_failed_commands_leave_no_output_files(outcomes, world):
    """Failed commands write no file under a final name (a run directory may exist, empty)."""
    written = [p for p in world["fresh"].rglob("*") if p.is_file()]
    assert written == []
    assert json.loads(world["generated"].read_text())["output"] == "kept"


# ----------------------------------------------------------------------------------------------
# In-process checks of the fixes made for this matrix


def test_unpack_list_needs_no_out_but_unpack_does(world):
    listed = CliRunner().invoke(app, ["unpack", str(world["pack"]), "--list", "--json"])
    assert listed.exit_code == 0, listed.output
    # a directory named `adapter` is a run's adapter, named after the directory above it
    assert json.loads(listed.stdout)["adapters"] == [world["adapter"].parent.name]
    missing_out = CliRunner().invoke(app, ["unpack", str(world["pack"])])
    assert missing_out.exit_code == 2
    assert "--out" in missing_out.output


def test_pack_with_altered_embedded_factors_is_refused(tmp_path, tiny_llama_dir):
    from safetensors import safe_open

    from loraxs_cli.errors import BadInputError
    from loraxs_cli.pack import FACTORS_PREFIX, load_member, pack_adapters

    adapter = make_adapter(tiny_llama_dir, tmp_path / "embedded", embed_factors=True)
    pack = pack_adapters([("a", str(adapter))], tmp_path / "pack.safetensors")["pack"]
    with safe_open(pack, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    factor_key = next(k for k in sorted(tensors) if k.startswith(FACTORS_PREFIX))
    tensors[factor_key] = tensors[factor_key] * 1.001
    save_file(tensors, pack, metadata=metadata)
    with pytest.raises(BadInputError, match="sha256 mismatch of its factors"):
        load_member(pack, "a")
