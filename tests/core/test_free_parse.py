"""parse_commands: every shape a cleaner may answer in, and never an exception."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from freelm.free import Deletion, format_commands, parse_commands

GOOD = [Deletion("Let me try", "dead end."), Deletion("Check:", "ok.")]
BODY = format_commands(GOOD)


def test_bare_list():
    assert parse_commands(BODY) == GOOD


def test_fenced_list_with_prose_around():
    raw = f"Here are the deletions:\n```json\n{BODY}\n```\nDone."
    assert parse_commands(raw) == GOOD


def test_think_block_before_the_json_is_ignored():
    raw = '<think>\nmaybe [{"prefix": "x", "suffix": "y"}] ... no.\n</think>\n\n' + BODY
    assert parse_commands(raw) == GOOD


def test_empty_list_means_nothing_to_delete():
    parsed = parse_commands("[]")
    assert parsed == [] and parsed.error is None


def test_single_object_is_accepted():
    assert parse_commands('{"prefix": "a", "suffix": "b"}') == [Deletion("a", "b")]


def test_truncated_list_keeps_complete_objects():
    raw = BODY[:-1] + ', {"prefix": "cut off here'
    parsed = parse_commands(raw)
    assert parsed == GOOD
    assert "truncated_list_recovered" in parsed.dropped


def test_malformed_items_are_dropped_valid_ones_kept():
    raw = '[{"prefix": "a", "suffix": "b"}, 3, {"prefix": "only"}, {"prefix": 1, "suffix": "x"}]'
    parsed = parse_commands(raw)
    assert parsed == [Deletion("a", "b")]
    assert len(parsed.dropped) == 3 and parsed.error is None


def test_garbage_gives_an_error_not_an_exception():
    for raw in ["", "   ", "no json here", "[1, 2", "{broken", "```json\n[{]\n```"]:
        parsed = parse_commands(raw)
        assert parsed == [] and parsed.error, raw


def test_non_string_input():
    assert parse_commands(None).error.startswith("not_text")  # type: ignore[arg-type]


def test_escaped_newlines_and_unicode_round_trip():
    cmds = [Deletion("Étape 1 :\n", '≤ 3\n"quoted"')]
    assert parse_commands(format_commands(cmds)) == cmds


@given(st.text())
def test_never_raises_on_arbitrary_text(raw):
    parsed = parse_commands(raw)
    assert all(isinstance(d, Deletion) for d in parsed)


# prose a cleaner may write around its answer: no bracket, brace or fence that could open another JSON value,
# no "<" that could spell a "</think>" (text before the last one is ignored)
noise = st.text(alphabet=st.characters(blacklist_characters="[]{}`<", blacklist_categories=("Cs",)), max_size=40)


# a command's text is a span of the thinking, which never holds "</think>" (the answer is read after the last one)
span = st.text(min_size=1).filter(lambda text: "</think>" not in text)


@given(st.lists(st.tuples(span, span), max_size=5), noise, noise)
def test_format_then_parse_is_identity_inside_noise(pairs, before, after):
    cmds = [Deletion(p, s) for p, s in pairs]
    body = format_commands(cmds)
    for raw in (f"{before}```json\n{body}\n```{after}", f"{before}\n{body}\n{after}"):  # fenced, bare
        parsed = parse_commands(raw)
        assert parsed == cmds and parsed.error is None and parsed.dropped == [], raw


def test_parser_finds_the_list_after_false_starts_without_calling_it_truncated():
    for raw in ('see [here and [{"prefix": "a", "suffix": "b"}] then [', 'x [[{"prefix": "a", "suffix": "b"}]'):
        parsed = parse_commands(raw)
        assert parsed == [Deletion("a", "b")] and parsed.dropped == [], raw


def test_truncated_list_recovery_starts_at_the_list_not_inside_a_string():
    parsed = parse_commands('[{"prefix": "a[", "suffix": "b"}, {"prefix": "c')
    assert parsed == [Deletion("a[", "b")] and parsed.dropped == ["truncated_list_recovered"]


def test_single_object_inside_prose_and_named_drops():
    single = parse_commands('Delete this: {"prefix": "a", "suffix": "b"} thanks')
    assert single == [Deletion("a", "b")] and single.dropped == [] and single.error is None  # no note: not too deep
    parsed = parse_commands('[{"prefix": "a", "suffix": "b"}, 3, {"prefix": "x"}]')
    assert parsed.dropped == ["item 1: not an object", "item 2: needs string 'prefix' and 'suffix'"]
    assert parse_commands("</think>  ").error == "empty_output"
    assert parse_commands(3).error == "not_text: int"  # type: ignore[arg-type]


def test_canonical_json_keeps_non_ascii_text_as_is():
    assert format_commands([Deletion("Étape", "≤ 3")]) == '[{"prefix": "Étape", "suffix": "≤ 3"}]'


def test_cleaner_parser_reads_after_the_last_think_close():
    draft = format_commands([Deletion("draft", "one")])
    final = format_commands([Deletion("Let me", "again.")])
    raw = f"<think>\nplan\n</think>\n{draft}\nhmm, no\n</think>\n{final}"
    assert parse_commands(raw) == [Deletion("Let me", "again.")]
    # nothing after the last close: no list at all (the draft is not taken)
    assert parse_commands(f"<think>\n</think>\n{draft}\n</think>\nnothing").error == "no_json_list"


def test_a_list_that_starts_where_its_enclosing_bracket_stops_decoding_is_read_whole():
    """``[ "x" [...] ]`` fails to decode at the inner ``[``: that list itself is valid and is the answer (it was
    skipped as if it failed too, and the one-object fallback kept only its first command)."""
    two = format_commands([Deletion("a", "b"), Deletion("c", "d")])
    # ... and a list right after one the decoder refuses (an integer beyond Python's digit limit)
    for raw in (f'[ "x" {two} ]', f"Plan: [ step one {two}", f"[{'1' * 5000}]{two}", f"[[{'1' * 5000}]{two}]"):
        parsed = parse_commands(raw)
        assert parsed == [Deletion("a", "b"), Deletion("c", "d")] and parsed.error is None, raw


def test_truncated_list_recovery_takes_only_the_lists_own_items_up_to_one_that_cannot_decode():
    item = '{"prefix": "a", "suffix": "b"}'
    # an object in the prose before the list and one nested in an item are not items
    parsed = parse_commands('Note {"k": 1}: [' + item[:-1] + ', "why": {"k": 2}}, {"prefix": "c')
    assert parsed == [Deletion("a", "b")] and parsed.dropped == ["truncated_list_recovered"]
    # an item the decoder refuses (an integer beyond Python's digit limit) ends the recovery there
    parsed = parse_commands(f'[{item}, {{"prefix": {"1" * 5000}}}, {item}, {{"prefix": "c')
    assert parsed == [Deletion("a", "b")] and parsed.dropped == ["truncated_list_recovered"]
