"""Penalties and log-probabilities of fastllm/runtime/sampling.py against float64 references of their
formulas (per-row values, as the serving engine batches them), and greedy generation with penalties
against a pure-torch loop over the model's full forward."""
import pytest
import torch

import fastllm
from fastllm.runtime.sampling import (SamplingParams, penalize, penalize_counts, sample, sample_rows,
                                      token_logprobs)
from tiny_models import tiny_llama


def reference_penalties(logits, prompt_seen, counts, rep, presence, frequency):
    """float64: s / r or s * r on tokens of the prompt or output, then s - f * c - a * [c > 0]."""
    s = logits.double()
    seen = prompt_seen | (counts > 0)
    s = torch.where(seen, torch.where(s > 0, s / rep[:, None], s * rep[:, None]), s)
    return s - frequency[:, None] * counts - presence[:, None] * (counts > 0).double()


def random_case(b=5, v=37, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(b, v, generator=g)
    counts = torch.randint(0, 4, (b, v), generator=g) * (torch.rand(b, v, generator=g) < 0.5)
    prompt_seen = torch.rand(b, v, generator=g) < 0.2
    rep = torch.tensor([1.0, 1.3, 0.8, 2.0, 1.0])[:b].double()
    presence = torch.tensor([0.0, 0.5, -1.0, 2.0, 0.0])[:b].double()
    frequency = torch.tensor([0.0, 1.5, 0.3, -2.0, 0.7])[:b].double()
    return logits, counts, prompt_seen, rep, presence, frequency


def test_penalties_match_the_formula_per_row():
    logits, counts, prompt_seen, rep, presence, frequency = random_case()
    seen = prompt_seen | (counts > 0)
    ours = penalize_counts(penalize(logits, seen, rep.float()), counts, presence.float(), frequency.float())
    ref = reference_penalties(logits, prompt_seen, counts, rep, presence, frequency)
    torch.testing.assert_close(ours.double(), ref, rtol=2e-7, atol=1e-6)
    for i in range(len(rep)):  # scalars for one row give that row
        row = penalize_counts(penalize(logits[i:i + 1], seen[i:i + 1], float(rep[i])), counts[i:i + 1],
                              float(presence[i]), float(frequency[i]))
        torch.testing.assert_close(row, ours[i:i + 1])
    assert torch.equal(penalize_counts(logits, counts, 0.0, 0.0), logits)  # neutral values change nothing


def test_sample_rows_applies_each_rows_penalties():
    logits, counts, prompt_seen, rep, presence, frequency = random_case()
    seen = prompt_seen | (counts > 0)
    params = [SamplingParams(repetition_penalty=float(r), presence_penalty=float(a), frequency_penalty=float(f))
              for r, a, f in zip(rep, presence, frequency)]
    want = reference_penalties(logits, prompt_seen, counts, rep, presence, frequency).argmax(-1)
    assert torch.equal(sample_rows(logits, params, [None] * len(params), seen, counts), want)
    alone = [int(sample(logits[i:i + 1], p, seen[i:i + 1], None, counts[i:i + 1])) for i, p in enumerate(params)]
    assert alone == want.tolist()
    assert not torch.equal(want, logits.argmax(-1))  # the case is one where the penalties matter


def test_token_logprobs():
    logits, *_ = random_case()
    chosen = torch.tensor([3, 0, 36, 5, 5])
    lp, top, ids = token_logprobs(logits, chosen, 4)
    ref = logits.double().log_softmax(-1)
    torch.testing.assert_close(lp.double(), ref.gather(1, chosen[:, None])[:, 0], rtol=0, atol=1e-6)
    torch.testing.assert_close(top.double(), ref.topk(4, -1).values, rtol=0, atol=1e-6)
    assert torch.equal(ids, ref.topk(4, -1).indices)
    assert token_logprobs(logits, chosen, 0)[1].shape == (5, 0)


@pytest.mark.parametrize("name, value", [("presence_penalty", 2.5), ("frequency_penalty", -3.0),
                                         ("presence_penalty", float("nan")), ("repetition_penalty", float("nan"))])
def test_bad_penalties(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})
    with pytest.raises(TypeError, match="frequency_penalty"):
        SamplingParams(frequency_penalty="1")


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_sampling")
    tiny_llama(path, eos_token_id=None)
    return fastllm.LLM.load(str(path), device="cpu")


def reference_greedy(llm, prompt, n, rep=1.0, presence=0.0, frequency=0.0):
    """Greedy tokens from the full forward of the whole sequence at every step, penalised in float64."""
    ids, v = list(prompt), llm.config.vocab_size
    prompt_seen = torch.zeros(1, v, dtype=torch.bool)
    prompt_seen[0, prompt] = True
    per_row = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    for _ in range(n):
        with torch.inference_mode():
            logits = llm.model(torch.tensor([ids]))[:, -1]                      # (1, V)
        counts = torch.bincount(torch.tensor(ids[len(prompt):], dtype=torch.long), minlength=v)[None]
        s = reference_penalties(logits, prompt_seen, counts, per_row(rep), per_row(presence), per_row(frequency))
        ids.append(int(s.argmax(-1)))
    return ids[len(prompt):]


@pytest.mark.parametrize("penalties", [dict(presence_penalty=1.5), dict(frequency_penalty=2.0),
                                       dict(repetition_penalty=1.5, presence_penalty=-0.5, frequency_penalty=0.5)])
def test_greedy_generation_with_penalties_matches_reference(llm, penalties):
    prompt = llm.tokenizer.encode("the quick brown fox")
    got = llm.generate_ids([prompt], max_new_tokens=16, **penalties)[0]
    assert got == reference_greedy(llm, prompt, 16, penalties.get("repetition_penalty", 1.0),
                                   penalties.get("presence_penalty", 0.0), penalties.get("frequency_penalty", 0.0))
    assert got != llm.generate_ids([prompt], max_new_tokens=16)[0]


def _filtered_probs(logits, temperature, top_k, top_p):
    """float64: softmax(logits / T) restricted to the top_k tokens, or to the smallest set of the most likely tokens
    whose mass reaches top_p (one filter at a time), renormalised."""
    p = torch.softmax(logits.double() / temperature, -1)
    keep, mass = torch.zeros_like(p, dtype=torch.bool), 0.0
    for rank, j in enumerate(p.argsort(descending=True).tolist()):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[j], mass = True, mass + float(p[j])
    return torch.where(keep, p, 0.0) / p[keep].sum()


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.5, 0, 1.0), (2.0, 0, 1.0), (2.0, 3, 1.0), (0.5, 0, 0.9),
                                                     (2.0, 0, 0.8)])
def test_draws_follow_the_tempered_filtered_distribution(temperature, top_k, top_p):
    """The frequencies of 4000 seeded draws are within 5 standard errors of softmax(logits / T) after top-k or
    top-p (which acts on the tempered probabilities: at T = 1 the last two cases would keep another token)."""
    n, logits = 4000, torch.tensor([2.0, 1.0, 0.0, -1.0])
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
    got = sample(logits.expand(n, 4), params, generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(got, minlength=4).double() / n
    want = _filtered_probs(logits, temperature, top_k, top_p)
    assert torch.equal(freq > 0, want > 0), (freq, want)
    assert ((freq - want).abs() <= 5 * (want * (1 - want) / n).sqrt()).all(), (freq, want)


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-8])
def test_tiny_temperature_samples_the_argmax(temperature):
    """A temperature just above 0 divides the logits into overflow: the best token must still win (no NaN)."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5], [0.0, -1.0, 7.0, float("-inf")]])
    for top_k, top_p in ((0, 1.0), (2, 0.9)):
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=0)
        got = sample(logits, params, generator=torch.Generator().manual_seed(0))
        assert got.tolist() == [1, 2]


@pytest.mark.parametrize("top_p", [1e-300, 1e-45, 1e-8])
def test_tiny_top_p_keeps_the_top_token(top_p):
    """A top_p below float32's smallest value rounds to 0 against the float32 mass: the top token must stay."""
    logits = torch.tensor([[1.0, 3.0, -2.0, 2.5], [0.0, -1.0, 7.0, 6.9]])
    for temperature in (1.0, 2.0):
        got = sample(logits, SamplingParams(temperature=temperature, top_p=top_p), generator=torch.Generator())
        assert got.tolist() == [1, 2]


@pytest.mark.parametrize("name", ["temperature", "top_p", "repetition_penalty", "presence_penalty",
                                  "frequency_penalty"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_sampling_values(name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number"):
        SamplingParams(**{name: value})


def test_seed_range_is_torchs():
    for seed in (-2 ** 63, -1, 0, 2 ** 64 - 1):
        SamplingParams(seed=seed).generator("cpu")
    for seed in (-2 ** 63 - 1, 2 ** 64, 10 ** 30):
        with pytest.raises(ValueError, match=r"seed must be in \[-2\*\*63, 2\*\*64\)"):
            SamplingParams(seed=seed)
