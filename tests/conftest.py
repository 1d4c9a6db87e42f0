"""Shared fixtures: an isolated loraxs home per test, tiny model directories, real-model paths."""

from __future__ import annotations

from pathlib import Path

import pytest

from models_for_tests import minilm_dir, save_tiny, smollm2_dir, tiny_bert, tiny_gpt2, tiny_llama


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
def tiny_llama_dir(tmp_path_factory, smollm2_path) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer (and chat template)."""
    return save_tiny(tiny_llama(), tmp_path_factory.mktemp("tiny-llama"), tokenizer_from=smollm2_path)


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, minilm_path) -> Path:
    """A 2-layer random BERT classifier with MiniLM's tokenizer."""
    return save_tiny(tiny_bert(), tmp_path_factory.mktemp("tiny-bert"), tokenizer_from=minilm_path)


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, smollm2_path) -> Path:
    """A 2-layer random GPT-2 (Conv1D layers) with SmolLM2's tokenizer."""
    return save_tiny(tiny_gpt2(), tmp_path_factory.mktemp("tiny-gpt2"), tokenizer_from=smollm2_path)
