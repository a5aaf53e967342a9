"""SentencePiece tokenizers (`--kind sentencepiece-bpe|sentencepiece-unigram`), trained with the
real `sentencepiece` library and kept as a Hugging Face `tokenizers` Tokenizer, so a run still has
one RUN/tokenizer.json and every later stage (shards, chat template, SFT, serve, HF export) loads
it unchanged through azllm.tokenizer.AzTokenizer.

Why these settings:
- ids 0..15 are azllm's special tokens (bos/eos/pad as SentencePiece's own, the rest as control
  symbols), 16 is SentencePiece's required <unk>, 17..272 the 256 byte pieces <0x00>..<0xFF>:
  byte fallback, so no text is ever unknown; learned pieces follow;
- normalisation "identity" after our own NFC (the same normalizer the BPE kind has): the built-in
  rules are NFKC-based and rewrite compatibility characters, and NFC keeps ə ı ğ ş ç ö ü İ intact;
- no dummy-prefix space and no whitespace folding: "Salam" encodes without a leading "▁" and
  runs of spaces survive, so decode(encode(text)) == NFC(text) and token texts concatenate
  (streaming decode, chat contents encoded one by one) exactly as with byte-level BPE.
SentencePiece reads sentences, so training text is split into lines; a newline is never a piece
and always encodes as the byte token <0x0A>, here and in SentencePiece itself.

The conversion is checked, not assumed: tests and bench/tokenizer_kinds.py compare the Tokenizer
with sentencepiece's own processor line by line on real text.
"""

from __future__ import annotations

import io
import json
import struct
import unicodedata
from collections.abc import Iterable, Iterator

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers

from azllm.errors import AzllmError

SPM_KINDS = {"sentencepiece-bpe": "bpe", "sentencepiece-unigram": "unigram"}
UNK = "<unk>"
# SentencePiece's piece types (sentencepiece_model.proto), the same numbers as GGUF token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Unigram score given, in the Tokenizer, to pieces SentencePiece never matches in text (special,
# <unk>, byte pieces): HF's Unigram puts every vocabulary entry in its trie, so "<|end|>" typed
# by a user would otherwise become the control token. Log-probabilities of real pieces are > -50,
# so any path of real pieces beats one through these, provided every character of their names
# is a piece: all printable ASCII is required in the vocabulary (an unknown character would
# score below them: HF scores it min(all scores) - 10).
HIDDEN_SCORE = -1e4
ASCII = "".join(chr(c) for c in range(0x21, 0x7F))


def _special_tokens() -> list[str]:
    from azllm.tokenizer import SPECIAL_TOKENS  # tokenizer.py imports this module

    return SPECIAL_TOKENS


def require_sentencepiece():
    """The sentencepiece library, needed to train or read a .model (not to use tokenizer.json)."""
    try:
        import sentencepiece
    except ImportError:
        raise AzllmError(
            "SentencePiece tokenizers need the sentencepiece package: pip install 'azllm[spm]'"
        ) from None
    return sentencepiece


def _lines(texts: Iterable[str], seen: list[int]) -> Iterator[str]:
    for text in texts:
        seen[0] += 1
        for line in unicodedata.normalize("NFC", text).split("\n"):
            if line.strip():
                yield line


def train_sentencepiece(
    texts: Iterable[str], vocab_size: int, kind: str, *, threads: int = 1
) -> tuple[Tokenizer, bytes]:
    """Train a SentencePiece model; return (the Tokenizer, the .model file's bytes)."""
    spm = require_sentencepiece()

    specials = _special_tokens()
    floor = len(specials) + 1 + 256 + len(ASCII)
    if vocab_size < floor + 1:
        raise AzllmError(f"--vocab-size {vocab_size} is too small: it must exceed {floor}")
    seen, out = [0], io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_lines(texts, seen),
            model_writer=out,
            model_type=SPM_KINDS[kind],
            vocab_size=vocab_size,
            byte_fallback=True,
            character_coverage=0.9995,  # rarer characters are left to the byte pieces
            required_chars=ASCII,
            normalization_rule_name="identity",
            add_dummy_prefix=False,
            remove_extra_whitespaces=False,
            bos_id=0,
            eos_id=1,
            pad_id=2,
            unk_id=len(specials),
            bos_piece=specials[0],
            eos_piece=specials[1],
            pad_piece=specials[2],
            unk_piece=UNK,
            control_symbols=specials[3:],
            max_sentence_length=1 << 16,
            # sentencepiece holds its sentences in memory: past this many lines it samples
            input_sentence_size=5_000_000,
            shuffle_input_sentence=True,
            num_threads=threads,
            minloglevel=2,
        )
    except RuntimeError as e:
        if seen[0] == 0:
            raise AzllmError("the corpus is empty: no text to train the tokenizer on") from None
        msg = str(e).splitlines()[0].split("] ")[-1].strip()
        if "Vocabulary size too high" in msg:
            most = msg.rsplit("<=", 1)[-1].strip(" .")
            raise AzllmError(
                f"--vocab-size {vocab_size}: the corpus can fill at most {most} "
                f"{kind} pieces; lower --vocab-size or give more text"
            ) from None
        raise AzllmError(f"sentencepiece could not train the tokenizer: {msg}") from None
    data = out.getvalue()
    return spm_to_tokenizer(data, "the trained model"), data


# ---- reading a .model file (protobuf, read by hand: no protobuf dependency) ------------------


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of one protobuf message: varints as int, the rest as bytes."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        wire = key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            value, i = buf[i : i + n], i + n
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i : i + n], i + n
        else:
            raise ValueError(f"wire type {wire}")
        if i > len(buf):
            raise ValueError("truncated")
        yield key >> 3, value


def read_spm_model(data: bytes) -> dict:
    """The parts of a sentencepiece ModelProto azllm uses: pieces (text, score, type), the
    model type, byte fallback and the normalizer's settings (proto2 defaults where absent)."""
    pieces, spec = [], {"model_type": 1, "byte_fallback": False}
    norm = {"name": "", "add_dummy_prefix": True, "remove_extra_whitespaces": True}
    for num, value in _fields(data):
        if num == 1:  # SentencePiece {piece = 1; score = 2; type = 3}
            piece = {"text": "", "score": 0.0, "type": NORMAL}
            for n, v in _fields(value):
                if n == 1:
                    piece["text"] = v.decode("utf-8")
                elif n == 2:
                    piece["score"] = struct.unpack("<f", v)[0]
                elif n == 3:
                    piece["type"] = v
            pieces.append(piece)
        elif num == 2:  # TrainerSpec {model_type = 3; byte_fallback = 35}
            for n, v in _fields(value):
                if n == 3:
                    spec["model_type"] = v
                elif n == 35:
                    spec["byte_fallback"] = bool(v)
        elif num == 3:  # NormalizerSpec {name = 1; add_dummy_prefix = 3; remove_extra_ws = 4}
            for n, v in _fields(value):
                if n == 1:
                    norm["name"] = v.decode("utf-8")
                elif n == 3:
                    norm["add_dummy_prefix"] = bool(v)
                elif n == 4:
                    norm["remove_extra_whitespaces"] = bool(v)
    return {"pieces": pieces, **spec, "normalizer": norm}


def spm_to_tokenizer(data: bytes, where: str) -> Tokenizer:
    """A SentencePiece model made by `azllm tokenizer train` as an equivalent HF Tokenizer."""
    spm = require_sentencepiece()

    fix = "train one with `azllm tokenizer train --kind sentencepiece-bpe|sentencepiece-unigram`"
    try:
        spm.SentencePieceProcessor(model_proto=data)  # sentencepiece's own validation
        model = read_spm_model(data)
    except (RuntimeError, ValueError, IndexError, UnicodeDecodeError):
        raise AzllmError(f"{where}: not a SentencePiece model file; {fix}") from None
    pieces, specials = model["pieces"], _special_tokens()
    kind = {1: "unigram", 2: "bpe"}.get(model["model_type"])
    norm = model["normalizer"]
    texts = [p["text"] for p in pieces]
    problem = None
    if kind is None:
        problem = f"model type {model['model_type']} is neither unigram nor bpe"
    elif texts[: len(specials) + 1] != [*specials, UNK]:
        problem = f"ids 0..{len(specials)} are not azllm's special tokens and <unk>"
    elif not model["byte_fallback"]:
        problem = "it has no byte fallback"
    elif norm["name"] != "identity" or norm["add_dummy_prefix"] or norm["remove_extra_whitespaces"]:
        problem = "its normalizer is not identity without dummy prefix and whitespace folding"
    if problem:
        raise AzllmError(f"{where}: {problem}; {fix}")

    if kind == "unigram":
        vocab = [(p["text"], p["score"] if p["type"] == NORMAL else HIDDEN_SCORE) for p in pieces]
        tok = Tokenizer(models.Unigram(vocab, unk_id=texts.index(UNK), byte_fallback=True))
    else:
        tok = Tokenizer(
            models.BPE(
                {t: i for i, t in enumerate(texts)},
                spm_bpe_merges(pieces),
                unk_token=UNK,
                byte_fallback=True,
            )
        )
    tok.normalizer = normalizers.NFC()
    # split=False: one sequence per text, as SentencePiece encodes it (no word boundaries)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="never", split=False
    )
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    )
    tok.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in [*specials, UNK]]
    )
    return tok


def spm_bpe_merges(pieces: list[dict]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges the adjacent pair whose joined piece has the highest score;
    HF's BPE applies the lowest-ranked merge. Ranking every split (a, b) of each normal piece by
    that piece's score (ties: lower id) makes the two pick the same pair. SentencePiece breaks
    a tie between two pairs forming the same piece by position, HF by rank: a corner the
    line-by-line comparisons count."""
    normal = {p["text"]: i for i, p in enumerate(pieces) if p["type"] == NORMAL}
    ranked = []
    for text, i in normal.items():
        for k in range(1, len(text)):
            a, b = text[:k], text[k:]
            if a in normal and b in normal:
                ranked.append((-pieces[i]["score"], i, normal[a], normal[b], a, b))
    ranked.sort()
    return [(a, b) for *_, a, b in ranked]


# ---- which kind a tokenizer.json is ------------------------------------------------------------


def tokenizer_kind(tok: Tokenizer) -> str:
    """The kind: "bpe" (byte-level BPE), "sentencepiece-bpe" or "sentencepiece-unigram"."""
    spec = json.loads(tok.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "Metaspace" and pre.get("prepend_scheme") == "never":
        if spec["model"]["type"] == "Unigram":
            return "sentencepiece-unigram"
        if spec["model"].get("byte_fallback"):
            return "sentencepiece-bpe"
    return "bpe"  # azllm's byte-level BPE (or a foreign tokenizer: exports check its details)


def spm_vocab(tok: Tokenizer) -> tuple[list[str], list[float], list[int]]:
    """(pieces, scores, SentencePiece/GGUF token types) in id order, for llama.cpp's "llama"
    (SentencePiece BPE) vocabulary. Scores: llama.cpp merges the pair whose joined piece scores
    highest, so a normal piece's score is minus its id (the order the merges are ranked in)."""
    spec = json.loads(tok.to_str())
    specials = set(_special_tokens())
    vocab = tok.get_vocab(with_added_tokens=True)
    pieces = [""] * len(vocab)
    for text, i in vocab.items():
        pieces[i] = text
    types = []
    for text in pieces:
        if text in specials:
            types.append(CONTROL)
        elif text == UNK:
            types.append(UNKNOWN)
        elif len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    if spec["model"]["type"] == "Unigram":
        scores = [float(s) for _, s in spec["model"]["vocab"]]
    else:
        scores = [-float(i) if t == NORMAL else 0.0 for i, t in enumerate(types)]
    return pieces, scores, types
