"""When a completion ends (EOS or a stop string) and what its text is: one implementation for both
decode paths. The HF path feeds one step at a time, the fast path blocks of steps; the rules are the
same: a row ends at its first EOS token ("eos", kept in the tokens, not in the text) or when the decoded
tail of its tokens contains a stop string ("stop"; the text is cut before the stop string), else at
max_new_tokens ("length")."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    finish_reason: str  #: "eos", "stop" (a stop string) or "length"


class EndTracker:
    """The tokens and end of every row of a micro-batch, fed as they are generated."""

    def __init__(self, tokenizer, eos_ids, stops: list[str], rows: int):
        self.tokenizer, self.stops = tokenizer, list(stops)
        self.eos = set(eos_ids)
        self.generated: list[list[int]] = [[] for _ in range(rows)]
        self.finish = ["length"] * rows
        self.finished = [False] * rows
        self.left = rows
        # the decoded tail checked for stop strings: long enough to hold any of them, whatever the tokens
        self.window = max((len(tokenizer(s, add_special_tokens=False)["input_ids"]) for s in stops), default=0) + 2

    @property
    def all_done(self) -> bool:
        return self.left == 0

    def push(self, row: int, token: int) -> bool:
        """Append one token to a live row; True when it ends the row."""
        out = self.generated[row]
        out.append(token)
        if token in self.eos:
            self.finish[row] = "eos"
        elif self.stops and self.hit_stop(out):
            self.finish[row] = "stop"
        else:
            return False
        self.finished[row] = True
        self.left -= 1
        return True

    def feed(self, rows: list[list[int]]):
        """A block of steps: rows[r] = the next tokens of row r (tokens after a row's end are ignored)."""
        for r, toks in enumerate(rows):
            if self.finished[r]:
                continue
            for t in toks:
                if self.push(r, t):
                    break

    def hit_stop(self, toks: list[int]) -> bool:
        tail = self.tokenizer.decode(toks[-self.window:], skip_special_tokens=True)
        return any(s in tail for s in self.stops)

    def completions(self) -> list[Completion]:
        results = []
        for toks, reason in zip(self.generated, self.finish):
            text = self.tokenizer.decode(toks, skip_special_tokens=True)
            if reason == "stop":
                cut = min((text.find(s) for s in self.stops if s in text), default=-1)
                text = text[:cut] if cut >= 0 else text
            results.append(Completion(text=text, token_ids=toks, finish_reason=reason))
        return results
