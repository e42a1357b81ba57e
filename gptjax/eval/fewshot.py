"""Zero-, one- and few-shot evaluation as in the paper (section 2), on local task files.

    python -m gptjax.fewshot --checkpoint RUN --task TASK.jsonl [--task ...] --shots 0,1,8
        [--examples TRAIN.jsonl] [--seed S] [--limit N] [--unconditional] [--json]

Task files and prompts: gptjax/eval/tasks.py. Scoring as the paper does it:

- multiple choice: the log-likelihood of each choice (after the delimiter) given the prompt;
  the prediction is the choice with the highest log-likelihood per token ("acc", the table's
  figure), also reported unnormalised ("acc_sum") and, with --unconditional, normalised by the
  choice's likelihood after a neutral context ("Answer:" + delimiter; "acc_uncond");
- completion: greedy decoding after the prompt until the stop string (or end-of-text, or the
  longest target's length + 8 tokens); right when the output equals the target after
  whitespace normalisation (runs of whitespace as one space, none at either end).

When K examples do not fit the context with the item, the prompt keeps as many as fit; the
report says how many were used. All choices of all items are scored together in batches
padded to power-of-two lengths (gptjax/eval/scoring.py), one compilation per length.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax

from gptjax import tokenizer
from gptjax.lora.runs import load_model
from gptjax.eval import scoring
from gptjax.cli import OneLineParser, nonneg_int, positive_int, run_cli, user_path
from gptjax.config import Config, ModelConfig
from gptjax.errors import UserError, warn
from gptjax.eval.tasks import Item, Task, fit_prompt, read_task, shot_indices

UNCONDITIONAL_CONTEXT = "Answer:"
EXTRA_NEW_TOKENS = 8  # completion decoding may run this far past the longest target


def encode_pair(encode: Callable[[str], list[int]], context: str, continuation: str,
                prefix_id: int) -> tuple[list[int], list[int]]:
    """Token ids of (context, continuation) as lm-evaluation-harness splits them: whitespace
    that ends the context moves to the continuation (BPE writes " word" as one token), the two
    are encoded together and split at the context's length; an empty context is end-of-text."""
    n = len(context) - len(context.rstrip())
    if n:
        context, continuation = context[:-n], context[-n:] + continuation
    if not context:
        return [prefix_id], encode(continuation)
    whole, ctx = encode(context + continuation), encode(context)
    return ctx, whole[len(ctx):]


def normalize(text: str) -> str:
    return " ".join(text.split())


def _stderr(hits: Sequence[bool]) -> float:
    """Standard error of the mean of 0/1 outcomes (sample standard deviation, as lm-eval)."""
    n = len(hits)
    if n < 2:
        return 0.0
    p = sum(hits) / n
    return math.sqrt(p * (1 - p) / (n - 1))


@dataclasses.dataclass(frozen=True)
class Setting:
    """How a task is evaluated, the same for every K."""

    seed: int = 0
    limit: int | None = None
    unconditional: bool = False
    max_new_tokens: int | None = None
    batch_size: int = scoring.DEFAULT_BATCH
    progress: bool = False


def _prompts(task: Task, pool: Sequence[Item], from_task: bool, k: int, room: Callable[[Item], int],
             encode: Callable[[str], list[int]], s: Setting) -> tuple[list[str], list[int]]:
    """(prompt text, shots used) per evaluated item."""
    n = len(task.items) if s.limit is None else min(s.limit, len(task.items))
    prompts, used = [], []
    for i in range(n):
        item = task.items[i]
        shots = [pool[j] for j in shot_indices(len(pool), k, s.seed, i, from_task)]
        text, u = fit_prompt(task, shots, item, encode, room(item), f"{task.path}: item {i + 1}")
        prompts.append(text)
        used.append(u)
    return prompts, used


def _choice_scores(params: Any, cfg: ModelConfig, tok: Any, task: Task, prompts: list[str],
                   s: Setting) -> dict[str, float]:
    """Accuracies of the multiple-choice items behind `prompts`."""
    items = task.items[: len(prompts)]
    pairs, owner = [], []
    for i, (p, item) in enumerate(zip(prompts, items)):
        for c in item.choices:
            pairs.append(encode_pair(tok.encode, p, task.delimiter + c, tok.eot_id))
            owner.append(i)
    if s.unconditional:
        for i, item in enumerate(items):
            for c in item.choices:
                pairs.append(encode_pair(tok.encode, UNCONDITIONAL_CONTEXT,
                                         task.delimiter + c, tok.eot_id))
    lps = [lp for lp, _ in scoring.loglikelihoods(params, cfg, pairs, batch_size=s.batch_size,
                                                  progress=s.progress)]
    n_cond = len(owner)
    per_item: list[list[tuple[float, int, float]]] = [[] for _ in items]
    for j, i in enumerate(owner):
        uncond = lps[n_cond + j] if s.unconditional else 0.0
        per_item[i].append((lps[j], len(pairs[j][1]), lps[j] - uncond))
    hits: dict[str, list[bool]] = {"acc": [], "acc_sum": [], "acc_uncond": []}
    for item, scores in zip(items, per_item):
        for key, value in (("acc", lambda t: t[0] / t[1]), ("acc_sum", lambda t: t[0]),
                           ("acc_uncond", lambda t: t[2])):
            vals = [value(t) for t in scores]
            hits[key].append(max(range(len(vals)), key=vals.__getitem__) == item.answer)
    if not s.unconditional:
        del hits["acc_uncond"]
    out = {k: sum(v) / len(v) for k, v in hits.items()}
    out.update({f"{k}_stderr": _stderr(v) for k, v in hits.items()})
    return out


def _completion_scores(params: Any, cfg: ModelConfig, tok: Any, task: Task, prompts: list[str],
                       max_new: int, s: Setting) -> dict[str, float]:
    items = task.items[: len(prompts)]
    outs = scoring.generate_texts(params, cfg, tok, [tok.encode(p) for p in prompts],
                                  max_new_tokens=max_new, stops=[task.stop],
                                  batch_size=s.batch_size, progress=s.progress)
    hits = [normalize(o) == normalize(it.target) for o, it in zip(outs, items)]
    return {"acc": sum(hits) / len(hits), "acc_stderr": _stderr(hits)}


def evaluate(params: Any, cfg: ModelConfig, tok: Any, task: Task, k: int,
             examples: Task | None = None, setting: Setting = Setting()) -> dict[str, Any]:
    """K-shot accuracy of a task.

    Args:
      params, cfg: the model.
      tok: its tokenizer.
      task: the items (the first setting.limit of them).
      k: examples per prompt.
      examples: where they are drawn from; None: the task's other items.
    Returns:
      {"k", "n", "acc", "acc_stderr", "shots_used_mean", "shots_used_min"}; multiple choice
      also "acc_sum" and with setting.unconditional "acc_uncond" (each with a _stderr).
    """
    pool = (examples or task).items
    T = cfg.context_length
    if examples is not None and examples.kind != task.kind:
        raise UserError(f"{examples.path} holds {examples.kind} records, {task.path} "
                        f"{task.kind} records")
    n_tok = functools.lru_cache(maxsize=None)(lambda text: len(tok.encode(text)))
    if task.kind == "choice":
        # The sequence scored is prompt + answer, of at most T + 1 tokens.
        room = lambda it: T + 1 - max(n_tok(task.delimiter + c) for c in it.choices)  # noqa: E731
        max_new = 0
    else:
        max_new = setting.max_new_tokens or min(
            T - 1, max(n_tok(task.delimiter + it.target) for it in task.items) + EXTRA_NEW_TOKENS)
        room = lambda it: T - max_new  # noqa: E731
    prompts, used = _prompts(task, pool, examples is None, k, room, tok.encode, setting)
    if task.kind == "choice":
        scores = _choice_scores(params, cfg, tok, task, prompts, setting)
    else:
        scores = _completion_scores(params, cfg, tok, task, prompts, max_new, setting)
    return {"k": k, "n": len(prompts), **scores, "shots_used_mean": sum(used) / len(used),
            "shots_used_min": min(used)}


# --------------------------------------------------------------------------- report


def table(results: list[dict[str, Any]], shots: Sequence[int]) -> str:
    """The paper's layout: a row per task, a column per K, accuracy ± standard error in %."""
    head = ["task", "kind", "n", *[f"{k}-shot" for k in shots]]
    rows = []
    notes = []
    for r in results:
        cells = [r["task"], r["kind"], str(r["runs"][0]["n"])]
        for run in r["runs"]:
            cells.append(f"{100 * run['acc']:.1f} ± {100 * run['acc_stderr']:.1f}")
            if run["shots_used_min"] < run["k"]:
                notes.append(f"{r['task']} {run['k']}-shot: {run['shots_used_mean']:.1f} shots "
                             f"used on average (at least {run['shots_used_min']}): no more fit "
                             "the context")
            if "acc_sum" in run:
                notes.append(f"{r['task']} {run['k']}-shot: unnormalised "
                             f"{100 * run['acc_sum']:.1f}"
                             + (f", unconditional-normalised {100 * run['acc_uncond']:.1f}"
                                if "acc_uncond" in run else ""))
        rows.append(cells)
    widths = [max(len(x[c]) for x in [head, *rows]) for c in range(len(head))]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    lines = [fmt(head), fmt(["-" * w for w in widths]), *map(fmt, rows)]
    return "\n".join(lines + ([""] + notes if notes else []))


# --------------------------------------------------------------------------- training


_BROKEN_TASKS: set[tuple[str, ...]] = set()  # task lists that failed once: not retried


def during_training(params: Any, cfg: Config, step: int, write: Callable[[dict], None],
                    say: Callable[[str], None]) -> None:
    """Evaluates train.fewshot_tasks with train.fewshot_shots examples (fewer where a task has
    fewer other items), logging `fewshot/<task>/acc` and its `_stderr` at this step. A task
    file that cannot be used disables few-shot evaluation with a warning, as a missing
    validation split disables evaluation: a run is never stopped by it. Runs in one-process
    runs only (several processes would each need the whole parameters)."""
    paths = tuple(cfg.train.fewshot_tasks)
    if not paths or paths in _BROKEN_TASKS or jax.process_count() > 1:
        return
    try:
        tasks = [read_task(user_path(p)) for p in paths]
        tok = tokenizer.get_tokenizer(cfg.data.tokenizer)
        record: dict[str, Any] = {"step": step}
        for task in tasks:
            k = min(cfg.train.fewshot_shots, len(task.items) - 1)
            r = evaluate(params, cfg.model, tok, task, k)
            record[f"fewshot/{task.name}/acc"] = r["acc"]
            record[f"fewshot/{task.name}/acc_stderr"] = r["acc_stderr"]
            say(f"step {step} | {task.name} {r['k']}-shot accuracy {100 * r['acc']:.1f}% "
                f"± {100 * r['acc_stderr']:.1f} ({r['n']} items)")
    except UserError as e:
        warn(f"few-shot evaluation disabled: {e}")
        _BROKEN_TASKS.add(paths)
        return
    write(record)


# --------------------------------------------------------------------------- CLI


def shot_list(text: str) -> tuple[int, ...]:
    """Comma-separated numbers of shots, 0 allowed: `0,1,8`."""
    items = [s.strip() for s in text.split(",")]
    if not all(items):
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}")
    return tuple(nonneg_int(s) for s in items)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = OneLineParser(prog="python -m gptjax.fewshot", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, metavar="RUN_DIR", type=user_path)
    p.add_argument("--step", type=nonneg_int, help="checkpoint step (default: the latest)")
    p.add_argument("--task", required=True, action="append", metavar="TASK.jsonl",
                   type=user_path, help="a task file; repeat for several")
    p.add_argument("--shots", type=shot_list, default=(0, 1, 8), help="values of K (0,1,8)")
    p.add_argument("--examples", metavar="TRAIN.jsonl", type=user_path,
                   help="draw the examples from this file (default: the task's other items)")
    p.add_argument("--seed", type=nonneg_int, default=0, help="seed of the example draws")
    p.add_argument("--limit", type=positive_int, help="evaluate the first N items only")
    p.add_argument("--separator", help='between examples (default "\\n\\n" or the header\'s)')
    p.add_argument("--delimiter", help='between a context and its answer (default " ")')
    p.add_argument("--stop", help='ends completion decoding (default "\\n")')
    p.add_argument("--unconditional", action="store_true",
                   help=f"also normalise choices by their likelihood after "
                        f"{UNCONDITIONAL_CONTEXT!r}")
    p.add_argument("--max-new-tokens", type=positive_int,
                   help="completion decoding limit (default: longest target + 8)")
    p.add_argument("--batch-size", type=positive_int, default=scoring.DEFAULT_BATCH,
                   help="rows per call at full context (more at shorter lengths)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p.parse_args(argv)


def run(a: argparse.Namespace) -> dict[str, Any]:
    over = {"separator": a.separator, "delimiter": a.delimiter, "stop": a.stop}
    tasks = [read_task(t, over) for t in a.task]
    if a.examples and len(tasks) > 1:
        raise UserError("--examples goes with a single --task")
    examples = read_task(a.examples, over) if a.examples else None
    params, cfg, meta, step = load_model(a.checkpoint, a.step)
    tok = tokenizer.get_tokenizer(meta.get("tokenizer", cfg.data.tokenizer))
    setting = Setting(a.seed, a.limit, a.unconditional, a.max_new_tokens, a.batch_size,
                      progress=True)
    results = []
    for task in tasks:
        runs = [evaluate(params, cfg.model, tok, task, k, examples, setting) for k in a.shots]
        results.append({"task": task.name, "file": task.path, "kind": task.kind, "runs": runs})
    return {"checkpoint": str(a.checkpoint), "step": step, "tokenizer": tok.name,
            "shots": list(a.shots), "seed": a.seed, "tasks": results}


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)

    def body() -> None:
        out = run(a)
        if a.json:
            print(json.dumps(out), flush=True)
        else:
            print(f"checkpoint {out['checkpoint']} (step {out['step']}, {out['tokenizer']} "
                  f"tokenizer), seed {out['seed']}")
            print(table(out["tasks"], a.shots), flush=True)

    return run_cli("gptjax.fewshot", body)

