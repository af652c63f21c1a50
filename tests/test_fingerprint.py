"""workbench.fingerprint: equal for the same weights however they are held, different when they differ."""

import pytest
import torch

from workbench import CommandRConfig, HookedCommandR
from workbench.fingerprint import config_fingerprint, sample_indices, weights_fingerprint

CFG = CommandRConfig(vocab_size=97, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, d_mlp=64, use_qk_norm=True)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp")
    HookedCommandR.from_config(CFG, seed=3).save_pretrained(path)
    return str(path)


def test_same_weights_same_fingerprint_also_under_disk_offload(ckpt, tmp_path):
    plain = HookedCommandR.from_pretrained(ckpt, progress=False)
    fp = weights_fingerprint(plain)
    assert len(fp) == 64 and fp == weights_fingerprint(plain.state_dict())
    dm = {"embed": "cpu", "blocks.0": "cpu", "blocks.1": "disk", "blocks.2": "disk", "ln_final": "cpu",
          "unembed": "cpu"}
    for folder in (None, str(tmp_path / "off")):
        off = HookedCommandR.from_pretrained(ckpt, device_map=dm, offload_folder=folder, progress=False)
        assert off.get_parameter("blocks.1.attn.q_proj.weight").is_meta        # values only in the offload map
        assert weights_fingerprint(off) == fp


def test_fingerprint_changes_with_values_dtype_names_and_refuses_meta(ckpt):
    model = HookedCommandR.from_pretrained(ckpt, progress=False)
    fp = weights_fingerprint(model)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    name = "blocks.2.mlp.down_proj.weight"
    for i in (0, int(sample_indices(sd[name].numel())[-1]), int(sample_indices(sd[name].numel())[70])):
        changed = dict(sd)
        changed[name] = sd[name].clone().reshape(-1)
        changed[name][i] += 1e-3
        changed[name] = changed[name].reshape(sd[name].shape)
        assert weights_fingerprint(changed) != fp, i
    assert weights_fingerprint({k: v.half() for k, v in sd.items()}) != fp
    renamed = dict(sd)
    renamed["extra"] = renamed.pop(name)
    assert weights_fingerprint(renamed) != fp
    assert weights_fingerprint(HookedCommandR.from_config(CFG, seed=4)) != fp
    with pytest.raises(ValueError, match="meta device"):
        weights_fingerprint(HookedCommandR.from_config(CFG, device="meta"))
    assert config_fingerprint(CFG) == config_fingerprint(model.cfg)
    assert config_fingerprint(CFG.replace(d_mlp=96)) != config_fingerprint(CFG)
