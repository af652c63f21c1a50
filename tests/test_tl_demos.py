"""Idioms from TransformerLens' demo notebooks that failed on HookedCommandR, in our own words, each
asserting values against an independent computation: the TransformerBridge weight-processing call
(``enable_compatibility_mode``) keeps the logits and makes the direct-path arithmetic exact, TL-named
parameters are the model's weights, the bridge's ``hook_in`` alias and tensor layer indices reach
the right hooks, and the demo checker script counts steps honestly."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from conftest import alias_fixture
from workbench import HookedCommandR
from workbench.hook_names import get_act_name

REPO = Path(__file__).resolve().parent.parent
PROMPTS = ["When David and Emma went to the shops, Emma gave the bag to",
           "When David and Emma went to the shops, David gave the bag to"]


pytestmark = pytest.mark.usefixtures("one_thread")
plain = alias_fixture("bundled_model")


@pytest.fixture(scope="module")
def processed():
    model = HookedCommandR.from_pretrained("command-r-tiny", dtype=torch.float32, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.enable_compatibility_mode(refactor_factored_attn_matrices=True)
    model.compat_warnings = [str(w.message) for w in caught]
    return model


def test_compatibility_mode_keeps_logits_and_folds(plain, processed):
    tokens = plain.to_tokens(PROMPTS)
    torch.testing.assert_close(processed(tokens), plain(tokens), atol=2e-5, rtol=1e-5)
    for i, block in enumerate(processed.blocks):
        assert torch.equal(block.ln1.weight, torch.ones_like(block.ln1.weight))
        w = plain.blocks[i].ln1.weight
        torch.testing.assert_close(block.attn.W_V, plain.blocks[i].attn.W_V * w[None, :, None])
        assert processed.W_O[i].sum(-1).abs().max() < 1e-5          # writing weights centred over d_model
    # the tied embedding / unembedding is not touched, and what was skipped is said
    assert torch.equal(processed.W_U, plain.W_U)
    text = " ".join(processed.compat_warnings)
    assert "center_unembed skipped" in text and "refactor_factored_attn_matrices skipped" in text


def test_direct_path_arithmetic_exact_after_folding(processed):
    """Exploratory demo's direct path patch: v = (resid_pre centred / ln1 scale) @ W_V, once folded."""
    _, cache = processed.run_with_cache(PROMPTS)
    layer = 2
    resid = cache["resid_pre", layer]
    centred = resid - resid.mean(-1, keepdim=True)
    scale = cache[get_act_name("scale", layer, "ln1")]
    v_kv = processed.blocks[layer].attn.W_V_kv                          # [kv_head d_model d_head]
    v = torch.einsum("bpm,kmd->bpkd", centred / scale, v_kv)
    torch.testing.assert_close(v, cache["v", layer], atol=1e-5, rtol=1e-4)


def test_dla_logit_diff_after_processing(processed):
    """The logit difference rebuilt from the final residual (apply_ln_to_stack @ W_U) is the model's."""
    tokens = processed.to_tokens(PROMPTS)
    logits, cache = processed.run_with_cache(tokens)
    answers = torch.tensor([[processed.to_single_token(" David"), processed.to_single_token(" Emma")],
                            [processed.to_single_token(" Emma"), processed.to_single_token(" David")]])
    final = logits[:, -1].gather(-1, answers)
    true_diff = (final[:, 0] - final[:, 1]).mean()
    directions = processed.W_U[:, answers]                              # [d_model batch 2]
    diff_dirs = (directions[:, :, 0] - directions[:, :, 1]).T           # [batch d_model]
    scaled = cache.apply_ln_to_stack(cache["resid_post", -1][:, -1], layer=-1, pos_slice=-1)
    torch.testing.assert_close((scaled * diff_dirs).sum(-1).mean(), true_diff, atol=1e-4, rtol=1e-4)
    per_layer, _ = cache.decompose_resid(layer=-1, pos_slice=-1, return_labels=True)
    parts = (cache.apply_ln_to_stack(per_layer, layer=-1, pos_slice=-1) * diff_dirs).sum(-1).mean(-1)
    torch.testing.assert_close(parts.sum(), true_diff, atol=1e-4, rtol=1e-4)


def test_tl_named_parameters_are_the_weights(plain):
    params = dict(plain.tl_named_parameters())
    assert torch.equal(params["blocks.1.attn.W_Q"], plain.W_Q[1])
    assert torch.equal(params["blocks.3.mlp.W_out"], plain.W_out[3])
    assert torch.equal(params["unembed.W_U"], plain.W_U)
    assert params["blocks.0.attn.W_K"].shape == (plain.cfg.n_heads, plain.cfg.d_model, plain.cfg.d_head)
    assert not any(n.startswith(("blocks.0.ln2", "pos_embed")) for n in params)


def test_bridge_hook_in_alias_and_tensor_layers(plain):
    tokens = plain.to_tokens(PROMPTS[0])
    assert get_act_name("in", 2) == "blocks.2.hook_resid_pre"
    assert get_act_name("out", 2) == "blocks.2.hook_resid_post"
    _, cache = plain.run_with_cache(tokens)

    def zero_last(resid, hook):
        resid = resid.clone()
        resid[:, -1] = 0
        return resid

    via_alias = plain.run_with_hooks(tokens, fwd_hooks=[(get_act_name("in", 1), zero_last)])
    via_name = plain.run_with_hooks(tokens, fwd_hooks=[("blocks.1.hook_resid_pre", zero_last)])
    assert torch.equal(via_alias, via_name) and not torch.equal(via_alias, plain(tokens))
    head = torch.topk(torch.arange(16.0), k=1).indices[0]                # tensor(15): layer 3, head 3
    assert torch.equal(cache["attn", head // plain.cfg.n_heads], cache["blocks.3.attn.hook_pattern"])
    with pytest.raises(ValueError, match="layer"):
        get_act_name("pattern", torch.tensor(1.5))


def run_checker(tmp_path, cells: list, *flags: str) -> tuple[subprocess.CompletedProcess, dict]:
    """scripts/tl_demo_check.py (transformer-lens blocked) on a notebook of ``cells``: the process and its JSON."""
    nb = {"cells": [{"cell_type": "code", "source": c} for c in cells], "metadata": {}, "nbformat": 4,
          "nbformat_minor": 5}
    path = tmp_path / "demo.ipynb"
    path.write_text(json.dumps(nb))
    out = tmp_path / "out.json"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "tl_demo_check.py"), str(path), "--no-tl", *flags,
                           "--json", str(out)], capture_output=True, text=True, timeout=120,
                          env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    return proc, json.loads(out.read_text())


def test_checker_counts_steps(tmp_path):
    """The demo checker on a small notebook: replaced load, substituted names, a skipped plot cell,
    a GQA failure reported (not hidden), and a value printed by the model."""
    cells = ["import torch\nfrom transformer_lens.model_bridge import TransformerBridge",
             'model = TransformerBridge.boot_transformers("gpt2")\nmodel.enable_compatibility_mode(disable_warnings=True)',
             'toks = model.to_tokens("After John and Mary went out, Mary gave it to")\n'
             'logits = model(toks)\nd = (logits[0, -1, model.to_single_token(" John")] - '
             'logits[0, -1, model.to_single_token(" Mary")]).item()\nprint(round(d, 4))',
             "import plotly.express as px\npx.line(y=[1, 2]).show()",
             'def f(v, hook):\n    v[:, :, 3] = 0\n    return v\nmodel.run_with_hooks(toks, fwd_hooks=[("blocks.0.attn.hook_v", f)])']
    proc, rec = run_checker(tmp_path, cells)
    sm, steps = rec["summary"], rec["steps"]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert sm["skipped_plot"] == 1 and sm["run"] == 4
    assert steps[0]["status"] == "fail" and steps[0]["origin"] == "env"      # transformer-lens blocked
    assert sm["failed_env"] == 1 and sm["failed_cascade"] == 0 and sm["failed_surface"] == 1
    assert steps[1]["status"] == "pass" and steps[1]["loads_replaced"] == 1
    assert steps[2]["status"] == "pass"
    assert steps[4]["status"] == "fail" and steps[4]["origin"] == "surface" and "IndexError" in steps[4]["error"]
    model = HookedCommandR.from_pretrained("command-r-tiny", dtype=torch.float32, progress=False)
    model.enable_compatibility_mode(disable_warnings=True)
    logits = model("After David and Emma went out, Emma gave it to")
    expected = (logits[0, -1, model.to_single_token(" David")] - logits[0, -1, model.to_single_token(" Emma")]).item()
    assert abs(float(steps[2]["stdout"].strip()) - expected) < 1e-3


def test_generated_text_with_an_id_past_the_tokenizer_reads_as_replacement(plain):
    """A model row past the tokenizer's vocabulary (untrained padding rows) can win the argmax; text out
    marks it with U+FFFD instead of losing the generation, while to_string stays strict by default."""
    n_tok = plain.tokenizer.vocab_size
    assert plain.cfg.vocab_size > n_tok
    extra = plain.cfg.vocab_size - 1

    def force(logits, hook):
        logits[..., extra] = logits.max() + 10
        return logits

    with plain.hooks(fwd_hooks=[("hook_logits", force)]):
        text = plain.generate("The capital of France is", max_new_tokens=2, verbose=False)
        ids = plain.generate(plain.to_tokens("The capital of France is"), max_new_tokens=2)
    assert ids[0, -2:].tolist() == [extra, extra]
    assert text == plain.to_string(ids[0], errors="replace") and text.endswith("France is\ufffd\ufffd")
    with pytest.raises(ValueError, match="outside the tokenizer's vocabulary"):
        plain.to_string(ids[0])


def test_checker_counts_a_half_set_name_as_cascade_and_ports_the_gqa_switch(tmp_path):
    """A name an earlier failed statement left half-set is a cascade, not a surface failure; with
    --ungroup-gqa a per-query-head hook_v edit runs and zeroes exactly that head's output."""
    cells = ["import torch\nfrom transformer_lens.model_bridge import TransformerBridge",
             'model = TransformerBridge.boot_transformers("gpt2")',
             "xs = [1, 2]\nxs = torch.tensor(xs).to(undefined_device)",
             "torch.zeros(3).gather(0, xs)",
             'toks = model.to_tokens("When John and Mary went out")\n'
             'def f(v, hook):\n    v[:, :, 3] = 0\n    return v\n'
             '_, cache = model.run_with_cache(toks, fwd_hooks=[("blocks.0.attn.hook_v", f)])\n'
             'print(cache["z", 0][:, :, 3].abs().max().item(), cache["z", 0][:, :, 2].abs().max().item())']
    steps = run_checker(tmp_path, cells, "--ungroup-gqa")[1]["steps"]
    assert steps[2]["origin"] == "cascade"                                 # NameError
    assert steps[3]["status"] == "fail" and steps[3]["origin"] == "cascade" and steps[3]["needs"] == ["xs"]
    assert steps[4]["status"] == "pass", steps[4].get("error")
    zeroed, other = map(float, steps[4]["stdout"].split())
    assert zeroed == 0.0 and other > 0.0
