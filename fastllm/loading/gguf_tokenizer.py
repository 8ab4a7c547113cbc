"""The tokenizer embedded in a GGUF file (llama.cpp's tokenizer.ggml.* keys), rebuilt as a `tokenizers`
object, for the two kinds llama-architecture files carry (tokenizer.ggml.model):

    "gpt2"   byte-level BPE (SmolLM2, Llama 3): tokens spelled in the GPT-2 byte alphabet, merges in the
             file, a pre-tokenizer regular expression named by tokenizer.ggml.pre.
    "llama"  SentencePiece BPE (Llama 2, TinyLlama, Mistral): tokens spelled in UTF-8 with U+2581 "▁" for a
             space, a score per token, <0xXX> byte tokens for characters outside the vocabulary, usually
             no merges. llama.cpp tokenises such text by repeatedly joining the adjacent pair whose join
             is the highest-scoring token; a BPE whose merges are ranked by that score does the same, so
             the merges are derived from the scores (`merges_from_scores`). Text: spaces -> "▁" and one
             "▁" prepended (tokenizer.ggml.add_space_prefix, default true), no split into words; decoding
             reverses it (▁ -> space, byte tokens -> bytes -> UTF-8, the prepended space stripped).

Control (type 3) and unknown (type 2) tokens become special tokens, user-defined ones (type 4) added
tokens, both matched whole in the text; add_bos/add_eos become a post-processor (BOS by default for
"llama", as llama.cpp and transformers do when the file does not say).
"""
from __future__ import annotations

from .tokenizer import Tokenizer

TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_BYTE = 1, 2, 3, 4, 6
"""tokenizer.ggml.token_type values (llama.cpp's llama_token_type)."""

SPACE = "\u2581"
"""SentencePiece's visible space, "▁"."""

# Pre-tokenizer regular expression of Llama 3 style BPE vocabularies (tokenizer.ggml.pre "llama-bpe").
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges (left, right), best first, for a SentencePiece vocabulary: every split of a normal
    token into two normal tokens, ranked by the joined token's score (higher first; on equal scores the
    longer left piece first, then token order). Byte, control and unknown tokens are never the result of
    a merge, so text like "<0x41>" or "<s>" typed by a user stays text."""
    normal = {t: i for i, (t, ty) in enumerate(zip(tokens, types)) if ty == TOKEN_NORMAL}
    merges = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                merges.append((-scores[i], -len(left), -len(right), i, normal[left], normal[right], left, right))
    merges.sort()
    return [(m[-2], m[-1]) for m in merges]


def _special(meta: dict, tokens: list[str], key: str, path: str) -> tuple[str, int] | None:
    """(text, id) of the special token tokenizer.ggml.{key}_token_id, None when absent; ValueError out of range."""
    i = meta.get(f"tokenizer.ggml.{key}_token_id")
    if i is not None and (isinstance(i, bool) or not isinstance(i, int)):
        raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id must be an integer, got {i!r}")
    if i is not None and not 0 <= i < len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.{key}_token_id {i} is outside the vocabulary of {len(tokens)}")
    return None if i is None else (tokens[int(i)], int(i))


def _byte_level(meta: dict, tokens: list[str], types: list[int], path: str):
    from tokenizers import Regex, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    pre = meta.get("tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre_tokenizer = {
        "default": byte_level, "gpt-2": byte_level,
        "smollm": pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level]),
        "llama-bpe": pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]),
    }.get(pre)
    if pre_tokenizer is None:
        raise ValueError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported yet (supported: default, gpt-2, "
                         "smollm, llama-bpe)")
    merges = _merges(meta, path) or []
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, ignore_merges=pre == "llama-bpe"))
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece(meta: dict, tokens: list[str], types: list[int], path: str):
    from tokenizers import decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    scores = meta.get("tokenizer.ggml.scores")
    if scores is None or len(scores) != len(tokens):
        raise ValueError(f"{path}: a 'llama' (SentencePiece) GGUF tokenizer needs tokenizer.ggml.scores, one per "
                         f"token ({len(tokens)}), got {None if scores is None else len(scores)}")
    if not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in scores):
        raise ValueError(f"{path}: tokenizer.ggml.scores must be numbers")
    merges = _merges(meta, path) or merges_from_scores(tokens, list(scores), types)
    unk = _special(meta, tokens, "unknown", path)
    tok = HFTokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges, fuse_unk=True, byte_fallback=True,
                                 unk_token=unk[0] if unk is not None else None))
    prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first" if prefix else "never",
                                                 split=False)
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    tok.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tok


def _merges(meta: dict, path: str) -> list[tuple[str, str]] | None:
    """tokenizer.ggml.merges as (left, right) pairs: each entry is "left right"."""
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    if not isinstance(merges, list) or not all(isinstance(m, str) and " " in m for m in merges):
        bad = next((m for m in merges if not (isinstance(m, str) and " " in m)), merges) \
            if isinstance(merges, list) else merges
        raise ValueError(f"{path}: tokenizer.ggml.merges must be strings \"left right\", got {bad!r}")
    return [tuple(m.split(" ", 1)) for m in merges]


_KINDS = {"gpt2": (_byte_level, False), "llama": (_sentencepiece, True)}
"""tokenizer.ggml.model -> (builder, whether BOS is added when the file has no add_bos_token)."""


def tokenizer_from_metadata(meta: dict, path: str = "") -> Tokenizer:
    """A fastllm Tokenizer from the GGUF metadata {key: value} (the tokenizer.* keys are read)."""
    from tokenizers import AddedToken, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind not in _KINDS:
        raise ValueError(f"{path}: GGUF tokenizer model {kind!r} is not supported (supported: "
                         f"{', '.join(sorted(_KINDS))})")
    build, bos_by_default = _KINDS[kind]
    if "tokenizer.ggml.tokens" not in meta:
        raise ValueError(f"{path}: the GGUF metadata lacks tokenizer.ggml.tokens")
    tokens = meta["tokenizer.ggml.tokens"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) for t in tokens):
        raise ValueError(f"{path}: tokenizer.ggml.tokens must be a non-empty array of strings")
    types = meta.get("tokenizer.ggml.token_type", [TOKEN_NORMAL] * len(tokens))
    if not isinstance(types, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in types):
        raise ValueError(f"{path}: tokenizer.ggml.token_type must be an array of integers")
    if len(types) != len(tokens):
        raise ValueError(f"{path}: tokenizer.ggml.token_type has {len(types)} entries for {len(tokens)} tokens")
    try:
        tok = build(meta, tokens, types, path)
    except ValueError:
        raise
    except Exception as e:  # the tokenizers package raises plain Exceptions on inconsistent vocabularies/merges
        raise ValueError(f"{path}: the GGUF tokenizer (tokenizer.ggml.tokens / merges) is inconsistent: {e}") from None
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types)
                            if ty == TOKEN_CONTROL or (ty == TOKEN_UNKNOWN and kind == "llama")])
    tok.add_tokens([AddedToken(t, normalized=False) for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED])

    bos, eos = _special(meta, tokens, "bos", path), _special(meta, tokens, "eos", path)
    add_bos = bos is not None and bool(meta.get("tokenizer.ggml.add_bos_token", bos_by_default))
    add_eos = eos is not None and bool(meta.get("tokenizer.ggml.add_eos_token", False))
    if add_bos or add_eos:
        single = " ".join([bos[0]] * add_bos + ["$A"] + [eos[0]] * add_eos)
        tok.post_processor = processors.TemplateProcessing(
            single=single, special_tokens=[t for t, on in ((bos, add_bos), (eos, add_eos)) if on])
    names = {"bos_token": "bos", "eos_token": "eos", "unk_token": "unknown", "pad_token": "padding"}
    specials = {name: (_special(meta, tokens, key, path) or (None,))[0] for name, key in names.items()}
    return Tokenizer(tok, meta.get("tokenizer.chat_template"), specials)
