"""4-bit / 8-bit bitsandbytes loading on the CPU: loads, generates, hooks fire, logits close to fp32."""

import pytest
import torch
from torch import nn

from _reference import make_hf_checkpoint
from workbench import HookedCommandR, QuantizationConfig
from workbench.kv_cache import KVCache

VOCAB = 97


# ``bnb`` (tests/conftest.py): the bitsandbytes module, or a skip where it cannot run 4-bit on this CPU.


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    # larger than the parity model so block-wise quantization has full 64-weight blocks
    return make_hf_checkpoint(tmp_path_factory.mktemp("q"), seed=7, hidden_size=128, intermediate_size=256,
                              num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def fp32(ckpt):
    return HookedCommandR.from_pretrained(ckpt, progress=False)


def _ids(batch=2, pos=8, seed=0):
    return torch.randint(0, VOCAB, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_config_accepts_bitsandbytes_field_names():
    q = QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype="bfloat16",
                           bnb_4bit_use_double_quant=True, llm_int8_skip_modules=["o_proj"])
    assert q.bits == 4 and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert QuantizationConfig.coerce(q.to_dict()) == q
    assert QuantizationConfig.coerce({"load_in_8bit": True, "quant_method": "bitsandbytes"}).bits == 8
    assert not q.should_quantize("blocks.0.attn.o_proj.weight") and q.should_quantize("blocks.0.attn.q_proj.weight")
    assert not q.should_quantize("embed.weight") and not q.should_quantize("blocks.1.ln1.weight")
    with pytest.raises(ValueError, match="exclusive"):
        QuantizationConfig(load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(ValueError, match="bnb_4bit_quant_type.*'int3'"):
        QuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="int3")
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['load_in_3bit'\]"):
        QuantizationConfig.coerce({"load_in_3bit": True})


def test_transformers_bitsandbytes_config_is_accepted():
    transformers = pytest.importorskip("transformers")
    try:
        hf = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=["mlp"])
    except Exception as e:  # noqa: BLE001
        pytest.skip(f"BitsAndBytesConfig unavailable: {e}")
    q = QuantizationConfig.coerce(hf)
    assert q.load_in_4bit and q.bnb_4bit_quant_type == "nf4" and q.bnb_4bit_compute_dtype == torch.bfloat16
    assert q.llm_int8_skip_modules == ["mlp"]


@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_4bit_loads_and_logits_close_to_fp32(bnb, ckpt, fp32, quant_type):
    from workbench.quantization import dense_weight

    model = HookedCommandR.from_pretrained(ckpt, quantization_config={"load_in_4bit": True,
                                                                      "bnb_4bit_quant_type": quant_type},
                                           progress=False)
    q_proj = model.blocks[0].attn.q_proj
    assert isinstance(q_proj, bnb.nn.Linear4bit) and isinstance(model.embed, nn.Embedding)
    assert model.embed.weight.dtype == torch.float32 and model.unembed.weight is model.embed.weight
    n_linear = sum(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    assert n_linear == 7 * model.cfg.n_layers
    ids = _ids()
    with torch.no_grad():
        got, want = model(ids), fp32(ids)
    err = _rel_err(got, want)
    print(f"4-bit {quant_type}: relative logit error vs fp32 = {err:.4f}, "
          f"max abs = {(got - want).abs().max():.4f}, logit std = {want.std():.4f}")
    # quantized (not a no-op), but still the same model; fp4's coarser grid costs more on this
    # random tiny model (measured on this model: nf4 0.27, fp4 0.33 relative error)
    assert 0 < err < {"nf4": 0.4, "fp4": 0.5}[quant_type]
    # the quantized weights really are the checkpoint's: each dequantized weight is within the
    # 4-bit block error of the original (absmax / 7 per 64-weight block for these formats)
    for name in ("q_proj", "o_proj"):
        w = getattr(fp32.blocks[1].attn, name).weight
        dq = dense_weight(getattr(model.blocks[1].attn, name)).float()
        blocks = w.reshape(-1, 64)
        assert ((dq.reshape(-1, 64) - blocks).abs() <= blocks.abs().amax(1, keepdim=True) / 5 + 1e-6).all()
    # and the forward uses exactly those weights: an fp32 model holding them gives (almost) the same logits
    deq = HookedCommandR.from_pretrained(ckpt, progress=False)
    with torch.no_grad():
        for i, block in enumerate(model.blocks):
            for mod in ("attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                deq.get_submodule(f"blocks.{i}.{mod}").weight.copy_(dense_weight(block.get_submodule(mod)))
        close = deq(ids)
    assert _rel_err(got, close) < 0.1 * max(err, 1e-3), (_rel_err(got, close), err)


def test_4bit_hooks_fire_including_result_and_pattern(bnb, ckpt):
    model = HookedCommandR.from_pretrained(ckpt, quantization_config=QuantizationConfig(load_in_4bit=True,
                                                                                        bnb_4bit_quant_type="nf4"),
                                           progress=False)
    ids = _ids()
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)                                  # every hook
        plain, plain_cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_attn_out"))
    L = model.cfg.n_layers
    for i in range(L):
        for hook in ("attn.hook_q", "attn.hook_pattern", "attn.hook_z", "attn.hook_result", "mlp.hook_post",
                     "hook_resid_post"):
            assert f"blocks.{i}.{hook}" in cache.keys(), hook
        # per-head results (quantized o_proj run per head) add up to the plain attention output
        result = cache[f"blocks.{i}.attn.hook_result"]
        assert _rel_err(result.sum(2), plain_cache[f"blocks.{i}.hook_attn_out"]) < 1e-2
        # and the dequantized W_O reproduces them
        w_o = model.blocks[i].attn.W_O
        assert w_o.shape == (model.cfg.n_heads, model.cfg.d_head, model.cfg.d_model)
        via_w_o = torch.einsum("bshd,hdm->bshm", cache[f"blocks.{i}.attn.hook_z"], w_o)
        assert _rel_err(via_w_o, result) < 1e-2
        pattern = cache[f"blocks.{i}.attn.hook_pattern"]
        torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))
    assert _rel_err(logits, plain) < 1e-2
    with torch.no_grad():
        ablated = model.run_with_hooks(ids, fwd_hooks=[("blocks.0.mlp.hook_post", lambda x, hook: x * 0)])
    assert _rel_err(ablated, plain) > 0.05


def test_4bit_generates(bnb, ckpt):
    model = HookedCommandR.from_pretrained(ckpt, quantization_config={"load_in_4bit": True}, progress=False)
    ids = _ids(batch=1, pos=5)
    cache = KVCache.for_model(model)
    toks = ids
    with torch.no_grad():
        logits = model(ids, kv_cache=cache)
        full_logits = []
        for _ in range(5):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks = torch.cat([toks, nxt], 1)
            logits = model(nxt, kv_cache=cache)
        full = model(toks[:, :-1])
    assert toks.shape == (1, 10)
    # cached decoding agrees with one uncached forward over the same tokens
    assert torch.equal(full[:, 5:].argmax(-1), toks[:, 6:])
    try:
        import workbench.generation  # noqa: F401
    except ImportError:
        pytest.skip("workbench.generation not available")
    out = model.generate(ids, max_new_tokens=5, eos_token_id=-1)
    assert torch.equal(out, toks)


def test_8bit_loads_and_skip_modules(bnb, ckpt, fp32):
    model = HookedCommandR.from_pretrained(ckpt, quantization_config=QuantizationConfig(
        load_in_8bit=True, llm_int8_skip_modules=["mlp"]), progress=False)
    assert isinstance(model.blocks[0].attn.q_proj, bnb.nn.Linear8bitLt)
    assert type(model.blocks[0].mlp.up_proj) is nn.Linear
    assert torch.equal(model.blocks[0].mlp.up_proj.weight, fp32.blocks[0].mlp.up_proj.weight)
    ids = _ids()
    with torch.no_grad():
        err = _rel_err(model(ids), fp32(ids))
        _, cache = model.run_with_cache(ids, names_filter=lambda n: n.endswith("hook_result"))
    print(f"8-bit (mlp skipped): relative logit error vs fp32 = {err:.5f}")
    assert 0 < err < 0.05
    assert len(cache.keys()) == model.cfg.n_layers


def test_quantized_model_refuses_save_and_disk(bnb, ckpt, tmp_path):
    model = HookedCommandR.from_pretrained(ckpt, quantization_config={"load_in_4bit": True}, progress=False)
    with pytest.raises(ValueError, match="quantization_config.*not supported"):
        model.save_pretrained(tmp_path / "q")
    with pytest.raises(ValueError, match="quantized model cannot be offloaded to disk"):
        HookedCommandR.from_pretrained(ckpt, quantization_config={"load_in_4bit": True}, device_map="auto",
                                       max_memory={"cpu": 10_000}, progress=False)
