"""Checks of what callers hand to generation (the library's LLM and the server share them): text, stop strings,
token ids and chat messages. Each raises TypeError / ValueError naming the argument, before any model work.

    check_text(text, name)           a str that UTF-8 can encode (a lone surrogate such as "\\ud800" cannot)
    stop_strings(stop)               None, a str, or a list/tuple of str -> tuple[str, ...]
    token_ids(ids, vocab_size, name) a list/tuple of ints in [0, vocab_size) -> list[int]
    chat_messages(messages)          [{"role", "content"}, ...] with OpenAI content parts joined into text
    encode_chat(tokenizer, messages) the messages' token ids through the chat template; its failures -> ValueError
"""
from __future__ import annotations

import numbers


def check_text(text, name: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"{name} must be a str, got {type(text).__name__}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{name} is not valid Unicode text: {e.reason} at character {e.start} "
                         f"({text[e.start:e.end]!r})") from None
    return text


def stop_strings(stop) -> tuple[str, ...]:
    """The stop strings as a tuple: stop is None, one str, or a list/tuple of str."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        return (check_text(stop, "stop"),)
    if not isinstance(stop, (list, tuple)):
        raise TypeError(f"stop must be a str or a list of str, got {type(stop).__name__}")
    return tuple(check_text(s, f"stop[{i}]") for i, s in enumerate(stop))


def token_ids(ids, vocab_size: int, name: str) -> list[int]:
    """ids as a list of Python ints, each an integer (not a bool or float) in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)) or not isinstance(ids, (list, tuple)):
        raise TypeError(f"{name} must be a list of token ids (ints), got {type(ids).__name__}")
    out = []
    for j, t in enumerate(ids):
        if isinstance(t, bool) or not isinstance(t, numbers.Integral):
            raise TypeError(f"{name}[{j}] must be an int token id, got {type(t).__name__} {t!r}")
        if not 0 <= t < vocab_size:
            raise ValueError(f"{name}[{j}] is token id {t}, outside the model's vocabulary of {vocab_size} "
                             f"ids [0, {vocab_size})")
        out.append(int(t))
    return out


def _content_text(content, name: str) -> str:
    """A message's content as text: a str, or OpenAI's content parts [{"type": "text", "text": ...}, ...] joined."""
    if isinstance(content, str):
        return check_text(content, name)
    if content is None:
        raise ValueError(f"{name} is None: give the message's text")
    if not isinstance(content, (list, tuple)):
        raise TypeError(f"{name} must be a str or a list of text parts, got {type(content).__name__}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or part.get("type") != "text":
            raise ValueError(f"{name}[{j}] must be a text part {{'type': 'text', 'text': ...}} (the only kind "
                             f"supported), got {part!r:.80}")
        texts.append(check_text(part.get("text"), f"{name}[{j}]['text']"))
    return "".join(texts)


def chat_messages(messages) -> list[dict]:
    """A conversation checked and ready for a chat template: a non-empty list of dicts, each with a str role and
    a content (str or text parts, given as one str); other keys pass through. Content None is allowed only
    beside tool_calls (an assistant's call, which the template renders)."""
    if isinstance(messages, (str, dict)) or not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts with 'role' and 'content', got {type(messages).__name__}")
    if not messages:
        raise ValueError("messages is empty: give at least one message")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise TypeError(f"messages[{i}] must be a dict with 'role' and 'content', got {type(m).__name__}")
        check_text(m.get("role"), f"messages[{i}]['role']")
        if "content" not in m:
            raise ValueError(f"messages[{i}] has no 'content'")
        if m["content"] is None and m.get("tool_calls"):
            out.append(dict(m))
            continue
        out.append({**m, "content": _content_text(m["content"], f"messages[{i}]['content']")})
    return out


def encode_chat(tokenizer, messages) -> list[int]:
    """Token ids of the conversation rendered by the tokenizer's chat template. The template's own refusals
    stay ValueErrors; anything else it raises (a template that is not a string, jinja2 syntax or undefined
    errors, errors inside its expressions) becomes a ValueError naming the chat template."""
    messages = chat_messages(messages)
    try:
        return tokenizer.encode_chat(messages)
    except ValueError:
        raise
    except Exception as e:
        raise ValueError(f"the model's chat template cannot render these messages: {type(e).__name__}: {e}") from e
