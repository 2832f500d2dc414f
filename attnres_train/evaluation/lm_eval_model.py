"""An lm-evaluation-harness model (``--model attnres``) for checkpoints and exported directories.

    attnres-lm-eval --model attnres --model_args pretrained=runs/demo/checkpoints/step_00000200 --tasks hellaswag

``attnres-lm-eval`` is lm-eval's own command line with this model registered (lm-eval 0.4 discovers models only
among its own modules, so plain ``lm_eval`` does not know ``attnres``; a native Kimi Linear export also runs there
as ``--model hf``). ``model_args``: ``pretrained`` (anything ``read_model_source`` reads), ``device`` (cpu),
``max_length`` (context window, default 2048), ``tokenizer`` ("byte" or a directory, when the source names none).

Requests: ``loglikelihood`` (sum of the continuation's log-probabilities and whether greedy decoding would give it),
``loglikelihood_rolling`` (a whole text in disjoint windows of ``max_length``) and ``generate_until`` (greedy
decoding up to ``max_gen_toks`` or a stop string). Each forward sees the full sequence: decoding keeps no cache
yet. An empty context is replaced by the EOS token, as lm-eval's own models do.
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
        from attnres_train.interop.pretrained import build_pretrained_model, load_tokenizer, read_model_source

        source = read_model_source(pretrained)
        self.tokenizer = load_tokenizer(tokenizer or source.tokenizer, pretrained)
        # lm-eval passes device="cuda" unless told otherwise; a CPU-only machine runs on the CPU.
        self._device = torch.device(device if torch.cuda.is_available() or not str(device).startswith("cuda")
                                    else "cpu")
        self.model = build_pretrained_model(source, self._device).eval()
        self.max_length = int(max_length)

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

    @torch.no_grad()
    def generate_until(self, requests) -> list[str]:
        results = []
        for request in requests:
            context, gen_kwargs = request.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.get("max_gen_toks", 256))
            tokens = self._encode(context) or [self.tokenizer.eos_token_id]
            generated: list[int] = []
            text = ""
            for _ in range(max_new):
                window = (tokens + generated)[-self.max_length:]
                logits = self.model(torch.tensor([window], device=self._device)).logits[0, -1]
                next_id = int(logits.argmax())
                if next_id == self.tokenizer.eos_token_id:
                    break
                generated.append(next_id)
                text = self.tokenizer.decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results


def main() -> None:
    """``attnres-lm-eval``: lm-eval's command line with ``--model attnres`` available."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()


if __name__ == "__main__":
    main()
