"""Seeded random corruptions of a small checkpoint, and generated configs: every case ends in a clear
``CheckpointError``/``ConfigError`` naming the file (or field), or in a model whose weights equal the
original's. Never a bare UnicodeDecodeError/KeyError/struct.error, a hang, or other weights loaded from
an inconsistent header. Each case runs under a 10 s alarm; the whole file takes a few seconds."""

import json
import math
import random
import shutil
import signal
import struct

import pytest
import torch

from workbench import ConfigError, HookedCommandR
from workbench.config import CommandRConfig
from workbench.loading import CheckpointError

CFG = dict(vocab_size=61, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=48, use_qk_norm=True,
           max_position_embeddings=64)
N_HEADER_CASES, N_CONFIG_CASES = 260, 140


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz_base")
    HookedCommandR.from_config(CommandRConfig(**CFG), seed=0).save_pretrained(path)
    reference = {k: v.clone() for k, v in HookedCommandR.from_pretrained(path, progress=False).state_dict().items()}
    with open(path / "model.safetensors", "rb") as f:
        data = f.read()
    with open(path / "config.json", encoding="utf-8") as f:
        config = json.load(f)
    return path, data, config, reference


class _Hang(Exception):
    pass


def _alarm(signum, frame):
    raise _Hang("a case ran past 10 s")


def _outcome(path, reference, names):
    """Load ``path``: a clear error naming one of ``names`` (returned), or weights equal to ``reference``."""
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(10)
    try:
        model = HookedCommandR.from_pretrained(path, progress=False)
    except (CheckpointError, ConfigError) as e:
        message = str(e)
        assert any(n in message for n in names), f"error names neither {names}: {message}"
        return type(e).__name__
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    state = model.state_dict()
    assert state.keys() == reference.keys()
    for k, v in reference.items():
        assert torch.equal(state[k], v), f"loaded without error but {k} differs from the original"
    return "loaded"


def _split(data):
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def _join(header, body, pad=0):
    raw = json.dumps(header).encode() + b" " * pad
    return struct.pack("<Q", len(raw)) + raw + body


_JUNK = [None, True, -1, 0, 1, 2**63, 2**64 + 5, 1.5, float("nan"), "x", "F32", "I32", "F8_E4M3", "BOOL", [], [1],
         [1, 2, 3], [-1, 4], ["0", "4"], {}, {"a": 1}, [[1]], "\u00e9"]


def _mutate(rng, data):
    header, body = _split(data)
    names = [k for k in header if k != "__metadata__"]
    name = rng.choice(names)
    kind = rng.randrange(10)
    if kind == 0:    # the header-length field
        n = struct.unpack("<Q", data[:8])[0]
        value = rng.choice([0, 1, 7, n - 1, n + 1, n + rng.randrange(1, 5000), len(data), 2**63, 2**64 - 1,
                            rng.randrange(2**64)])
        return struct.pack("<Q", value) + data[8:]
    if kind == 1:    # dtype names
        header[name]["dtype"] = rng.choice(["F16", "BF16", "F64", "I32", "U8", "I64", "F8_E5M2", "f32", "", "Q4"]
                                           + _JUNK)
    elif kind == 2:  # shapes
        shape = list(header[name]["shape"])
        choice = rng.randrange(5)
        if choice == 0 and len(shape) == 2:
            shape = shape[::-1]                                            # same bytes, other shape
        elif choice == 1:
            shape = [math.prod(shape)]
        elif choice == 2:
            shape.append(1)
        elif choice == 3:
            shape[rng.randrange(len(shape))] += rng.choice([-1, 1, 7])
        else:
            shape = rng.choice(_JUNK)
        header[name]["shape"] = shape
    elif kind == 3:  # offsets: shifted, overlapping another tensor, reversed, junk
        b, e = header[name]["data_offsets"]
        other = header[rng.choice(names)]["data_offsets"]
        choice = rng.randrange(4)
        if choice == 0:
            k = rng.choice([-4, -1, 1, 2, 4, 64])
            header[name]["data_offsets"] = [b + k, e + k]
        elif choice == 1:
            header[name]["data_offsets"] = list(other)
        elif choice == 2:
            header[name]["data_offsets"] = [e, b]
        else:
            header[name]["data_offsets"] = rng.choice(_JUNK)
    elif kind == 4:  # entries removed, added, renamed, replaced by junk
        choice = rng.randrange(4)
        if choice == 0:
            del header[name]
        elif choice == 1:
            header["model.layers.0.extra.weight"] = dict(header[name])
        elif choice == 2:
            header[name + "x"] = header.pop(name)
        else:
            header[name] = rng.choice(_JUNK)
    elif kind == 5:  # metadata
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"format": 1}, [], "pt", None, {"a": {"b": 1}}])
    elif kind == 6:  # random bytes inside the JSON header (invalid UTF-8, broken syntax, changed digits)
        n = struct.unpack("<Q", data[:8])[0]
        out = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            out[8 + rng.randrange(n)] = rng.randrange(256)
        return bytes(out)
    elif kind == 7:  # truncated data, or bytes appended
        cut = rng.randrange(8, len(data))
        return data[:cut] if rng.random() < 0.7 else data + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 9)))
    elif kind == 8:  # not JSON at all / not an object
        raw = rng.choice([b"[1, 2]", b"\"s\"", b"null", b"{", b"\xff\xfe\x00", b"{\"a\": " * 5000])
        return struct.pack("<Q", len(raw)) + raw + body
    else:            # a header whose whitespace padding changed: harmless, must load the same weights
        return _join(header, body, pad=rng.randrange(0, 64))
    return _join(header, body)


def test_random_header_corruptions(base, tmp_path):
    src, data, _, reference = base
    seen = {}
    for case in range(N_HEADER_CASES):
        rng = random.Random(1000 + case)
        folder = tmp_path / f"c{case}"
        shutil.copytree(src, folder)
        with open(folder / "model.safetensors", "wb") as f:
            f.write(_mutate(rng, data))
        try:
            outcome = _outcome(folder, reference, ["model.safetensors", "config.json"])
        except AssertionError as e:
            raise AssertionError(f"case {case}: {e}") from None
        except Exception as e:  # noqa: BLE001 - the point: anything else is a failure, reported with its case
            raise AssertionError(f"case {case}: bare {type(e).__name__}: {e}") from e
        seen[outcome] = seen.get(outcome, 0) + 1
        shutil.rmtree(folder)
    assert seen.get("CheckpointError", 0) > N_HEADER_CASES // 2 and seen.get("loaded", 0) > 0, seen


_CONFIG_KEYS = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                "head_dim", "intermediate_size", "rope_theta", "layer_norm_eps", "logit_scale", "use_qk_norm",
                "tie_word_embeddings", "attention_bias", "max_position_embeddings", "model_type", "torch_dtype",
                "rope_scaling", "rope_parameters", "pad_token_id", "bos_token_id", "eos_token_id", "hidden_act",
                "sliding_window", "layer_types"]
_VALUES = _JUNK + [float("inf"), -float("inf"), -0.0, 1e-30, 1e308, 200000, 3, 16, 33, 2**31, "false", "true",
                   "cohere2", "llama", "float16", "int8", {"rope_type": "linear", "factor": 2.0}, {"rope_theta": "x"},
                   ["full_attention"], ["sliding_attention", "x"]]


def test_generated_configs(base, tmp_path):
    src, _, config, reference = base
    outcomes = {}
    for case in range(N_CONFIG_CASES):
        rng = random.Random(5000 + case)
        folder = tmp_path / f"g{case}"
        shutil.copytree(src, folder)
        d = dict(config)
        changed = rng.sample(_CONFIG_KEYS, rng.randrange(1, 3))
        for key in changed:
            if rng.random() < 0.15:
                d.pop(key, None)
            else:
                d[key] = rng.choice(_VALUES)
        raw = json.dumps(d).encode()
        if case % 10 == 0:       # bytes that are not UTF-8
            raw = raw[:5] + b"\xff\xfe" + raw[5:]
        with open(folder / "config.json", "wb") as f:
            f.write(raw)
        try:
            outcome = _outcome(folder, reference, ["config.json", "model.safetensors"])
        except AssertionError as e:
            # weights equal to the original are the only acceptable success, unless a value changes the
            # meaning but not the weights (logit_scale, rope_theta, ...): then the weights still match.
            raise AssertionError(f"case {case} ({ {k: d.get(k) for k in changed} }): {e}") from None
        except Exception as e:  # noqa: BLE001
            raise AssertionError(f"case {case} ({ {k: d.get(k) for k in changed} }): bare {type(e).__name__}: {e}") \
                from e
        if outcome == "loaded":   # what was accepted is sane: finite positive floats, real booleans
            cfg = CommandRConfig.from_pretrained(folder)
            assert all(math.isfinite(v) and v > 0 for v in (cfg.rope_theta, cfg.layer_norm_eps, cfg.logit_scale))
            assert all(isinstance(v, bool) for v in (cfg.use_qk_norm, cfg.tie_word_embeddings, cfg.attention_bias))
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        shutil.rmtree(folder)
    assert outcomes.get("ConfigError", 0) > N_CONFIG_CASES // 3 and outcomes.get("loaded", 0) > 0, outcomes


def test_config_errors_name_the_field():
    """Straight from a dict (no file to name), each refused value names its field."""
    base = CommandRConfig(**CFG).to_dict()
    rng = random.Random(7)
    for _ in range(300):
        key, value = rng.choice(_CONFIG_KEYS), rng.choice(_VALUES)
        try:
            CommandRConfig.from_dict({**base, key: value})
        except ConfigError as e:
            assert any(k in str(e) for k in _CONFIG_KEYS + ["sliding_window_pattern", "config"]), str(e)
