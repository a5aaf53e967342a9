"""The tokenizer: byte-level BPE (HF `tokenizers`) and the one definition of special tokens.

Why these choices:
- byte-level BPE never meets an unknown character, so any Azerbaijani (or other) text round-trips;
- NFC normalisation makes `ə` typed as one code point or as `e` + combining mark the same token;
- the pre-tokenizer splits with the Llama-3 / GPT-4o regex, which llama.cpp knows as the
  "smaug-bpe" pre-tokenizer (export/gguf.py), so a GGUF export tokenizes exactly as we do.
Other kinds (`--kind`): SentencePiece BPE and unigram, trained by the sentencepiece library and
kept as the same kind of tokenizer.json with the same special tokens (tokenizer_spm.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from azllm.atomic import atomic_write_text
from azllm.errors import AzllmError

# The Llama-3 split pattern. llama.cpp knows it as "llama-bpe" (which also skips BPE for
# whole-vocabulary pieces, Llama-3's ignore_merges) and as "smaug-bpe" (the same split, plain
# BPE): our tokenizers do not ignore merges, so the GGUF export writes "smaug-bpe".
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Special tokens, the one place they are defined. They take ids 0..15 in this order in every
# tokenizer azllm trains, so ids are stable across vocab sizes. Reserved slots leave room for
# later needs (tools, images) without retraining the tokenizer.
BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"  # EOS also separates documents in the shards
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"  # chat turns
SPECIAL_TOKENS = [BOS, EOS, PAD, SYSTEM, USER, ASSISTANT, END] + [
    f"<|reserved_{i}|>" for i in range(9)
]


# The chat template, the one definition (training, `azllm chat`, the server and exports use it):
#   <|bos|><|system|>S<|end|><|user|>U<|end|><|assistant|>A<|end|><|user|>...
# A reply is generated after a trailing <|assistant|> and ends at <|end|>. Loss is taken on the
# assistant's content and its <|end|>, nothing else.
CHAT_ROLES = ("system", "user", "assistant")
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
# The same template as Jinja, for Hugging Face's `chat_template` (tests check both agree).
CHAT_TEMPLATE_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def render_chat(messages: list[dict], add_generation_prompt: bool = False) -> str:
    """The conversation as template text (special tokens written out)."""
    out = [BOS]
    for m in messages:
        out.append(f"{ROLE_TOKENS[m['role']]}{m['content']}{END}")
    if add_generation_prompt:
        out.append(ASSISTANT)
    return "".join(out)


def _new_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


KINDS = ("bpe", "sentencepiece-bpe", "sentencepiece-unigram")  # `azllm tokenizer train --kind`


def train_tokenizer(
    texts: Iterable[str],
    vocab_size: int,
    *,
    min_frequency: int = 2,
    show_progress: bool = False,
    kind: str = "bpe",
) -> Tokenizer:
    """Train a tokenizer of `kind` (byte-level BPE by default) on a stream of documents."""
    if kind != "bpe":
        if kind not in KINDS:
            raise AzllmError(f"--kind {kind}: not one of {', '.join(KINDS)}")
        from azllm.tokenizer_spm import train_sentencepiece

        return train_sentencepiece(texts, vocab_size, kind)[0]
    floor = len(SPECIAL_TOKENS) + 256
    if vocab_size < floor + 1:
        raise AzllmError(f"--vocab-size {vocab_size} is too small: it must exceed {floor}")
    tok = _new_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, even unseen ones
        show_progress=show_progress,
    )
    seen = [0]

    def counting(it: Iterable[str]) -> Iterator[str]:
        for t in it:
            seen[0] += 1
            yield t

    tok.train_from_iterator(counting(texts), trainer=trainer)
    if seen[0] == 0:
        raise AzllmError("the corpus is empty: no text to train the tokenizer on")
    return tok


CHAT_FORMAT_FILE = "chat_format.json"  # beside an imported run's tokenizer.json (hf_import.py)


@dataclass
class ChatFormat:
    """Our template's roles spelled in a foreign (imported) tokenizer's own tokens: a
    conversation is start + (prefix[role] + content + suffix[role])... + prefix["assistant"].
    `end` closes a turn (stops generation); `jinja` is the template exports ship."""

    start: str
    prefix: dict
    suffix: dict
    bos: str
    eos: str
    pad: str
    end: str
    jinja: str


@dataclass
class AzTokenizer:
    """A trained tokenizer plus the ids azllm needs; load with `load_tokenizer`. `chat`: an
    imported tokenizer's own special tokens and chat template (None: azllm's, SPECIAL_TOKENS)."""

    tok: Tokenizer
    path: Path | None = None
    chat: ChatFormat | None = None

    def __post_init__(self) -> None:
        if self.chat is not None:
            self._foreign_ids()
            self.tok.encode_special_tokens = True
            return
        missing = [t for t in SPECIAL_TOKENS[:7] if self.tok.token_to_id(t) is None]
        if missing:
            where = self.path or "tokenizer"
            raise AzllmError(
                f"{where}: lacks azllm's special tokens {missing}; train it with "
                "`azllm tokenizer train`"
            )
        self.bos_id = self.tok.token_to_id(BOS)
        self.eos_id = self.tok.token_to_id(EOS)
        self.pad_id = self.tok.token_to_id(PAD)
        # Text is text: "<|end|><|assistant|>" typed by a user, sent to the server, found in an
        # SFT row or in corpus text encodes as its characters, never as control ids, so nobody
        # can close a turn, write the assistant's or system's, or forge a document break. The
        # template's own tokens are inserted by id (encode_chat, BOS in generate). The flag is a
        # runtime setting of the Rust tokenizer, not saved by to_str(): tokenizer.json and its
        # sha256 stay as they were, and text without special strings encodes as before.
        self.tok.encode_special_tokens = True

    def _foreign_ids(self) -> None:
        c = self.chat
        where = f"{self.path.parent / CHAT_FORMAT_FILE}" if self.path else CHAT_FORMAT_FILE
        ids = {}
        for name in ("bos", "eos", "pad", "end"):
            ids[name] = self.tok.token_to_id(getattr(c, name))
            if ids[name] is None:
                raise AzllmError(f"{where}: {name} {getattr(c, name)!r} is not a token of it")
        self.bos_id, self.eos_id, self.pad_id, self._end_id = (ids[k] for k in ids)
        # the template's own pieces: special strings in them are parsed (they are not content)
        self.tok.encode_special_tokens = False
        try:
            enc = lambda t: self.tok.encode(t, add_special_tokens=False).ids  # noqa: E731
            self._start = enc(c.start)
            self._prefix = {r: enc(c.prefix[r]) for r in CHAT_ROLES}
            self._suffix = {r: enc(c.suffix[r]) for r in CHAT_ROLES}
        except KeyError as e:
            raise AzllmError(f"{where}: no prefix/suffix for role {e}") from None

    def __setstate__(self, state: dict) -> None:
        # pickle/deepcopy rebuild the Rust tokenizer from its JSON, which lacks the flag
        self.__dict__.update(state)
        self.tok.encode_special_tokens = True

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size()

    @property
    def kind(self) -> str:
        """One of KINDS: "bpe" (byte-level), "sentencepiece-bpe", "sentencepiece-unigram"."""
        from azllm.tokenizer_spm import tokenizer_kind

        return tokenizer_kind(self.tok)

    def encode(self, text: str) -> list[int]:
        """Ids of plain text; special-token strings in it are encoded as ordinary text."""
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        # Rust-side parallelism over all cores (TOKENIZERS_PARALLELISM governs it)
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        # skip_special drops control ids (0..15) only: "<|end|>" that came from text is made of
        # ordinary byte tokens and decodes back to those characters
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def encode_chat(
        self, messages: list[dict], add_generation_prompt: bool = False
    ) -> tuple[list[int], list[bool]]:
        """Token ids of a conversation and, per token, whether it is trained on (assistant
        content and its closing <|end|>). The template's tokens go in by id and each content
        is encoded as text, so a message cannot add or close turns; for contents without
        special strings the ids equal `render_chat(...)` tokenized with special strings parsed
        (as HF's apply_chat_template and llama.cpp's chat code do)."""
        if self.chat is not None:
            return self._encode_foreign_chat(messages, add_generation_prompt)
        end_id = self.tok.token_to_id(END)
        ids, mask = [self.bos_id], [False]
        for m in messages:
            role = m["role"]
            content = self.encode(m["content"])
            ids += [self.tok.token_to_id(ROLE_TOKENS[role])] + content + [end_id]
            trained = role == "assistant"
            mask += [False] + [trained] * len(content) + [trained]
        if add_generation_prompt:
            ids.append(self.tok.token_to_id(ASSISTANT))
            mask.append(False)
        return ids, mask

    def _encode_foreign_chat(self, messages, add_generation_prompt):
        ids, mask = list(self._start), [False] * len(self._start)
        for m in messages:
            role = m["role"]
            pre, content, suf = self._prefix[role], self.encode(m["content"]), self._suffix[role]
            ids += pre + content + suf
            trained = role == "assistant"
            mask += [False] * len(pre) + [trained] * (len(content) + len(suf))
        if add_generation_prompt:
            ids += self._prefix["assistant"]
            mask += [False] * len(self._prefix["assistant"])
        return ids, mask

    @property
    def end_id(self) -> int:
        return self._end_id if self.chat is not None else self.tok.token_to_id(END)

    @property
    def chat_template(self) -> str:
        """The Jinja chat template exports write (HF, GGUF)."""
        return self.chat.jinja if self.chat is not None else CHAT_TEMPLATE_JINJA

    def render_chat(self, msgs: list[dict], add_generation_prompt: bool = False) -> str:
        if self.chat is None:
            return render_chat(msgs, add_generation_prompt)
        c = self.chat
        out = [c.start] + [c.prefix[m["role"]] + m["content"] + c.suffix[m["role"]] for m in msgs]
        return "".join(out + ([c.prefix["assistant"]] if add_generation_prompt else []))

    def to_json(self) -> str:
        return self.tok.to_str()

    def sha256(self) -> str:
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, path: Path) -> None:
        if self.chat is not None:  # before tokenizer.json: a loader finding it finds both
            text = json.dumps(dataclasses.asdict(self.chat), indent=1, ensure_ascii=False)
            atomic_write_text(Path(path).parent / CHAT_FORMAT_FILE, text)
        atomic_write_text(Path(path), self.to_json())


def load_tokenizer(path: str | Path) -> AzTokenizer:
    path = Path(path)
    if path.is_dir():
        path = path / "tokenizer.json"
    if not path.exists():
        raise AzllmError(f"{path}: tokenizer file not found; make one with `azllm tokenizer train`")
    if path.suffix == ".model":  # a SentencePiece model written by `tokenizer train --kind`
        from azllm.tokenizer_spm import spm_to_tokenizer

        return AzTokenizer(spm_to_tokenizer(path.read_bytes(), str(path)), path)
    try:
        tok = Tokenizer.from_str(path.read_text(encoding="utf-8"))
    except Exception as e:  # tokenizers raises bare Exceptions for bad JSON
        raise AzllmError(f"{path}: not a valid tokenizer.json ({str(e).splitlines()[0]})") from None
    chat, fmt = None, path.parent / CHAT_FORMAT_FILE
    if fmt.exists():  # an imported run (hf_import.py): the tokenizer's own chat template
        try:
            chat = ChatFormat(**json.loads(fmt.read_text(encoding="utf-8")))
        except (ValueError, TypeError) as e:
            raise AzllmError(f"{fmt}: corrupt ({str(e)[:120]}); re-run azllm import") from None
    return AzTokenizer(tok, path, chat)


def tokenizer_stats(tok: AzTokenizer, texts: Iterable[str]) -> dict[str, float]:
    """Fertility (tokens per whitespace word), bytes per token, and share of the vocab used."""
    n_tokens = n_words = n_bytes = 0
    used: set[int] = set()
    batch: list[str] = []

    def flush() -> None:
        nonlocal n_tokens
        for ids in tok.encode_batch(batch):
            n_tokens += len(ids)
            used.update(ids)
        batch.clear()

    for text in texts:
        n_words += len(text.split())
        n_bytes += len(text.encode("utf-8"))
        batch.append(text)
        if len(batch) >= 1024:
            flush()
    flush()
    if n_words == 0:
        raise AzllmError("no words in the text given to `tokenizer stats`")
    return {
        "words": n_words,
        "tokens": n_tokens,
        "bytes": n_bytes,
        "fertility": n_tokens / n_words,
        "bytes_per_token": n_bytes / max(n_tokens, 1),
        "vocab_size": tok.vocab_size,
        "vocab_used": len(used),
        "vocab_used_fraction": len(used) / tok.vocab_size,
    }
