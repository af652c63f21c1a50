"""Sampling: processed scores bit-identical to transformers' logits processors, reproducible draws,
frequencies that match the distribution (chi-square), defaults from generation_config."""

import math

import pytest
import torch
from transformers.generation.logits_process import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                                                    TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from _reference import load_reference, make_hf_checkpoint
from workbench import HookedCommandR
from workbench.generation import process_logits, sample

SETTINGS = [
    dict(temperature=0.7),
    dict(top_k=5),
    dict(top_p=0.8),
    dict(repetition_penalty=1.3),
    dict(repetition_penalty=0.8, temperature=0.3, top_k=20, top_p=0.9),
    dict(temperature=1.7, top_k=0, top_p=0.5),
    dict(top_p=0.0),                          # min_tokens_to_keep: one token survives
    dict(top_k=200),                          # more than the vocabulary
]


def _hf_processors(do_sample, temperature=1.0, top_k=50, top_p=1.0, repetition_penalty=1.0, prompt_start=None):
    """transformers' processors in the order its generate builds them (utils._get_logits_processor)."""
    procs = LogitsProcessorList()
    if repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(repetition_penalty, prompt_ignore_length=prompt_start))
    if do_sample:
        if temperature != 1.0:
            procs.append(TemperatureLogitsWarper(temperature))
        if top_k:
            procs.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
        if top_p < 1.0:
            procs.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return procs


@pytest.mark.parametrize("kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
@pytest.mark.parametrize("do_sample", [True, False])
def test_processed_scores_equal_transformers(kw, do_sample):
    gen = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 97, generator=gen) * 3
    scores[0, :10] = scores[0, 10]                      # ties at the top-k / top-p boundary
    seqs = torch.randint(0, 97, (4, 12), generator=gen)
    prompt_start = torch.tensor([0, 3, 0, 7])           # left-padding lengths: not penalised
    ours = process_logits(scores.clone(), seqs, do_sample=do_sample, prompt_start=prompt_start, **kw)
    theirs = _hf_processors(do_sample, prompt_start=prompt_start, **kw)(seqs, scores.clone())
    assert torch.equal(ours, theirs)
    if kw.get("repetition_penalty", 1.0) != 1.0 or (do_sample and len(kw) > 0 and kw != dict(top_k=200)):
        assert not torch.equal(ours, scores), "the setting must change something"
    assert torch.isfinite(ours).sum(-1).min() >= 1


def test_penalty_ignores_left_padding_only():
    scores = torch.tensor([[1.0, -1.0, 2.0, 0.5]])
    seqs = torch.tensor([[0, 1, 2]])
    out = process_logits(scores, seqs, repetition_penalty=2.0, prompt_start=torch.tensor([1]))
    assert out.tolist() == [[1.0, -2.0, 1.0, 0.5]]


def test_fixed_generator_reproduces_tokens():
    probs_logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    a = [sample(probs_logits, True, torch.Generator().manual_seed(7)) for _ in range(2)]
    assert torch.equal(a[0], a[1])
    draws = {tuple(sample(probs_logits, True, torch.Generator().manual_seed(s)).tolist()) for s in range(20)}
    assert len(draws) > 1, "different seeds must give different draws"
    assert torch.equal(sample(probs_logits, False), probs_logits.argmax(-1))


def test_sampled_frequencies_match_distribution():
    """Chi-square goodness of fit of 40k draws against softmax(processed scores)."""
    gen = torch.Generator().manual_seed(3)
    scores = torch.randn(1, 30, generator=gen) * 1.5
    seqs = torch.tensor([[2, 5]])
    processed = process_logits(scores, seqs, do_sample=True, temperature=0.8, top_k=12, top_p=0.95,
                               repetition_penalty=1.2)
    p = torch.softmax(processed, -1)[0].double()
    n = 40_000
    draws = sample(processed.expand(n, -1), True, torch.Generator().manual_seed(11))
    counts = torch.bincount(draws, minlength=30).double()
    kept = p > 0
    assert counts[~kept].sum() == 0, "a filtered-out token was sampled"
    expected = n * p[kept]
    chi2 = float(((counts[kept] - expected) ** 2 / expected).sum())
    df = int(kept.sum()) - 1
    # 99.99th percentile of chi2(df) is below df + 8.5 sqrt(2 df) + 12 for df in 1..50 (generous)
    assert chi2 < df + 8.5 * math.sqrt(2 * df) + 12, (chi2, df)
    # and the test can fail: a wrong distribution (unfiltered softmax) is rejected
    q = torch.softmax(scores, -1)[0].double()[kept]
    q = q / q.sum()
    wrong = float(((counts[kept] - n * q) ** 2 / (n * q)).sum())
    assert wrong > df + 8.5 * math.sqrt(2 * df) + 12


def test_bad_settings_are_refused():
    s = torch.zeros(1, 5)
    with pytest.raises(ValueError, match="do_sample=False"):
        process_logits(s, torch.zeros(1, 1, dtype=torch.long), do_sample=True, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        process_logits(s, torch.zeros(1, 1, dtype=torch.long), do_sample=True, top_p=1.5)
    with pytest.raises(ValueError, match="top_k"):
        process_logits(s, torch.zeros(1, 1, dtype=torch.long), do_sample=True, top_k=-1)


# ---------------------------------------------------------------------- through generate
@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("samp"), seed=4)
    ours = HookedCommandR.from_pretrained(path)
    ours.attn_impl = "explicit"
    return ours, load_reference(path)


def test_sampling_matches_transformers_with_same_seed(pair):
    """Bit-identical logits + identical processors + one multinomial per step = the same tokens."""
    ours, ref = pair
    ids = torch.randint(1, 97, (2, 6), generator=torch.Generator().manual_seed(5))
    kw = dict(max_new_tokens=12, do_sample=True, temperature=0.9, top_k=20, top_p=0.95, repetition_penalty=1.1)
    torch.manual_seed(123)
    with torch.no_grad():
        theirs = ref.generate(ids, **kw)
    torch.manual_seed(123)
    mine = ours.generate(ids, **kw)
    assert torch.equal(mine, theirs)
    g = lambda s: torch.Generator().manual_seed(s)  # noqa: E731
    assert torch.equal(ours.generate(ids, generator=g(9), **kw), ours.generate(ids, generator=g(9), **kw))


def test_generation_config_supplies_defaults(pair):
    ours, _ = pair
    ids = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(6))
    tops = []
    ours.generation_config = {"do_sample": True, "top_k": 3, "temperature": 0.5}
    try:
        ours.generate(ids, max_new_tokens=4, on_step=lambda info: tops.append(info.top_probs),
                      generator=torch.Generator().manual_seed(0))
        greedy = ours.generate(ids, max_new_tokens=4, top_k=3, do_sample=False)
    finally:
        del ours.generation_config
    for probs in tops:                                     # top-k 3 from generation_config applied
        assert (probs[:, 3:] == 0).all() and (probs[:, :3] > 0).all()
    assert len(tops) == 4
    assert torch.equal(greedy, ours.generate(ids, max_new_tokens=4))
