"""fastllm's Llama (fastllm/models/llama.py) loaded from a Hugging Face directory against transformers,
in float32: logits over a whole sequence, and prefill + decode steps through the static KV cache; the checks of
the model's entry points (and GPT-2's) and of its config."""
import json
import math

import pytest
import torch

from fastllm.loading.safetensors import load_hf_dir
from tiny_models import tiny_llama

VARIANTS = {
    "gqa-llama3-rope": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "mha-tied": dict(num_key_value_heads=4, tie_word_embeddings=True),
    "linear-rope-bias": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, attention_bias=True),
    "dynamic-rope": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=8),
    "mqa-headdim": dict(num_key_value_heads=1, head_dim=24),
}


def _forward(model, tokens):
    with torch.inference_mode():
        return model(tokens)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_transformers(tmp_path, variant):
    hf = tiny_llama(tmp_path, **VARIANTS[variant])
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    assert cfg.tie_word_embeddings == (variant == "mha-tied")
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    out = _forward(model, tokens)
    with torch.no_grad():
        ref = hf(tokens).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def _new_cache(model, kind, batch, positions, dtype=None):
    """A static cache, or a paged one (blocks of 4) whose rows got scattered, non-ascending blocks and reserved
    all their positions up front (as the server does)."""
    if kind == "static":
        return model.new_cache(batch, positions, dtype=dtype)
    cache = model.new_cache(batch, positions, block_size=4, num_blocks=1 + batch * -(-positions // 4) + 3,
                            dtype=dtype)
    cache.reserve(0, 5)                        # take blocks, give them back: the pool's order is shuffled
    cache.reserve(1, 9)
    cache.release(0)
    for row in reversed(range(batch)):
        assert cache.reserve(row, positions)
    return cache


@pytest.mark.parametrize("kind", ["static", "paged"])
@pytest.mark.parametrize("variant", ["gqa-llama3-rope", "mqa-headdim"])
def test_prefill_and_decode_steps_equal_full_recompute(tmp_path, variant, kind):
    """Ragged prompts prefilled together (packed), then decode steps through the static or the paged cache,
    give the logits of whole-sequence forwards of each row."""
    tiny_llama(tmp_path, **VARIANTS[variant])
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    lens, steps = [6, 1, 9], 5
    seqs = [torch.randint(0, cfg.vocab_size, (n + steps,), generator=torch.Generator().manual_seed(n)) for n in lens]
    with torch.inference_mode():
        cache = _new_cache(model, kind, len(lens), max(lens) + steps)
        got = [model.prefill([s[:n].tolist() for s, n in zip(seqs, lens)], cache)]            # (B, V)
        for t in range(steps - 1):
            got.append(model.decode(torch.stack([s[n + t] for s, n in zip(seqs, lens)]), cache))
        assert cache.lengths.tolist() == [n + steps - 1 for n in lens]
        for b, (s, n) in enumerate(zip(seqs, lens)):
            full = _forward(model, s[None, :n + steps - 1])[0, n - 1:]                         # (steps, V)
            torch.testing.assert_close(torch.stack([g[b] for g in got]), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_int8_cache(tmp_path, kind):
    """An int8 KV cache: prefill attends to its exact keys and values (the same logits as a float cache) and
    stores them as reference.quantize_int8 does; the decode steps then read the int8 rows (kv_cache_append and
    decode_attention with the scales) and stay within the quantisation's reach of the float cache's logits."""
    from fastllm.reference.decode_attention import cache_index, quantize_int8

    tiny_llama(tmp_path, **VARIANTS["gqa-llama3-rope"])
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    lens, steps = [6, 1, 9], 4
    seqs = [torch.randint(0, cfg.vocab_size, (n + steps,), generator=torch.Generator().manual_seed(n)) for n in lens]
    with torch.inference_mode():
        caches = [_new_cache(model, kind, len(lens), max(lens) + steps, dtype) for dtype in (None, torch.int8)]
        assert caches[1].k.dtype == torch.int8 and caches[0].k_scale is None
        first = [model.prefill([s[:n].tolist() for s, n in zip(seqs, lens)], c) for c in caches]
        torch.testing.assert_close(first[1], first[0], rtol=0, atol=0)
        for b, n in enumerate(lens):  # every written position: the float cache's values, quantised
            blocks, slots = cache_index(torch.arange(n), torch.tensor(b), caches[0].block_table, 4)
            for name in ("k", "v"):
                codes, scale = quantize_int8(getattr(caches[0], name)[:, blocks, slots])
                assert torch.equal(getattr(caches[1], name)[:, blocks, slots], codes)
                assert torch.equal(getattr(caches[1], name + "_scale")[:, blocks, slots], scale)
        for t in range(steps - 1):
            tok = torch.stack([s[n + t] for s, n in zip(seqs, lens)])
            ref, got = (model.decode(tok, c) for c in caches)
            blocks, slots = cache_index(torch.tensor(lens) + t, torch.arange(len(lens)), caches[0].block_table, 4)
            for name in ("k", "v"):  # layer 0's new rows (the same inputs in both), appended quantised
                codes, scale = quantize_int8(getattr(caches[0], name)[0, blocks, slots])
                assert torch.equal(getattr(caches[1], name)[0, blocks, slots], codes)
                assert torch.equal(getattr(caches[1], name + "_scale")[0, blocks, slots], scale)
            # int8 rows are within 1/254 of their largest value; through this random model's 2 layers that moves
            # the logits by up to ~4% of their spread (a wrong scale or row would move them by their whole spread)
            assert not torch.equal(got, ref)
            torch.testing.assert_close(got, ref, rtol=0, atol=0.08 * ref.std().item())


def test_kv_cache_dtype_choice(tmp_path):
    tiny_llama(tmp_path)
    model, _ = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    with pytest.raises(ValueError, match="model's dtype torch.float32 or torch.int8"):
        model.new_cache(1, 8, dtype=torch.float16)
    model.kv_cache_dtype = torch.int8
    assert model.new_cache(1, 8).k.dtype == torch.int8 and model.new_cache(1, 8, dtype=torch.float32).k_scale is None


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_inputs_of_the_model_entry_points_are_checked(tmp_path, arch):
    """model(tokens) and new_cache(max_len) refuse more positions than the context (128 here): a Llama ran on with
    rotary angles it never saw, a GPT-2 failed with an IndexError of its position table; the context itself passes.
    Dynamic (NTK) scaling may go past it (test_logits_match_transformers["dynamic-rope"] does)."""
    from tiny_models import tiny_gpt2

    (tiny_llama if arch == "llama" else tiny_gpt2)(tmp_path)
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.max_seq_len + 1), generator=torch.Generator().manual_seed(0))
    assert _forward(model, tokens[:, :-1]).shape == (1, 128, cfg.vocab_size)
    with pytest.raises(ValueError, match="tokens has 129 positions, more than the model's context of 128"):
        _forward(model, tokens)
    assert model.new_cache(1, 128).max_len == 128
    with pytest.raises(ValueError, match="max_len has 129 positions, more than the model's context of 128"):
        model.new_cache(1, 129)
    with pytest.raises(TypeError, match="tokens must be an int64 or int32 tensor of token ids, got torch.float32"):
        _forward(model, tokens.float())
    with pytest.raises(TypeError, match="got list"):
        _forward(model, tokens.tolist())
    with pytest.raises(ValueError, match=r"tokens must have shape \(batch, length\), got \(129,\)"):
        _forward(model, tokens[0])


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


@pytest.mark.parametrize("changes, message", [
    (dict(model_type="bert", architectures=["BertModel"]), "unsupported architecture"),
    (dict(rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}), "rope_scaling type 'yarn'"),
    (dict(hidden_size=32, head_dim=8), "shape"),
])
def test_bad_config(tmp_path, changes, message):
    tiny_llama(tmp_path)
    _edit_config(tmp_path, **changes)
    with pytest.raises(ValueError, match=message):
        load_hf_dir(str(tmp_path), "cpu", torch.float32)


@pytest.mark.parametrize("low", [2.0, 16 / (2 * math.pi)])
def test_llama3_rope_with_equal_freq_factors(tmp_path, low):
    """low_freq_factor == high_freq_factor: the smooth band shrinks to the one wavelength 16 / low. Where no frequency
    falls on it transformers' frequencies are a step between the two scalings, matched exactly; where one does
    (2 pi / inv_freq_0 = 2 pi = 16 / low) transformers computes NaN (0 / 0), and the config is refused."""
    from transformers.modeling_rope_utils import _compute_llama3_parameters

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": low, "high_freq_factor": low,
               "original_max_position_embeddings": 16}
    hf = tiny_llama(tmp_path, rope_scaling=scaling)
    expected, _ = _compute_llama3_parameters(hf.config, "cpu")
    if expected.isfinite().all():
        model, _ = load_hf_dir(str(tmp_path), "cpu", torch.float32)
        assert torch.equal(model.rotary.inv_freq, expected)
        base = 1.0 / 10000.0 ** (torch.arange(0, 16, 2).float() / 16)
        assert (expected == base).any() and (expected == base / 8).any()   # a step: kept or divided by factor
    else:
        with pytest.raises(ValueError, match=r"config\.json: rope_scaling low_freq_factor == high_freq_factor"):
            load_hf_dir(str(tmp_path), "cpu", torch.float32)


def test_missing_and_corrupt_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_hf_dir(str(tmp_path), "cpu", torch.float32)
    tiny_llama(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_hf_dir(str(tmp_path), "cpu", torch.float32)
    tiny_llama(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        load_hf_dir(str(tmp_path), "cpu", torch.float32)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        load_hf_dir(str(tmp_path), "cpu", torch.float32)


def test_sharded_checkpoint(tmp_path):
    hf = tiny_llama(tmp_path / "one")
    hf.save_pretrained(str(tmp_path / "sharded"), safe_serialization=True, max_shard_size="40KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").exists()
    a, cfg = load_hf_dir(str(tmp_path / "one"), "cpu", torch.float32)
    b, _ = load_hf_dir(str(tmp_path / "sharded"), "cpu", torch.float32)
    tokens = torch.randint(0, cfg.vocab_size, (1, 7))
    assert torch.equal(_forward(a, tokens), _forward(b, tokens))


@pytest.mark.parametrize("kind", ["static", "paged"])
def test_prefill_into_chosen_rows_leaves_the_others(tmp_path, kind):
    """A sequence prefilled into a free row while another row is mid-generation: both continue as if alone
    (what a continuous-batching server does)."""
    tiny_llama(tmp_path)
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    a, b = [5, 6, 7, 8, 9], [10, 11, 12]
    with torch.inference_mode():
        cache = _new_cache(model, kind, 2, 16)
        if kind == "paged":
            cache.release(1)
        model.prefill([a], cache, rows=[0])
        cache.release(1)
        model.decode(torch.tensor([13, 0]), cache)                       # row 1 is free: its step is ignored
        got_b = model.prefill([b], cache, rows=[1])[0]
        if kind == "paged":
            assert cache.reserve(1, 4)                               # the prefill reserved the prompt's blocks
        step = model.decode(torch.tensor([14, 15]), cache)
        assert cache.lengths.tolist() == [7, 4]
        torch.testing.assert_close(got_b, _forward(model, torch.tensor([b]))[0, -1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step[0], _forward(model, torch.tensor([a + [13, 14]]))[0, -1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(step[1], _forward(model, torch.tensor([b + [15]]))[0, -1], rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="rows must name 1 distinct cache rows"):
            model.prefill([b], cache, rows=[2])


def test_paged_decode_past_the_reserved_blocks_is_refused(tmp_path):
    """A row whose next position lies past its reserved blocks would write into the shared scratch block (and
    read back another row's keys): decode refuses it instead, naming the row; after reserve it goes on."""
    tiny_llama(tmp_path)
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    with torch.inference_mode():
        cache = model.new_cache(2, 16, block_size=4, num_blocks=8)
        model.prefill([[5, 6, 7, 8], [9, 10]], cache)                # row 0 fills its one block
        with pytest.raises(ValueError, match="row 0 .* 1 block"):
            model.decode(torch.tensor([1, 2]), cache)
        assert cache.lengths.tolist() == [4, 2]                      # nothing written
        assert cache.reserve(0, 5)
        step = model.decode(torch.tensor([1, 2]), cache)
        torch.testing.assert_close(step[0], _forward(model, torch.tensor([[5, 6, 7, 8, 1]]))[0, -1], rtol=1e-4,
                                   atol=1e-5)
