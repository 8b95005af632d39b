"""JSONL loaders: the paper's multiple-choice format and a generative question/answer format.

Multiple choice (the paper's): {"question": "... A. x B. y ...", "label": "A"}; the loss is on the
single answer-letter token, the prediction is the argmax over the option letters. Optional
"choices": [...] appends "A. ..." lines to the question and fixes the letters for that record.
Generative: {"question": "...", "answer": "..."}; correct = every answer token is the argmax.
Both accept an optional "paraphrase" (string or list): phrasings used only to measure
cross-prompt generalisation, never trained on.

A file holds one format. Any malformed line raises DataError naming the file and the line.
"""
from __future__ import annotations

import json
import string
from pathlib import Path

from .items import Item

LETTERS = string.ascii_uppercase


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
        _fail(path, lineno, f"field {key!r} must be a non-empty string, got {value!r}")
    return value.strip()


def _paraphrases(path, lineno, rec) -> tuple[str, ...]:
    value = rec.get("paraphrase", ())
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) and v.strip() for v in value):
        _fail(path, lineno, "field 'paraphrase' must be a string or a list of non-empty strings")
    return tuple(v.strip() for v in value)


def _records(path: Path):
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e})") from None
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            _fail(path, lineno, f"invalid JSON ({e.msg} at column {e.colno})")
        if not isinstance(rec, dict):
            _fail(path, lineno, f"expected a JSON object, got {type(rec).__name__}")
        yield lineno, rec


def _mc_item(path, lineno, rec, default_letters) -> Item:
    question = _text(path, lineno, rec, "question")
    label = _text(path, lineno, rec, "label").upper()
    letters = default_letters
    choices = rec.get("choices")
    if choices is not None:
        if not isinstance(choices, list) or not 2 <= len(choices) <= 26 or \
                not all(isinstance(c, str) for c in choices):
            _fail(path, lineno, "field 'choices' must be a list of 2..26 strings")
        letters = tuple(LETTERS[:len(choices)])
        question += "\n" + "\n".join(f"{l}. {c}" for l, c in zip(letters, choices))
    if label not in letters:
        _fail(path, lineno, f"label {label!r} is not one of the option letters {''.join(letters)}")
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
    # Without per-record choices the letters are A..(highest label in the file), at least A..D.
    labels = [str(r.get("label", "")).strip().upper() for _, r in records]
    top = max([LETTERS.index(l) for l in labels if len(l) == 1 and l in LETTERS] + [3])
    default_letters = tuple(LETTERS[:top + 1])
    items = []
    for lineno, rec in records:
        if kind == "mc":
            if "label" not in rec:
                _fail(path, lineno, f"missing field 'label' (line {first} made this a multiple-choice file)")
            items.append(_mc_item(path, lineno, rec, default_letters))
        else:
            if "label" in rec:
                _fail(path, lineno, f"has 'label' but line {first} made this a generative file")
            q = _text(path, lineno, rec, "question")
            a = _text(path, lineno, rec, "answer")
            items.append(Item(f"{path.name}:{lineno}", (q,), a, None, _paraphrases(path, lineno, rec)))
    return items
