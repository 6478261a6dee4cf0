"""The tokenizer a GGUF file describes in its metadata, rebuilt as a `tokenizers.Tokenizer`.

llama.cpp stores a vocabulary as metadata: `tokenizer.ggml.model` (its kind), `.tokens`,
`.token_type`, `.merges` (or `.scores`), the special token ids and whether to add BOS/EOS,
and `tokenizer.ggml.pre`, the rule that splits text into words before the merges. Two
kinds are rebuilt here, following transformers' GGUF tokenizer loader
(`transformers/integrations/gguf/gguf_tokenizer_mapping.py`) so that both give the same ids:

  "gpt2"   byte-level BPE (GPT-2, Llama 3, SmolLM): tokens spelled in GPT-2's byte alphabet;
  "llama"  SentencePiece-style BPE (Llama 1 and 2, Mistral): "▁" marks a space, the tokens
           <0x00>..<0xFF> spell bytes that have no token of their own. In a Gemma file
           (general.architecture gemma, gemma2, gemma3) as transformers' GemmaTokenizer:
           every space becomes "▁" with no prefix space, tokens of spaces alone (stored as
           "  ") are spelled "▁▁", and the merges follow the tokens' order in the file (its
           scores do not give the merge order).

Where llama.cpp splits text differently from transformers (the "smollm" family splits every
digit apart) this follows llama.cpp, which is what the model was trained with.
"""

from __future__ import annotations

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from mqa import data
from mqa.convert.errors import ConvertError

KINDS = ("gpt2", "llama")
GEMMA = ("gemma", "gemma2", "gemma3")  # general.architecture values with Gemma's tokenizer

# llama.cpp's token types (gguf.TokenType).
UNKNOWN, CONTROL, USER_DEFINED = 2, 3, 4

# GPT-2's split, applied by pre_tokenizers.ByteLevel(use_regex=True).
_GPT2 = ("gpt2", "default", "mpt", "olmo", "jais")
# llama.cpp splits every digit apart, then applies GPT-2's split (llama-vocab.cpp).
_DIGITS = ("smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva")
# Llama 3's split; the regex as transformers' GGUF loader has it.
_LLAMA3 = ("llama3", "llama-v3", "llama-bpe", "falcon3", "smaug-bpe", "dbrx", "pixtral")
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def gguf_tokenizer(metadata: dict) -> tuple[tokenizers.Tokenizer | None, list[str]]:
    """(the tokenizer, notes for the user) from GGUF metadata {key: value}; (None, [note])
    when the file has no vocabulary. An unsupported kind is a ConvertError."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind is None or "tokenizer.ggml.tokens" not in metadata:
        return None, ["the file has no tokenizer.ggml.model/tokens metadata; the workdir has no "
                      "tokenizer"]
    if kind not in KINDS:
        raise ConvertError(f"tokenizer.ggml.model={kind!r} is not supported; valid: 'gpt2' "
                           "(byte-level BPE), 'llama' (SentencePiece-style BPE)")
    notes = []
    if kind == "gpt2":
        tokenizer = _byte_level(metadata, notes)
    elif metadata.get("general.architecture") in GEMMA:
        metadata = _gemma_spelling(metadata)
        tokenizer = _gemma(metadata)
    else:
        tokenizer = _sentencepiece(metadata)
    _add_special_tokens(tokenizer, metadata, byte_level=kind == "gpt2")
    notes += _set_post_processor(tokenizer, metadata, add_bos_default=kind == "llama")
    return tokenizer, notes


def _byte_level(metadata: dict, notes: list[str]) -> tokenizers.Tokenizer:
    chars = data.byte_level_chars()  # byte -> its character in GPT-2's alphabet
    alphabet = set(chars)

    def spelled(token: str) -> str:  # a token written in plain text, as some files have
        return token if set(token) <= alphabet else "".join(chars[b] for b in token.encode("utf-8"))

    vocab = {spelled(token): i for i, token in enumerate(metadata["tokenizer.ggml.tokens"])}
    tokenizer = tokenizers.Tokenizer(models.BPE(
        vocab, _merges(metadata, vocab), dropout=None, continuing_subword_prefix="",
        end_of_word_suffix="", fuse_unk=False))
    pre = metadata.get("tokenizer.ggml.pre")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre in _DIGITS:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in _LLAMA3:
        tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2 and pre is not None:
            notes.append(f"tokenizer.ggml.pre={pre!r} is not a known split rule; splitting text "
                         "with GPT-2's, as transformers does; ids may differ from llama.cpp's")
        tokenizer.pre_tokenizer = byte_level
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _byte_fallback_bpe(metadata: dict) -> tokenizers.Tokenizer:
    """SentencePiece-style BPE: unknown pieces fused, bytes spelled <0x..> when no token has
    them; the pre-tokenizer and decoder are the caller's."""
    tokens = metadata["tokenizer.ggml.tokens"]
    vocab = {token: i for i, token in enumerate(tokens)}
    unk = metadata.get("tokenizer.ggml.unknown_token_id")
    return tokenizers.Tokenizer(models.BPE(
        vocab, _merges(metadata, vocab), dropout=None, fuse_unk=True, byte_fallback=True,
        unk_token=tokens[unk] if unk is not None and unk < len(tokens) else None))


def _sentencepiece(metadata: dict) -> tokenizers.Tokenizer:
    tokenizer = _byte_fallback_bpe(metadata)
    prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="first" if prefix else "never", split=False)
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    tokenizer.decoder = decoders.Sequence(steps + ([decoders.Strip(" ", 1, 0)] if prefix else []))
    return tokenizer


def _gemma_spelling(metadata: dict) -> dict:
    """The metadata with tokens of spaces alone spelled with "▁", and scores that rank the
    tokens in file order (what the merges follow), as transformers' GGUF loader has them."""
    tokens = ["▁" * len(t) if " " in t and not t.strip() else t
              for t in metadata["tokenizer.ggml.tokens"]]
    return {**metadata, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.scores": [-float(i) for i in range(len(tokens))]}


def _gemma(metadata: dict) -> tokenizers.Tokenizer:
    tokenizer = _byte_fallback_bpe(metadata)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    tokenizer.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
    tokenizer.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    return tokenizer


def _merges(metadata: dict, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges, or (SentencePiece files have none) the ones its scores imply: every
    split of a token into two tokens, best-scored token first, as transformers derives them."""
    if "tokenizer.ggml.merges" in metadata:
        merges = [tuple(merge.split(" ")) for merge in metadata["tokenizer.ggml.merges"]]
        bad = next((m for m in merges if len(m) != 2), None)
        if bad is not None:
            raise ConvertError(f"tokenizer.ggml.merges entry {' '.join(bad)!r} is not two tokens "
                               "separated by one space")
        return merges
    if "tokenizer.ggml.scores" not in metadata:
        raise ConvertError("the tokenizer has neither tokenizer.ggml.merges nor "
                           "tokenizer.ggml.scores; cannot rebuild its merges")
    scores = dict(zip(metadata["tokenizer.ggml.tokens"], metadata["tokenizer.ggml.scores"]))
    merges = []
    for token, score in scores.items():
        pairs = [(token[:i], token[i:], score) for i in range(1, len(token))
                 if token[:i] in vocab and token[i:] in vocab]
        merges += sorted(pairs, key=lambda pair: (vocab[pair[0]], vocab[pair[1]]))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(left, right) for left, right, _ in merges]


def _special_ids(metadata: dict) -> dict[str, int]:
    tokens = metadata["tokenizer.ggml.tokens"]
    ids = {name: metadata.get(f"tokenizer.ggml.{name}_token_id")
           for name in ("bos", "eos", "unknown", "padding")}
    return {name: i for name, i in ids.items() if i is not None and 0 <= i < len(tokens)}


def _add_special_tokens(tokenizer: tokenizers.Tokenizer, metadata: dict, byte_level: bool) -> None:
    """Control tokens (and BOS, EOS, UNK, PAD) are special: matched whole in text, skipped
    when decoding with skip_special_tokens; user-defined ones are matched whole too."""
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [0] * len(tokens)
    alphabet = set(data.byte_level_chars())
    # A control token outside the byte alphabet in a byte-level vocabulary is a llama.cpp
    # mislabel (transformers skips it too): adding it would grow the vocabulary.
    special = [i for i, kind in enumerate(types)
               if kind == CONTROL and (not byte_level or set(tokens[i]) <= alphabet)]
    special += [i for i in _special_ids(metadata).values() if i not in special]
    vocab = tokenizer.get_vocab()
    special = [tokens[i] for i in sorted(special) if tokens[i] in vocab]
    if special:
        tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in special])
    user = [token for token, kind in zip(tokens, types) if kind == USER_DEFINED and token in vocab]
    if user:
        tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])


def _set_post_processor(tokenizer: tokenizers.Tokenizer, metadata: dict,
                        add_bos_default: bool) -> list[str]:
    """BOS/EOS around each text when the file says to add them (SentencePiece files that do
    not say add BOS, as llama.cpp and transformers do); `encode(text)` then adds them and
    `encode(text, add_special_tokens=False)` does not."""
    tokens, ids = metadata["tokenizer.ggml.tokens"], _special_ids(metadata)
    add = {"bos": bool(metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)),
           "eos": bool(metadata.get("tokenizer.ggml.add_eos_token", False))}
    notes = [f"tokenizer.ggml.add_{name}_token is set but the file has no {name}_token_id; "
             f"no {name.upper()} is added" for name in add if add[name] and name not in ids]
    add = {name: on and name in ids for name, on in add.items()}
    if not any(add.values()):
        return notes
    def template(sequence: str, type_id: int) -> list[str]:
        return ([f"{tokens[ids['bos']]}:{type_id}"] if add["bos"] else []) + [
            f"${sequence}:{type_id}"] + ([f"{tokens[ids['eos']]}:{type_id}"] if add["eos"] else [])

    single, pair = template("A", 0), template("A", 0) + template("B", 1)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(tokens[ids[name]], ids[name]) for name in ("bos", "eos") if add[name]])
    if add["bos"]:
        notes.append(f"the model expects BOS {tokens[ids['bos']]!r} first: tokenizer.json adds it "
                     "when encoding with special tokens, eval.py (--text, --sample) puts it "
                     "before each window and prompt; mqa's tokenizer.encode adds none")
    return notes
