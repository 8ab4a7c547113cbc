"""Tiny random-weight Hugging Face models saved offline into a directory, for the runtime tests:
a LlamaForCausalLM from a LlamaConfig (transformers as the oracle) and a byte-level BPE tokenizer
trained on a few sentences, with a chat template."""
from __future__ import annotations

import json

import torch

TEXT = ("the quick brown fox jumps over the lazy dog. a cat sat on the mat and looked at the dog. "
        "hello world, this is a tiny tokenizer for tests; numbers 0123456789 too!") * 4
VOCAB = 320
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ eos_token }}"
                 "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}")


def save_tokenizer(path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<s>", "</s>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([TEXT], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "chat_template": CHAT_TEMPLATE}))


def tiny_llama(path, seed: int = 0, **overrides):
    """Save a random LlamaForCausalLM (+ tokenizer) into `path`; returns the transformers model (fp32, eval)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    args = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                bos_token_id=0, eos_token_id=1, rms_norm_eps=1e-5)
    args.update(overrides)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**args)).eval()
    with torch.no_grad():  # larger weights than the default init, so that logits differ visibly between tokens
        for p in model.parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    model.save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(path)
    return model


def tiny_gpt2(path, seed: int = 0, **overrides):
    """Save a random GPT2LMHeadModel (+ tokenizer) into `path`; returns the transformers model (fp32, eval)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    args = dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=1)
    args.update(overrides)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(**args)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, 0.2 if p.dim() > 1 else 1.0)
    model.save_pretrained(str(path), safe_serialization=True)
    save_tokenizer(path)
    return model
