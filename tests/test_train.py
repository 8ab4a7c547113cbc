"""fastllm.train.finetune on the tiny random Llama: the loss goes down on a small corpus, and a run resumed from a
checkpoint continues exactly as the uninterrupted run."""
import json
import os

import pytest
import torch

import fastllm
from fastllm.train import finetune, load_blocks, lr_factor
from tiny_models import tiny_llama

CORPUS = os.path.join(os.path.dirname(__file__), "data", "tiny_corpus.txt")
SMALL = dict(batch_size=4, seq_len=32, lr=3e-3, warmup=3, progress=False)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llama")
    tiny_llama(path)
    return path


def _load(model_dir):
    return fastllm.LLM.load(str(model_dir), device="cpu", dtype=torch.float32)


def test_loss_goes_down_and_plot_written(model_dir, tmp_path):
    llm = _load(model_dir)
    out = finetune(llm.model, CORPUS, llm.tokenizer, steps=30, accum=2, out_dir=str(tmp_path), **SMALL)
    assert len(out.losses) == 30 and all(torch.isfinite(torch.tensor(out.losses)))
    first, last = sum(out.losses[:5]) / 5, sum(out.losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert out.plot and os.path.getsize(out.plot) > 1000
    assert not llm.model.training
    ids = llm.generate_ids([llm.tokenizer.encode("the quick")], max_new_tokens=4)[0]  # still generates
    assert 1 <= len(ids) <= 4 and all(0 <= t < llm.config.vocab_size for t in ids)


def test_resume_continues_identically(model_dir, tmp_path):
    llm = _load(model_dir)
    full = finetune(llm.model, CORPUS, llm.tokenizer, steps=8, out_dir=str(tmp_path), save_every=4, **SMALL)
    trained = {n: p.detach().clone() for n, p in llm.model.named_parameters()}
    llm = _load(model_dir)
    resumed = finetune(llm.model, CORPUS, llm.tokenizer, steps=8, resume=str(tmp_path / "step4"), **SMALL)
    assert resumed.losses == full.losses  # bit-identical on CPU
    for name, p in llm.model.named_parameters():
        assert torch.equal(p, trained[name]), name


def test_data_formats(model_dir, tmp_path):
    tok = _load(model_dir).tokenizer
    rows = [{"text": "the cat sat on the mat"}, {"messages": [{"role": "user", "content": "hello"},
                                                             {"role": "assistant", "content": "hello world"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows * 5))
    blocks = load_blocks(str(path), tok, 8, eos=1)
    assert blocks.shape[1] == 9 and blocks.dtype == torch.long
    assert torch.equal(blocks[0, -1], blocks[1, 0])  # blocks overlap by one token
    assert (blocks == 1).any()  # documents end with EOS
    (tmp_path / "bad.jsonl").write_text('{"txt": 1}\n')
    with pytest.raises(ValueError, match="bad.jsonl:1"):
        load_blocks(str(tmp_path / "bad.jsonl"), tok, 8)
    with pytest.raises(ValueError, match="seq_len"):
        load_blocks(CORPUS, tok, 0)
    with pytest.raises(ValueError, match="fewer than one block"):
        load_blocks(CORPUS, tok, 10 ** 6)


def test_lr_schedule():
    f = [lr_factor(s, 4, 20, 0.1) for s in range(21)]
    assert f[0] == 0.25 and f[3] == 1.0 and f[4] == 1.0
    assert all(a >= b for a, b in zip(f[4:], f[5:])) and abs(f[20] - 0.1) < 1e-12


def test_cli_train(model_dir, tmp_path):
    from fastllm.cli import main

    out = tmp_path / "run"
    assert main(["train", CORPUS, "-m", str(model_dir), "--device", "cpu", "--out", str(out), "--steps", "3",
                 "--batch-size", "2", "--seq-len", "16"]) == 0
    assert (out / "final" / "model.safetensors").exists() and (out / "loss.png").exists()
    assert main(["train", str(tmp_path / "missing.txt"), "-m", str(model_dir), "--device", "cpu"]) == 2
