import pytest

from chargpt.tokenizer import CharTokenizer, UnknownCharactersError, prompt_ids


def test_vocabulary_is_the_sorted_characters() -> None:
    tok = CharTokenizer.from_text("hello world\n")
    assert tok.vocab == ("\n", " ", "d", "e", "h", "l", "o", "r", "w")


def test_round_trip() -> None:
    text = "To be, or not to be: that is the question.\nÄ→✓"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode(text[:2]) == [tok.vocab.index("T"), tok.vocab.index("o")]


def test_unknown_characters_are_named_with_positions() -> None:
    tok = CharTokenizer.from_text("abc")
    with pytest.raises(UnknownCharactersError) as err:
        tok.encode("abXcYX")
    assert err.value.positions == {"X": [2, 5], "Y": [4]}
    message = str(err.value)
    assert "'X' at positions 2, 5" in message
    assert "'Y' at position 4" in message


def test_invalid_vocabularies_are_refused() -> None:
    for vocab in ([], ["a", "a"], ["ab"]):
        with pytest.raises(ValueError):
            CharTokenizer(vocab)


def test_empty_prompt_starts_from_token_zero() -> None:
    tok = CharTokenizer.from_text("\nab")
    assert prompt_ids(tok, "") == [0]
    assert prompt_ids(tok, "ba") == [2, 1]
