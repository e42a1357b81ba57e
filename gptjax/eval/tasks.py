"""Few-shot task files and the K-shot prompts of the paper (section 2).

A task file is JSON Lines. Each record is either multiple choice,
`{"context": str, "choices": [str, ...], "answer": int}`, or completion,
`{"context": str, "target": str}`; one file holds one kind. An optional first line
`{"task": {"name": ..., "separator": ..., "delimiter": ..., "stop": ...}}` sets how prompts are
written (command-line flags override it):

- separator (default a blank line, "\\n\\n") goes between the examples and the item;
- delimiter (default " ") goes between a context and its answer, so "Q: 2+2? A:" and "4" make
  "Q: 2+2? A: 4";
- stop (default "\\n") ends a completion's greedy decoding.

A K-shot prompt is K solved examples then the item's context:
`ctx_1 + delim + ans_1 + sep + … + ctx_K + delim + ans_K + sep + ctx`. The examples are drawn at
random without replacement, seeded by (seed, item index) so an item's prompt does not depend on
--limit or on other items, from the examples file or else from the task file minus the item.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gptjax.errors import UserError

DEFAULTS = {"separator": "\n\n", "delimiter": " ", "stop": "\n"}


@dataclasses.dataclass(frozen=True)
class Item:
    context: str
    choices: tuple[str, ...] = ()  # multiple choice
    answer: int = -1  # index into choices
    target: str = ""  # completion

    @property
    def answer_text(self) -> str:
        return self.choices[self.answer] if self.choices else self.target


@dataclasses.dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "choice" or "completion"
    items: tuple[Item, ...]
    separator: str = DEFAULTS["separator"]
    delimiter: str = DEFAULTS["delimiter"]
    stop: str = DEFAULTS["stop"]
    path: str = ""


def _item(rec: Any, where: str) -> Item:
    if not isinstance(rec, dict):
        raise UserError(f"{where}: expected a JSON object")
    ctx = rec.get("context")
    if not isinstance(ctx, str):
        raise UserError(f'{where}: missing "context" (a string)')
    if "choices" in rec or "answer" in rec:
        choices, answer = rec.get("choices"), rec.get("answer")
        if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
            raise UserError(f'{where}: "choices" must be a list of strings')
        if not choices or not all(choices):
            raise UserError(f'{where}: "choices" is empty or holds an empty choice')
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise UserError(f'{where}: missing "answer" (an index into "choices")')
        if not 0 <= answer < len(choices):
            raise UserError(f'{where}: "answer" {answer} is out of range for '
                            f"{len(choices)} choices")
        return Item(ctx, tuple(choices), answer)
    target = rec.get("target")
    if not isinstance(target, str) or not target.strip():
        raise UserError(f'{where}: expected "choices" and "answer" (multiple choice) or a '
                        f'nonempty "target" (completion)')
    return Item(ctx, target=target)


def _header(rec: Any, where: str) -> dict[str, str]:
    h = rec["task"]
    if not isinstance(h, dict):
        raise UserError(f'{where}: "task" must be an object')
    unknown = sorted(set(h) - {"name", *DEFAULTS})
    if unknown:
        raise UserError(f"{where}: unknown task setting(s) {', '.join(unknown)} (known: name, "
                        f"{', '.join(DEFAULTS)})")
    if not all(isinstance(v, str) for v in h.values()):
        raise UserError(f"{where}: task settings must be strings")
    return h


def read_task(path: str | Path, overrides: dict[str, str | None] | None = None) -> Task:
    """A task file (see the module docstring); overrides (separator, delimiter, stop; None
    leaves the file's or the default value) win over its header."""
    p = Path(path)
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read task file {p}: {e}") from None
    settings: dict[str, str] = {"name": p.stem, **DEFAULTS}
    items: list[Item] = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{p}:{i}"
        try:
            rec = json.loads(line)
        except ValueError:
            raise UserError(f"{where}: not valid JSON") from None
        if isinstance(rec, dict) and "task" in rec and "context" not in rec:
            if items:
                raise UserError(f"{where}: the task header must be the first record")
            settings.update(_header(rec, where))
            continue
        items.append(_item(rec, where))
    if not items:
        raise UserError(f"{p}: no examples")
    kinds = {bool(it.choices) for it in items}
    if len(kinds) > 1:
        raise UserError(f"{p}: mixes multiple-choice and completion records")
    settings.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if not settings["stop"]:
        raise UserError(f"{p}: the stop string is empty")
    kind = "choice" if items[0].choices else "completion"
    return Task(settings["name"], kind, tuple(items), settings["separator"],
                settings["delimiter"], settings["stop"], str(p))


def shot_indices(n_pool: int, k: int, seed: int, item: int, exclude_self: bool) -> list[int]:
    """K distinct example indices for an item, drawn from a pool of n_pool (without the item
    itself when the pool is the task file)."""
    pool = [j for j in range(n_pool) if not (exclude_self and j == item)]
    if k > len(pool):
        raise UserError(f"{k} shots need at least {k} examples besides the item, but the pool "
                        f"has {len(pool)}")
    if k == 0:
        return []
    rng = np.random.default_rng([seed, item])
    return [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]


def render(task: Task, examples: Sequence[Item], item: Item) -> str:
    """The prompt: each example's context, delimiter and answer, then the item's context."""
    shots = [e.context + task.delimiter + e.answer_text for e in examples]
    return task.separator.join([*shots, item.context])


def fit_prompt(task: Task, examples: Sequence[Item], item: Item, encode: Any, room: int,
               where: str) -> tuple[str, int]:
    """(prompt, shots used): as many of the examples as keep the prompt within `room` tokens
    (the context length less the item's longest answer), dropping those farthest from the item
    first."""
    for used in range(len(examples), -1, -1):
        text = render(task, examples[len(examples) - used:], item)
        n = len(encode(text))
        if n <= room:
            return text, used
    raise UserError(f"{where}: the context ({n} tokens, {room} allowed with its longest "
                    f"answer) is longer than the model's context")
