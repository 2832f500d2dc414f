"""``attnres-generate``: continue prompts with a trained model, streaming the text to stdout as it is produced.

    attnres-generate RUN_DIR --prompt "Once upon a time" --max-new-tokens 100 --temperature 0.8 --top-p 0.95
    attnres-generate model.pt --prompt "def main(" --prompt "import " --temperature 0     # greedy, batched
    attnres-generate exported/demo --prompt "Once"       # a directory written by attnres-export

One prompt streams token by token. Several prompts run as one left-padded batch; each is printed, as
``[i] prompt + continuation``, as soon as its row ends (EOS or --max-new-tokens). Bad input gets one line on
stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, TextIO

import torch

from .loading import load_for_generation
from .sampling import GenerationError, SamplingConfig, generate

REPLACEMENT_CHARACTER = "\ufffd"


class TextStream:
    """Token ids in, printable text out: holds back a trailing incomplete character (a multi-byte UTF-8
    character, or a BPE piece that decodes to U+FFFD until its continuation arrives)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.printed = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        if text.endswith(REPLACEMENT_CHARACTER) or not text.startswith(self.printed):
            return ""
        new, self.printed = text[len(self.printed):], text
        return new

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        new = text[len(self.printed):] if text.startswith(self.printed) else ""
        self.printed = text
        return new


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="attnres-generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a run directory, a complete checkpoint directory, a Hugging Face directory "
                                      "written by attnres-export, or a model .pt export")
    parser.add_argument("--prompt", action="append", required=True, help="text to continue (repeat for a batch)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1]")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer", default=None,
                        help="'byte' or a Hugging Face tokenizer (default: the model's own, else byte)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    return parser.parse_args(argv)


def run(args: argparse.Namespace, out: TextIO) -> None:
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                              seed=args.seed)
    for index, prompt in enumerate(args.prompt):
        if prompt == "":
            raise GenerationError(f"--prompt #{index + 1} is empty: give at least one character to continue")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise GenerationError(f"--device={args.device!r}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise GenerationError(f"--device={args.device!r}: CUDA is not available on this machine")
    loaded = load_for_generation(args.model, device=device, tokenizer=args.tokenizer)
    tokenizer = loaded.tokenizer
    prompts = [tokenizer.encode(p) for p in args.prompt]
    for index, ids in enumerate(prompts):
        if not ids:
            raise GenerationError(f"--prompt #{index + 1} encodes to no tokens")
    streams = [TextStream(tokenizer) for _ in prompts]
    single = len(prompts) == 1
    if single:
        out.write(args.prompt[0])
        out.flush()

    def on_token(row: int, token: Optional[int]) -> None:
        stream = streams[row]
        if token is not None:
            text = stream.push(token)
            if single and text:
                out.write(text)
                out.flush()
            return
        tail = stream.flush()
        if single:
            out.write(tail + "\n")
        else:
            out.write(f"[{row + 1}] {args.prompt[row]}{stream.printed}\n")
        out.flush()

    generate(loaded.model, prompts, sampling, eos_token_id=tokenizer.eos_token_id, on_token=on_token)


def main(argv=None) -> None:
    args = parse_args(argv)
    try:
        run(args, sys.stdout)
    except GenerationError as exc:
        print(f"attnres-generate: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
