"""Shared fixtures: an isolated loraxs home per test, tiny model directories, real-model paths."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from models_for_tests import (
    MINILM_TOPICS_TRAIN,
    SMOLLM2_TEXT,
    SMOLLM2_TEXT_TRAIN,
    minilm_dir,
    save_tiny,
    smollm2_dir,
    tiny_bert,
    tiny_gpt2,
    tiny_llama,
)


def _users_cache() -> Path:
    """The factor cache this user's own runs use (LORAXS_HOME as it was before the tests set it)."""
    home = os.environ.get("LORAXS_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "loraxs"


def _snapshot(root: Path) -> list[tuple[str, int, int]] | None:
    if not root.exists():
        return None
    return sorted(
        (str(p.relative_to(root)), p.stat().st_mtime_ns, p.stat().st_size)
        for p in root.rglob("*")
        if p.is_file()
    )


def pytest_configure(config):
    # Before any fixture of any scope runs: session- and module-scoped fixtures are set up before the
    # per-test home below applies, so the whole session (and every process it starts) gets a home of
    # its own first. The user's cache is recorded here and checked when the session ends.
    config.loraxs_users_cache = _users_cache()
    config.loraxs_users_snapshot = _snapshot(config.loraxs_users_cache)
    config.loraxs_session_home = Path(tempfile.mkdtemp(prefix="loraxs-tests-"))
    os.environ["LORAXS_HOME"] = str(config.loraxs_session_home / "home")
    os.environ["HF_HUB_OFFLINE"] = "1"
    # `datasets` (its cache of loaded datasets) reads its place once, when it is imported.
    os.environ["HF_DATASETS_CACHE"] = str(config.loraxs_session_home / "hf-datasets")
    # trackio reads its store's place once, when it is imported (tests/test_trackers.py uses it).
    os.environ["TRACKIO_DIR"] = str(config.loraxs_session_home / "trackio")
    if os.environ.get("PYTEST_XDIST_WORKER"):
        # pytest-xdist: one thread per worker (two torch processes with two threads each on two cores
        # run about 10x slower); processes the tests start inherit it.
        os.environ["OMP_NUM_THREADS"] = "1"
        import torch

        torch.set_num_threads(1)


def pytest_unconfigure(config):
    home = getattr(config, "loraxs_session_home", None)
    if home is not None:
        shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session", autouse=True)
def users_cache_untouched(pytestconfig):
    """Fails the session (an error at teardown) if any test wrote into the user's own factor cache."""
    yield
    root = pytestconfig.loraxs_users_cache
    after = _snapshot(root)
    assert after == pytestconfig.loraxs_users_snapshot, f"the tests changed the user's factor cache {root}"


@pytest.fixture(autouse=True)
def loraxs_home(tmp_path, monkeypatch) -> Path:
    """Every test gets its own factor cache; nothing touches ~/.cache/loraxs."""
    home = tmp_path / "loraxs-home"
    monkeypatch.setenv("LORAXS_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("LORAXS_DEBUG", raising=False)
    return home


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return smollm2_dir()


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    return minilm_dir()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    """A 2-layer random Llama with a self-made ChatML tokenizer (and chat template) laid out as SmolLM2's."""
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"), tokenizer_from="chatml")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer random BERT classifier with a self-made lower-casing WordPiece tokenizer."""
    return save_tiny(tiny_bert(), tmp_path_factory.mktemp("tiny-bert"), tokenizer_from="wordpiece")


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory) -> Path:
    """A 2-layer random GPT-2 (Conv1D layers) with the self-made ChatML tokenizer."""
    return save_tiny(tiny_gpt2(), tmp_path_factory.mktemp("tiny-gpt2"), tokenizer_from="chatml")


# ----------------------------------------------------------------------------------------------
# Real-model work shared across test files. Factors are content-addressed, so one cache per session
# serves every real-model test (SmolLM2's SVD and its SB gradient pass are computed once); the tests
# that use these fixtures share an xdist_group so that they run on the worker that holds them.


def cli_json(*args) -> dict:
    from typer.testing import CliRunner

    from loraxs_cli.cli.app import app

    result = CliRunner().invoke(app, [*map(str, args), "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


@pytest.fixture(scope="session")
def real_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("real-home")


@pytest.fixture
def in_real_home(real_home, monkeypatch) -> Path:
    monkeypatch.setenv("LORAXS_HOME", str(real_home))
    return real_home


def _bbc_files(root: Path, per_topic: int, held_out: int, row=lambda r: r, held_row=None) -> tuple[str, str]:
    """A seeded stratified BBC split (scripts/bbc_data.py) as train.jsonl and test.jsonl under `root`;
    `held_row` makes the held-out rows (default: `row`)."""
    from models_for_tests import bbc_split

    files = []
    rows_of = (row, held_row or row)
    for name, rows, make in zip(("train", "test"), bbc_split(per_topic, held_out), rows_of, strict=True):
        path = root / f"{name}.jsonl"
        path.write_text("".join(json.dumps(make(r)) + "\n" for r in rows))
        files.append(str(path))
    return files[0], files[1]


@pytest.fixture(scope="session")
def bbc_text(tmp_path_factory) -> tuple[str, str]:
    """BBC articles as plain text: 16 per topic to train on, 4 per topic held out, each held-out article
    its opening (HELD_OUT_CHARS: about two 64-token blocks; 40 blocks in all). Whole articles made 170
    blocks, and each held-out evaluation of SmolLM2 took ~55 s of the suite's longest group."""
    return _bbc_files(tmp_path_factory.mktemp("bbc-text"), 16, 4, row=lambda r: {"text": r["text"]},
                      held_row=lambda r: {"text": _opening(r["text"], HELD_OUT_CHARS)})  # fmt: skip


HELD_OUT_CHARS = 560


def _opening(text: str, chars: int) -> str:
    """The first `chars` characters of a text, cut back to a word boundary."""
    return text if len(text) <= chars else text[:chars].rsplit(" ", 1)[0]


@pytest.fixture(scope="session")
def smollm2_text_base(smollm2_path, bbc_text, real_home) -> dict:
    """SmolLM2-135M's held-out scores on BBC text before any training (64 tokens per article)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(real_home))
        return cli_json("eval", smollm2_path, "--data", bbc_text[1], *SMOLLM2_TEXT[:2], "--max-length", "64")[
            "results"
        ][0]


@pytest.fixture(scope="session")
def smollm2_text_xs(smollm2_path, bbc_text, real_home, tmp_path_factory) -> dict:
    """A LoRA-XS run of 30 steps on BBC text, its held-out scores measured by `train` (held-out file)."""
    out = tmp_path_factory.mktemp("smollm2-text-xs") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(real_home))
        run = cli_json("train", smollm2_path, "--data", bbc_text[0], "--eval-data", bbc_text[1], "--out", out,
                       "--save-every", 0, *SMOLLM2_TEXT_TRAIN)  # fmt: skip
    return {**run, "out": out}


@pytest.fixture(scope="session")
def bbc_topics(tmp_path_factory) -> tuple[str, str]:
    """BBC News, 5 topics: 40 articles per topic to train on, 20 held out."""
    return _bbc_files(tmp_path_factory.mktemp("bbc-topics"), 40, 20)


@pytest.fixture(scope="session")
def minilm_topics_xs(minilm_path, bbc_topics, real_home, tmp_path_factory) -> dict:
    """MiniLM on BBC topics: a LoRA-XS run of 60 steps (MINILM_TOPICS_TRAIN), made once for
    test_real_train and test_real_sb; `eval` holds `train`'s scores on the held-out file."""
    out = tmp_path_factory.mktemp("minilm-topics-xs") / "run"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAXS_HOME", str(real_home))
        data = ("--data", bbc_topics[0], "--eval-data", bbc_topics[1])
        run = cli_json("train", minilm_path, *data, "--out", out, "--save-every", 0, *MINILM_TOPICS_TRAIN)
    return {**run, "out": out}
