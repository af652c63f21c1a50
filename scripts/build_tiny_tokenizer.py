"""Build the tokenizer files of ``command-r-tiny``: tokenizer.json, tokenizer_config.json, special_tokens_map.json.

The pipeline is Command-R's (as in its tokenizer.json): NFC normaliser; pre-tokenizer
``Sequence[Digits(individual_digits=True), ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)]``;
byte-level BPE whose initial alphabet is all 256 byte symbols (so any text encodes, no ``<UNK>``);
ByteLevel decoder; ``<BOS_TOKEN> $A`` post-processor. Ids 0-7 are the same control tokens as in
Command-R (``<PAD>`` = 0, ``<BOS_TOKEN>`` = 5) and the turn tokens follow the BPE vocabulary, as
Command-R's follow its 255000 entries. Only the vocabulary is small and trained on our own data.

The three chat templates (``default``, ``tool_use``, ``rag``) are written for this project; they
produce the Command-R prompt format.

Usage (normally called by ``train_tiny.py``)::

    python scripts/build_tiny_tokenizer.py --out /tmp/tok --vocab 2000
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from tiny_data import TinyData  # noqa: E402

# Ids 0-7, exactly as in Command-R's vocabulary.
BASE_SPECIALS = ["<PAD>", "<UNK>", "<CLS>", "<SEP>", "<MASK_TOKEN>", "<BOS_TOKEN>", "<EOS_TOKEN>", "<EOP_TOKEN>"]
# Appended after the BPE vocabulary, in Command-R's order (its ids 255000-255028).
TURN_TOKENS = [
    "<|START_OF_TURN_TOKEN|>", "<|END_OF_TURN_TOKEN|>", "<|YES_TOKEN|>", "<|NO_TOKEN|>", "<|GOOD_TOKEN|>",
    "<|BAD_TOKEN|>", "<|USER_TOKEN|>", "<|CHATBOT_TOKEN|>", "<|SYSTEM_TOKEN|>",
    *[f"<|USER_{i}_TOKEN|>" for i in range(10)], *[f"<|EXTRA_{i}_TOKEN|>" for i in range(10)],
]

# ------------------------------------------------------------------------------------------- chat templates
# Written for this project (not copied from any checkpoint). Whitespace between tags is trimmed with
# "-" so the output is byte-for-byte the Command-R turn format, under transformers' Jinja settings too.
DEFAULT_TEMPLATE = """\
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + messages[0]['content'] + '<|END_OF_TURN_TOKEN|>' -}}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set turns = messages -%}
{%- endif -%}
{%- for message in turns -%}
  {%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' -%}
  {%- if message['role'] != expected -%}
    {{- raise_exception('command-r-tiny chat template: after an optional first system message, roles must alternate user/assistant/user/...; message ' ~ loop.index0 ~ ' has role ' ~ message['role'] ~ ', expected ' ~ expected) -}}
  {%- endif -%}
  {%- if message['role'] == 'user' -%}
    {{- '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'].strip() + '<|END_OF_TURN_TOKEN|>' -}}
  {%- else -%}
    {{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + message['content'].strip() + '<|END_OF_TURN_TOKEN|>' -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' -}}
{%- endif -%}
"""

# Shared by tool_use and rag: the system preamble and the conversation turns.
_PREAMBLE = """\
{{- bos_token -}}
{%- if messages and messages[0]['role'] == 'system' -%}
  {%- set user_preamble = messages[0]['content'] -%}
  {%- set turns = messages[1:] -%}
{%- else -%}
  {%- set user_preamble = '## Task and Context\\nYou answer people\\'s questions and help with their requests in a conversation. You can look things up with the tools described here before you reply, and you should focus on what the user actually needs.\\n\\n## Style Guide\\nAnswer in full sentences with correct grammar and spelling, unless the user asks for a different style.' -%}
  {%- set turns = messages -%}
{%- endif -%}
{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|># Safety Preamble\\nThese instructions take precedence over the task and style sections below. Refuse requests that are harmful or unethical.' -}}
{{- '\\n\\n# System Preamble\\n## Basic Rules\\nYou are a conversational assistant that can use tools. You will see a conversation between yourself and a user, ending with the user\\'s latest message, and then an instruction saying what kind of reply to write. Follow that instruction, and cite your sources when it asks you to.' -}}
{{- '\\n\\n# User Preamble\\n' + user_preamble -}}
"""

_TURNS = """\
{%- for message in turns -%}
  {%- if message['role'] == 'user' -%}
    {{- '<|START_OF_TURN_TOKEN|><|USER_TOKEN|>' + message['content'].strip() + '<|END_OF_TURN_TOKEN|>' -}}
  {%- elif message['role'] == 'assistant' -%}
    {{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' + message['content'].strip() + '<|END_OF_TURN_TOKEN|>' -}}
  {%- elif message['role'] == 'system' -%}
    {{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>' + message['content'].strip() + '<|END_OF_TURN_TOKEN|>' -}}
  {%- else -%}
    {{- raise_exception('command-r-tiny chat template: unsupported role ' ~ message['role'] ~ ' (expected user, assistant or system)') -}}
  {%- endif -%}
{%- endfor -%}
"""

_GENERATION_PROMPT = """\
{%- if add_generation_prompt -%}
  {{- '<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>' -}}
{%- endif -%}
"""

TOOL_USE_TEMPLATE = _PREAMBLE + """\
{{- '\\n\\n## Available Tools\\nThese are the tools you can call:\\n\\n' -}}
{%- for tool in tools or [] -%}
  {%- set params = tool['parameter_definitions'] or {} -%}
  {%- if not loop.first -%}{{- '\\n\\n' -}}{%- endif -%}
  {{- '```python\\ndef ' + tool['name'] + '(' -}}
  {%- for name, spec in params.items() -%}
    {%- if not loop.first -%}{{- ', ' -}}{%- endif -%}
    {%- if spec['required'] -%}{{- name + ': ' + spec['type'] -}}
    {%- else -%}{{- name + ': Optional[' + spec['type'] + '] = None' -}}{%- endif -%}
  {%- endfor -%}
  {{- ') -> List[Dict]:\\n    \"\"\"' + tool['description'] -}}
  {%- if params -%}
    {{- '\\n\\n    Args:' -}}
    {%- for name, spec in params.items() -%}
      {%- set kind = spec['type'] if spec['required'] else 'Optional[' + spec['type'] + ']' -%}
      {{- '\\n        ' + name + ' (' + kind + '): ' + spec['description'] -}}
    {%- endfor -%}
  {%- endif -%}
  {{- '\\n    \"\"\"\\n    pass\\n```' -}}
{%- endfor -%}
{{- '<|END_OF_TURN_TOKEN|>' -}}
""" + _TURNS + """\
{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Write \\'Action:\\' followed by a JSON list of the actions you want to take, in order, to reply well to the user\\'s last message. You may call any of the tools above, any number of times, but use as few actions as you need. Use the `directly-answer` tool when no other tool is needed. Write the list like this:\\n```json\\n[\\n    {\\n        \"tool_name\": the tool\\'s name as given in the list above,\\n        \"parameters\": a dict of the tool\\'s parameters as specified there, or {} if it takes none\\n    }\\n]```<|END_OF_TURN_TOKEN|>' -}}
""" + _GENERATION_PROMPT

RAG_TEMPLATE = _PREAMBLE + """\
{{- '<|END_OF_TURN_TOKEN|>' -}}
""" + _TURNS + """\
{%- set mode = citation_mode if citation_mode is defined and citation_mode else 'accurate' -%}
{%- if mode not in ['accurate', 'fast'] -%}
  {{- raise_exception('command-r-tiny rag template: citation_mode must be \\'accurate\\' or \\'fast\\', got ' ~ mode) -}}
{%- endif -%}
{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|><results>' -}}
{%- for document in documents or [] -%}
  {{- '\\nDocument: ' ~ loop.index0 ~ '\\n' -}}
  {%- for key, value in document.items() -%}
    {{- key ~ ': ' ~ value ~ '\\n' -}}
  {%- endfor -%}
{%- endfor -%}
{{- '</results><|END_OF_TURN_TOKEN|>' -}}
{{- '<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>Follow these steps in order, starting each one on a new line.\\n' -}}
{{- 'First, write \\'Relevant Documents:\\' followed by the comma-separated numbers of the documents that are relevant to the user\\'s last message, or \\'None\\' if none are.\\n' -}}
{{- 'Second, write \\'Cited Documents:\\' followed by the comma-separated numbers of the documents whose facts a good answer should cite, or \\'None\\'.\\n' -}}
{%- if mode == 'accurate' -%}
  {{- 'Third, write \\'Answer:\\' followed by a reply to the user\\'s last message in good, natural English, using the documents but without citations or markup.\\n' -}}
{%- endif -%}
{{- 'Finally, write \\'Grounded answer:\\' followed by a reply to the user\\'s last message in good, natural English, marking every fact taken from a document with <co: doc> and </co: doc>, e.g. <co: 0>my fact</co: 0> for a fact from document 0.<|END_OF_TURN_TOKEN|>' -}}
""" + _GENERATION_PROMPT

TEMPLATES = {"default": DEFAULT_TEMPLATE, "tool_use": TOOL_USE_TEMPLATE, "rag": RAG_TEMPLATE}


# ------------------------------------------------------------------------------------------- tokenizer
def train_bpe(texts: list[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE with Command-R's pipeline; ``vocab_size`` counts ids 0-7 and the 256 byte symbols."""
    tok = Tokenizer(models.BPE(dropout=None, unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in BASE_SPECIALS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    n_bpe = tok.get_vocab_size(with_added_tokens=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TURN_TOKENS])
    for i, t in enumerate(BASE_SPECIALS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    for i, t in enumerate(TURN_TOKENS):
        assert tok.token_to_id(t) == n_bpe + i, (t, tok.token_to_id(t))
    tok.post_processor = processors.TemplateProcessing(
        single="<BOS_TOKEN>:0 $A:0", pair="<BOS_TOKEN>:0 $A:0 $B:1",
        special_tokens=[("<BOS_TOKEN>", BASE_SPECIALS.index("<BOS_TOKEN>"))],
    )
    return tok


def tokenizer_config(tok: Tokenizer, model_max_length: int) -> dict:
    """tokenizer_config.json in the layout Command-R checkpoints use, with our templates."""
    decoder = {}
    for i, t in sorted(tok.get_added_tokens_decoder().items()):
        decoder[str(i)] = {"content": t.content, "lstrip": False, "normalized": False, "rstrip": False,
                           "single_word": False, "special": True}
    return {
        "add_bos_token": True,
        "add_eos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": decoder,
        "bos_token": "<BOS_TOKEN>",
        "chat_template": [{"name": name, "template": src} for name, src in TEMPLATES.items()],
        "clean_up_tokenization_spaces": False,
        "cls_token": "<CLS>",
        "eos_token": "<|END_OF_TURN_TOKEN|>",
        "legacy": True,
        "mask_token": "<MASK_TOKEN>",
        "model_max_length": model_max_length,
        "pad_token": "<PAD>",
        "padding_side": "left",
        "sep_token": "<SEP>",
        "tokenizer_class": "CohereTokenizer",
        "unk_token": "<UNK>",
        "use_default_system_prompt": False,
    }


SPECIAL_TOKENS_MAP = {
    "bos_token": "<BOS_TOKEN>", "cls_token": "<CLS>", "eos_token": "<|END_OF_TURN_TOKEN|>",
    "mask_token": "<MASK_TOKEN>", "pad_token": "<PAD>", "sep_token": "<SEP>", "unk_token": "<UNK>",
}


def write_tokenizer_files(tok: Tokenizer, out: str, model_max_length: int) -> None:
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"), pretty=False)
    with open(os.path.join(out, "tokenizer_config.json"), "w", encoding="utf-8") as f:
        json.dump(tokenizer_config(tok, model_max_length), f, indent=2, ensure_ascii=False)
        f.write("\n")
    with open(os.path.join(out, "special_tokens_map.json"), "w", encoding="utf-8") as f:
        json.dump(SPECIAL_TOKENS_MAP, f, indent=2)
        f.write("\n")


def build(out: str, vocab_size: int = 2000, n_docs: int = 30000, seed: int = 1234,
          model_max_length: int = 2048) -> Tokenizer:
    """Train the BPE on a fixed sample of the training distribution and write the three files."""
    tok = train_bpe(TinyData(seed).tokenizer_corpus(n_docs), vocab_size)
    write_tokenizer_files(tok, out, model_max_length)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--vocab", type=int, default=2000, help="BPE vocabulary incl. ids 0-7 and the byte alphabet")
    args = ap.parse_args()
    tok = build(args.out, args.vocab)
    print(f"wrote {args.out}: {tok.get_vocab_size()} ids")


if __name__ == "__main__":
    main()
