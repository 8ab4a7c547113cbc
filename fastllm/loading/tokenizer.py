"""Tokenizer: the `tokenizers` package for text <-> ids, and the chat template rendered with jinja2 the
way transformers renders it (variables messages, add_generation_prompt, tools and the special tokens), in the
bounded sandbox of chat_template.py.
Built from a Hugging Face directory (tokenizer.json + tokenizer_config.json / chat_template.jinja) or,
by fastllm/loading/gguf.py, from the vocabulary embedded in a GGUF file."""
from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as _HFTokenizer

from ..models.config import read_json
from . import chat_template


def _token_text(tok) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
    return tok.get("content") if isinstance(tok, dict) else tok


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level alphabet, character -> byte: the printable Latin-1 bytes stand for themselves,
    the other bytes (controls, space, ...) for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


def _decoder_steps(tokenizer: _HFTokenizer) -> list[dict]:
    """The `tokenizers` decoder as a flat list of its steps' JSON descriptions."""
    if tokenizer.decoder is None:
        return []
    spec = json.loads(tokenizer.decoder.__getstate__())
    return spec["decoders"] if spec["type"] == "Sequence" else [spec]


class Tokenizer:
    def __init__(self, tokenizer: _HFTokenizer, chat_template: str | None = None,
                 special_tokens: dict[str, str | None] | None = None):
        """special_tokens: {"bos_token": text, "eos_token": text, ...} for the chat template."""
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items() if v is not None}
        self._template = None
        self._token_bytes = None

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for in decoded text, without the decoder's context-dependent steps
        (a prefix space stripped at the start): a byte-level BPE token through GPT-2's byte alphabet, a
        SentencePiece "<0xXX>" byte token as that byte, "▁" as a space. A token may hold part of a UTF-8
        character, so this is bytes (as OpenAI's logprobs report them), not text."""
        if self._token_bytes is None:
            steps = _decoder_steps(self.tokenizer)
            kinds = {s["type"] for s in steps}
            alphabet = _byte_level_alphabet() if "ByteLevel" in kinds else None
            replaces = [(s["pattern"]["String"], s["content"]) for s in steps
                        if s["type"] == "Replace" and "String" in s["pattern"]]

            def convert(token: str) -> bytes:
                if alphabet is not None and all(c in alphabet for c in token):
                    return bytes(alphabet[c] for c in token)
                if "ByteFallback" in kinds and len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
                    return bytes([int(token[3:5], 16)])
                for pattern, content in replaces:
                    token = token.replace(pattern, content)
                return token.encode("utf-8")

            self._token_bytes = convert
        token = self.tokenizer.id_to_token(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.vocab_size}")
        return self._token_bytes(token)

    def token_id(self, text: str | None) -> int | None:
        return None if text is None else self.tokenizer.token_to_id(text)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for a conversation [{"role": ..., "content": ...}, ...]."""
        if not self.chat_template:
            raise ValueError("this model's tokenizer has no chat template; use generate() with plain text")
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise TypeError("messages must be a list of dicts with 'role' and 'content'")
        if self._template is None:
            self._template = chat_template.compile_template(self.chat_template)
        return chat_template.render(self._template, messages=list(messages),
                                    add_generation_prompt=add_generation_prompt, tools=None, **self.special_tokens)

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """Token ids of the rendered conversation (the template writes any BOS itself, as transformers does)."""
        return self.encode(self.apply_chat_template(messages), add_special_tokens=False)

    @classmethod
    def from_hf_dir(cls, path: str) -> "Tokenizer":
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise FileNotFoundError(f"{file} does not exist (fastllm reads tokenizers in the tokenizer.json format)")
        try:
            tok = _HFTokenizer.from_file(file)
        except Exception as e:  # the tokenizers package raises a plain Exception for malformed files
            raise ValueError(f"{file} is not a valid tokenizer.json: {e}") from None
        model_config = os.path.join(path, "config.json")
        if os.path.isfile(model_config):  # ids past the model's embedding rows would fail (or index garbage) later
            from ..models.config import ModelConfig

            vocab = ModelConfig.from_hf_dir(path).vocab_size
            top = max(tok.get_vocab(with_added_tokens=True).values(), default=-1)
            if top >= vocab:
                raise ValueError(f"{file} has token id {top}, beyond the vocab_size {vocab} of {model_config}")
        config_file = os.path.join(path, "tokenizer_config.json")
        config = read_json(config_file) if os.path.exists(config_file) else {}
        template = config.get("chat_template")
        if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
            template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                            None)
        if template is not None and not isinstance(template, str):
            raise ValueError(f"{config_file}: chat_template must be a string, got {type(template).__name__}")
        jinja_file = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                template = f.read()
        specials = {k: _token_text(config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
        return cls(tok, template, specials)
