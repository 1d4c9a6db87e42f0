"""`loraxs convert --from official` on checkpoints built the way the official LoRA-XS and LoRA-SB code
builds them: real PEFT `get_peft_model`, each LoRA `Linear` given an r x r `default_lora_latent_mapping`
and a forward `W x + s * B(R(A x))`, A and B from its SVD recipe, real `save_pretrained`, and
`reconstr_config.json` in the run directory above the adapter.

Cases: LoRA-XS and LoRA-SB on a causal LM (Llama, the official math setup: seven projections,
alpha = r) and on a RoBERTa classifier (the official GLUE setup: query, value, attention.output.dense,
output.dense; head classifier.dense + classifier.out_proj under modules_to_save; XS with alpha / r = 2).
LoRA-SB's factors are rounded to bf16 as its code leaves them (and its Llama adapter is saved in bf16,
as its bf16 training run saves it).

Key forms: the installed PEFT's save_pretrained (>= 0.18: `<module>.default_lora_latent_mapping.weight`)
and PEFT 0.10-0.17's (`<module>_lora_latent_mapping.weight`: those versions drop ".default" anywhere in
a key, `k.replace(".default", "")` in get_peft_model_state_dict; the official requirements pin 0.10.0
and 0.13.2). The latter is that rule applied to the real PEFT state dict.
"""

from __future__ import annotations

import json
import shutil
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

from loraxs_cli.adapter import apply_adapter, load_adapter
from loraxs_cli.cli.app import app
from loraxs_cli.models import ResolvedModel, head_kwargs, load_model
from models_for_tests import save_tiny

peft = pytest.importorskip("peft")
sklearn_svd = pytest.importorskip("sklearn.decomposition")

runner = CliRunner()
IDS = torch.tensor([[5, 17, 300, 42, 9, 1000, 77, 3], [8, 8, 1200, 64, 5, 19, 2, 700]])
LLAMA_TARGETS = ["q_proj", "o_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]
ROBERTA_TARGETS = ["query", "value", "attention.output.dense", "output.dense"]
RANK = 4
NUM_LABELS = 3
# max |logit difference| allowed between the official model and loraxs: float32 rounding of the
# same products in another order (the logits are of order 1)
ROUNDING = 2e-5


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def tiny_roberta_dir(tmp_path_factory) -> Path:
    """A 2-layer random RoBERTa saved as a masked LM (as roberta-large is: no classifier in it)."""
    from transformers import RobertaConfig, RobertaForMaskedLM

    torch.manual_seed(0)
    config = RobertaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=30522,
        max_position_embeddings=258,
        type_vocab_size=1,
        pad_token_id=0,
    )
    return save_tiny(RobertaForMaskedLM(config), tmp_path_factory.mktemp("tiny-roberta"), "wordpiece")


# ----------------------------------------------------------------------------------------------
# The official recipe, rebuilt on PEFT


def _latent_forward(self, x, *args, **kwargs):
    """The patched LoRA Linear of the official code: W x + scaling * lora_B(latent(lora_A(x)))."""
    name = self.active_adapter[0]
    result = self.base_layer(x, *args, **kwargs)
    h = self.lora_A[name](self.lora_dropout[name](x.to(self.lora_A[name].weight.dtype)))
    update = self.lora_B[name](self.default_lora_latent_mapping(h)) * self.scaling[name]
    return (result + update).to(x.dtype)


def _xs_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA-XS: sklearn's TruncatedSVD of W^T (in x out); lora_A = its transform^T = S V^T (r x in),
    lora_B = its components^T = U (out x r)."""
    svd = sklearn_svd.TruncatedSVD(n_components=RANK, n_iter=10, random_state=42)
    matrix = weight.detach().T.numpy()
    svd.fit(matrix)
    encoder, decoder = svd.transform(matrix), svd.components_
    return torch.tensor(encoder.T, dtype=weight.dtype), torch.tensor(decoder.T, dtype=weight.dtype)


def _sb_factors(gradient: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LoRA-SB: torch.svd_lowrank of the (first-step) gradient^T, U, S and V rounded to bf16;
    lora_A = U^T (orthonormal rows), lora_B = V (orthonormal columns), R0 = diag(S)."""
    u, s, v = torch.svd_lowrank(gradient.T.float(), q=RANK, niter=10)
    u, s, v = (t.to(torch.bfloat16).float() for t in (u, s, v))
    return u.T.contiguous(), v.contiguous(), torch.diag(s)


@dataclass
class Official:
    run_dir: Path
    adapter_dir: Path  # what the official code's save_pretrained wrote
    legacy_dir: Path  # the same adapter as PEFT 0.10-0.17 write it
    logits: torch.Tensor  # the official model's, on IDS
    model: torch.nn.Module


def official_checkpoint(
    base_dir: Path, out: Path, *, method: str, task: str, alpha: int, spread: dict | None = None
) -> Official:
    """The official recipe on `base_dir`, saved under `out`. `spread` (a tokenized batch): shift the
    classifier's output bias so that every class wins on some rows of it (a tiny random encoder
    otherwise predicts one class for every input)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import Linear as LoraLinear
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    torch.manual_seed(1)
    if task == "causal-lm":
        model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        config = LoraConfig(
            r=RANK, lora_alpha=alpha, target_modules=LLAMA_TARGETS, lora_dropout=0.0, task_type="CAUSAL_LM"
        )
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            base_dir, num_labels=NUM_LABELS, dtype=torch.float32
        )
        config = LoraConfig(
            r=RANK, lora_alpha=alpha, target_modules=ROBERTA_TARGETS, lora_dropout=0.0, task_type="SEQ_CLS"
        )
    model = get_peft_model(model, config)
    gen = torch.Generator().manual_seed(2)
    patched = 0
    for layer in model.modules():
        if not isinstance(layer, LoraLinear):
            continue
        weight = layer.base_layer.weight
        layer.default_lora_latent_mapping = torch.nn.Linear(RANK, RANK, bias=False)
        if method == "xs":
            a, b = _xs_factors(weight)
            r = torch.randn(RANK, RANK, generator=gen) * 0.3  # a trained R
        else:
            gradient = torch.randn(weight.shape, generator=gen) * 0.01
            a, b, r0 = _sb_factors(gradient)
            r = (r0 + torch.randn(RANK, RANK, generator=gen) * 0.1).to(torch.bfloat16).float()
        with torch.no_grad():
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
            layer.default_lora_latent_mapping.weight.copy_(r)
        layer.forward = types.MethodType(_latent_forward, layer)
        patched += 1
    assert patched == 14 if task == "causal-lm" else patched == 8
    if task == "seq-cls":  # the head trained alongside (modules_to_save)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "classifier.modules_to_save" in name:
                    param.add_(torch.randn(param.shape, generator=gen) * 0.2)
    model.eval()
    if spread is not None:
        with torch.no_grad():
            logits = model(**spread).logits
            bias = model.base_model.model.classifier.modules_to_save["default"].out_proj.bias
            bias -= logits.mean(0)  # centred: the rows' own variation decides the class
            for _ in range(20):  # even out the classes' shares of the rows
                counts = torch.bincount(model(**spread).logits.argmax(-1), minlength=NUM_LABELS)
                bias -= 0.02 * (counts.float() - counts.float().mean()) * logits.std(0).mean()
    with torch.no_grad():
        logits = model(input_ids=IDS).logits
    if method == "sb" and task == "causal-lm":  # LoRA-SB trains LLMs in bf16: the adapter is saved so
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.data = param.data.to(torch.bfloat16)
    run_dir = out / "run"
    adapter_dir = run_dir / "ft"
    model.save_pretrained(adapter_dir)
    reconstr = {
        "reconstruction_type": "svd",
        "reconstr_mode": "separated",
        "half_init_dec": False,
        "replacement_module_random_init": False,
        "r_squared": True,
        "svd": {"n_iter": 10, "random_state": 42, "rank": RANK},
    }
    (run_dir / "reconstr_config.json").write_text(json.dumps(reconstr))
    # PEFT 0.10-0.17: the adapter name removed with k.replace(".default", "") from every key
    from peft import get_peft_model_state_dict

    legacy_dir = out / "legacy-run" / "ft"
    legacy_dir.mkdir(parents=True)
    state = get_peft_model_state_dict(model)
    save_file(
        {k.replace(".default", ""): v.contiguous() for k, v in state.items()},
        str(legacy_dir / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )
    shutil.copy(adapter_dir / "adapter_config.json", legacy_dir)
    shutil.copy(run_dir / "reconstr_config.json", legacy_dir.parent)
    return Official(run_dir, adapter_dir, legacy_dir, logits, model)


def loraxs_logits(base_dir: Path, adapter_dir: Path) -> torch.Tensor:
    adapter = load_adapter(adapter_dir)
    task = adapter.config.task
    model = load_model(
        ResolvedModel(str(base_dir), "dir", base_dir),
        dtype=torch.float32,
        **head_kwargs(task, adapter.config.labels),
    )
    apply_adapter(model, adapter)
    with torch.no_grad():
        return model(input_ids=IDS).logits


def merged_logits(merged_dir: Path, adapter_dir: Path) -> torch.Tensor:
    adapter = load_adapter(adapter_dir)
    kwargs = head_kwargs(adapter.config.task, adapter.config.labels)
    model = load_model(ResolvedModel(str(merged_dir), "dir", merged_dir), dtype=torch.float32, **kwargs)
    with torch.no_grad():
        return model(input_ids=IDS).logits


CASES = [
    pytest.param("xs", "causal-lm", RANK, id="xs-llama-alpha=r"),
    pytest.param("xs", "seq-cls", 2 * RANK, id="xs-roberta-alpha=2r"),
    pytest.param("sb", "causal-lm", RANK, id="sb-llama-bf16"),
    pytest.param("sb", "seq-cls", RANK, id="sb-roberta"),
]


@pytest.mark.parametrize(("method", "task", "alpha"), CASES)
def test_official_checkpoint_imports_exactly(
    method, task, alpha, tiny_llama_dir, tiny_roberta_dir, tmp_path, request
):
    base = tiny_llama_dir if task == "causal-lm" else tiny_roberta_dir
    official = official_checkpoint(base, tmp_path, method=method, task=task, alpha=alpha)
    kwargs = head_kwargs(task, [f"LABEL_{i}" for i in range(NUM_LABELS)])
    base_model = load_model(ResolvedModel(str(base), "dir", base), dtype=torch.float32, **kwargs)
    with torch.no_grad():
        assert (base_model(input_ids=IDS).logits - official.logits).abs().max() > 1e-2  # a visible update
    keys = set(load_file(official.adapter_dir / "adapter_model.safetensors"))
    legacy = set(load_file(official.legacy_dir / "adapter_model.safetensors"))
    assert any(k.endswith(".default_lora_latent_mapping.weight") for k in keys)
    assert any(k.endswith("_lora_latent_mapping.weight") and ".default" not in k for k in legacy)
    for label, src in (("peft-now", official.adapter_dir), ("peft-0.10-0.17", official.legacy_dir)):
        out = tmp_path / f"xs-{label}"
        result = invoke("convert", src, "--from", "official", "--model", base, "--out", out, "--json")
        assert result.exit_code == 0, result.output
        doc = json.loads(result.stdout)
        assert doc["method"] == doc["method_detected"] == method
        assert doc["rank"] == RANK and doc["alpha"] == alpha and doc["task"] == task
        assert doc["modules"] == (14 if task == "causal-lm" else 8)
        if task == "seq-cls":
            assert doc["labels"] == ["LABEL_0", "LABEL_1", "LABEL_2"]
            assert set(doc["head"]) == {
                f"classifier.{m}.{p}" for m in ("dense", "out_proj") for p in ("weight", "bias")
            }
        got = loraxs_logits(base, out)
        diff = float((got - official.logits).abs().max())
        print(f"\n{request.node.callspec.id} [{label}]: exit 0, max |logit diff| {diff:.2e}")
        assert diff <= ROUNDING, diff
        source = load_adapter(out).config.extra["converted_from"]
        assert source["reconstr_config"]["r_squared"] is True
    # merge --verify folds it into the weights with the same logits
    merged = tmp_path / "merged"
    result = invoke(
        "merge", base, "--adapter", tmp_path / "xs-peft-now", "--out", merged, "--verify", "--json"
    )
    assert result.exit_code == 0, result.output
    diff = float((merged_logits(merged, tmp_path / "xs-peft-now") - official.logits).abs().max())
    print(f"{request.node.callspec.id} merged: max |logit diff| {diff:.2e}")
    assert diff <= 10 * ROUNDING, diff


def test_imported_classifier_evaluates_glue_integer_labels(tiny_roberta_dir, tmp_path):
    """GLUE data carries integer labels; the imported head names its classes LABEL_i: label i is class i.
    The labels here are the official model's own predictions, so eval must score 1.0."""
    from transformers import AutoTokenizer

    texts = [f"sentence number {i} about {w}" for i, w in enumerate(["cats", "markets", "rain", "music"] * 6)]
    tokenizer = AutoTokenizer.from_pretrained(tiny_roberta_dir)
    batch = dict(tokenizer(texts, padding=True, return_tensors="pt"))
    official = official_checkpoint(
        tiny_roberta_dir, tmp_path, method="xs", task="seq-cls", alpha=2 * RANK, spread=batch
    )
    with torch.no_grad():
        predicted = official.model(**batch).logits.argmax(-1).tolist()
    assert len(set(predicted)) == NUM_LABELS, predicted
    out = tmp_path / "xs"
    result = invoke(
        "convert", official.adapter_dir, "--from", "official", "--model", tiny_roberta_dir, "--out", out
    )
    assert result.exit_code == 0, result.output
    data = tmp_path / "glue.jsonl"
    data.write_text(
        "".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in zip(texts, predicted, strict=True))
    )
    tsv = tmp_path / "glue.tsv"  # a TSV cell holds the digit as text
    tsv.write_text("text\tlabel\n" + "".join(f"{t}\t{y}\n" for t, y in zip(texts, predicted, strict=True)))
    for path in (data, tsv):
        result = invoke("eval", tiny_roberta_dir, "--adapter", out, "--data", path, "--json")
        assert result.exit_code == 0, result.output
        row = json.loads(result.stdout)["results"][0]
        assert row["accuracy"] == 1.0 and row["mcc"] == pytest.approx(1.0), row
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "x", "label": NUM_LABELS}) + "\n")
    result = invoke("eval", tiny_roberta_dir, "--adapter", out, "--data", bad)
    assert result.exit_code == 3 and "not one of the model's labels" in result.output


def test_method_option_and_detection(tiny_llama_dir, tmp_path):
    official = official_checkpoint(tiny_llama_dir, tmp_path, method="sb", task="causal-lm", alpha=RANK)
    src = official.adapter_dir
    result = invoke(
        "convert",
        src,
        "--from",
        "official",
        "--model",
        tiny_llama_dir,
        "--out",
        tmp_path / "o",
        "--method",
        "xs",
        "--json",
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["method"] == "xs" and doc["method_detected"] == "sb"
    assert "look like LoRA-SB" in result.stderr
    assert load_adapter(tmp_path / "o").config.method == "xs"
    for args, message in (
        (("--method", "vera"), "is not one of"),
        (("--method", "sb", "--from", "peft-lora"), "--method is for --from official"),
    ):
        full = ["convert", src, "--model", tiny_llama_dir, "--out", tmp_path / "p", *args]
        if "--from" not in args:
            full += ["--from", "official"]
        result = invoke(*full)
        assert result.exit_code == 2 and message in result.output, result.output
    # inspect counts the r x r latent mappings as adapter numbers, not as a task head
    result = invoke("inspect", src, "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["format"] == "official" and shown["head_params"] == 0 and shown["modules"] == 14
    lora_numbers = sum(v.numel() for v in load_file(src / "adapter_model.safetensors").values())
    assert shown["params"] == lora_numbers
    # an official checkpoint is not a plain LoRA: --from peft-lora says which import to use
    result = invoke("convert", src, "--from", "peft-lora", "--model", tiny_llama_dir, "--out", tmp_path / "p")
    assert result.exit_code == 3 and "--from official" in result.output
    # the official run without the r x r matrix (r_squared false) is a plain LoRA
    config = json.loads((official.run_dir / "reconstr_config.json").read_text())
    (official.run_dir / "reconstr_config.json").write_text(json.dumps({**config, "r_squared": False}))
    result = invoke("convert", src, "--from", "official", "--model", tiny_llama_dir, "--out", tmp_path / "p")
    assert result.exit_code == 3 and "r_squared" in result.output
    assert not (tmp_path / "p").exists()


def test_official_checkpoint_on_the_wrong_base(tiny_llama_dir, tiny_roberta_dir, tmp_path):
    official = official_checkpoint(tiny_llama_dir, tmp_path, method="xs", task="causal-lm", alpha=RANK)
    result = invoke(
        "convert",
        official.adapter_dir,
        "--from",
        "official",
        "--model",
        tiny_roberta_dir,
        "--out",
        tmp_path / "o",
    )
    assert result.exit_code == 4 and "is not a linear layer" in result.output
    assert len(result.output.strip().splitlines()) == 1
