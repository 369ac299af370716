"""A toy tokenizer for engine tests on tiny random models: token id -> a short piece of text over
a small alphabet (so stop strings span tokens), with the surface the generation loops use
(`eos_ids`, `decode`, `id_to_token`, `detokenizer()`). It stands in for the tokenizer only.
"""

from __future__ import annotations

VOCAB = 64
EOS = 63
PIECES = ["".join("ab c"[(i * 7 + j * 3) % 4] for j in range(1 + i % 3)) for i in range(VOCAB)]


class ToyDetokenizer:
    def __init__(self, pieces=PIECES):
        self.pieces = pieces
        self.text, self._read = "", 0

    def add_token(self, t: int) -> None:
        self.text += self.pieces[t]

    def finalize(self) -> None:
        pass

    @property
    def last_segment(self) -> str:
        seg, self._read = self.text[self._read :], len(self.text)
        return seg


class ToyTokenizer:
    eos_ids = {EOS}
    vocab_size = VOCAB

    def __init__(self, pieces=PIECES):
        self.pieces = pieces

    def id_to_token(self, i: int) -> str:
        return self.pieces[i]

    def decode(self, ids) -> str:
        return "".join(self.pieces[i] for i in ids)

    def detokenizer(self):
        return ToyDetokenizer(self.pieces)
