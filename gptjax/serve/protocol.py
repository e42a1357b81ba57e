"""OpenAI's completion protocol, without the web framework: checking a request body, and the
JSON of choices, logprobs, chunks and errors. Pure functions, so each rule is testable alone."""

from __future__ import annotations

import dataclasses
import math
import secrets
from typing import Any

from gptjax.serve.engine import TOP_LOGPROBS
from gptjax.tokenizer import Tokenizer

MAX_CHOICES = 256  # prompts × n in one request: more is a client bug, not a workload
MAX_STOPS = 16


class ApiError(Exception):
    """An error the client caused (or may retry), as OpenAI reports it."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, kind: str = "invalid_request_error") -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = (status, message, param,
                                                                        code, kind)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param,
                          "code": self.code}}


@dataclasses.dataclass
class CompletionRequest:
    prompts: list[list[int]]
    texts: list[str]  # each prompt's text (decoded when given as ids)
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    n: int = 1
    stop: list[str] = dataclasses.field(default_factory=list)
    seed: int = 0
    stream: bool = False
    echo: bool = False
    logprobs: int | None = None
    include_usage: bool = False


def _bad(param: str, message: str) -> ApiError:
    return ApiError(400, message, param=param)


def _get(body: dict[str, Any], name: str, kinds: tuple[type, ...], default: Any) -> Any:
    """body[name] if of one of `kinds` (null means the default); bool is no number here."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        names = " or ".join(k.__name__.replace("str", "string").replace("float", "number")
                            .replace("int", "integer").replace("bool", "boolean")
                            for k in kinds)
        raise _bad(name, f"'{name}' must be {names}, got {type(value).__name__}: {value!r}")
    return value


def _prompts(value: Any, tok: Tokenizer) -> list[list[int]]:
    """A string, a list of strings, a list of token ids or a list of such lists."""

    def ids(x: Any) -> list[int]:
        if isinstance(x, str):
            out = tok.encode(x)
        elif isinstance(x, list) and all(isinstance(t, int) and not isinstance(t, bool)
                                         for t in x):
            bad = [t for t in x if not 0 <= t < tok.vocab_size]
            if bad:
                raise _bad("prompt", f"token id {bad[0]} is outside the vocabulary of "
                                     f"{tok.vocab_size}")
            out = list(x)
        else:
            raise _bad("prompt", "'prompt' must be a string, a list of strings, a list of "
                                 "token ids or a list of token-id lists")
        if not out:
            raise _bad("prompt", "the prompt is empty")
        return out

    if value is None:
        raise _bad("prompt", "'prompt' is required")
    if not _is_list_of_prompts(value):
        return [ids(value)]
    return [ids(x) for x in value]


def _is_list_of_prompts(value: Any) -> bool:
    """A list of strings or of id lists (not one string, nor one id list)."""
    return isinstance(value, list) and bool(value) and not all(isinstance(t, int) for t in value)


def _stop(value: Any) -> list[str]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad("stop", "'stop' must be a string or a list of strings")
    if len(items) > MAX_STOPS:
        raise _bad("stop", f"at most {MAX_STOPS} stop sequences, got {len(items)}")
    return [s for s in items if s]


def parse_completion(body: Any, tok: Tokenizer, context_length: int) -> CompletionRequest:
    """The request, checked; raises ApiError(400) naming the first bad field."""
    if not isinstance(body, dict):
        raise _bad(None, "the request body must be a JSON object")
    prompts = _prompts(body.get("prompt"), tok)
    r = CompletionRequest(prompts=prompts, texts=[
        p if isinstance(p, str) else tok.decode(ids) for p, ids in
        zip(body["prompt"] if _is_list_of_prompts(body["prompt"]) else [body["prompt"]],
            prompts)])
    r.max_tokens = _get(body, "max_tokens", (int,), 16)
    r.temperature = float(_get(body, "temperature", (int, float), 1.0))
    r.top_p = float(_get(body, "top_p", (int, float), 1.0))
    r.top_k = _get(body, "top_k", (int,), 0)
    r.n = _get(body, "n", (int,), 1)
    r.stop = _stop(body.get("stop"))
    seed = _get(body, "seed", (int,), None)
    r.stream = _get(body, "stream", (bool,), False)
    r.echo = _get(body, "echo", (bool,), False)
    r.logprobs = _get(body, "logprobs", (int,), None)
    options = _get(body, "stream_options", (dict,), {})
    r.include_usage = bool(options.get("include_usage", False))
    if r.max_tokens < 0:
        raise _bad("max_tokens", f"'max_tokens' must be >= 0, got {r.max_tokens}")
    if r.max_tokens == 0 and not r.echo:
        raise _bad("max_tokens", "'max_tokens' may be 0 only with 'echo'")
    if not (math.isfinite(r.temperature) and r.temperature >= 0):
        raise _bad("temperature", f"'temperature' must be a number >= 0, got {r.temperature}")
    if not (0 < r.top_p <= 1):  # NaN fails this too
        raise _bad("top_p", f"'top_p' must be in (0, 1], got {r.top_p}")
    if r.top_k < 0:
        raise _bad("top_k", f"'top_k' must be >= 0 (0: off), got {r.top_k}")
    if not 1 <= r.n <= 128:
        raise _bad("n", f"'n' must be in 1..128, got {r.n}")
    if len(r.prompts) * r.n > MAX_CHOICES:
        raise _bad("n", f"prompts × n may be at most {MAX_CHOICES}, got "
                        f"{len(r.prompts) * r.n}")
    if r.logprobs is not None and not 0 <= r.logprobs <= TOP_LOGPROBS:
        raise _bad("logprobs", f"'logprobs' must be in 0..{TOP_LOGPROBS}, got {r.logprobs}")
    if seed is not None and not 0 <= seed < 2**32:
        raise _bad("seed", f"'seed' must be in [0, 2**32 - 1], got {seed}")
    r.seed = secrets.randbits(32) if seed is None else seed
    for p in r.prompts:
        if len(p) + r.max_tokens > context_length:
            raise ApiError(400, f"This model's maximum context length is {context_length} "
                           f"tokens, however you requested {len(p) + r.max_tokens} tokens "
                           f"({len(p)} in your prompt; {r.max_tokens} for the completion).",
                           param="max_tokens", code="context_length_exceeded")
    return r


def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Where the first stop sequence begins in text[start:] (an index into text), if any."""
    hits = [i for s in stops if (i := text.find(s, start)) >= 0]
    return min(hits) if hits else None


def token_texts(tok: Tokenizer, ids: list[int]) -> list[str]:
    return [tok.decode([i]) for i in ids]


def logprobs_json(tok: Tokenizer, ids: list[int], lps: list[float | None],
                  tops: list[list[tuple[int, float]] | None], k: int, offset: int
                  ) -> dict[str, Any]:
    """OpenAI's `logprobs` object for these tokens; text offsets count from `offset`."""
    texts = token_texts(tok, ids)
    offsets, at = [], offset
    for t in texts:
        offsets.append(at)
        at += len(t)
    top_json: list[dict[str, float] | None] = []
    for i, top in zip(ids, tops):
        if top is None:
            top_json.append(None)
            continue
        d = {tok.decode([j]): lp for j, lp in top[:k]}
        top_json.append(d)
    # The chosen token is listed in its own top_logprobs too, as vLLM and OpenAI do.
    for d, t, lp in zip(top_json, texts, lps):
        if d is not None and lp is not None:
            d.setdefault(t, lp)
    # Extensions: each token's bytes (a character split over tokens shows as U+FFFD in
    # `tokens`), and the alternatives by id (two partial-byte tokens share a text key above).
    return {"tokens": texts, "token_logprobs": lps, "top_logprobs": top_json,
            "text_offset": offsets,
            "token_bytes": [list(tok.token_bytes(i)) for i in ids],
            "top_tokens": [None if top is None else
                           [{"id": j, "bytes": list(tok.token_bytes(j)), "logprob": lp}
                            for j, lp in top[:k]] for top in tops]}


def safe_end(text: str, stops: list[str], final: bool) -> int:
    """How much of `text` can be sent now: not a trailing U+FFFD (the rest of its character's
    bytes may follow, and an incomplete character decodes to one U+FFFD, so one is held back),
    nor a tail that may be the start of a stop sequence."""
    if final:
        return len(text)
    end = len(text)
    if end and text[end - 1] == "\ufffd":
        end -= 1
    hold = 0
    for s in stops:
        hold = max([hold] + [k for k in range(1, min(len(s), end + 1)) if
                             text[:end].endswith(s[:k])])
    return end - hold
