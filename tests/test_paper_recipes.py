"""The papers' recipes on request: `--svd sklearn` is the official LoRA-XS call, the BERT/RoBERTa default
targets are the official code's, the defaults' recipes (cache keys) did not move, `--svd exact` is offered."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import sklearn
import torch
from safetensors.torch import load_file
from sklearn.decomposition import TruncatedSVD
from typer.testing import CliRunner

from loraxs_cli.cache import FACTORS_FILE, Recipe
from loraxs_cli.cli.app import app
from loraxs_cli.errors import BadInputError
from loraxs_cli.factors import SVDSettings, canonical_flips, compute_xs_factors, truncated_svd
from loraxs_cli.models import backbone, linear_modules, match_targets, weight_matrix
from models_for_tests import tiny_bert

runner = CliRunner()
OFFICIAL_GLUE_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]  # main_glue.py
SKLEARN_FLIPS_BY_COMPONENTS = tuple(int(v) for v in sklearn.__version__.split(".")[:2]) >= (1, 5)


def official_factors(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What the official LoRA-XS code computes (utils/svd_utils.py, utils/initialization_utils.py):
    TruncatedSVD(n_components=r, n_iter=10, random_state=42) fitted on weight.T; enc = transform(weight.T),
    dec = components_; lora_B = dec.T, lora_A = enc.T. sklearn is called directly, the official way."""
    transposed = weight.detach().cpu().numpy().T
    svd = TruncatedSVD(n_components=rank, n_iter=10, random_state=42)
    svd.fit(transposed)
    enc, dec = svd.transform(transposed), svd.components_
    return torch.from_numpy(np.ascontiguousarray(dec.T)), torch.from_numpy(np.ascontiguousarray(enc.T))


def with_canonical_signs(b: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    signs = canonical_flips(b)
    if SKLEARN_FLIPS_BY_COMPONENTS:  # sklearn >= 1.5 flips each component by our rule already
        assert torch.equal(signs, torch.ones_like(signs))
    return b * signs, a * signs[:, None]


@pytest.mark.parametrize("shape", [(48, 48), (40, 96), (96, 40)])
def test_sklearn_backend_is_the_official_call_on_a_random_matrix(shape):
    weight = torch.randn(*shape, generator=torch.Generator().manual_seed(sum(shape)))
    layer = torch.nn.Module()
    layer.proj = torch.nn.Linear(shape[1], shape[0], bias=False)
    layer.proj.weight.data = weight
    settings = SVDSettings.for_backend("sklearn")
    assert settings.as_dict() == {"backend": "sklearn", "niter": 10, "oversample": 10, "seed": 0}
    ours = compute_xs_factors(layer, ["proj"], 8, settings).tensors
    b, a = with_canonical_signs(*official_factors(weight, 8))
    assert torch.equal(ours["proj.B"], b) and torch.equal(ours["proj.A"], a)
    # The SVD form that LoRA-SB's --svd sklearn uses agrees: U = B, S Vh = A.
    u, s, vh = truncated_svd(weight, 8, settings, "proj")
    assert torch.equal(u, b)
    torch.testing.assert_close(s[:, None] * vh, a, rtol=1e-6, atol=1e-6)


def test_sklearn_backend_matches_the_official_code_on_a_tiny_models_weights(tiny_bert_dir):
    doc = json.loads(
        runner.invoke(app, ["init", str(tiny_bert_dir), "-r", "4", "--svd", "sklearn", "--json"]).stdout
    )
    tensors = load_file(Path(doc["path"]) / FACTORS_FILE)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir))
    modules = dict(backbone(model).named_modules())
    names = [m["name"] for m in doc["modules"]]
    assert len(names) == 2 * 4
    for name in names:
        b, a = with_canonical_signs(*official_factors(modules[name].weight, 4))
        assert torch.equal(tensors[f"{name}.B"], b), name
        assert torch.equal(tensors[f"{name}.A"], a), name
    meta = json.loads((Path(doc["path"]) / "meta.json").read_text())
    assert meta["recipe"]["svd"] == {"backend": "sklearn", "niter": 10, "oversample": 10, "seed": 0}
    # Explicit settings override the official defaults and make another entry.
    args = ["init", str(tiny_bert_dir), "-r", "4", "--svd", "sklearn", "--niter", "3", "--json"]
    other = json.loads(runner.invoke(app, args).stdout)
    assert other["entry"] != doc["entry"]
    other_meta = json.loads((Path(other["path"]) / "meta.json").read_text())
    assert other_meta["recipe"]["svd"] == {"backend": "sklearn", "niter": 3, "oversample": 10, "seed": 0}


def test_sklearn_seed_offsets_the_official_random_state():
    weight = torch.randn(40, 30, generator=torch.Generator().manual_seed(1))
    b42, _ = with_canonical_signs(*official_factors(weight, 6))
    seeded = truncated_svd(weight, 6, SVDSettings.for_backend("sklearn", seed=0), "any.module.name")[0]
    assert torch.equal(seeded, b42)  # every module gets random_state 42, whatever its name
    other = truncated_svd(weight, 6, SVDSettings.for_backend("sklearn", seed=1), "any.module.name")[0]
    assert not torch.equal(other, b42)
    with pytest.raises(BadInputError, match="--seed must be in"):
        SVDSettings.for_backend("sklearn", seed=-43)


def _peft_targets(model, targets: list[str]) -> set[str]:
    """Backbone-relative names of the modules PEFT wraps for `target_modules=targets`."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", r=2, target_modules=targets))
    prefix = "base_model.model." + model.base_model_prefix + "."
    return {
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if hasattr(module, "lora_A") and name.startswith(prefix)
    }


@pytest.mark.parametrize("model_type", ["bert", "roberta"])
def test_default_encoder_targets_are_the_official_peft_set(model_type):
    if model_type == "bert":
        model = tiny_bert(vocab_size=64)
    else:
        from transformers import RobertaConfig, RobertaForSequenceClassification

        sizes = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
        config = RobertaConfig(**sizes, num_hidden_layers=2, vocab_size=64, max_position_embeddings=64)
        model = RobertaForSequenceClassification(config)
    ours = match_targets(linear_modules(model), None, model_type)
    official = _peft_targets(model, OFFICIAL_GLUE_TARGETS)
    assert set(ours) == official and len(ours) == len(official) == 2 * 4
    assert not any(n.endswith(("key", "intermediate.dense")) for n in ours)


def test_default_recipes_keep_their_cache_keys():
    """Adding options must not move the defaults' cache entries (these values predate them)."""
    svd = SVDSettings.for_backend("torch")
    assert svd == SVDSettings() and svd.as_dict() == {
        "backend": "torch",
        "niter": 4,
        "oversample": 16,
        "seed": 0,
    }
    recipe = Recipe(method="xs", modules=("layers.0.q_proj",), svd=svd.as_dict(), weights_dtype="float32")
    assert recipe.hash == "cc4a709b7221"


def test_svd_exact_is_offered_and_runs(tiny_bert_dir):
    for command in ("init", "train"):
        text = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"}).output
        assert "exact" in text and "sklearn" in text, command
    doc = json.loads(
        runner.invoke(app, ["init", str(tiny_bert_dir), "-r", "4", "--svd", "exact", "--json"]).stdout
    )
    tensors = load_file(Path(doc["path"]) / FACTORS_FILE)
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(str(tiny_bert_dir))
    name = doc["modules"][0]["name"]
    weight = weight_matrix(dict(backbone(model).named_modules())[name]).detach()
    best = torch.linalg.svd(weight.double())
    rank4 = (best.U[:, :4] * best.S[:4]) @ best.Vh[:4]
    torch.testing.assert_close(
        (tensors[f"{name}.B"] @ tensors[f"{name}.A"]).double(), rank4, atol=1e-5, rtol=0
    )
    result = runner.invoke(app, ["init", str(tiny_bert_dir), "-r", "4", "--svd", "lapack"])
    assert result.exit_code == 2 and "'lapack' is not one of 'torch', 'sklearn', 'exact'" in result.output
    with pytest.raises(BadInputError, match="unknown --svd 'lapack'"):  # the library's own check
        SVDSettings.for_backend("lapack")
