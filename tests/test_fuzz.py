"""Fuzzing the readers: random bytes and mutated adapters, cache entries and packs.

Whatever the bytes, reading them either succeeds or raises a LoraxsError subclass (a one-line error
with its exit code in the CLI); any other exception is a crash and fails the test.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraxs_cli.adapter import CONFIG_FILE, EMBEDDED_FACTORS_FILE, WEIGHTS_FILE, load_adapter
from loraxs_cli.cache import META_FILE, FactorCache
from loraxs_cli.data import label_names, read_rows
from loraxs_cli.errors import LoraxsError
from loraxs_cli.pack import load_members, pack_adapters, pack_names
from loraxs_cli.sources import load_one
from models_for_tests import make_adapter

EXAMPLES = 150
# derandomize: the examples follow from each test's source, so a failure in CI replays as it is here
# (pytest tests/test_fuzz.py shows it, with hypothesis' falsifying example); print_blob adds the
# reproduce_failure line. No example database: nothing to carry between machines.
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    derandomize=True,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)

# Edits of a byte string: flip bytes at relative positions, cut it, or splice random bytes in.
flips = st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8)
edits = st.one_of(
    st.tuples(st.just("flip"), flips),
    st.tuples(st.just("cut"), st.floats(0, 1, exclude_max=True)),
    st.tuples(st.just("splice"), st.tuples(st.floats(0, 1), st.binary(min_size=1, max_size=64))),
)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=8,
)


def apply(data: bytes, edit) -> bytes:
    kind, arg = edit
    if kind == "flip":
        out = bytearray(data)
        for where, mask in arg:
            out[int(where * len(out))] ^= mask
        return bytes(out)
    if kind == "cut":
        return data[: int(arg * len(data))]
    where, extra = arg
    at = int(where * len(data))
    return data[:at] + extra + data[at:]


def _as_jsonl(values) -> bytes:
    return "".join(json.dumps({"text": "t", "label": v}) + "\n" for v in values).encode()


def survives(read) -> None:
    """read() succeeds or raises the documented error type; anything else propagates and fails."""
    try:
        read()
    except LoraxsError as error:
        assert str(error).strip(), "an empty error message"


@pytest.fixture(scope="module")
def valid(tmp_path_factory, tiny_llama_dir) -> dict[str, Path]:
    """A valid adapter (with embedded factors), a pack of two adapters and a cache entry."""
    root = tmp_path_factory.mktemp("fuzz")
    home = root / "home"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(home))
        adapter = make_adapter(tiny_llama_dir, root / "adapter", embed_factors=True)
        plain = make_adapter(tiny_llama_dir, root / "plain", seed=1)
    pack = root / "pack.safetensors"
    pack_adapters([("a", str(adapter)), ("b", str(plain))], pack)
    entry = next(FactorCache(home / "factors").entries())
    return {"adapter": adapter, "pack": pack, "entry": entry.path, "home": home}


def scratch_copy(src: Path) -> Path:
    target = Path(tempfile.mkdtemp(prefix="fuzz-")) / src.name
    (shutil.copytree if src.is_dir() else shutil.copy)(src, target)
    return target


@pytest.fixture(scope="module")
def adapter_copy(valid):
    return scratch_copy(valid["adapter"])


@FUZZ
@given(name=st.sampled_from([WEIGHTS_FILE, EMBEDDED_FACTORS_FILE]), edit=edits)
def test_mutated_adapter_weights(valid, adapter_copy, name, edit):
    original = (valid["adapter"] / name).read_bytes()
    (adapter_copy / name).write_bytes(apply(original, edit))
    try:
        survives(lambda: load_adapter(adapter_copy))
    finally:
        (adapter_copy / name).write_bytes(original)


@FUZZ
@given(field=st.sampled_from(["rank", "alpha", "modules", "base", "factors", "tensors_sha256", "head",
                              "labels", "task", "format_version", "method"]), value=json_values)  # fmt: skip
def test_mutated_adapter_config(valid, adapter_copy, field, value):
    config = json.loads((valid["adapter"] / CONFIG_FILE).read_text())
    config[field] = value
    (adapter_copy / CONFIG_FILE).write_text(json.dumps(config))
    try:
        survives(lambda: load_adapter(adapter_copy))
    finally:
        shutil.copy(valid["adapter"] / CONFIG_FILE, adapter_copy / CONFIG_FILE)


@FUZZ
@given(name=st.sampled_from([WEIGHTS_FILE, CONFIG_FILE]), data=st.binary(max_size=512))
def test_random_bytes_as_adapter_files(valid, adapter_copy, name, data):
    (adapter_copy / name).write_bytes(data)
    try:
        survives(lambda: load_adapter(adapter_copy))
    finally:
        shutil.copy(valid["adapter"] / name, adapter_copy / name)


@pytest.fixture(scope="module")
def pack_copy(valid):
    return scratch_copy(valid["pack"])


@FUZZ
@given(edit=edits)
def test_mutated_pack(valid, pack_copy, edit):
    pack_copy.write_bytes(apply(valid["pack"].read_bytes(), edit))
    survives(lambda: load_members(pack_copy, pack_names(pack_copy)))
    survives(lambda: load_one(f"{pack_copy}::a"))


@FUZZ
@given(
    value=json_values, where=st.sampled_from(["index", "adapters", "member", "config", "sha256", "factors"])
)
def test_mutated_pack_index(valid, pack_copy, value, where):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(valid["pack"]), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118
    index = json.loads(metadata["loraxs_pack"])
    if where == "index":
        index = value
    elif where == "adapters":
        index["adapters"] = value
    elif where == "member":
        index["adapters"]["a"] = value
    else:
        index["adapters"]["a"][where] = value
    save_file(tensors, str(pack_copy), metadata={**metadata, "loraxs_pack": json.dumps(index)})
    survives(lambda: load_members(pack_copy, pack_names(pack_copy)))


@pytest.fixture(scope="module")
def cache_copy(valid):
    home = Path(tempfile.mkdtemp(prefix="fuzz-home-"))
    shutil.copytree(valid["home"] / "factors", home / "factors")
    return home


def copied_entry(valid, cache_copy) -> Path:
    return cache_copy / "factors" / valid["entry"].parent.name / valid["entry"].name


def read_cache(home: Path) -> None:
    """What `cache ls`, `cache verify` and a cache hit do with every entry."""
    for entry in FactorCache(home / "factors").entries():
        survives(
            lambda entry=entry: (entry.id, entry.r_max, entry.modules, entry.size_bytes(), entry.verify())
        )
        survives(lambda entry=entry: entry.load(min(entry.r_max, 4)))


@FUZZ
@given(edit=edits)
def test_mutated_cache_factors(valid, cache_copy, edit):
    target = copied_entry(valid, cache_copy) / "factors.safetensors"
    original = (valid["entry"] / "factors.safetensors").read_bytes()
    target.write_bytes(apply(original, edit))
    try:
        read_cache(cache_copy)
    finally:
        target.write_bytes(original)


@FUZZ
@given(field=st.sampled_from(["r_max", "sha256", "modules", "recipe_settings", "method", "format_version"]),
       value=json_values)  # fmt: skip
def test_mutated_cache_meta(valid, cache_copy, field, value):
    target = copied_entry(valid, cache_copy) / META_FILE
    meta = json.loads((valid["entry"] / META_FILE).read_text())
    meta[field] = value
    target.write_text(json.dumps(meta))
    try:
        read_cache(cache_copy)
    finally:
        shutil.copy(valid["entry"] / META_FILE, target)


@FUZZ
@given(
    data=st.binary(max_size=256) | st.lists(json_values, max_size=4).map(_as_jsonl),
    suffix=st.sampled_from([".jsonl", ".csv", ".txt"]),
    task=st.sampled_from(["causal-lm", "seq-cls", "regression"]),
)
def test_random_bytes_and_rows_as_data(data, suffix, task):
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"rows{suffix}"
        path.write_bytes(data)
        survives(lambda: label_names(read_rows(path), task))
