"""JSONL loaders: the paper's multiple-choice format and a generative question/answer format.

Multiple choice (the paper's): {"question": "... A. x B. y ...", "label": "A"}; the loss is on the
single answer-letter token, the prediction is the argmax over the option letters. A question's
letters are the ones it lists ("A. x", "B) y", "(C) z", from A without a gap), A..D when it lists
none; optional "choices": [...] appends "A. ..." lines to the question and fixes the letters. A
label outside its question's letters is an error (it used to widen the letters of the whole file).
Generative: {"question": "...", "answer": "..."}; correct = every answer token is the argmax.
Both accept an optional "paraphrase" (string or list): phrasings used only to measure
cross-prompt generalisation, never trained on.

A file holds one format: UTF-8, one record per "\n"-terminated line ("\r\n" too). Any malformed
line raises DataError naming the file and the line.
"""
from __future__ import annotations

import hashlib
import json
import re
import reprlib
import string
import sys
from pathlib import Path

from .items import Item

LETTERS = string.ascii_uppercase
DEFAULT_LETTERS = tuple("ABCD")
# An option as questions list them: "A. Lima", "B) Paris", "(C) Oslo". Only the run from A counts,
# so a stray "U.S." or "vitamin E." elsewhere in the text adds no letter.
_OPTION = re.compile(r"(?:^|[\s(])([A-Z])[.)]")


class DataError(ValueError):
    """Malformed input data; the message starts with "file:line:"."""


def _fail(path: Path, line: int, msg: str):
    raise DataError(f"{path}:{line}: {msg}")


def _text(path, lineno, rec, key, required=True):
    value = rec.get(key)
    if value is None:
        if required:
            _fail(path, lineno, f"missing field {key!r} (fields present: {sorted(rec)})")
        return None
    if not isinstance(value, str) or not value.strip():
        _fail(path, lineno, f"field {key!r} must be a non-empty string, got {reprlib.repr(value)}")
    return value.strip()


def _paraphrases(path, lineno, rec) -> tuple[str, ...]:
    value = rec.get("paraphrase", ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        _fail(path, lineno, "field 'paraphrase' must be a string or a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _lines(path: Path):
    """(line number, text) of every line. Split on "\n" only: str.splitlines() also splits on
    U+2028, U+0085 and others that JSON allows raw inside a string. Decoded line by line, so that
    invalid UTF-8 is reported with its line."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    for lineno, raw in enumerate(data.split(b"\n"), 1):  # 0x0a never occurs inside a UTF-8 character
        raw = raw.removesuffix(b"\r")
        try:
            yield lineno, raw.decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(path, lineno, f"not UTF-8 text (byte {e.start + 1} of the line is 0x{raw[e.start]:02x})")


def _records(path: Path):
    for lineno, line in _lines(path):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})")
        except ValueError:  # not a syntax error: an integer past the digit limit (3.10.7+ has one)
            _fail(path, lineno, f"invalid JSON (a number longer than {sys.get_int_max_str_digits()} digits)")
        except RecursionError:
            _fail(path, lineno, "invalid JSON (nested too deeply)")
        if not isinstance(rec, dict):
            _fail(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def data_sha256(path) -> str:
    """Content hash of a data file: a resume checks that the file did not change under its path."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None


def _listed_letters(question: str) -> tuple[str, ...]:
    found = set(_OPTION.findall(question))
    n = 0
    while n < len(LETTERS) and LETTERS[n] in found:
        n += 1
    return tuple(LETTERS[:n]) if n >= 2 else ()


def _mc_item(path, lineno, rec) -> Item:
    question = _text(path, lineno, rec, "question")
    label = _text(path, lineno, rec, "label").upper()
    letters = _listed_letters(question)
    source = "as the question lists them" if letters else \
        "the default: the question lists no \"A. ...\" options; list them or give \"choices\""
    letters = letters or DEFAULT_LETTERS
    choices = rec.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or \
                not all(isinstance(c, str) for c in choices):
            _fail(path, lineno, "field 'choices' must be a list of 2..26 strings")
        letters = tuple(LETTERS[:len(choices)])
        source = "one per entry of \"choices\""
        question += "\n" + "\n".join(f"{l}. {c}" for l, c in zip(letters, choices))
    if label not in letters:
        _fail(path, lineno, f"label {reprlib.repr(label)} is not one of the option letters "
              f"{', '.join(letters)} ({source})")
    return Item(f"{path.name}:{lineno}", (question,), label, letters,
                _paraphrases(path, lineno, rec))


def load_jsonl(path) -> list[Item]:
    """Items of a multiple-choice or generative JSONL file (the format is read from the fields)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    records = list(_records(path))
    if not records:
        raise DataError(f"{path}: no records")
    first, first_rec = records[0]
    kind = "mc" if "label" in first_rec else "gen"
    items = []
    for lineno, rec in records:
        if kind == "mc":
            if "label" not in rec:
                _fail(path, lineno, f"missing field 'label' (line {first} made this a multiple-choice file)")
            items.append(_mc_item(path, lineno, rec))
        else:
            if "label" in rec:
                _fail(path, lineno, f"has 'label' but line {first} made this a generative file")
            q = _text(path, lineno, rec, "question")
            a = _text(path, lineno, rec, "answer")
            items.append(Item(f"{path.name}:{lineno}", (q,), a, None, _paraphrases(path, lineno, rec)))
    return items
