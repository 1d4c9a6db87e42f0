"""Inputs nobody planned for (issue 16): hostile names, outputs over inputs, Ctrl-C where a library
swallows it, FIFOs, edited cache metadata, a cache entry removed mid-run, markup in paths, stale
temporaries, permissions, strict JSON, bad environment values, closed and broken standard output.

Each class is fixed once in a shared place (fsutil, cli/output.py, cache.py); these tests drive the
commands that rely on it, in process where that is faithful and as real processes where signals,
pipes and file descriptors are the point.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest
import torch
from hardening_util import Watched, assert_one_line_error, cli_env, run_inprocess, sha256_tree, wait_for
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner

from loraxs_cli.cache import FactorCache
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError
from loraxs_cli.fsutil import (
    atomic_dir,
    atomic_path,
    check_output,
    clean_stale_temps,
    require_regular_file,
    safe_name,
)
from models_for_tests import make_adapter

PROMPT_ROWS = [{"adapter": None, "prompt": "1 plus 1 is"}]
TRAIN_ROWS = [{"prompt": f"{i} plus {i} is", "response": f" {2 * i}"} for i in range(8)]


def invoke(*args, env: dict | None = None):
    return CliRunner(env=env).invoke(app, [str(a) for a in args])


def one_line(result, code: int) -> str:
    """The single `error:` line of an in-process run that exited with `code`."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output and "internal error" not in result.output, result.output
    lines = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.output
    return lines[0]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """A factor cache, an adapter, a merged model, a PEFT export, a pack and prompts, made once."""
    root = tmp_path_factory.mktemp("robustness")
    home = root / "home"
    w = {"root": root, "home": home, "llama": tiny_llama_dir}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(home))
        w["adapter"] = make_adapter(tiny_llama_dir, root / "adapter")
        for name, args in (
            ("merged", ["merge", tiny_llama_dir, "--adapter", w["adapter"], "--out", root / "merged"]),
            ("peft", ["convert", w["adapter"], "--to", "peft-lora", "--out", root / "peft"]),
            ("pack", ["pack", f"solo={w['adapter']}", "--out", root / "pack.safetensors"]),
        ):
            result = invoke(*args)
            assert result.exit_code == 0, result.output
            w[name] = Path(args[-1])
    w["prompts"] = write_jsonl(root / "prompts.jsonl", PROMPT_ROWS)
    return w


@pytest.fixture
def at_home(world, monkeypatch) -> dict[str, Path]:
    """The world, with its factor cache as this test's LORAXS_HOME."""
    monkeypatch.setenv("LORAXS_HOME", str(world["home"]))
    return world


def copy_home(world, tmp_path) -> Path:
    home = tmp_path / "home-copy"
    shutil.copytree(world["home"], home)
    return home


# ----------------------------------------------------------------------------------------------
# 1. names that build paths never lead outside the output


def hostile_pack(world, tmp_path: Path, member: str) -> Path:
    """The world's pack with its one member renamed to `member`, tensors and index alike (as a hostile
    or damaged file would be): written with safetensors itself."""
    with safe_open(str(world["pack"]), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    index = json.loads(metadata["loraxs_pack"])
    index["adapters"] = {member: index["adapters"]["solo"]}
    renamed = {(member + k[len("solo") :] if k.startswith("solo/") else k): v for k, v in tensors.items()}
    path = tmp_path / "hostile.safetensors"
    save_file(renamed, str(path), metadata={**metadata, "loraxs_pack": json.dumps(index)})
    return path


@pytest.mark.parametrize(
    "member",
    ["../escaped", "../../escaped", "{victim}", "a/b", "..", ".", "two\nlines", "back\\slash", ""],
    ids=["dotdot", "dotdot2", "absolute", "subdir", "parent", "self", "newline", "backslash", "empty"],
)
def test_unpack_of_a_hostile_member_name_writes_nothing_anywhere(at_home, tmp_path, member):
    outside = tmp_path / "outside"
    outside.mkdir()
    victim = outside / "victim"
    victim.write_text("must survive\n")
    member = member.format(victim=victim)
    pack = hostile_pack(at_home, tmp_path, member)
    out = outside / "out"
    out.mkdir()
    before = listing(tmp_path)
    for args in (["--out", out, "--force"], ["--out", out], ["--list"]):
        line = one_line(invoke("unpack", pack, *args), 3)
        assert "not one plain name" in line
    eval_member = invoke("eval", at_home["llama"], "-a", f"{pack}::{member}", "--data", at_home["prompts"])
    assert eval_member.exit_code == 3, eval_member.output
    assert listing(tmp_path) == before and victim.read_text() == "must survive\n"


@pytest.mark.parametrize("name", ["..", "tab\there", "line\nbreak", "__reserved", "a::b"])
def test_pack_refuses_a_name_that_is_not_one_plain_component(at_home, tmp_path, name):
    source = tmp_path / "src"
    shutil.copytree(at_home["adapter"], source)
    out = tmp_path / "p.safetensors"
    result = invoke("pack", f"{name}={source}", "--out", out)
    assert result.exit_code in (2, 3), result.output  # a NAME= value is usage; a path read, bad input
    assert len([line for line in result.output.splitlines() if line.startswith("error:")]) == 1
    assert not out.exists() and not list(tmp_path.glob(".p.safetensors*"))


def test_a_directory_name_that_is_not_a_plain_name_is_refused_at_pack_time(at_home, tmp_path):
    odd = tmp_path / "odd\nname"
    shutil.copytree(at_home["adapter"], odd)
    result = invoke("pack", odd, "--out", tmp_path / "p.safetensors")
    assert result.exit_code == 2 and "cannot name a pack member" in result.output
    assert not (tmp_path / "p.safetensors").exists()


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "/etc", "x\ny", "del\x7f", "a\\b"])
def test_safe_name_refuses_anything_but_one_plain_component(name):
    with pytest.raises(BadInputError, match="is not a valid name"):
        safe_name(name, "member")


def test_safe_name_keeps_ordinary_names():
    for name in ("alice", "run-3.adapter", "user_0001", "é-ü", "...x", "a b"):
        assert safe_name(name) == name


def test_a_factor_id_outside_the_cache_is_not_followed(at_home, tmp_path):
    cache = FactorCache(at_home["home"] / "factors")
    entry = next(cache.entries())
    elsewhere = tmp_path / "elsewhere" / "base" / "entry"
    shutil.copytree(entry.path, elsewhere)
    for wrong in (str(elsewhere), "../entry", f"{entry.id}/..", "a/b/c", ".tmp-x/y", "", "/"):
        assert cache.get(wrong) is None, wrong
    assert cache.get(entry.id) is not None
    # An adapter whose config names an absolute factor path: refused as missing, never read from there.
    adapter = tmp_path / "adapter"
    shutil.copytree(at_home["adapter"], adapter)
    config_path = adapter / "loraxs_config.json"
    config = json.loads(config_path.read_text())
    config["factors"]["id"] = str(elsewhere)
    config_path.write_text(json.dumps(config))
    line = one_line(invoke("merge", at_home["llama"], "--adapter", adapter, "--out", tmp_path / "m"), 3)
    assert "not in the cache" in line and not (tmp_path / "m").exists()


# ----------------------------------------------------------------------------------------------
# 2. an output never destroys an input


OVERLAPS = {
    "merge-out-is-the-adapter": "merge {llama} --adapter {adapter} --out {adapter} --force",
    "merge-out-contains-the-adapter": "merge {llama} --adapter {adapter} --out {root} --force",
    "merge-out-inside-the-base": "merge {llama} --adapter {adapter} --out {llama}/merged",
    "merge-out-symlink-to-the-adapter": "merge {llama} --adapter {adapter} --out {link_to_adapter} --force",
    "merge-out-is-the-factor-cache": "merge {llama} --adapter {adapter} --out {home} --force",
    "convert-out-is-the-source": "convert {adapter} --to peft-lora --out {adapter} --force",
    "convert-out-inside-the-source": "convert {adapter} --to peft-lora --out {adapter}/peft",
    "import-out-is-the-source": "convert {peft} --from peft-lora --model {llama} --out {peft} --force",
    "import-out-is-the-base": "convert {peft} --from peft-lora --model {llama} --out {llama} --force",
    "generate-out-is-the-prompts": "generate {llama} --prompts {prompts} --out {prompts}",
    "generate-out-hard-link-to-the-prompts": "generate {llama} --prompts {prompts} --out {hard_link}",
    "generate-out-is-an-adapter": "generate {llama} --prompts {prompts} -a {adapter} --out {adapter}",
    "pack-out-is-the-input-pack": "pack {pack}::solo --out {pack} --force",
    "unpack-member-is-the-pack": "unpack {self_pack} --out {self_pack_dir} --force",
}


@pytest.fixture(scope="module")
def overlap_world(world) -> dict[str, Path]:
    w = dict(world)
    root = world["root"]
    w["link_to_adapter"] = root / "link-to-adapter"
    w["link_to_adapter"].symlink_to(world["adapter"], target_is_directory=True)
    w["hard_link"] = root / "prompts-hard-link.jsonl"
    os.link(world["prompts"], w["hard_link"])
    # A pack whose one member is named like the pack file: unpacking it beside itself would replace it.
    w["self_pack_dir"] = root / "self-pack"
    w["self_pack_dir"].mkdir()
    w["self_pack"] = w["self_pack_dir"] / "solo.safetensors"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(world["home"]))
        made = invoke("pack", f"solo.safetensors={world['adapter']}", "--out", w["self_pack"])
    assert made.exit_code == 0, made.output
    return w


@pytest.mark.parametrize("command", list(OVERLAPS.values()), ids=list(OVERLAPS))
def test_an_output_over_an_input_is_refused_before_anything_is_written(overlap_world, monkeypatch, command):
    w = overlap_world
    monkeypatch.setenv("LORAXS_HOME", str(w["home"]))
    inputs = [w[k] for k in ("llama", "adapter", "peft", "pack", "prompts", "self_pack", "home")]
    before = sha256_tree(*inputs)
    names_before = listing(w["root"])
    args = command.format(**{k: v for k, v in w.items() if isinstance(v, Path)}).split()
    line = one_line(invoke(*args), 3)
    assert "would destroy an input" in line
    assert sha256_tree(*inputs) == before
    assert listing(w["root"]) == names_before  # not even a temporary


def test_check_output_sees_through_dots_symlinks_and_hard_links(tmp_path):
    src = tmp_path / "src"
    (src / "deep").mkdir(parents=True)
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    (tmp_path / "alias").symlink_to(src, target_is_directory=True)
    os.link(data, tmp_path / "data-link.jsonl")
    refused = {
        src: "is",
        tmp_path / "x" / ".." / "src": "is",
        tmp_path / "alias": "is",
        src / "deep" / "out": "lies inside",
        tmp_path / "alias" / "new": "lies inside",
        tmp_path: "contains",
        tmp_path / "data-link.jsonl": "is",
    }
    for out, relation in refused.items():
        with pytest.raises(BadInputError, match=f"{relation} the input"):
            check_output(out, [src, data], force=True)
    assert check_output(tmp_path / "sibling", [src, data, tmp_path / "missing"], force=False)
    (tmp_path / "sibling").mkdir()
    with pytest.raises(BadInputError, match="exists; pass --force"):
        check_output(tmp_path / "sibling", [src], force=False)
    assert check_output(tmp_path / "sibling", [src], force=True) == tmp_path / "sibling"


# ----------------------------------------------------------------------------------------------
# 5. Ctrl-C, FIFOs, edited cache metadata, a cache entry removed mid-run, stale temporaries


def merge_args(w: dict, out: Path, *extra) -> list:
    return ["merge", w["llama"], "--adapter", w["adapter"], "--out", out, "--force", *extra]


def temps(directory: Path, prefix: str) -> list[Path]:
    return [p for p in directory.iterdir() if p.name.startswith(prefix)]


def merge_writing(directory: Path) -> bool:
    return bool(temps(directory, ".merged.tmp-"))


def previous_output(world, out: Path) -> dict[str, str]:
    """An earlier merged model at `out`, marked so that a replacement (same bytes) would show."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(world["merged"], out)
    (out / "previous.txt").write_text("the earlier output\n")
    return sha256_tree(out)


@pytest.mark.xdist_group("process")  # the signal must land while the merge writes
def test_ctrl_c_during_merge_keeps_the_previous_output(world, tmp_path):
    """A real SIGINT while the merged model is being written (and verified): exit 130, the earlier
    output byte for byte, no temporary left."""
    out = tmp_path / "merged"
    for _ in range(6):
        before = previous_output(world, out)
        child = Watched(merge_args(world, out, "--verify"), world["home"])
        assert wait_for(lambda c=child: merge_writing(tmp_path) or c.proc.poll() is not None, 240)
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGINT)
        result = child.result()
        if result.returncode == 0:  # the merge ended before the signal: try again
            continue
        assert result.returncode == 130, result.describe()
        assert "interrupted" in result.stderr and "Traceback" not in result.stderr, result.describe()
        break
    else:
        pytest.fail("every SIGINT landed after the merge had finished")
    assert sha256_tree(out) == before
    assert temps(tmp_path, ".merged.") == []


SWALLOWED_CTRL_C = textwrap.dedent(
    """
    import os, signal, sys, time
    import loraxs_cli.merge as merge

    class Finalizer:  # Python swallows an exception raised in __del__ ("Exception ignored in ...")
        def __del__(self):
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)

    real = merge._copy_model_files

    def copy_then_ctrl_c(src, dst):
        real(src, dst)
        Finalizer()  # collected at once: SIGINT arrives inside __del__

    merge._copy_model_files = copy_then_ctrl_c
    sys.argv = ["loraxs", *sys.argv[1:]]
    from loraxs_cli.cli.app import main
    main()
    """
)


@pytest.mark.xdist_group("process")  # a real SIGINT to a real process
def test_ctrl_c_swallowed_inside_a_library_still_stops_the_merge(world, tmp_path):
    """The root cause of "Ctrl-C ignored, output published, traceback, exit 0": Python raises the
    KeyboardInterrupt wherever the main thread is, and a finalizer (or a library's broad except)
    swallows it. The SIGINT flag still stops the publish: exit 130, the old output kept."""
    out = tmp_path / "merged"
    before = previous_output(world, out)
    proc = subprocess.run(
        [sys.executable, "-c", SWALLOWED_CTRL_C, *map(str, merge_args(world, out))],
        env=cli_env(world["home"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "Exception ignored" in proc.stderr, proc.stderr  # the interrupt was indeed swallowed
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.rstrip().endswith("interrupted"), proc.stderr
    assert sha256_tree(out) == before
    assert temps(tmp_path, ".merged.") == []


def test_a_swallowed_ctrl_c_stops_any_command_in_process(at_home, tmp_path, monkeypatch):
    """The same, in process and for another writer (pack): a library that catches the interrupt and
    goes on cannot make the command publish its output or exit 0."""
    import loraxs_cli.pack as pack_module

    real = pack_module._add_factors

    def swallowing(*args, **kwargs):
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)  # the handler interrupts the sleep
        except KeyboardInterrupt:
            pass  # what a broad `except BaseException` in a library does
        return real(*args, **kwargs)

    monkeypatch.setattr(pack_module, "_add_factors", swallowing)
    out = tmp_path / "p.safetensors"
    result = invoke("pack", at_home["adapter"], "--out", out)
    assert result.exit_code == 130 and "interrupted" in result.output, result.output
    assert not out.exists() and not list(tmp_path.glob(".p.safetensors*"))
    monkeypatch.setattr(pack_module, "_add_factors", real)
    assert pack_module.pack_adapters([("a", str(at_home["adapter"]))], out)["adapters"] == 1  # flag reset


def make_fifo(path: Path) -> Path:
    os.mkfifo(path)
    return path


@contextlib.contextmanager
def released_if_blocked(fifos: list[Path], timeout: float = 60):
    """In process there is no subprocess timeout: if the body still runs after `timeout` s (blocked opening
    a FIFO), a writer opens each FIFO in turn, which lets a blocked reader go on, and the test fails."""
    done, fired = threading.Event(), threading.Event()

    def release() -> None:
        if done.wait(timeout):
            return
        fired.set()
        while not done.wait(0.2):
            for fifo in fifos:
                with contextlib.suppress(OSError):  # ENXIO: nobody is reading it
                    os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    guard = threading.Thread(target=release, daemon=True)
    guard.start()
    try:
        yield
    finally:
        done.set()
        guard.join()
    assert not fired.is_set(), f"a command blocked opening one of {fifos}"


def test_fifos_are_refused_instead_of_blocking(world, tmp_path):
    """A FIFO where a weights file, a pack or the cache's factors file should be: one line, exit 3, at
    once (a blocked open would hold the command until the guard's timeout)."""
    model = tmp_path / "fifo-model"
    model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(world["llama"] / name, model / name)
    make_fifo(model / "model.safetensors")
    home = copy_home(world, tmp_path)
    entry = next(FactorCache(home / "factors").entries())
    entry.file.unlink()
    make_fifo(entry.file)
    fifo_pack = make_fifo(tmp_path / "fifo.safetensors")
    cases = [
        (["init", model, "--rank", "2"], "is a FIFO"),
        (["unpack", fifo_pack, "--list"], "is a FIFO"),
        (["merge", world["llama"], "--adapter", world["adapter"], "--out", tmp_path / "m"], "not a regular"),
    ]
    fifos = [model / "model.safetensors", entry.file, fifo_pack]
    for args, message in cases:
        with released_if_blocked(fifos):
            result = run_inprocess(args, home)
        assert_one_line_error(result, 3)
        assert message in result.error_lines[0], result.describe()
    with released_if_blocked(fifos):
        verify = run_inprocess(["cache", "verify"], home)
    assert verify.returncode == 3 and "not a regular file" in verify.stdout, verify.describe()


def test_require_regular_file_names_what_it_found(tmp_path):
    fifo = make_fifo(tmp_path / "pipe")
    with pytest.raises(BadInputError, match="is a FIFO"):
        require_regular_file(fifo, "data file")
    with pytest.raises(BadInputError, match="is a directory"):
        require_regular_file(tmp_path, "data file")
    with pytest.raises(BadInputError, match="no such data file"):
        require_regular_file(tmp_path / "missing", "data file")
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "file")
    assert require_regular_file(tmp_path / "link") == tmp_path / "link"


def edit_meta(entry_path: Path, **changes) -> None:
    meta_file = entry_path / "meta.json"
    meta = json.loads(meta_file.read_text())
    for key, change in changes.items():
        meta[key] = change(meta[key])
    meta_file.write_text(json.dumps(meta))


@pytest.mark.parametrize(
    ("edit", "still_a_hit"),
    [
        ({"r_max": lambda r: r * 2}, True),
        ({"r_max": lambda r: r - 1}, True),
        ({"modules": lambda modules: [*modules, "layers.9.self_attn.q_proj"]}, True),
        ({"modules": lambda modules: modules[1:]}, False),  # init and train compute a new entry
        ({"modules": lambda modules: [modules[0], *modules]}, True),
    ],
    ids=["r_max-inflated", "r_max-deflated", "module-added", "module-dropped", "module-twice"],
)
def test_edited_cache_metadata_is_a_damaged_entry_for_every_command(world, tmp_path, edit, still_a_hit):
    """meta.json is not under the factors' sha256: what it claims is checked against the tensors, so
    an edit makes a damaged entry (exit 3) for every command that would use it, never an adapter
    that later commands refuse."""
    home = copy_home(world, tmp_path)
    entry = next(FactorCache(home / "factors").entries())
    edit_meta(entry.path, **edit)
    edited = FactorCache(home / "factors").get(entry.id)
    problem = edited.verify()
    assert problem is not None and "meta.json" in problem
    with pytest.raises(BadInputError, match="is damaged"):
        edited.load(min(edited.r_max, 2))
    env = {"LORAXS_HOME": str(home)}
    data = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    commands = [
        ["eval", world["llama"], "--adapter", world["adapter"], "--data", data],
        ["merge", world["llama"], "--adapter", world["adapter"], "--out", tmp_path / "merged"],
    ]
    if still_a_hit:  # the entry matches what init and train look for: they refuse it too
        commands += [
            ["init", world["llama"], "--rank", str(min(edited.r_max, 4))],
            ["train", world["llama"], "--data", data, "--rank", "2", "--out", tmp_path / "run",
             "--max-steps", "1"],
        ]  # fmt: skip
    for args in commands:
        line = one_line(invoke(*args, env=env), 3)
        assert "is damaged" in line, (args, line)
    assert not (tmp_path / "merged").exists() and not (tmp_path / "run" / "adapter").exists()
    verify = invoke("cache", "verify", env=env)
    assert verify.exit_code == 3 and "DAMAGED" in verify.stdout


def test_cache_rm_during_train_embed_factors_does_not_fail_the_run(tiny_llama_dir, tmp_path, loraxs_home):
    """`cache rm` after train read its factors: the run still finishes and embeds the factors it trained
    on, as they were in the cache. (cache rm takes no lock: in process it removes the same files.)"""
    from loraxs_cli.adapter import load_adapter
    from loraxs_cli.train import TrainConfig, TrainEvents, train

    data = write_jsonl(tmp_path / "train.jsonl", TRAIN_ROWS)
    seen: dict = {}

    def on_step(row: dict) -> None:
        if row["step"] != 1:
            return
        (entry,) = FactorCache().entries()
        seen["factors"] = entry.load(4)
        seen["id"] = entry.id
        removed = run_inprocess(["cache", "rm", entry.id, "-y"], loraxs_home)
        assert removed.returncode == 0, removed.describe()

    config = TrainConfig(
        model=str(tiny_llama_dir), data=str(data), out=str(tmp_path / "run"), rank=4, max_steps=3,
        batch_size=4, max_length=32, embed_factors=True, save_every=100, eval_split=0.25,
    )  # fmt: skip
    result = train(config, TrainEvents(step=on_step))
    assert list(FactorCache().entries()) == [], "the entry was removed mid-run"
    adapter = load_adapter(result.adapter_dir)
    assert adapter.config.factors["id"] == seen["id"] and adapter.factors is not None
    for module, parts in seen["factors"].items():
        assert torch.equal(adapter.factors[module]["A"], parts["A"])
        assert torch.equal(adapter.factors[module]["B"], parts["B"])


def test_a_kept_load_is_not_served_for_a_file_replaced_on_disk(world, tmp_path):
    home = copy_home(world, tmp_path)
    entry = next(FactorCache(home / "factors").entries())
    first = entry.load(2)
    module = next(iter(first))
    tensors = {}
    with safe_open(str(entry.file), framework="pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    tensors[f"{module}.A"] = -tensors[f"{module}.A"]
    save_file(tensors, str(entry.file))
    with pytest.raises(BadInputError, match="sha256 mismatch"):
        entry.load(2)  # the file changed: read again, and its sha256 no longer fits


def test_temporaries_of_dead_writers_are_removed_by_the_next_write(at_home, tmp_path):
    """Leftovers of killed merge/pack/convert/generate runs (their pid in the name) go with the next
    write into the directory; a live writer's temporary stays; an output moved aside by a writer
    killed between its two renames is put back."""
    dead, live = dead_pid(), os.getpid()
    work = tmp_path / "work"
    work.mkdir()
    stale = [
        work / f".merged.tmp-{dead}-abcdef12",
        work / f".p.safetensors.tmp-{dead}-0123ab",
        work / f".peft.tmp-{dead}-deadbeef",
        work / f".out.jsonl.tmp-{dead}-cafe00",
    ]
    for path in stale[:1] + stale[2:3]:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"\0" * 4096)
    for path in stale[1:2] + stale[3:]:
        path.write_bytes(b"partial")
    kept = work / f".merged.tmp-{live}-abcdef12"
    kept.mkdir()
    moved_aside = work / f".earlier.old-{dead}-abcdef12"
    moved_aside.mkdir()
    (moved_aside / "keep.txt").write_text("the earlier output\n")

    assert invoke("pack", at_home["adapter"], "--out", work / "p.safetensors").exit_code == 0
    assert not any(p.exists() for p in stale)
    assert kept.exists() and not moved_aside.exists()
    assert (work / "earlier" / "keep.txt").read_text() == "the earlier output\n"

    for command in (
        ["merge", at_home["llama"], "--adapter", at_home["adapter"], "--out", work / "merged"],
        ["convert", at_home["adapter"], "--to", "peft-lora", "--out", work / "peft"],
        ["generate", at_home["llama"], "--prompts", at_home["prompts"], "--out", work / "out.jsonl",
         "--max-new-tokens", "1"],
    ):  # fmt: skip
        (work / f".again.tmp-{dead}-00aa11").mkdir()
        result = invoke(*command)
        assert result.exit_code == 0, result.output
        assert not (work / f".again.tmp-{dead}-00aa11").exists(), command[0]
    assert kept.exists()
    assert sorted(p.name for p in work.iterdir() if p.name.startswith(".")) == [kept.name]


@pytest.mark.xdist_group("process")  # the kill must land while the merge writes
def test_a_killed_merge_leaves_nothing_once_the_next_one_ran(world, tmp_path):
    out = tmp_path / "merged"
    for _ in range(6):
        child = Watched(merge_args(world, out, "--verify"), world["home"])
        assert wait_for(lambda c=child: merge_writing(tmp_path) or c.proc.poll() is not None, 240)
        if child.proc.poll() is None:
            child.kill()
            break
        child.result()
        shutil.rmtree(out, ignore_errors=True)
    else:
        pytest.fail("the merge always ended before the kill")
    assert temps(tmp_path, ".merged.tmp-"), "the kill left its temporary (the case under test)"
    # the kill is what needed a process; the next merge that cleans up after it need not be one
    again = run_inprocess(merge_args(world, tmp_path / "other"), world["home"])
    assert again.returncode == 0, again.describe()
    assert temps(tmp_path, ".merged.") == [] and not out.exists()


def test_the_cache_removes_entry_temporaries_of_dead_writers(world, tmp_path, monkeypatch):
    home = copy_home(world, tmp_path)
    monkeypatch.setenv("LORAXS_HOME", str(home))
    base = next(FactorCache(home / "factors").entries()).path.parent
    stale = base / f".tmp-xs-r2-0123456789ab-{dead_pid()}-abcdef12"
    stale.mkdir()
    (stale / "factors.safetensors").write_bytes(b"partial")
    result = invoke("init", world["llama"], "--rank", "2", "--niter", "1")  # a new recipe: an insert
    assert result.exit_code == 0, result.output
    assert not stale.exists()


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_permissions_of_the_umask(at_home, tmp_path, umask):
    """safetensors creates its files 0600 whatever the umask; every published output follows it."""
    previous = os.umask(umask)
    try:
        outputs = [tmp_path / "merged", tmp_path / "peft", tmp_path / "p.safetensors", tmp_path / "g.jsonl"]
        for args in (
            ["merge", at_home["llama"], "--adapter", at_home["adapter"], "--out", outputs[0]],
            ["convert", at_home["adapter"], "--to", "peft-lora", "--out", outputs[1]],
            ["pack", at_home["adapter"], "--out", outputs[2]],
            ["generate", at_home["llama"], "--prompts", at_home["prompts"], "--out", outputs[3],
             "--max-new-tokens", "1"],
        ):  # fmt: skip
            result = invoke(*args)
            assert result.exit_code == 0, result.output
        with atomic_dir(tmp_path / "made") as made:
            save_file({"x": torch.zeros(2)}, str(made / "t.safetensors"))
        with atomic_path(tmp_path / "one.safetensors") as one:
            save_file({"x": torch.zeros(2)}, str(one))
    finally:
        os.umask(previous)
    files = [p for o in [*outputs, tmp_path / "made"] for p in ([o] if o.is_file() else o.iterdir())]
    files.append(tmp_path / "one.safetensors")
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(mode_of(p)) for p in files} == {p.name: oct(0o666 & ~umask) for p in files}
    for directory in (tmp_path / "merged", tmp_path / "peft", tmp_path / "made"):
        assert mode_of(directory) == 0o777 & ~umask


def test_a_new_cache_entry_follows_the_umask(world, tmp_path, monkeypatch):
    monkeypatch.setenv("LORAXS_HOME", str(tmp_path / "home"))
    previous = os.umask(0o022)
    try:
        result = invoke("init", world["llama"], "--rank", "2")
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    entry = next(FactorCache().entries())
    assert {p.name: mode_of(p) for p in entry.path.iterdir()} == {
        "factors.safetensors": 0o644,
        "meta.json": 0o644,
    }


def test_brackets_in_paths_and_messages_are_printed_as_text(at_home, tmp_path):
    """Rich markup characters in a path neither crash the rendering after the output was written nor
    vanish from messages."""
    for name in ("out[red]", "x[/bad]", "[bold]y[/]", "[link=z]w"):
        out = tmp_path / name
        result = invoke("merge", at_home["llama"], "--adapter", at_home["adapter"], "--out", out)
        assert result.exit_code == 0, result.output
        assert f"{out}: merged" in result.stdout
        converted = invoke("convert", at_home["adapter"], "--to", "peft-lora", "--out", f"{out}-peft")
        assert converted.exit_code == 0 and f"{out}-peft: PEFT LoRA" in converted.stdout
    pack = tmp_path / "p[red]x[/bad].safetensors"  # a plain message: "packed 1 adapters into PATH"
    packed = invoke("pack", at_home["adapter"], "--out", pack)
    assert packed.exit_code == 0 and f"into {pack} (" in packed.stdout, packed.output
    missing = tmp_path / "no[word]here"
    line = one_line(invoke("merge", at_home["llama"], "--adapter", missing, "--out", tmp_path / "m"), 3)
    assert "no[word]here" in line
    listed = invoke("unpack", at_home["pack"], "--list")
    assert listed.exit_code == 0 and listed.stdout.split() == ["solo"]


def test_output_methods_print_user_text_verbatim(capsys):
    from loraxs_cli.cli.output import Output, styled

    out = Output()
    out.info("kept [red]this[/] and [/that]")
    out.warn("a [bold]warning[/]")
    out.out.print(styled("[bold]{}[/]: done", "p[/x]"))
    captured = capsys.readouterr()
    assert "kept [red]this[/] and [/that]" in captured.err
    assert "warning: a [bold]warning[/]" in captured.err
    assert "p[/x]: done" in captured.out


# ----------------------------------------------------------------------------------------------
# 6. the small print: strict JSON, environment values, closed and broken output, COLUMNS=0


def test_json_output_is_strict_json(capsys):
    import numpy as np

    from loraxs_cli.cli.output import Output

    document = {
        "loss": math.nan,
        "metrics": {"ppl": math.inf, "low": -math.inf, "ok": 0.5},
        "rows": [1.0, np.float32("nan"), torch.tensor(2.5)],
        "path": Path("a/b"),
    }
    Output(json_mode=True).result(document, lambda: None)
    text = capsys.readouterr().out

    def refuse(constant):
        raise AssertionError(f"non-standard JSON constant {constant}")

    parsed = json.loads(text, parse_constant=refuse)
    assert parsed["loss"] is None and parsed["metrics"]["ppl"] is None and parsed["rows"][1] is None
    assert parsed["metrics"]["ok"] == 0.5 and parsed["rows"][2] == 2.5 and parsed["path"] == "a/b"
    assert parsed["non_finite"] == {
        "loss": "NaN",
        "metrics.ppl": "Infinity",
        "metrics.low": "-Infinity",
        "rows[1]": "NaN",
    }


@pytest.mark.parametrize("value", ["abc", "-5", "nan", "inf", "1e999"])
def test_a_bad_environment_value_is_one_line_not_a_crash(world, tmp_path, value):
    env = {"LORAXS_LOCK_TIMEOUT": value, "LORAXS_HOME": str(tmp_path / "home")}
    listed = invoke("cache", "ls", env=env)  # the variable is not even needed here
    assert listed.exit_code == 0, listed.output
    line = one_line(invoke("init", world["llama"], "--rank", "2", env=env), 3)
    assert "LORAXS_LOCK_TIMEOUT" in line and repr(value) in line


def test_a_broken_pipe_or_a_closed_stdout_is_reported_as_such(world):
    """No "check free space and permissions", no rich exit 1, no "Exception ignored" on shutdown."""
    args = ["inspect", "gpt3-175b", "--rank", "16"]
    for extra in ([], ["--json"]):
        reader_gone = subprocess.Popen(
            [sys.executable, "-m", "loraxs_cli", *args, *extra],
            env=cli_env(world["home"]),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        reader_gone.stdout.close()  # before the child writes: its write gets EPIPE
        stderr = reader_gone.stderr.read()
        assert reader_gone.wait(timeout=120) == 3, stderr
        assert stderr.count("error:") == 1 and "broken pipe" in stderr, stderr
        assert "free space" not in stderr and "Exception ignored" not in stderr, stderr

        closed = subprocess.run(
            [sys.executable, "-m", "loraxs_cli", *args, *extra],
            env=cli_env(world["home"]),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: os.close(1),
            timeout=120,
        )
        assert closed.returncode == 3, closed.stderr
        assert closed.stderr.count("error:") == 1 and "standard output is closed" in closed.stderr


@pytest.mark.parametrize("columns", ["0", "00", "abc", "-3", ""])
def test_an_unusable_columns_value_still_prints(at_home, columns):
    result = invoke("cache", "ls", env={"COLUMNS": columns})
    assert result.exit_code == 0, result.output
    entry = next(FactorCache().entries())
    assert entry.id in result.stdout


def test_clean_stale_temps_never_touches_other_names(tmp_path):
    dead = dead_pid()
    others = ["notes.tmp", f".x.tmp-{dead}", f".x.tmp-{dead}-XYZ", f"x.tmp-{dead}-abcdef", ".hidden"]
    for name in others:
        (tmp_path / name).write_text("keep")
    (tmp_path / f".x.tmp-{dead}-abcdef").write_text("stale")
    removed = clean_stale_temps(tmp_path)
    assert [p.name for p in removed] == [f".x.tmp-{dead}-abcdef"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(others)
