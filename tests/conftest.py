import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pathlib

import pytest
import torch

from workbench import CommandRConfig, HookedCommandR
from workbench.tokenizer import Tokenizer

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
    if not SHARED.is_dir():
        pytest.skip(f"../shared not found at {SHARED} (third-party test data lives there)")
    return SHARED


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module (``pytestmark = pytest.mark.usefixtures("one_thread")``), restored after.

    Hundreds of tiny forwards: on a shared, loaded 2-core machine one thread avoids the thread pool's
    synchronisation cost per op (~25x faster for the tiny model); results do not depend on it."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def bundled_model():
    """The bundled ``command-r-tiny`` in float32, loaded once per test module."""
    return HookedCommandR.from_pretrained("command-r-tiny", dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def bundled_tokenizer():
    """The bundled ``command-r-tiny`` tokenizer, loaded once per test module."""
    return Tokenizer.from_pretrained("command-r-tiny")


@pytest.fixture(scope="session")
def bnb():
    """The ``bitsandbytes`` module, or skip when it is absent or cannot quantize and multiply on this CPU."""
    bnb = pytest.importorskip("bitsandbytes")
    try:
        lin = bnb.nn.Linear4bit(64, 32, bias=False, compute_dtype=torch.float32, device="meta")
        lin.weight = bnb.nn.Params4bit(torch.randn(32, 64), requires_grad=False, module=lin).to("cpu")
        lin(torch.randn(2, 64))
    except Exception as e:  # noqa: BLE001 - any failure means "not on this CPU"
        pytest.skip(f"bitsandbytes cannot run 4-bit on this CPU ({type(e).__name__}: {e})")
    return bnb


def alias_fixture(of: str):
    """A module-scoped fixture that is fixture ``of`` under the name a test module assigns it to, so its tests
    keep their own parameter names: ``model = alias_fixture("bundled_model")``."""
    @pytest.fixture(scope="module")
    def alias(request):
        return request.getfixturevalue(of)

    return alias


def jittered_model(cfg: dict, seed: int, norm_seed: int, scale: float) -> HookedCommandR:
    """A random model from ``CommandRConfig(**cfg)`` whose LayerNorm / QK-norm weights are moved off 1 by
    ``scale`` x normal noise (so a computation that skipped them would show), in eval mode."""
    m = HookedCommandR.from_config(CommandRConfig(**cfg), seed=seed)
    with torch.no_grad():
        g = torch.Generator().manual_seed(norm_seed)
        for name, p in m.named_parameters():
            if "norm" in name or "ln" in name:
                p.add_(scale * torch.randn(p.shape, generator=g))
    return m.eval()
