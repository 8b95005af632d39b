"""JSONL loaders of the lab: both formats load, and every malformed line is reported with its
file and line number."""
import json

import pytest

from cpl_lab.formats import DataError, load_jsonl


def write(path, lines):
    path.write_text("\n".join(l if isinstance(l, str) else json.dumps(l) for l in lines) + "\n")
    return path


def test_multiple_choice(tmp_path):
    f = write(tmp_path / "mc.jsonl", [
        {"question": "Capital of France? A. Lima B. Paris C. Oslo D. Rome", "label": "B"},
        "",
        {"question": "2+2? A. 3 B. 4 C. 5", "label": "b", "paraphrase": "two plus two?"},
        {"question": "Sky?", "label": "A", "choices": ["blue", "green"]},
    ])
    items = load_jsonl(f)
    assert [it.answer for it in items] == ["B", "B", "A"]
    assert items[0].options == ("A", "B", "C", "D")
    assert items[1].heldout == ("two plus two?",)
    assert items[2].options == ("A", "B") and "A. blue" in items[2].prompts[0]
    assert items[2].key == "mc.jsonl:4"


def test_generative(tmp_path):
    items = load_jsonl(write(tmp_path / "gen.jsonl", [
        {"question": "Who wrote Hamlet?", "answer": "Shakespeare"},
        {"question": "Largest planet?", "answer": "Jupiter", "paraphrase": ["Biggest planet?"]}]))
    assert items[0].options is None and items[1].answer == "Jupiter"
    assert items[1].heldout == ("Biggest planet?",)


@pytest.mark.parametrize("lines, line, words", [
    ([{"question": "q", "label": "A"}, "{not json"], 2, "invalid JSON"),
    ([{"question": "q", "label": "A"}, {"question": "q2"}], 2, "missing field 'label'"),
    ([{"question": "q", "label": "AB"}], 1, "not one of the option letters"),
    ([{"question": "q", "label": "C", "choices": ["x", "y"]}], 1, "not one of the option letters"),
    ([{"question": "q", "answer": "a"}, {"question": "q", "answer": "a"}, {"answer": "x"}], 3,
     "missing field 'question'"),
    ([{"question": "q", "answer": "a"}, {"question": "q", "label": "A"}], 2, "generative"),
    ([{"question": "", "answer": "a"}], 1, "non-empty string"),
    ([[1, 2]], 1, "JSON object"),
    ([{"question": "q", "answer": "a", "paraphrase": 3}], 1, "paraphrase"),
    ([{"question": "q", "label": "A", "choices": "ab"}], 1, "choices"),
])
def test_bad_lines_name_file_and_line(tmp_path, lines, line, words):
    f = write(tmp_path / "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        load_jsonl(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:{line}:"), msg
    assert words in msg


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_jsonl(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no records"):
        load_jsonl(tmp_path / "empty.jsonl")


def test_line_separators_inside_strings_and_crlf(tmp_path):
    # JSON allows U+2028, U+2029 and U+0085 raw inside strings; str.splitlines() splits on them.
    f = tmp_path / "seps.jsonl"
    f.write_bytes("\r\n".join(json.dumps(r, ensure_ascii=False) for r in [
        {"question": "one\u2028two?", "answer": "a"},
        {"question": "three\u0085four?", "answer": "b"},
        {"question": "five\u2029six?", "answer": "c"}]).encode() + b"\r\n")
    items = load_jsonl(f)
    assert [it.prompts[0] for it in items] == ["one\u2028two?", "three\u0085four?", "five\u2029six?"]
    assert [it.key for it in items] == ["seps.jsonl:1", "seps.jsonl:2", "seps.jsonl:3"]


@pytest.mark.parametrize("content, line, words", [
    (b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "a"}\n', 2,
     "not UTF-8 text (byte 18 of the line is 0xe9)"),
    (b'{"question": "q", "answer": ' + b"1" * 5000 + b"}\n", 1,
     "invalid JSON (a number longer than 4300 digits)"),
    (b'{"question": "q", "answer": "a"}\n\n' + b"[" * 100_000 + b"\n", 3, "nested too deeply"),
], ids=["utf8", "huge-int", "deep"])
def test_undecodable_lines_name_file_and_line(tmp_path, content, line, words):
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_jsonl(f)
    assert str(err.value).startswith(f"{f}:{line}: "), err.value
    assert words in str(err.value)


def test_option_letters_are_the_questions_own(tmp_path):
    items = load_jsonl(write(tmp_path / "mc.jsonl", [
        {"question": "Capital of Peru? A. Lima B. Paris C. Oslo D. Rome E. Quito", "label": "A"},
        {"question": "2+2?\n(A) 3\n(B) 4\n(C) 5", "label": "B"},
        {"question": "Which vitamin? A) C B) E. coli", "label": "B"},
        {"question": "True?", "label": "D"}]))
    assert [it.options for it in items] == [tuple("ABCDE"), tuple("ABC"), tuple("AB"), tuple("ABCD")]


@pytest.mark.parametrize("rec, allowed", [
    # one label past D used to widen every question of the file to A..Z, silently
    ({"question": "2+2? A. 3 B. 4 C. 5", "label": "Z"}, "A, B, C (as the question lists them)"),
    ({"question": "2+2?", "label": "E"}, "A, B, C, D (the default"),
    ({"question": "Sky?", "label": "C", "choices": ["blue", "green"]}, "A, B (one per entry of \"choices\")"),
], ids=["listed", "default", "choices"])
def test_label_outside_the_options(tmp_path, rec, allowed):
    f = write(tmp_path / "mc.jsonl", [{"question": "1+1? A. 2 B. 3 C. 4 D. 5", "label": "A"}, rec])
    with pytest.raises(DataError) as err:
        load_jsonl(f)
    msg = str(err.value)
    assert msg.startswith(f"{f}:2: label {rec['label']!r} is not one of the option letters {allowed}"), msg
