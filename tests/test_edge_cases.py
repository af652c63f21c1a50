"""Edge cases found in review: streaming after a newline, greedy settings, generation_config lengths,
"auto" dtype from the weights, single file preferred over an index, HF-style quantization skip lists."""

import json
import shutil

import pytest
import torch

from _reference import load_reference, make_hf_checkpoint
from workbench import HookedCommandR, Tokenizer
from workbench.generation import TextStreamer
from workbench.quantization import QuantizationConfig


@pytest.fixture(scope="module")
def tiny():
    return HookedCommandR.from_pretrained("command-r-tiny"), Tokenizer.from_pretrained("command-r-tiny")


def test_streamer_keeps_split_characters_after_newline(tiny):
    _, tok = tiny
    for text in ["x\n😀", "ok.\n👍 done\n\n햏!", "a\n\n똠\n"]:
        out = []
        s = TextStreamer(tok, skip_prompt=False)
        s.on_finalized_text = lambda t, stream_end=False: out.append(t)
        for i in tok.encode(text, add_special_tokens=False):
            s.put(torch.tensor([i]))
        s.end()
        assert "".join(out) == tok.decode(tok.encode(text, add_special_tokens=False))


def test_greedy_ignores_sampling_only_settings(tiny):
    model, tok = tiny
    ids = tok.apply_chat_template([{"role": "user", "content": "Hello"}], add_generation_prompt=True,
                                  return_tensors="pt")
    assert torch.equal(model.generate(ids, max_new_tokens=4, temperature=0.0),
                       model.generate(ids, max_new_tokens=4))


def test_generation_config_lengths(tiny, tmp_path):
    model, tok = tiny
    ids = tok("Hello there", return_tensors="pt")["input_ids"]
    saved = getattr(model, "generation_config", None)
    try:
        model.generation_config = {"max_new_tokens": 3, "eos_token_id": []}
        assert model.generate(ids).shape[1] == ids.shape[1] + 3
        model.generation_config = {"max_length": ids.shape[1] + 2, "eos_token_id": []}
        assert model.generate(ids).shape[1] == ids.shape[1] + 2
        assert model.generate(ids, max_new_tokens=1).shape[1] == ids.shape[1] + 1
    finally:
        model.generation_config = saved


def test_auto_dtype_falls_back_to_the_weights(tmp_path):
    path = make_hf_checkpoint(tmp_path / "c")
    ref = load_reference(path, torch.float16)
    ref.save_pretrained(tmp_path / "f16")
    cfg_file = tmp_path / "f16" / "config.json"
    cfg = json.loads(cfg_file.read_text())
    cfg.pop("torch_dtype", None), cfg.pop("dtype", None)
    cfg_file.write_text(json.dumps(cfg))
    assert HookedCommandR.from_pretrained(tmp_path / "f16", torch_dtype="auto").dtype == torch.float16
    assert HookedCommandR.from_pretrained(tmp_path / "f16").dtype == torch.float32


def test_single_file_preferred_over_index_like_transformers(tmp_path):
    path = make_hf_checkpoint(tmp_path / "c")
    ref = load_reference(path)
    ref.save_pretrained(tmp_path / "both", max_shard_size="20KB")
    with torch.no_grad():
        for p in ref.parameters():
            p.mul_(0.5)
    ref.save_pretrained(tmp_path / "single")
    shutil.copy(tmp_path / "single" / "model.safetensors", tmp_path / "both" / "model.safetensors")
    ours = HookedCommandR.from_pretrained(tmp_path / "both")
    theirs = load_reference(tmp_path / "both")
    assert torch.equal(ours.embed.weight, theirs.model.embed_tokens.weight)


def test_skip_modules_match_whole_names_in_both_spellings():
    q = QuantizationConfig(load_in_8bit=True, llm_int8_skip_modules=["blocks.1"])
    assert not q.should_quantize("blocks.1.attn.q_proj.weight")
    assert q.should_quantize("blocks.10.attn.q_proj.weight")
    hf = QuantizationConfig(load_in_8bit=True, llm_int8_skip_modules=["self_attn", "model.layers.2"])
    assert not hf.should_quantize("blocks.0.attn.o_proj.weight")
    assert not hf.should_quantize("blocks.2.mlp.up_proj.weight")
    assert hf.should_quantize("blocks.3.mlp.up_proj.weight")
