"""open_clip's CLIP tokenizer (`SimpleTokenizer`: byte-level BPE over its shipped vocabulary) without torch.

One module for every side that turns prompts into token ids: `patcher export` checks it against open_clip's
tokenizer on the run's prompts, `patcher triton` copies it beside the text model's model.py (as
`patcher_tokenizer.py`, with the vocabulary file), and `patcher classify --run` / `patcher embed --run` use it in
process. Cleaning and splitting are open_clip's: ftfy's `fix_text` and the `regex` module's pattern when those
packages are there (they come with open_clip); without them a stdlib rendering is used, which differs only on
mojibake (text decoded with the wrong codec, which ftfy repairs) and on characters newer than this Python's
Unicode database. Imports numpy and the standard library only.
"""

from __future__ import annotations

import gzip
import html
import itertools
import string
import unicodedata
from collections.abc import Callable
from pathlib import Path

import numpy as np

VOCABULARY_FILE = "bpe_simple_vocab_16e6.txt.gz"  # open_clip's, copied beside the exported text model
MERGES = 49152 - 256 - 2  # how many merge rules open_clip reads from the vocabulary
SPECIAL = ("<start_of_text>", "<end_of_text>")
CLEANINGS = ("lower", "whitespace", "canonicalize")
CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
# What ftfy.fix_text does to ordinary text, for the stdlib fallback (ftfy.chardata's tables)
_LIGATURES = {0x132: "IJ", 0x133: "ij", 0x149: "ʼn", 0x1F1: "DZ", 0x1F2: "Dz", 0x1F3: "dz", 0x1C4: "DŽ",
              0x1C5: "Dž", 0x1C6: "dž", 0x1C7: "LJ", 0x1C8: "Lj", 0x1C9: "lj", 0x1CA: "NJ", 0x1CB: "Nj",
              0x1CC: "nj", 0xFB00: "ff", 0xFB01: "fi", 0xFB02: "fl", 0xFB03: "ffi", 0xFB04: "ffl", 0xFB05: "ſt",
              0xFB06: "st"}
_QUOTES = {**{c: "'" for c in (0x2BC, 0x2018, 0x2019, 0x201A, 0x201B)}, **{c: '"' for c in range(0x201C, 0x2020)}}
_CONTROL = {*range(0x0, 0x9), 0xB, *range(0xE, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD)}
_FOLDS = {"ſ": "s", "K": "k"}  # non-ASCII characters that simple case folding maps onto ASCII letters


MAX_WORD_BYTES = 64  # BPE costs about n^2 in a word's length: a 4,000-letter word took 6.5 s; 64 bytes take ~1 ms


class PromptError(ValueError):
    """A prompt the text model refuses; the message names the limit."""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters, as open_clip builds it."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars = printable[:]
    extra = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, (chr(c) for c in chars), strict=True))


def _stdlib_fix_text(text: str) -> str:
    """ftfy.fix_text's effect on text that is not mojibake: NFC, ligatures, full-width forms, curly quotes, control
    characters removed."""
    text = html.unescape(text) if "<" not in text else text
    text = unicodedata.normalize("NFC", text)
    out = []
    for char in text:
        code = ord(char)
        if code in _CONTROL:
            continue
        if code in _LIGATURES:
            out.append(_LIGATURES[code])
        elif code == 0x3000 or 0xFF01 <= code <= 0xFFEF:
            out.append(unicodedata.normalize("NFKC", char))
        else:
            out.append(_QUOTES.get(code, char))
    return "".join(out)


def _fix_text() -> Callable[[str], str]:
    try:
        import ftfy
    except ImportError:
        return _stdlib_fix_text
    return ftfy.fix_text


def _kind(char: str) -> str:
    """L (letter), N (number), S (space) or O (anything else), as the regex pattern's classes see a character."""
    category = unicodedata.category(char)
    if category[0] in "LN":
        return category[0]
    return "S" if char.isspace() else "O"


def _same_ascii(text: str, start: int, word: str) -> bool:
    """True when text[start:] begins with `word` (ASCII) under simple case folding."""
    if start + len(word) > len(text):
        return False
    return all(_FOLDS.get(c, c.lower()) == w for c, w in zip(text[start : start + len(word)], word, strict=True))


def stdlib_split(text: str) -> list[str]:
    """open_clip's pattern `<special>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+` (IGNORECASE)."""
    pieces, index = [], 0
    while index < len(text):
        matched = next((w for w in (*SPECIAL, *CONTRACTIONS) if _same_ascii(text, index, w)), None)
        if matched is not None:
            pieces.append(text[index : index + len(matched)])
            index += len(matched)
            continue
        kind = _kind(text[index])
        end = index + 1
        if kind == "S":
            index = end
            continue
        if kind != "N":
            while end < len(text) and _kind(text[end]) == kind:
                end += 1
        pieces.append(text[index:end])
        index = end
    return pieces


def _splitter() -> Callable[[str], list[str]]:
    try:
        import regex
    except ImportError:
        return stdlib_split
    pattern = regex.compile("|".join(SPECIAL) + r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
                            regex.IGNORECASE)
    return lambda text: pattern.findall(text)


def canonicalize(text: str) -> str:
    """open_clip's `canonicalize_text`: underscores to spaces, punctuation removed, lower case, spaces collapsed."""
    text = text.replace("_", " ").translate(str.maketrans("", "", string.punctuation)).lower()
    return " ".join(text.split()).strip()


class ClipTokenizer:
    """Prompts to token ids [N, context_length] int64, as open_clip's SimpleTokenizer does (start, BPE, end, zeros)."""

    def __init__(self, vocabulary: Path, context_length: int, clean: str = "lower", exact: bool = True) -> None:
        with gzip.open(vocabulary) as handle:
            lines = handle.read().decode("utf-8").split("\n")[1 : MERGES + 1]
        merges = [tuple(line.split()) for line in lines]
        byte_chars = list(bytes_to_unicode().values())
        vocab = [*byte_chars, *(c + "</w>" for c in byte_chars), *("".join(m) for m in merges), *SPECIAL]
        self.encoder = {token: index for index, token in enumerate(vocab)}
        self.ranks = {merge: rank for rank, merge in enumerate(merges)}
        self.byte_encoder = bytes_to_unicode()
        self.sot, self.eot = self.encoder[SPECIAL[0]], self.encoder[SPECIAL[1]]
        self.context_length = int(context_length)
        if clean not in CLEANINGS:
            raise ValueError(f"tokenizer cleaning {clean!r} is not one of {', '.join(CLEANINGS)}")
        self.clean_mode = clean
        self.fix_text = _fix_text() if exact else _stdlib_fix_text
        self.split = _splitter() if exact else stdlib_split
        self.cache: dict[str, str] = {token: token for token in SPECIAL}

    def clean(self, text: str) -> str:
        """open_clip's cleaning: ftfy, HTML entities twice, then spaces collapsed (and lower case, or canonical)."""
        text = html.unescape(html.unescape(self.fix_text(text))).strip()
        if self.clean_mode == "canonicalize":
            return canonicalize(text)
        text = " ".join(text.split()).strip()
        return text.lower() if self.clean_mode == "lower" else text

    def bpe(self, token: str) -> str:
        """One pre-token's BPE pieces, space-separated (the last one marked `</w>`)."""
        if token in self.cache:
            return self.cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        while len(word) > 1:
            pairs = set(itertools.pairwise(word))
            best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
            if best not in self.ranks:
                break
            merged, index = [], 0
            while index < len(word):
                if index < len(word) - 1 and (word[index], word[index + 1]) == best:
                    merged.append(word[index] + word[index + 1])
                    index += 2
                else:
                    merged.append(word[index])
                    index += 1
            word = tuple(merged)
        pieces = " ".join(word)
        if len(self.cache) < 100_000:
            self.cache[token] = pieces
        return pieces

    def encode(self, text: str, limit: int | None = None, max_word_bytes: int | None = None) -> list[int]:
        """Token ids of one prompt, without the start and end tokens; once `limit` are found the rest is not
        encoded. PromptError for a word longer than `max_word_bytes`, checked before its BPE."""
        ids: list[int] = []
        for piece in self.split(self.clean(text)):
            raw = piece.encode("utf-8")
            if max_word_bytes is not None and len(raw) > max_word_bytes:
                raise PromptError(f"word {_shown(piece, 30)} is {len(raw)} bytes long, more than "
                                  f"MAX_WORD_BYTES={max_word_bytes} (no real word is; the tokenizer's cost grows "
                                  "with the square of a word's length)")
            chars = "".join(self.byte_encoder[b] for b in raw)
            ids += [self.encoder[part] for part in self.bpe(chars).split(" ")]
            if limit is not None and len(ids) >= limit:
                return ids[:limit]
        return ids

    def token_count(self, text: str) -> int:
        """Tokens of the prompt with start and end: more than context_length means open_clip truncates it."""
        return len(self.encode(text)) + 2

    def __call__(self, texts: list[str], truncate: bool = True, strict: bool = False) -> np.ndarray:
        """[N, context_length] int64: start, tokens, end, zeros; a prompt too long is cut with the end token last
        (open_clip's behaviour) when `truncate`, else PromptError naming it, its length and the context.
        `strict` (what a server takes from clients): PromptError for a word over MAX_WORD_BYTES (before its BPE) and
        for a prompt without tokens."""
        result = np.zeros((len(texts), self.context_length), dtype=np.int64)
        for row, text in enumerate(texts):
            try:  # one token past the context is enough to know it is too long: the rest is never encoded
                ids = self.encode(text, self.context_length - 1, MAX_WORD_BYTES if strict else None)
            except PromptError as error:
                raise PromptError(f"item {row}: prompt {_shown(text)}: {error}") from None
            tokens = [self.sot, *ids, self.eot]
            if strict and len(tokens) == 2:
                raise PromptError(f"item {row}: prompt {_shown(text)} has no tokens (only spaces or control "
                                  "characters): give a label with letters or digits")
            if len(tokens) > self.context_length:
                if not truncate:
                    raise PromptError(f"item {row}: prompt {_shown(text)} has over {self.context_length} tokens, "
                                      f"more than the model's context_length={self.context_length} (open_clip "
                                      "would truncate it, dropping its end)")
                tokens = [*tokens[: self.context_length - 1], self.eot]
            result[row, : len(tokens)] = tokens
        return result


def _shown(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def decode_prompts(items: list[bytes], max_bytes: int) -> list[str]:
    """BYTES tensor items as prompts; PromptError naming the first that is empty, too long or not UTF-8."""
    texts = []
    for index, item in enumerate(items):
        if len(item) > max_bytes:
            raise PromptError(f"item {index}: prompt of {len(item)} bytes exceeds max_prompt_bytes={max_bytes}")
        try:
            text = item.decode("utf-8")
        except UnicodeDecodeError as error:
            raise PromptError(f"item {index}: prompt is not UTF-8 (byte {error.start}: "
                              f"{item[error.start:error.start + 1]!r})") from None
        if not text.strip():
            raise PromptError(f"item {index}: prompt is empty")
        texts.append(text)
    return texts


def file_sha256(path: Path) -> str:
    """sha256 of a file (the vocabulary), without importing anything of patcher."""
    import hashlib

    return hashlib.sha256(Path(path).read_bytes()).hexdigest()

