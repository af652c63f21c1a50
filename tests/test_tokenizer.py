"""workbench.tokenizer against the real Command-R / Command A tokenizer files and transformers' tokenizer.

The third-party files live in ``../shared`` beside the repository (never inside it); tests skip where it is absent.
transformers is only a reference here and is always used offline.
"""

from __future__ import annotations

import ast
import gzip
import json
import os
import sys
import unicodedata
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workbench.tokenizer as tokenizer_module
from workbench.tokenizer import TokenPiece, Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may reach the network, transformers included
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

SHARED = Path(__file__).resolve().parents[2] / "shared"
COMMAND_R, COMMAND_A = SHARED / "command-r", SHARED / "command-a"
MODULE_FILE = Path(__file__).resolve().parents[1] / "workbench" / "tokenizer.py"
HYPOTHESIS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _require(folder: Path) -> Path:
    if not (folder / "tokenizer.json.gz").is_file():
        pytest.skip(f"real tokenizer files not found at {folder} (third-party data kept beside the repo, not in it)")
    return folder


def _unpacked_copy(folder: Path, dest: Path, config: dict | None = None) -> Path:
    """Write tokenizer.json (gunzipped) and tokenizer_config.json into ``dest`` for transformers to load."""
    (dest / "tokenizer.json").write_bytes(gzip.decompress((folder / "tokenizer.json.gz").read_bytes()))
    if config is None and (folder / "tokenizer_config.json").is_file():
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    if config is not None:
        (dest / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return dest


def _hf_tokenizer(folder: Path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.from_pretrained(_require(COMMAND_R))


@pytest.fixture(scope="module")
def tok_a() -> Tokenizer:
    return Tokenizer.from_pretrained(_require(COMMAND_A))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return _hf_tokenizer(_unpacked_copy(_require(COMMAND_R), tmp_path_factory.mktemp("command-r")))


TEXTS = [
    "Hello this is a test",
    " Hello",
    "12345 and 3.14159, 1,000,000",
    "Hello\n\nworld",
    "\n\n",
    "tabs\tand\t\ttabs\r\nCRLF",
    "spaces     runs   \n   \t  mixed ",
    "안녕하세요. 똠방각하 뷁 햏, 세계!",
    "\u1100\u1161\u11a8 \u1112\u1161\u11ab",  # decomposed Hangul -> NFC 각 한
    "e\u0301te\u0301 cafe\u0301",  # combining accents -> NFC
    "日本語のテキスト、カタカナとひらがな。",
    "emoji 👩‍👩‍👧‍👦 🇰🇷 🤖✨ and 🏳️‍🌈",
    "user wrote <|END_OF_TURN_TOKEN|> and <BOS_TOKEN> and <PAD> inline",
    "<|START_OF_TURN_TOKEN|><|USER_TOKEN|>hi<|END_OF_TURN_TOKEN|>",
    "<b>bold</b> & <script>alert(1)</script>",
    "def f(x):\n    return x ** 2  # code\n",
    "",
    "Ünïcödé ñ ß ø Ω ∑ ∞ \u200b zero-width \u00a0 nbsp",
]


# ------------------------------------------------------------------------------------------ facts and parity
def test_documented_encoding(tok):
    assert tok.encode("Hello this is a test") == [5, 28339, 2075, 1801, 1671, 3282]
    assert tok.encode(" Hello") == [5, 46609]
    assert tok.encode("12345") == [5, 24, 25, 26, 27, 28]
    assert tok.encode("Hello\n\nworld") == [5, 28339, 206, 206, 17080]
    assert tok.encode("\n\n", add_special_tokens=False) == [2126]


def test_special_tokens_match_transformers(tok, hf):
    assert (tok.bos_token, tok.bos_token_id) == ("<BOS_TOKEN>", 5)
    assert (tok.eos_token, tok.eos_token_id) == ("<|END_OF_TURN_TOKEN|>", 255001)
    assert (tok.pad_token, tok.pad_token_id) == ("<PAD>", 0)
    assert tok.unk_token is None and tok.unk_token_id is None  # the config sets unk_token null
    assert tok.special_tokens_map == hf.special_tokens_map
    assert tok.all_special_ids == hf.all_special_ids
    assert tok.all_special_tokens == hf.all_special_tokens
    assert len(tok) == len(hf) == tok.vocab_size == 255029
    assert tok.padding_side == hf.padding_side == "left"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok, hf, text):
    for add in (True, False):
        assert tok.encode(text, add_special_tokens=add) == hf.encode(text, add_special_tokens=add)
    ids = tok.encode(text)
    assert tok.decode(ids) == hf.decode(ids)
    assert tok.decode(ids, skip_special_tokens=True) == hf.decode(ids, skip_special_tokens=True)
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == unicodedata.normalize("NFC", text)
    assert tok.convert_ids_to_tokens(ids) == hf.convert_ids_to_tokens(ids)
    assert tok.convert_tokens_to_ids(tok.convert_ids_to_tokens(ids)) == ids


def test_decomposed_hangul_is_composed(tok):
    assert tok.encode("\u1100\u1161") == tok.encode("가")
    assert tok.decode(tok.encode("\u1100\u1161", add_special_tokens=False)) == "가"


def test_decode_accepts_tensors_and_batches(tok, hf):
    ids = tok.encode("Hello this is a test")
    assert tok.decode(torch.tensor(ids)) == tok.decode(ids) == "<BOS_TOKEN>Hello this is a test"
    assert tok.decode(ids[1]) == "Hello"
    batch = tok(["Hi there", "안녕 똠방각하"], return_tensors="pt")["input_ids"]
    assert tok.batch_decode(batch) == hf.batch_decode(batch)
    assert tok.batch_decode(batch, skip_special_tokens=True) == ["Hi there", "안녕 똠방각하"]
    with pytest.raises(ValueError, match="batch_decode"):
        tok.decode(batch)


@given(text=st.text(max_size=60))
@HYPOTHESIS
def test_round_trip_property(tok, hf, text):
    ids = tok.encode(text, add_special_tokens=False)
    assert tok.decode(ids) == unicodedata.normalize("NFC", text)
    assert ids == hf.encode(text, add_special_tokens=False)


# ------------------------------------------------------------------------------------------------ padding
def test_left_padding_matches_transformers(tok, hf):
    texts = ["Hi", "Hello there, how are you today?", "안녕하세요", ""]
    ours = tok(texts, return_tensors="pt")
    theirs = hf(texts, padding=True, return_tensors="pt")
    assert ours["input_ids"].dtype == torch.long
    assert torch.equal(ours.input_ids, theirs["input_ids"])
    assert torch.equal(ours.attention_mask, theirs["attention_mask"])
    assert ours.input_ids[0, 0].item() == tok.pad_token_id and ours.attention_mask[0, 0].item() == 0
    lists = tok(texts)
    assert lists["input_ids"] == theirs["input_ids"].tolist()
    assert tok(texts, padding=False)["input_ids"] == hf(texts)["input_ids"]


def test_right_padding_and_single_text(tok, hf):
    texts = ["Hi", "Hello there"]
    tok.padding_side, hf.padding_side = "right", "right"
    try:
        assert tok(texts)["input_ids"] == hf(texts, padding=True)["input_ids"]
        assert tok(texts)["attention_mask"] == hf(texts, padding=True)["attention_mask"]
    finally:
        tok.padding_side, hf.padding_side = "left", "left"
    single = tok("Hello this is a test")
    assert single["input_ids"] == hf("Hello this is a test")["input_ids"] == [5, 28339, 2075, 1801, 1671, 3282]
    assert single.attention_mask == [1] * 6
    assert tok("Hello", return_tensors="pt").input_ids.shape == (1, 2)
    with pytest.raises(ValueError, match="padding=True"):
        tok(texts, padding=False, return_tensors="pt")


def test_skip_special_tokens_follows_config_flags(tmp_path):
    """A checkpoint's tokenizer_config.json may flip special flags (added_tokens_decoder); transformers honours them."""
    folder = _require(COMMAND_R)
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    added = json.loads(gzip.decompress((folder / "tokenizer.json.gz").read_bytes()))["added_tokens"]
    config["added_tokens_decoder"] = {
        str(t["id"]): {"content": t["content"], "lstrip": False, "normalized": False, "rstrip": False,
                       "single_word": False, "special": t["id"] < 8 or t["id"] == 255001 or t["id"] >= 255009}
        for t in added
    }
    dest = _unpacked_copy(folder, tmp_path, config)
    ours, theirs = Tokenizer.from_pretrained(dest), _hf_tokenizer(dest)
    ids = ours.encode("hi<|START_OF_TURN_TOKEN|><|YES_TOKEN|><|END_OF_TURN_TOKEN|><PAD><|EXTRA_3_TOKEN|> x")
    assert ids == theirs.encode("hi<|START_OF_TURN_TOKEN|><|YES_TOKEN|><|END_OF_TURN_TOKEN|><PAD><|EXTRA_3_TOKEN|> x")
    assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    assert ours.decode(ids, skip_special_tokens=True) == "hi<|START_OF_TURN_TOKEN|><|YES_TOKEN|> x"


# -------------------------------------------------------------------------------------------- token pieces
def _check_pieces(tok: Tokenizer, ids: list[int]) -> list[TokenPiece]:
    pieces = tok.token_pieces(ids)
    text = tok.decode(ids)
    assert [p.id for p in pieces] == ids
    assert b"".join(p.bytes for p in pieces).decode("utf-8", errors="replace") == text
    previous_end = 0
    for piece in pieces:
        start, end = piece.span
        assert 0 <= start <= end <= len(text)
        assert start >= previous_end - 1  # consecutive tokens overlap by at most the one character they share
        assert piece.bytes in text[start:end].encode("utf-8") or "\ufffd" in text[start:end]
        previous_end = end
    if pieces:
        assert previous_end == len(text)
    return pieces


def test_token_pieces_reassemble_split_korean(tok):
    text = "안녕하세요. 똠방각하 뷁 햏"
    ids = tok.encode(text)
    pieces = _check_pieces(tok, ids)
    assert b"".join(p.bytes for p in pieces).decode("utf-8") == "<BOS_TOKEN>" + text
    # 똠 (EB 98 A0) is split: ' \xeb\x98' + '\xa0'; both tokens cover that one character.
    ddom = text.index("똠") + len("<BOS_TOKEN>")
    sharing = [p for p in pieces if p.span[0] <= ddom < p.span[1]]
    assert len(sharing) >= 2
    assert b"".join(p.bytes for p in sharing).endswith("똠".encode())
    assert sharing[0].span[1] > sharing[1].span[0]  # overlapping spans
    assert [p.text for p in sharing] == ["·<0xEB><0x98>", "<0xA0>"]
    assert sharing[0].token == "Ġëĺ"
    for ch in "뷁햏":  # also split across two tokens each
        index = text.index(ch) + len("<BOS_TOKEN>")
        assert len([p for p in pieces if p.span[0] <= index < p.span[1]]) == 2


def test_token_pieces_readable_text_and_specials(tok):
    ids = tok.encode("a b\tc\nd <|END_OF_TURN_TOKEN|>")
    pieces = _check_pieces(tok, ids)
    expected = ["<BOS_TOKEN>", "a", "·b", "→", "c", "↵", "d", "·", "<|END_OF_TURN_TOKEN|>"]
    assert [p.text for p in pieces] == expected
    assert [p.is_special for p in pieces] == [True] + [False] * 7 + [True]
    assert pieces[-1].bytes == b"<|END_OF_TURN_TOKEN|>"
    assert tok.token_pieces(torch.tensor(ids)) == pieces


def test_token_pieces_partial_sequence_and_unused_ids(tok):
    ids = tok.encode(" 똠", add_special_tokens=False)
    first = tok.token_pieces(ids[:1])  # a cut in the middle of a character decodes to U+FFFD
    assert tok.decode(ids[:1]) == " \ufffd" == b"".join(p.bytes for p in first).decode("utf-8", "replace")
    assert first[0].span == (0, 2)
    unused = tok.token_pieces([28339, 255500])  # embedding rows beyond the tokenizer's ids
    assert unused[1].bytes == b"" and unused[1].text == "<unused:255500>" and unused[1].span == (5, 5)
    assert tok.decode([28339, 255500], errors="ignore") == "Hello"   # strict (the default) raises: test_hardening_b


@given(ids=st.lists(st.integers(min_value=0, max_value=255028), max_size=12))
@HYPOTHESIS
def test_token_pieces_property_on_random_ids(tok, ids):
    _check_pieces(tok, ids)  # random byte soups: Rust's lossy decode must agree with Python's "replace"


@given(text=st.text(max_size=40))
@HYPOTHESIS
def test_token_pieces_property_on_text(tok, text):
    _check_pieces(tok, tok.encode(text))


# ----------------------------------------------------------------------------------------------- Command A
def test_command_a_tokenizer(tok_a):
    assert tok_a.encode("Hello this is a test") == [5, 28339, 2075, 1801, 1671, 3282]
    agentic = ["<|START_THINKING|>", "<|END_THINKING|>", "<|START_RESPONSE|>", "<|END_RESPONSE|>",
               "<|START_ACTION|>", "<|END_ACTION|>", "<|START_TOOL_RESULT|>", "<|END_TOOL_RESULT|>"]
    ids = tok_a.encode("".join(agentic), add_special_tokens=False)
    assert ids == list(range(255019, 255027))
    pieces = tok_a.token_pieces(ids)
    assert all(p.is_special for p in pieces) and [p.text for p in pieces] == agentic
    assert tok_a.bos_token_id == 5 and tok_a.eos_token_id == 255001 and tok_a.pad_token_id == 0
    with pytest.raises(ValueError, match="no chat template"):
        tok_a.apply_chat_template([{"role": "user", "content": "hi"}])


# ------------------------------------------------------------------------------------------------- loading
def test_missing_folder_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "workbench.bundled", None)  # as if the bundled-model module did not exist
    missing = tmp_path / "no-such-model"
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        Tokenizer.from_pretrained(missing)


def test_missing_tokenizer_json_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_broken_files_are_named(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_pretrained(tmp_path)
    _unpacked_copy(_require(COMMAND_R), tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_pretrained(tmp_path)


def test_bundled_name_goes_through_the_resolver(monkeypatch):
    folder = _require(COMMAND_A)
    fake = lambda name: folder if name == "command-r-tiny" else (_ for _ in ()).throw(KeyError(name))  # noqa: E731
    monkeypatch.setattr(tokenizer_module, "resolve_model_path", fake)   # the bundled resolver the tokenizer uses
    assert len(Tokenizer.from_pretrained("command-r-tiny")) == 255033
    with pytest.raises(FileNotFoundError, match="nonexistent-model"):
        Tokenizer.from_pretrained("nonexistent-model")


def test_module_does_not_import_transformers():
    tree = ast.parse(MODULE_FILE.read_text(encoding="utf-8"))
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
                for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree)
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "transformers" not in imported
