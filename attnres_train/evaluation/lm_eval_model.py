"""An lm-evaluation-harness model (``--model attnres``) for checkpoints and exported directories.

    attnres-lm-eval --model attnres --model_args pretrained=runs/demo/checkpoints/step_00000200 --tasks hellaswag

``attnres-lm-eval`` is lm-eval's own command line with this model registered (lm-eval 0.4 discovers models only
among its own modules, so plain ``lm_eval`` does not know ``attnres``; a native Kimi Linear export also runs there
as ``--model hf``). ``model_args``: ``pretrained`` (any path ``attnres_train.generate.load_for_generation``
loads), ``device`` (cpu), ``max_length`` (context window, default 2048), ``tokenizer`` ("byte" or a directory;
default: the one the source names), ``batch_size`` (rows decoded together by generate_until).

Requests: ``loglikelihood`` (sum of the continuation's log-probabilities and whether greedy decoding would give it),
``loglikelihood_rolling`` (a whole text in disjoint windows of ``max_length``) and ``generate_until`` (decoding with
the model's cache, ``attnres_train.generate``, up to ``max_gen_toks`` or a stop string; greedy unless the task sets
``do_sample``; requests with the same generation arguments run ``batch_size`` at a time, left-padded). A context
longer than ``max_length - max_gen_toks`` keeps its end. An empty context is replaced by the EOS token, as
lm-eval's own models do.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window


@register_model("attnres")
class AttnResLM(LM):
    def __init__(self, pretrained: str, device: str = "cpu", max_length: int = 2048, tokenizer: Optional[str] = None,
                 batch_size: Any = 1, **unused: Any):
        super().__init__()
        from attnres_train.generate.loading import load_for_generation

        # lm-eval passes device="cuda" unless told otherwise; a CPU-only machine runs on the CPU.
        self._device = torch.device(device if torch.cuda.is_available() or not str(device).startswith("cuda")
                                    else "cpu")
        loaded = load_for_generation(pretrained, self._device, tokenizer)
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.max_length = int(max_length)
        # lm-eval may pass "auto" (pick the largest that fits): one row at a time is what is known to fit.
        self.batch_size = int(batch_size) if str(batch_size).isdigit() and int(batch_size) > 0 else 1

    # --- helpers -----------------------------------------------------------------------------------------------
    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text) if text else []

    @torch.no_grad()
    def _log_probs(self, tokens: list[int]) -> torch.Tensor:
        """log p(tokens[t+1] | tokens[:t+1]) rows: ``[len(tokens) - 1, V]`` log-softmax of the model's logits."""
        input_ids = torch.tensor([tokens[:-1]], device=self._device)
        return F.log_softmax(self.model(input_ids).logits[0].float(), dim=-1)

    def _score(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        tokens = (context + continuation)[-(self.max_length + 1):]
        log_probs = self._log_probs(tokens)[-len(continuation):]
        targets = torch.tensor(continuation, device=log_probs.device)
        picked = log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
        return float(picked.sum()), bool((log_probs.argmax(dim=-1) == targets).all())

    # --- the three request types -------------------------------------------------------------------------------
    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        results = []
        for request in requests:
            context, continuation = request.args
            context_ids = self._encode(context) or [self.tokenizer.eos_token_id]
            results.append(self._score(context_ids, self._encode(continuation)))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        results = []
        for request in requests:
            (text,) = request.args
            total = 0.0
            for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
                    self._encode(text), self.tokenizer.eos_token_id, self.max_length, context_len=1)):
                total += self._score(list(context), list(continuation))[0]
            results.append(total)
        return results

    def generate_until(self, requests) -> list[str]:
        from attnres_train.generate import SamplingConfig, generate

        by_arguments: dict[tuple, list[int]] = {}
        parsed = []
        for index, request in enumerate(requests):
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = (until,) if isinstance(until, str) else tuple(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            sampled = bool(gen_kwargs.get("do_sample", False))
            sampling = SamplingConfig(max_new_tokens=max_new,
                                      temperature=float(gen_kwargs.get("temperature", 1.0)) if sampled else 0.0,
                                      top_p=float(gen_kwargs.get("top_p", 1.0)) if sampled else 1.0)
            tokens = self._encode(context) or [self.tokenizer.eos_token_id]
            parsed.append(tokens[-max(self.max_length - max_new, 1):])
            by_arguments.setdefault((until, sampling), []).append(index)
        results: list[str] = [""] * len(parsed)
        for (until, sampling), indices in by_arguments.items():
            for first in range(0, len(indices), self.batch_size):
                rows = indices[first:first + self.batch_size]
                texts = self._generate_rows([parsed[i] for i in rows], until, sampling, generate)
                for index, text in zip(rows, texts):
                    results[index] = text
        return results

    def _generate_rows(self, prompts: list[list[int]], until: tuple[str, ...], sampling, generate) -> list[str]:
        """One cached, batched decode; a row ends at EOS, ``max_new_tokens`` or once its text holds a stop string
        (the text is cut before it)."""
        produced: list[list[int]] = [[] for _ in prompts]

        def reached_stop(row: int, token: Optional[int]) -> bool:
            if token is None:
                return False
            produced[row].append(token)
            return bool(until) and any(stop in self.tokenizer.decode(produced[row]) for stop in until)

        outputs = generate(self.model, prompts, sampling, eos_token_id=self.tokenizer.eos_token_id,
                           on_token=reached_stop)
        texts = []
        for tokens in outputs:
            text = self.tokenizer.decode(tokens)
            for stop in until:
                text = text.split(stop)[0]
            texts.append(text)
        return texts


def main() -> None:
    """``attnres-lm-eval``: lm-eval's command line with ``--model attnres`` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
