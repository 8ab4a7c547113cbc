"""`fastllm generate` and `fastllm chat` on a tiny random Llama directory; errors are reported, not raised."""
import pytest
import torch

import fastllm
from fastllm.cli import main
from tiny_models import tiny_llama


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_cli")
    tiny_llama(path, eos_token_id=None)
    return str(path)


def test_generate(model_dir, capsys):
    assert main(["generate", "the dog", "-m", model_dir, "--max-new-tokens", "8", "--device", "cpu"]) == 0
    expected = fastllm.LLM.load(model_dir, device="cpu").generate("the dog", max_new_tokens=8)
    assert capsys.readouterr().out == expected + "\n"


def test_generate_int8_activations_and_cache(model_dir, capsys, monkeypatch):
    """--act int8 --kv-cache int8 reach LLM.load (a float model's layers are not quantised: act changes nothing)."""
    load, seen = fastllm.LLM.load, []
    monkeypatch.setattr(fastllm.LLM, "load", lambda *a, **kw: seen.append(kw) or load(*a, **kw))
    args = ["generate", "the dog", "-m", model_dir, "--max-new-tokens", "8", "--device", "cpu"]
    assert main(args + ["--act", "int8", "--kv-cache", "int8"]) == 0
    assert seen == [dict(device="cpu", act="int8", kv_cache="int8", dtype=None)]
    llm = load(model_dir, device="cpu", act="int8", kv_cache="int8")
    assert capsys.readouterr().out == llm.generate("the dog", max_new_tokens=8) + "\n"


def test_generate_in_bfloat16(model_dir, capsys, monkeypatch):
    """--dtype bfloat16 reaches LLM.load as torch.bfloat16 and the text is that model's."""
    load, seen = fastllm.LLM.load, []
    monkeypatch.setattr(fastllm.LLM, "load", lambda *a, **kw: seen.append(kw) or load(*a, **kw))
    assert main(["generate", "the dog", "-m", model_dir, "--max-new-tokens", "8", "--device", "cpu",
                 "--dtype", "bfloat16"]) == 0
    assert seen == [dict(device="cpu", act="float", kv_cache=None, dtype=torch.bfloat16)]
    llm = load(model_dir, device="cpu", dtype=torch.bfloat16)
    assert llm.model.tok_embeddings.weight.dtype == torch.bfloat16
    assert capsys.readouterr().out == llm.generate("the dog", max_new_tokens=8) + "\n"


def test_chat(model_dir, capsys, monkeypatch):
    lines = iter(["hello", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    assert main(["chat", "-m", model_dir, "--max-new-tokens", "6", "--device", "cpu"]) == 0
    llm = fastllm.LLM.load(model_dir, device="cpu")
    assert capsys.readouterr().out == llm.chat([{"role": "user", "content": "hello"}], max_new_tokens=6) + "\n"


def test_errors_are_reported(tmp_path, capsys):
    assert main(["generate", "hi", "-m", str(tmp_path / "nothing")]) == 2
    assert "neither a model directory" in capsys.readouterr().err
    assert main(["generate", "hi", "-m", str(tmp_path)]) == 2
    assert "config.json does not exist" in capsys.readouterr().err
