"""Turning (prompt, answer) text into token ids: a word-level tokenizer for the lab's own model,
and an adapter over any Hugging Face tokenizer (with its chat template when it has one).

Both return the prompt and answer ids separately, so the loss and the "is it correct" test can
look at exactly the answer tokens. The answer is tokenized on its own and appended, rather than
split out of the tokenized full text, because BPE merges across the boundary would otherwise
move it.
"""
from __future__ import annotations

import json
from pathlib import Path

SPECIALS = ("<pad>", "<bos>", "<unk>", "=>")


class WordTokenizer:
    """Whitespace word vocabulary built from the lab's own texts. Saved as JSON next to the model."""

    def __init__(self, words):
        self.vocab = list(SPECIALS) + sorted(set(words) - set(SPECIALS))
        self.index = {w: i for i, w in enumerate(self.vocab)}
        self.pad_id, self.bos_id, self.unk_id, self.sep_id = range(4)

    @classmethod
    def from_texts(cls, texts) -> "WordTokenizer":
        return cls(w for t in texts for w in t.lower().split())

    def __len__(self) -> int:
        return len(self.vocab)

    def ids(self, text: str) -> list[int]:
        return [self.index.get(w, self.unk_id) for w in text.lower().split()]

    def save(self, path) -> None:
        Path(path).write_text(json.dumps({"vocab": self.vocab}))

    @classmethod
    def load(cls, path) -> "WordTokenizer":
        tok = cls([])
        tok.vocab = json.loads(Path(path).read_text())["vocab"]
        tok.index = {w: i for i, w in enumerate(tok.vocab)}
        return tok


class WordCodec:
    """<bos> prompt words => answer words."""

    def __init__(self, tokenizer: WordTokenizer):
        self.tok = tokenizer
        self.pad_id = tokenizer.pad_id

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        return [self.tok.bos_id] + self.tok.ids(prompt) + [self.tok.sep_id], self.tok.ids(answer)

    def option_ids(self, prompt: str, letters) -> list[int]:
        return [self.tok.ids(l)[0] for l in letters]


class HFCodec:
    """A Hugging Face tokenizer: chat template when it has one, else "Question: ...\\nAnswer:"."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.chat = bool(getattr(tokenizer, "chat_template", None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def _prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": prompt}],
                                                tokenize=False, add_generation_prompt=True)
            return self.tok(text, add_special_tokens=False)["input_ids"]
        return self.tok(f"Question: {prompt}\nAnswer:", add_special_tokens=True)["input_ids"]

    def _answer_ids(self, answer: str) -> list[int]:
        # After "Answer:" the answer follows a space; after a chat header it starts the turn.
        text = answer if self.chat else " " + answer
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"the answer {answer!r} tokenizes to nothing")
        return ids

    def encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        return self._prompt_ids(prompt), self._answer_ids(answer)

    def option_ids(self, prompt: str, letters) -> list[int]:
        ids = [self._answer_ids(l)[0] for l in letters]
        if len(set(ids)) != len(ids):
            raise ValueError(f"option letters {letters} do not start with distinct tokens")
        return ids
