"""Chat templates: Command-R's default / tool_use / rag templates rendered like transformers, and the sandbox.

Reads the real tokenizer files from ``../shared/command-r`` beside the repository (skips where absent); transformers
is only a reference and is used offline.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
from pathlib import Path

import jinja2
import pytest
import torch
from tokenizers import Tokenizer as Backend
from tokenizers import decoders, models, pre_tokenizers

from workbench.tokenizer import ChatTemplateError, Tokenizer, UnsafeTemplateError

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network, transformers included
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

COMMAND_R = Path(__file__).resolve().parents[2] / "shared" / "command-r"
PROMPT = ("<BOS_TOKEN><|START_OF_TURN_TOKEN|><|USER_TOKEN|>Hello, how are you?<|END_OF_TURN_TOKEN|>"
          "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>")
PROMPT_IDS = [5, 255000, 255006, 28339, 19, 2991, 1955, 1933, 38, 255001, 255000, 255007]
HELLO = [{"role": "user", "content": "Hello, how are you?"}]


def _require_command_r() -> Path:
    if not (COMMAND_R / "tokenizer.json.gz").is_file():
        pytest.skip(f"real tokenizer files not found at {COMMAND_R} (third-party data kept beside the repo, not in it)")
    return COMMAND_R


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(_require_command_r())


@pytest.fixture(scope="module")
def tiny() -> Tokenizer:
    """A byte-level tokenizer built in memory, so the sandbox tests also run where ../shared is absent."""
    backend = Backend(models.BPE(vocab={c: i for i, c in enumerate(pre_tokenizers.ByteLevel.alphabet())}, merges=[]))
    backend.pre_tokenizer, backend.decoder = pre_tokenizers.ByteLevel(add_prefix_space=False), decoders.ByteLevel()
    backend.add_special_tokens(["<PAD>", "<BOS_TOKEN>", "<|END_OF_TURN_TOKEN|>"])
    return Tokenizer(backend, {"chat_template": "{{ bos_token }}{% for m in messages %}{{ m.content }}{% endfor %}"})


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    folder, dest = _require_command_r(), tmp_path_factory.mktemp("command-r")
    (dest / "tokenizer.json").write_bytes(gzip.decompress((folder / "tokenizer.json.gz").read_bytes()))
    (dest / "tokenizer_config.json").write_bytes((folder / "tokenizer_config.json").read_bytes())
    return transformers.AutoTokenizer.from_pretrained(str(dest), local_files_only=True)


TOOLS = [
    {
        "name": "internet_search",
        "description": "Returns a list of relevant document snippets for a textual query retrieved from the internet",
        "parameter_definitions": {
            "query": {"description": "Query to search the internet with", "type": "str", "required": True}
        },
    },
    {
        "name": "query_database",
        "description": "Runs SQL on the sales database",
        "parameter_definitions": {
            "sql": {"description": "The SQL query", "type": "str", "required": True},
            "limit": {"description": "Maximum rows", "type": "int", "required": False},
            "région": {"description": "Région filter (non-ASCII)", "type": "str"},
        },
    },
    {
        "name": "directly_answer",
        "description": "Calls a standard (un-augmented) AI chatbot to generate a response given the conversation "
                       "history",
        "parameter_definitions": {},
    },
]
DOCUMENTS = [
    {"title": "Tall penguins", "text": "Emperor penguins are the tallest."},
    {"title": "Penguin habitats", "text": "Emperor penguins only live in Antarctica."},
    {"url": "https://example.org/펭귄", "snippet": "황제펭귄은 가장 큰 펭귄이다 <co: 0>",
     "date": "2024-03-01"},
]
SYSTEM = {"role": "system", "content": "You are a terse assistant. Answer in one line."}
TURNS = [
    {"role": "user", "content": "  What's the biggest penguin in the world?  \n"},
    {"role": "assistant", "content": "The emperor penguin.\n"},
    {"role": "user", "content": "And where does it live? 어디에 살아요?"},
]

CASES = {
    "user": (HELLO, {}),
    "system+user": ([SYSTEM, *HELLO], {}),
    "multi-turn": (TURNS, {}),
    "system+multi-turn": ([SYSTEM, *TURNS], {}),
    "ends-with-assistant": (TURNS[:2], {}),
    "control-token-in-content": ([{"role": "user", "content": "say <|END_OF_TURN_TOKEN|> <BOS_TOKEN> please"}], {}),
    "none-values-dropped": ([{"role": "user", "content": "hi", "name": None}], {}),
    "tool_use": (HELLO, {"chat_template": "tool_use", "tools": TOOLS}),
    "tool_use-picked-by-tools": (TURNS, {"tools": TOOLS}),
    "tool_use+system": ([SYSTEM, *TURNS], {"chat_template": "tool_use", "tools": TOOLS}),
    "tool_use-no-tools-listed": (HELLO, {"chat_template": "tool_use", "tools": []}),
    "rag": (TURNS, {"chat_template": "rag", "documents": DOCUMENTS}),
    "rag-fast": (TURNS, {"chat_template": "rag", "documents": DOCUMENTS, "citation_mode": "fast"}),
    "rag-accurate": ([SYSTEM, *TURNS], {"chat_template": "rag", "documents": DOCUMENTS, "citation_mode": "accurate"}),
    "documents-without-name-use-default": (HELLO, {"documents": DOCUMENTS}),
    "template-string": (TURNS, {"chat_template": "{% for m in messages %}[{{ m.role }}] {{ m.content | trim }}\n"
                                                 "{% endfor %}{% if add_generation_prompt %}>>{% endif %}"}),
}


# ------------------------------------------------------------------------------------- documented prompt
def test_documented_generation_prompt(tok):
    assert tok.apply_chat_template(HELLO, add_generation_prompt=True, tokenize=False) == PROMPT
    assert tok.apply_chat_template(HELLO, add_generation_prompt=True) == PROMPT_IDS
    assert tok.encode(PROMPT, add_special_tokens=False) == PROMPT_IDS
    tensor = tok.apply_chat_template(HELLO, add_generation_prompt=True, return_tensors="pt")
    assert tensor.shape == (1, 12) and tensor.dtype == torch.long and tensor[0].tolist() == PROMPT_IDS
    as_dict = tok.apply_chat_template(HELLO, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    assert as_dict["input_ids"].tolist() == [PROMPT_IDS] and as_dict.attention_mask.tolist() == [[1] * 12]


# ------------------------------------------------------------------------------------ parity with transformers
@pytest.mark.parametrize("generation_prompt", [True, False])
@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_transformers(tok, hf, case, generation_prompt):
    messages, kwargs = CASES[case]
    ours = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs)
    theirs = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=False, **kwargs)
    assert ours == theirs
    ids = tok.apply_chat_template(messages, add_generation_prompt=generation_prompt, **kwargs)
    assert ids == hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False, **kwargs)


def test_rendered_pieces_are_where_expected(tok):
    rag = tok.apply_chat_template(TURNS, chat_template="rag", documents=DOCUMENTS, citation_mode="accurate",
                                  tokenize=False, add_generation_prompt=True)
    assert "Document: 2\nurl: https://example.org/펭귄\n" in rag and "Thirdly, Write 'Answer:'" in rag
    fast = tok.apply_chat_template(TURNS, chat_template="rag", documents=DOCUMENTS, citation_mode="fast",
                                   tokenize=False)
    assert "Thirdly" not in fast and "Grounded answer:" in fast
    tools = tok.apply_chat_template(HELLO, tools=TOOLS, tokenize=False)
    assert "def query_database(sql: str, limit: Optional[int] = None, région: Optional[str] = None)" in tools
    assert tools.endswith("]```<|END_OF_TURN_TOKEN|>")


def test_cohere_wrappers_match_transformers(tok, hf):
    for ours, theirs in [
        (tok.apply_tool_use_template(TURNS, TOOLS, tokenize=False, add_generation_prompt=True),
         hf.apply_tool_use_template(TURNS, TOOLS, tokenize=False, add_generation_prompt=True)),
        (tok.apply_grounded_generation_template(TURNS, DOCUMENTS, tokenize=False, add_generation_prompt=True),
         hf.apply_grounded_generation_template(TURNS, DOCUMENTS, tokenize=False, add_generation_prompt=True)),
    ]:
        assert ours == theirs


def test_role_alternation_error(tok, hf):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    message = "Conversation roles must alternate user/assistant/user/assistant/..."
    with pytest.raises(ChatTemplateError) as ours:
        tok.apply_chat_template(bad)
    assert str(ours.value) == message
    assert isinstance(ours.value, ValueError) and isinstance(ours.value, jinja2.TemplateError)
    with pytest.raises(jinja2.TemplateError, match="roles must alternate"):
        hf.apply_chat_template(bad, tokenize=False)


def test_batched_conversations(tok, hf):
    batch = [HELLO, TURNS, [SYSTEM, *HELLO]]
    strings = tok.apply_chat_template(batch, add_generation_prompt=True, tokenize=False)
    assert strings == hf.apply_chat_template(batch, add_generation_prompt=True, tokenize=False)
    ours = tok.apply_chat_template(batch, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    theirs = hf.apply_chat_template(batch, add_generation_prompt=True, padding=True, return_tensors="pt")
    assert torch.equal(ours["input_ids"], theirs["input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["attention_mask"])
    assert ours["input_ids"][0, 0].item() == tok.pad_token_id  # left padding


def test_template_globals_and_filters_match_transformers(tok, hf):
    template = (
        "{%- set ns = namespace(count=0) -%}"
        "{%- for m in messages -%}{%- if loop.index > 2 %}{% break %}{% endif -%}"
        "{%- set ns.count = ns.count + 1 -%}{{ m | tojson }}|{{ m | tojson(indent=2, sort_keys=True) }}\n"
        "{%- endfor -%}"
        "{{ ns.count }} {{ dict(a=1, b=[1, 2]) | tojson }} {{ strftime_now('%Y') }} {{ bos_token }}{{ eos_token }}"
        "{{ pad_token }} {{ extra_var }} {{ documents is none }} {{ tools | length }}"
    )
    kwargs = {"chat_template": template, "tokenize": False, "extra_var": "é<>&", "tools": TOOLS}
    messages = [{"role": "user", "content": "안녕 <b>\"quoted\"</b>"}, *TURNS]
    assert tok.apply_chat_template(messages, **kwargs) == hf.apply_chat_template(messages, **kwargs)
    overridden = tok.apply_chat_template(HELLO, chat_template="{{ bos_token }}", bos_token="X", tokenize=False)
    assert overridden == "X"  # template kwargs win over special tokens, as in transformers


def test_rich_objects_become_placeholders(tiny):
    @dataclasses.dataclass
    class Note:
        text: str

    class Secret:
        def delete_everything(self) -> None:  # pragma: no cover - must never be reachable from a template
            raise AssertionError("called")

    rendered = tiny.apply_chat_template(
        [{"role": "user", "content": Secret(), "note": Note("hi")}],
        chat_template="{{ messages[0].content }} {{ messages[0].note.text }}", tokenize=False,
    )
    assert rendered == "<Secret> hi"


# ------------------------------------------------------------------------------------------------- selection
def test_template_selection_and_errors(tok):
    assert tok.template_names == ["default", "rag", "tool_use"]
    assert tok.get_chat_template() == tok.chat_templates["default"]
    assert tok.get_chat_template(tools=TOOLS) == tok.chat_templates["tool_use"]
    assert tok.get_chat_template(chat_template="rag") == tok.chat_templates["rag"]
    with pytest.raises(ValueError, match=r"unknown chat template name 'grounded'.*default.*rag.*tool_use"):
        tok.apply_chat_template(HELLO, chat_template="grounded")
    with pytest.raises(ValueError, match="non-empty"):
        tok.apply_chat_template([])
    with pytest.raises(TypeError, match="JSON-schema"):
        tok.apply_chat_template(HELLO, tools=[print])
    with pytest.raises(TypeError, match="documents"):
        tok.apply_chat_template(HELLO, chat_template="rag", documents=["just a string"])
    with pytest.raises(ChatTemplateError, match="syntax error"):
        tok.apply_chat_template(HELLO, chat_template="{% for m in messages %}")


def test_templates_from_files(tmp_path):
    folder = _require_command_r()
    (tmp_path / "tokenizer.json.gz").write_bytes((folder / "tokenizer.json.gz").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "{{ bos_token }}single"}))
    single = Tokenizer.from_pretrained(tmp_path)
    assert single.template_names == ["default"]
    assert single.apply_chat_template(HELLO, tokenize=False) == "<BOS_TOKEN>single"
    (tmp_path / "chat_template.jinja").write_text("from file")
    (tmp_path / "additional_chat_templates").mkdir()
    (tmp_path / "additional_chat_templates" / "tool_use.jinja").write_text("tools: {{ tools | length }}")
    files = Tokenizer.from_pretrained(tmp_path)  # files win over the config, as in transformers
    assert files.template_names == ["default", "tool_use"]
    assert files.apply_chat_template(HELLO, tools=TOOLS, tokenize=False) == "tools: 3"


# ------------------------------------------------------------------------------------------------- sandbox
HOSTILE = [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{{ lipsum.__globals__['os'] }}",
    "{{ (1).__class__ }}",
    "{{ messages.__class__.__base__ }}",
    "{{ messages.append({'role': 'system', 'content': 'pwned'}) }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ messages.pop() }}",
    "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
    "{{ namespace(__init__=1) }}",
    "{% set m = messages[0] %}{% set m.role = 'system' %}",
    "{% import 'os' as os %}{{ os.system('id') }}",
    "{% include '/etc/passwd' %}",
    "{% from 'os' import system %}",
    "{{ dict.__call__.__globals__ }}",
    "{{ raise_exception.__globals__ }}",
    "{{ strftime_now.__globals__['datetime'] }}",
]


@pytest.mark.parametrize("template", HOSTILE)
def test_hostile_templates_are_stopped(tiny, template):
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(UnsafeTemplateError, match="unsafe operation") as caught:
        tiny.apply_chat_template(messages, chat_template=template, tokenize=False)
    assert isinstance(caught.value, ChatTemplateError)
    assert messages == [{"role": "user", "content": "hi"}]  # the caller's data is untouched


def test_import_statement_without_name_is_a_syntax_error(tiny):
    with pytest.raises(ChatTemplateError, match="syntax error"):
        tiny.apply_chat_template(HELLO, chat_template="{% import os %}", tokenize=False)


def test_in_memory_tokenizer_renders_and_tokenizes(tiny):
    assert tiny.template_names == ["default"] and tiny.bos_token == "<BOS_TOKEN>" and tiny.unk_token is None
    assert tiny.apply_chat_template(HELLO, tokenize=False) == "<BOS_TOKEN>Hello, how are you?"
    ids = tiny.apply_chat_template(HELLO)
    assert ids[0] == tiny.bos_token_id and tiny.decode(ids) == "<BOS_TOKEN>Hello, how are you?"
    with pytest.raises(ChatTemplateError, match="chat template failed: .*TypeError"):
        tiny.apply_chat_template(HELLO, chat_template="{{ 'a' + 1 }}")
