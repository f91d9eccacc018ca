"""Character tokenizer: the sorted set of characters of the training text."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

MAX_NAMED_CHARACTERS = 20


class UnknownCharactersError(ValueError):
    """Text holds characters outside the vocabulary. The message names the first
    ``MAX_NAMED_CHARACTERS`` of them with up to 10 positions each, so it stays short
    whatever the text."""

    def __init__(self, positions: dict[str, list[int]]) -> None:
        self.positions = positions
        named = list(positions.items())[:MAX_NAMED_CHARACTERS]
        shown = "; ".join(f"{ch!r} at {_format_positions(pos)}" for ch, pos in named)
        if len(positions) > len(named):
            shown += f"; ... and {len(positions) - len(named)} more distinct characters"
        super().__init__(f"characters not in the vocabulary: {shown}")


def _format_positions(positions: list[int], limit: int = 10) -> str:
    text = ", ".join(map(str, positions[:limit]))
    if len(positions) > limit:
        text += f", ... ({len(positions)} in all)"
    return "position " + text if len(positions) == 1 else "positions " + text


class CharTokenizer:
    """Maps each character of a fixed, ordered vocabulary to its index."""

    def __init__(self, vocab: Sequence[str]) -> None:
        chars = list(vocab)
        if not chars:
            raise ValueError("vocabulary is empty")
        if any(len(c) != 1 for c in chars):
            raise ValueError("vocabulary entries must be single characters")
        if len(set(chars)) != len(chars):
            raise ValueError("vocabulary holds a character twice")
        self.vocab: tuple[str, ...] = tuple(chars)
        self._index = {c: i for i, c in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls(sorted(set(text)))

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def unknown_characters(self, text: str) -> dict[str, list[int]]:
        """Each character of ``text`` missing from the vocabulary, with its positions."""
        unknown: dict[str, list[int]] = {}
        for pos, ch in enumerate(text):
            if ch not in self._index:
                unknown.setdefault(ch, []).append(pos)
        return unknown

    def encode(self, text: str) -> list[int]:
        try:
            return [self._index[c] for c in text]
        except KeyError:
            raise UnknownCharactersError(self.unknown_characters(text)) from None

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.vocab[i] for i in ids)


def prompt_ids(tokenizer: CharTokenizer, prompt: str) -> list[int]:
    """Token ids of a prompt; an empty prompt starts from id 0, as the lecture's generation
    does (a newline for Tiny Shakespeare)."""
    return tokenizer.encode(prompt) if prompt else [0]
