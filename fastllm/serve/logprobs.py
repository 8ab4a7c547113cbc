"""Log-probabilities in OpenAI's response shapes, from the engine's entries (scheduler.py)
(token id, logprob, [(top id, top logprob)] * k):

    completions  {"tokens": [text], "token_logprobs": [lp], "top_logprobs": [{text: lp}], "text_offset": [i]}
                 (each top_logprobs dict holds the k most likely tokens and the chosen one, as OpenAI's; a dict
                 keys on text, so of two tokens spelled alike it keeps the more likely one)
    chat         {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}],
                  "refusal": None}

A token's text is its bytes (Tokenizer.token_bytes) decoded as UTF-8, a partial character shown as U+FFFD;
chat entries carry the exact bytes too. text_offset counts characters of the generated text from 0.
"""
from __future__ import annotations


def _text(tokenizer, token_id: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_bytes(token_id)
    return raw.decode("utf-8", errors="replace"), list(raw)


class CompletionLogprobs:
    """Formats entries for /v1/completions, keeping text_offset running across streamed chunks."""

    def __init__(self, tokenizer):
        self.tokenizer, self.offset = tokenizer, 0

    def __call__(self, entries: list) -> dict:
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, lp, top in entries:
            text = _text(self.tokenizer, token_id)[0]
            alternatives = {}
            for i, v in [*top, (token_id, lp)]:  # two tokens of the same text keep the higher logprob
                alternatives.setdefault(_text(self.tokenizer, i)[0], v)
            out["tokens"].append(text)
            out["token_logprobs"].append(lp)
            out["top_logprobs"].append(alternatives)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def chat_logprobs(tokenizer, entries: list) -> dict:
    """Formats entries for /v1/chat/completions."""
    def item(token_id, lp):
        text, raw = _text(tokenizer, token_id)
        return {"token": text, "logprob": lp, "bytes": raw}

    return {"content": [{**item(t, lp), "top_logprobs": [item(i, v) for i, v in top]} for t, lp, top in entries],
            "refusal": None}
