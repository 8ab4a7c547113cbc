"""fastllm's GPT-2 (fastllm/models/gpt2.py) loaded from a Hugging Face directory against transformers, fp32:
whole-sequence logits, prefill + decode steps through the static KV cache, greedy generation."""
import torch

from fastllm import LLM
from fastllm.loading.safetensors import load_hf_dir
from tiny_models import tiny_gpt2


def test_logits_match_transformers(tmp_path):
    hf = tiny_gpt2(tmp_path)
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    assert cfg.arch == "gpt2" and cfg.tie_word_embeddings
    tokens = torch.randint(0, cfg.vocab_size, (2, 13), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        out = model(tokens)
        ref = hf(tokens).logits
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_prefill_and_decode_steps_equal_full_recompute(tmp_path):
    tiny_gpt2(tmp_path)
    model, cfg = load_hf_dir(str(tmp_path), "cpu", torch.float32)
    lens, steps = [5, 2, 8], 4
    seqs = [torch.randint(0, cfg.vocab_size, (n + steps,), generator=torch.Generator().manual_seed(n)) for n in lens]
    with torch.inference_mode():
        cache = model.new_cache(len(lens), max(lens) + steps)
        got = [model.prefill([s[:n].tolist() for s, n in zip(seqs, lens)], cache)]
        for t in range(steps - 1):
            got.append(model.decode(torch.stack([s[n + t] for s, n in zip(seqs, lens)]), cache))
        for b, (s, n) in enumerate(zip(seqs, lens)):
            full = model(s[None, :n + steps - 1])[0, n - 1:]
            torch.testing.assert_close(torch.stack([g[b] for g in got]), full, rtol=1e-4, atol=1e-5)


def test_greedy_generation_matches_transformers(tmp_path):
    hf = tiny_gpt2(tmp_path)
    llm = LLM.load(str(tmp_path), device="cpu", dtype=torch.float32)
    prompt = llm.tokenizer.encode("the quick brown fox")
    ours = llm.generate_ids([prompt], max_new_tokens=12)[0]
    with torch.no_grad():
        ids = torch.tensor([prompt])
        ref = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=False,
                          eos_token_id=None, pad_token_id=1)[0, len(prompt):].tolist()
    assert ours == ref
