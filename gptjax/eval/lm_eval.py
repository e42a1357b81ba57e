"""The `gptjax` model for EleutherAI's lm-evaluation-harness (the `eval` extra).

    python -m gptjax.lm_eval --model gptjax --model_args checkpoint=RUN_DIR[,step=N,batch_size=B]
        --tasks TASKS [any other lm-eval flag]

runs lm-eval's own command line with the model registered. In Python, importing this module
registers it: `lm_eval.simple_evaluate(model="gptjax", model_args="checkpoint=RUN_DIR", ...)`.

The three request kinds run on the jitted model and sampler (gptjax/eval/scoring.py):
`loglikelihood` (batched over power-of-two length buckets), `loglikelihood_rolling` (the windows
of gptjax.eval's sliding evaluation at stride = context length, first token predicted from
end-of-text) and `generate_until` (greedy, or sampled when do_sample or a positive temperature
is given; `until` stop strings and end-of-text end a row; `max_gen_toks`, default 256).

This file is gptjax/lm_eval.py, but `import lm_eval` below is the harness: absolute imports
(Python 3) look the name up on sys.path, where gptjax's folder is not.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from lm_eval.__main__ import cli_evaluate
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import simple_parse_args_string

from gptjax.lora.runs import load_model
from gptjax import tokenizer
from gptjax.eval import scoring
from gptjax.cli import run_cli
from gptjax.errors import UserError

DEFAULT_MAX_GEN_TOKS = 256


def _int_arg(name: str, value: Any, default: int, low: int = 1) -> int:
    """lm-eval passes model_args as parsed strings/numbers and batch_size as str or int."""
    if value is None or value == "":
        return default
    if isinstance(value, str) and value.startswith("auto"):
        return default  # no auto-tuning: the buckets already size calls by length
    try:
        out = int(value)
    except (TypeError, ValueError):
        raise UserError(f"gptjax model: {name} must be an integer, got {value!r}") from None
    if out < low:
        raise UserError(f"gptjax model: {name} must be at least {low}, got {out}")
    return out


@register_model("gptjax")
class GptjaxLM(TemplateLM):
    """A gptjax run directory as an lm-eval model."""

    def __init__(self, checkpoint: str = "", step: int | str | None = None,
                 batch_size: int | str | None = None, seed: int | str = 0,
                 max_gen_toks: int | str | None = None, **_ignored: Any) -> None:
        # **_ignored: lm-eval passes device, max_batch_size and the like to every model.
        super().__init__()
        if not checkpoint:
            raise UserError("gptjax model: give --model_args checkpoint=RUN_DIR")
        s = None if step in (None, "") else _int_arg("step", step, 0, low=0)
        self.params, cfg, meta, self.step = load_model(checkpoint, s)
        self.cfg = cfg.model
        self.tok = tokenizer.get_tokenizer(meta.get("tokenizer", cfg.data.tokenizer))
        self.batch = _int_arg("batch_size", batch_size, scoring.DEFAULT_BATCH)
        self.seed = _int_arg("seed", seed, 0, low=0)
        self.max_gen_toks = _int_arg("max_gen_toks", max_gen_toks, DEFAULT_MAX_GEN_TOKS)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None
                               ) -> GptjaxLM:
        return cls.create_from_arg_obj(simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None
                            ) -> GptjaxLM:
        # lm-eval's own versions pass its --batch_size beside model_args, so a batch_size in
        # both raised TypeError; here model_args wins.
        extra = {k: v for k, v in (additional_config or {}).items()
                 if v is not None and k not in arg_dict}
        return cls(**arg_dict, **extra)

    @property
    def eot_token_id(self) -> int:
        return self.tok.eot_id

    @property
    def max_length(self) -> int:
        return self.cfg.context_length

    @property
    def tokenizer_name(self) -> str:
        return self.tok.name

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   **kwargs: Any) -> list[int]:
        return self.tok.encode(string)

    def tok_decode(self, tokens: Sequence[int], **kwargs: Any) -> str:
        return self.tok.decode(list(tokens))

    def _loglikelihood_tokens(self, requests: list[tuple[tuple[str, str], list[int], list[int]]],
                              disable_tqdm: bool = False, **kwargs: Any
                              ) -> list[tuple[float, bool]]:
        pairs = [(ctx, cont) for _, ctx, cont in requests]
        out = scoring.loglikelihoods(self.params, self.cfg, pairs, batch_size=self.batch,
                                     progress=not disable_tqdm)
        for (key, _, _), ans in zip(requests, out):
            self.cache_hook.add_partial("loglikelihood", key, ans)
        return out

    def loglikelihood_rolling(self, requests: list[Any], disable_tqdm: bool = False
                              ) -> list[float]:
        texts = [req.args[0] for req in requests]
        out = scoring.rolling_loglikelihoods(self.params, self.cfg,
                                             [self.tok.encode(t) for t in texts], self.eot_token_id,
                                             batch_size=self.batch, progress=not disable_tqdm)
        for t, ans in zip(texts, out):
            self.cache_hook.add_partial("loglikelihood_rolling", (t,), ans)
        return out

    def _sampling(self, kw: dict[str, Any]) -> tuple[dict[str, Any], list[str], int]:
        """(generate_texts settings, stop strings, max new tokens) of a request's gen_kwargs."""
        kw = dict(kw or {})
        until = kw.pop("until", None)
        stops = [until] if isinstance(until, str) else list(until or [])
        max_new = _int_arg("max_gen_toks", kw.pop("max_gen_toks", None), self.max_gen_toks)
        temperature = float(kw.pop("temperature", 0.0) or 0.0)
        do_sample = kw.pop("do_sample", None)
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0
        settings = {"temperature": temperature, "top_k": int(kw.pop("top_k", 0) or 0),
                    "top_p": float(kw.pop("top_p", 1.0) or 1.0)}
        # The room the prompt needs: lm-eval truncates the context's start, as we do.
        return settings, stops, min(max_new, self.cfg.context_length - 1)

    def generate_until(self, requests: list[Any], disable_tqdm: bool = False) -> list[str]:
        out = [""] * len(requests)
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):
            groups.setdefault(repr(sorted((req.args[1] or {}).items())), []).append(i)
        for idx in groups.values():
            settings, stops, max_new = self._sampling(requests[idx[0]].args[1])
            prompts = [self.tok.encode(requests[i].args[0]) or [self.eot_token_id] for i in idx]
            texts = scoring.generate_texts(
                self.params, self.cfg, self.tok, prompts, max_new_tokens=max_new, stops=stops,
                seed=self.seed, batch_size=self.batch, truncate_prompt=True,
                progress=not disable_tqdm, **settings)
            for i, t in zip(idx, texts):
                out[i] = t
                self.cache_hook.add_partial("generate_until", requests[i].args, t)
        return out


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line, with `--model gptjax` available."""
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]  # lm-eval's parser reads sys.argv itself
    return run_cli("gptjax.lm_eval", cli_evaluate)

