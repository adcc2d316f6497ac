"""A character-level tokenizer for the tiny default policy (no downloads).

Every printable ASCII character is one token, plus a few symbols common in geometry
problems. The answer-format markers ``<think>``, ``</think>`` and ``\\boxed{`` are single
tokens, so a response like ``<think>3+4=7</think>\\boxed{7}`` is 9 tokens and a tiny
model learns the format in a few steps. Special ids: pad, bos, eos, the image placeholder
and unk (unknown characters; decoded as U+FFFD).

The public surface mirrors what a Hugging Face tokenizer offers (``encode``, ``decode``,
``batch_decode``, ``eos_token_id``, ``pad_token_id``, ``bos_token_id``, ``vocab_size``,
``len()``) so the Qwen2.5-VL tokenizer can replace it without touching the callers.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Sequence

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<image>", "<unk>")
MARKERS = ("<think>", "</think>", "\\boxed{")
EXTRA_CHARS = "\n\t°π√∠△⊙⊥∥≌≅×÷≤≥≠±²³½"
DEFAULT_CHARS = "".join(chr(c) for c in range(32, 127)) + EXTRA_CHARS
_FORMAT = "megatron-selfjudge-char-tokenizer"
_VERSION = 1


class CharTokenizer:
    """Character tokens plus single-token format markers and special ids."""

    def __init__(self, chars: str = DEFAULT_CHARS, markers: Sequence[str] = MARKERS) -> None:
        if len(set(chars)) != len(chars):
            raise ValueError("chars: every character must appear once")
        if any(len(m) < 2 for m in markers):
            raise ValueError("markers: a marker must be at least two characters long")
        self.chars = chars
        self.markers = tuple(markers)
        self._id_to_token = list(SPECIAL_TOKENS) + list(self.markers) + list(chars)
        self._token_to_id = {t: i for i, t in enumerate(self._id_to_token)}
        if len(self._token_to_id) != len(self._id_to_token):
            raise ValueError("markers: a marker collides with a special token")
        # Longest first, so that a marker that is a prefix of another never shadows it.
        self._markers_by_len = sorted(self.markers, key=len, reverse=True)
        self._marker_starts = {m[0] for m in self.markers}
        self._n_special = len(SPECIAL_TOKENS)

    # Special ids under the attribute names a Hugging Face tokenizer uses; they follow the
    # order of SPECIAL_TOKENS. image_token_id is the vocabulary's placeholder (collate may
    # substitute another index, e.g. -200 for megatron-core's LLaVAModel); unknown
    # characters map to unk_token_id.
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    image_token_id: int = 3
    unk_token_id: int = 4
    pad_token: str = SPECIAL_TOKENS[0]
    eos_token: str = SPECIAL_TOKENS[2]

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of pad, bos, eos, image and unk."""
        return list(range(self._n_special))

    @property
    def vocab_size(self) -> int:
        """Number of ids (specials + markers + characters)."""
        return len(self._id_to_token)

    def __len__(self) -> int:
        return self.vocab_size

    # ---- encoding ----
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """Token ids of text; markers become one id, unknown characters become unk."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected str, got {type(text).__name__}")
        ids = [self.bos_token_id] if add_special_tokens else []
        i, n = 0, len(text)
        while i < n:
            if text[i] in self._marker_starts:
                hit = next((m for m in self._markers_by_len if text.startswith(m, i)), None)
                if hit is not None:
                    ids.append(self._token_to_id[hit])
                    i += len(hit)
                    continue
            # Single characters can only hit character entries: specials and markers are longer.
            ids.append(self._token_to_id.get(text[i], self.unk_token_id))
            i += 1
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of ids; special ids render as their names unless skipped, unk as U+FFFD."""
        out = []
        for raw in ids:
            i = int(raw)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"ids: token id {i} outside the vocabulary [0, {self.vocab_size})")
            if i < self._n_special:
                if skip_special_tokens:
                    continue
                out.append("\ufffd" if i == self.unk_token_id else self._id_to_token[i])
            else:
                out.append(self._id_to_token[i])
        return "".join(out)

    def batch_decode(self, sequences: Iterable[Iterable[int]], skip_special_tokens: bool = False) -> list[str]:
        """decode() over a batch."""
        return [self.decode(s, skip_special_tokens=skip_special_tokens) for s in sequences]

    def convert_ids_to_tokens(self, ids: Iterable[int]) -> list[str]:
        """The token string of each id."""
        return [self._id_to_token[int(i)] for i in ids]

    def convert_tokens_to_ids(self, tokens: Iterable[str]) -> list[int]:
        """The id of each token string (unknown -> unk)."""
        return [self._token_to_id.get(t, self.unk_token_id) for t in tokens]

    # ---- persistence ----
    def save(self, path: str | Path) -> Path:
        """Write the vocabulary as JSON (a file, or tokenizer.json inside a directory)."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        payload = {"format": _FORMAT, "version": _VERSION, "specials": list(SPECIAL_TOKENS),
                   "markers": list(self.markers), "chars": self.chars}
        path.write_text(json.dumps(payload, ensure_ascii=False, indent=1), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CharTokenizer":
        """Read a tokenizer written by save()."""
        path = Path(path)
        if path.is_dir():
            path = path / "tokenizer.json"
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: not valid JSON ({err})") from err
        if not isinstance(payload, dict) or payload.get("format") != _FORMAT:
            raise ValueError(f"{path}: field 'format' is not {_FORMAT!r}")
        if payload.get("version") != _VERSION:
            raise ValueError(f"{path}: field 'version' {payload.get('version')!r} is not {_VERSION}")
        if payload.get("specials") != list(SPECIAL_TOKENS):
            raise ValueError(f"{path}: field 'specials' differs from {list(SPECIAL_TOKENS)}")
        chars, markers = payload.get("chars"), payload.get("markers")
        if not isinstance(chars, str) or not isinstance(markers, list) \
                or not all(isinstance(m, str) for m in markers):
            raise ValueError(f"{path}: fields 'chars' (str) and 'markers' (list of str) are required")
        return cls(chars=chars, markers=markers)
