from server.stops import StopMatcher


def run(stops: list[str], text: str) -> tuple[str, str | None, list[str]]:
    matcher: StopMatcher[int] = StopMatcher(stops)
    released, steps = [], []
    for i, char in enumerate(text):
        out = matcher.feed(char, i)
        steps.append("".join(c for c, _ in out))
        released.extend(out)
        if matcher.matched:
            break
    else:
        released.extend(matcher.flush())
    assert [i for _, i in released] == sorted(i for _, i in released)  # payloads stay in order
    return "".join(c for c, _ in released), matcher.matched, steps


def test_no_stops_releases_every_character_at_once() -> None:
    assert run([], "abc") == ("abc", None, ["a", "b", "c"])


def test_stop_is_removed_and_prefixes_are_held_back() -> None:
    text, matched, steps = run(["\n\n"], "ab\ncd\n\nef")
    assert (text, matched) == ("ab\ncd", "\n\n")
    assert steps == ["a", "b", "", "\nc", "d", "", ""]


def test_overlapping_prefixes() -> None:
    assert run(["aab"], "aaab")[:2] == ("a", "aab")
    assert run(["abc", "bcd"], "xbcd")[:2] == ("x", "bcd")
    assert run(["abc"], "ababx")[:2] == ("ababx", None)


def test_held_characters_are_flushed_at_the_end() -> None:
    assert run(["END"], "the EN")[:2] == ("the EN", None)
