"""Chat data: the loss mask on every assistant turn (or the last), checked against the tokenizer's own
`return_assistant_tokens_mask` on templates with `{% generation %}` markers and by the prefix method on
SmolLM2's own template; `messages` validation (file and line, exit 3) in train and generate."""

from __future__ import annotations

import copy
import json

import pytest
import yaml
from transformers import AutoTokenizer
from typer.testing import CliRunner

from loraxs_cli import data as datamod
from loraxs_cli.cli.app import app
from loraxs_cli.data import IGNORE_INDEX, Row, chat_example, encode, prompt_text, reference_answer
from loraxs_cli.errors import BadInputError, UsageError

runner = CliRunner()

THREE_TURNS = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": " 6, of course.\nAnything else?"},
]
ANSWERS = [m["content"] for m in THREE_TURNS if m["role"] == "assistant"]

# SmolLM2's own template (chat_template.jinja of SmolLM2-135M-Instruct) with generation markers around
# each assistant turn's content and its <|im_end|>: it renders the very same text.
SMOLLM2_MARKED = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# A plain ChatML template (no system prompt) whose markers cover the content only, not <|im_end|>.
CONTENT_ONLY_MARKED = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}{% endgeneration %}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Like reasoning models' templates: earlier assistant turns are rendered without their reasoning,
# so the conversation up to an earlier turn is not a prefix of the whole chat.
DROPS_EARLIER_REASONING = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' and not loop.last %}{{ message['content'].split('</think>')[-1] }}"
    "{% else %}{{ message['content'] }}{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    """SmolLM2-135M-Instruct's tokenizer and chat template (the tiny Llama carries them)."""
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


def with_template(tokenizer, template: str):
    other = copy.deepcopy(tokenizer)
    other.chat_template = template
    return other


def labelled_runs(ids: list[int], labels: list[int], tokenizer) -> list[str]:
    runs, current = [], []
    for token, label in zip(ids, labels, strict=True):
        if label != IGNORE_INDEX:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


def assistant_mask(tokenizer, messages) -> tuple[list[int], list[int]]:
    out = tokenizer.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    return list(out["input_ids"]), list(out["assistant_masks"])


def chat_row(messages, where="chat.jsonl:1") -> Row:
    return Row({"messages": messages}, where)


def test_prefix_method_on_smollm2_template_labels_exactly_the_assistant_tokens(tokenizer):
    assert not datamod._GENERATION_MARK.search(tokenizer.chat_template)  # SmolLM2: the prefix method
    ids, labels = chat_example(chat_row(THREE_TURNS), tokenizer)
    # the token ids are exactly what the tokenizer's own chat template makes of the conversation
    assert ids == list(
        tokenizer.apply_chat_template(THREE_TURNS, tokenize=True, return_dict=True)["input_ids"]
    )
    # each assistant turn, through its end-of-turn token, and nothing else
    assert labelled_runs(ids, labels, tokenizer) == [f"{answer}<|im_end|>" for answer in ANSWERS]
    # the tokenizer's own mask on the same template with generation markers agrees token for token
    marked = with_template(tokenizer, SMOLLM2_MARKED)
    for cut in (2, 4, 6):  # the marked template renders the same text, with and without generation prompt
        for prompt in (False, True):
            kwargs = {"tokenize": False, "add_generation_prompt": prompt}
            assert marked.apply_chat_template(THREE_TURNS[:cut], **kwargs) == tokenizer.apply_chat_template(
                THREE_TURNS[:cut], **kwargs
            )
    mask_ids, mask = assistant_mask(marked, THREE_TURNS)
    assert mask_ids == ids
    assert [int(label != IGNORE_INDEX) for label in labels] == mask
    # and through the markers, our labels are the same
    assert chat_example(chat_row(THREE_TURNS), marked) == (ids, labels)


def test_generation_markers_labels_are_the_tokenizers_assistant_mask(tokenizer):
    marked = with_template(tokenizer, SMOLLM2_MARKED)
    ids, labels = chat_example(chat_row(THREE_TURNS), marked)
    mask_ids, mask = assistant_mask(marked, THREE_TURNS)
    assert ids == mask_ids and sum(mask) > 0
    assert [int(label != IGNORE_INDEX) for label in labels] == mask
    last_ids, last_labels = chat_example(chat_row(THREE_TURNS), marked, "last")
    assert last_ids == ids
    assert labelled_runs(last_ids, last_labels, marked) == [f"{ANSWERS[-1]}<|im_end|>"]


def test_markers_around_the_content_only_still_learn_the_end_of_turn_token(tokenizer):
    marked = with_template(tokenizer, CONTENT_ONLY_MARKED)
    ids, labels = chat_example(chat_row(THREE_TURNS), marked)
    mask_ids, mask = assistant_mask(marked, THREE_TURNS)
    assert ids == mask_ids
    eos = marked.eos_token_id  # <|im_end|>
    runs = labelled_runs(ids, labels, marked)
    assert runs == [f"{answer}<|im_end|>" for answer in ANSWERS]
    # the tokenizer's mask, plus the <|im_end|> right after each masked span, and nothing more
    extended = list(mask)
    for i in range(1, len(mask)):
        if mask[i - 1] and not mask[i] and ids[i] == eos:
            extended[i] = 1
    assert sum(extended) == sum(mask) + 3
    assert [int(label != IGNORE_INDEX) for label in labels] == extended


def test_last_turn_only_and_the_trainer_setting(tokenizer, tmp_path):
    ids, labels = chat_example(chat_row(THREE_TURNS), tokenizer, "last")
    assert labelled_runs(ids, labels, tokenizer) == [f"{ANSWERS[-1]}<|im_end|>"]
    rows = [chat_row(THREE_TURNS)]
    every = encode(rows, tokenizer, "causal-lm", max_length=512)[0]
    last = encode(rows, tokenizer, "causal-lm", max_length=512, chat_loss="last")[0]
    assert every.input_ids == last.input_ids and every.num_targets > last.num_targets
    with pytest.raises(UsageError, match="--chat-loss"):
        encode(rows, tokenizer, "causal-lm", max_length=512, chat_loss="first")


def test_tokenizer_without_offsets_tokenizes_piece_by_piece(tokenizer, monkeypatch):
    monkeypatch.setattr(datamod, "_offsets", lambda tokenizer, text: None)
    ids, labels = chat_example(chat_row(THREE_TURNS), tokenizer)
    assert labelled_runs(ids, labels, tokenizer) == [f"{answer}<|im_end|>" for answer in ANSWERS]
    assert tokenizer.decode(ids) == tokenizer.apply_chat_template(THREE_TURNS, tokenize=False)


def test_template_that_rewrites_earlier_turns_needs_last_turn_loss(tokenizer):
    rewriting = with_template(tokenizer, DROPS_EARLIER_REASONING)
    chat = [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "<think>two and two</think>4"},
        {"role": "user", "content": "3+3?"},
        {"role": "assistant", "content": "<think>three and three</think>6"},
    ]
    with pytest.raises(BadInputError, match=r"chat\.jsonl:1: .*message 2.*--chat-loss last"):
        chat_example(chat_row(chat), rewriting)
    ids, labels = chat_example(chat_row(chat), rewriting, "last")
    assert labelled_runs(ids, labels, rewriting) == ["<think>three and three</think>6<|im_end|>"]


def test_prompt_and_reference_of_a_chat_for_generation(tokenizer):
    row = chat_row(THREE_TURNS)
    assert prompt_text(row, tokenizer) == tokenizer.apply_chat_template(
        THREE_TURNS[:-1], add_generation_prompt=True, tokenize=False
    )
    assert reference_answer(row) == ANSWERS[-1]
    question = chat_row(THREE_TURNS[:-1])
    assert prompt_text(question, tokenizer).endswith("And 3+3?<|im_end|>\n<|im_start|>assistant\n")
    with pytest.raises(BadInputError, match=r"chat\.jsonl:1: generation needs a reference"):
        reference_answer(question)


BAD_CHATS = [
    ([{"role": "user", "content": 7}, {"role": "assistant", "content": "7"}], "message 1 (user): 'content'"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant"}], "message 2 (assistant): 'content'"),
    ([{"content": "hi"}, {"role": "assistant", "content": "x"}], "message 1 has no 'role'"),
    ([{"role": 3, "content": "hi"}, {"role": "assistant", "content": "x"}], "message 1 has no 'role'"),
    ([{"role": "user", "content": ["hi"]}, {"role": "assistant", "content": "x"}], "must be a string"),
    (["hi", {"role": "assistant", "content": "x"}], "message 1 must be a {role, content} object"),
    ([], "non-empty list"),
    ("hello", "non-empty list"),
]


@pytest.mark.parametrize(("messages", "expected"), BAD_CHATS)
def test_malformed_messages_name_file_and_line_in_train_and_generate(
    tiny_llama_dir, tmp_path, messages, expected
):
    good = {"messages": [{"role": "user", "content": "1+1?"}, {"role": "assistant", "content": "2"}]}
    data = tmp_path / "chat.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
    train = runner.invoke(
        app,
        ["train", str(tiny_llama_dir), "--data", str(data), "--out", str(tmp_path / "run"), "--rank", "2"],
    )
    generate = runner.invoke(app, ["generate", str(tiny_llama_dir), "--prompts", str(data)])
    for result in (train, generate):
        errors = [line for line in result.output.splitlines() if line.startswith("error:")]
        assert result.exit_code == 3 and len(errors) == 1, result.output
        assert f"{data}:2" in errors[0] and expected in errors[0] and "internal" not in errors[0], errors


def test_a_template_refusing_the_conversation_is_bad_input(tokenizer):
    strict = with_template(
        tokenizer, "{{ raise_exception('Conversation roles must alternate user/assistant') }}"
    )
    with pytest.raises(BadInputError, match=r"chat\.jsonl:1: the chat template rejects .* must alternate"):
        chat_example(chat_row(THREE_TURNS), strict)


def test_chat_loss_flag_is_recorded_in_the_run_config(tiny_llama_dir, tmp_path):
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": THREE_TURNS}) + "\n" for _ in range(4)))
    run = tmp_path / "run"
    args = ["train", str(tiny_llama_dir), "--data", str(data), "--out", str(run), "--rank", "2"]
    args += ["--max-steps", "1", "--batch-size", "2", "--max-length", "128"]
    assert runner.invoke(app, [*args, "--chat-loss", "last"]).exit_code == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["chat_loss"] == "last"
    # resuming with the other setting would mix two runs
    again = runner.invoke(app, [*args, "--max-steps", "2"])
    assert again.exit_code == 3 and "chat_loss" in again.output
    bad = runner.invoke(app, [*args[:5], str(tmp_path / "other"), *args[6:], "--chat-loss", "first"])
    assert bad.exit_code == 2 and "--chat-loss" in bad.output
