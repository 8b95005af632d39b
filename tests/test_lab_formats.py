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
