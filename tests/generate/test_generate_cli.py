"""``attnres-generate`` on the checkpoint of a real (one-step, tiny) training run: loading from a run directory, a
checkpoint directory and a ``.pt`` export, streamed greedy text equal to the full forward's argmax, and one clear
line for each kind of bad input."""

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from cli_helpers import BIN_DIR, TINY_ARGS, check_ok, complete_checkpoints, run_train, train_env  # noqa: E402

from attnres_train.generate import load_for_generation  # noqa: E402
from attnres_train.generate.cli import main, parse_args, run  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    run_dir = root / "run"
    check_ok(run_train([*TINY_ARGS, f"run_dir={run_dir}", "train.max_steps=1"], cwd=root))
    assert complete_checkpoints(run_dir) == ["step_00000001"]
    return run_dir


@pytest.fixture(scope="module")
def exported_dir(run_dir, tmp_path_factory):
    """The run's checkpoint as a Hugging Face directory (Block AttnRes: this package's own model type)."""
    from attnres_train.interop.export import main as export_main

    out = tmp_path_factory.mktemp("exported") / "model"
    export_main([str(run_dir / "checkpoints" / "step_00000001"), str(out)])
    assert '"model_type": "attnres"' in (out / "config.json").read_text()
    return out


class RecordingOutput(io.StringIO):
    """Counts the flushes: the text reaches the terminal in pieces as it is produced."""

    def __init__(self):
        super().__init__()
        self.flushed_lengths = []

    def flush(self):
        self.flushed_lengths.append(len(self.getvalue()))


@torch.no_grad()
def test_greedy_text_streams_and_equals_the_argmax_of_full_forwards(run_dir):
    loaded = load_for_generation(run_dir)
    assert loaded.source.endswith("step_00000001") and type(loaded.tokenizer).__name__ == "ByteTokenizer"
    ids = loaded.tokenizer.encode("The ")
    expected = []
    for _ in range(12):
        token = int(loaded.model(torch.tensor([ids + expected])).logits[0, -1].argmax())
        if token == loaded.tokenizer.eos_token_id:
            break
        expected.append(token)

    out = RecordingOutput()
    run(parse_args([str(run_dir), "--prompt", "The ", "--max-new-tokens", "12", "--temperature", "0"]), out)
    assert out.getvalue() == "The " + loaded.tokenizer.decode(expected) + "\n"
    assert len(set(out.flushed_lengths)) > 2  # prompt, then pieces of the continuation, not one final write


def test_every_kind_of_path_loads_the_same_weights(run_dir, exported_dir, tmp_path):
    tag_dir = run_dir / "checkpoints" / "step_00000001"
    from attnres_train.train.export import exported_state

    model_cfg, state = exported_state(tag_dir)
    export = tmp_path / "model.pt"
    torch.save({"model_config": model_cfg, "state_dict": state}, export)
    paths = (run_dir, run_dir / "checkpoints", tag_dir, export, exported_dir)
    models = [load_for_generation(p).model for p in paths]
    assert type(load_for_generation(exported_dir).tokenizer).__name__ == "ByteTokenizer"
    for model in models[1:]:
        assert set(model.state_dict()) == set(models[0].state_dict())
        for (name, a), (_, b) in zip(models[0].state_dict().items(), model.state_dict().items()):
            assert torch.equal(a, b), name


def test_generate_and_eval_read_an_exported_directory_like_its_checkpoint(run_dir, exported_dir, capsys):
    from attnres_train.evaluation.held_out import main as eval_main

    texts = []
    for path in (run_dir, exported_dir):
        out = io.StringIO()
        run(parse_args([str(path), "--prompt", "ab", "--prompt", "The q", "--max-new-tokens", "6",
                        "--temperature", "0.7", "--seed", "5"]), out)
        texts.append(out.getvalue())
    assert texts[0] == texts[1] and texts[0].count("\n") == 2
    records = []
    for path in (run_dir, exported_dir):
        eval_main([str(path), "--data", "seq_len=64", "--batches", "1", "--batch-size", "2"])
        records.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("{")])
    assert records[0] == records[1] and len(records[0]) == 1 and '"loss"' in records[0][0]


def test_console_script_batches_prompts(run_dir):
    command = [str(BIN_DIR / "attnres-generate"), str(run_dir), "--prompt", "ab", "--prompt", "Hello world",
               "--max-new-tokens", "5", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    result = subprocess.run(command, capture_output=True, text=True, env=train_env(), timeout=120)
    assert result.returncode == 0, result.stderr
    # Only the rows' lines: DeepSpeed (imported to read a checkpoint) may log its accelerator choice to stdout.
    lines = sorted(line for line in result.stdout.splitlines() if re.match(r"\[\d+\] ", line))
    assert lines[0].startswith("[1] ab") and lines[1].startswith("[2] Hello world"), result.stdout


@pytest.mark.parametrize("make_args,message", [
    (lambda run, tmp: [str(tmp / "missing"), "--prompt", "x"], "no such file or directory"),
    (lambda run, tmp: [str(tmp), "--prompt", "x"], "not a checkpoint"),
    (lambda run, tmp: [str(run / "metrics.jsonl"), "--prompt", "x"], "not a model export"),
    (lambda run, tmp: [str(run), "--prompt", ""], "--prompt #1 is empty"),
    (lambda run, tmp: [str(run), "--prompt", "x", "--temperature", "-1"], "temperature=-1.0"),
    (lambda run, tmp: [str(run), "--prompt", "x", "--top-p", "2"], "top_p=2.0"),
    (lambda run, tmp: [str(run), "--prompt", "x", "--max-new-tokens", "0"], "max_new_tokens=0"),
    (lambda run, tmp: [str(run), "--prompt", "x", "--tokenizer", str(tmp / "nope")], "tokenizer"),
])
def test_bad_input_gets_one_line_and_exit_code_2(run_dir, tmp_path, capsys, make_args, message):
    with pytest.raises(SystemExit) as exit_info:
        main(make_args(run_dir, tmp_path))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err, err


def test_a_checkpoint_whose_weights_do_not_fit_its_config_is_refused(run_dir, tmp_path, capsys):
    from attnres_train.train.export import exported_state

    model_cfg, state = exported_state(run_dir / "checkpoints" / "step_00000001")
    torch.save({"model_config": dict(model_cfg, hidden_size=32), "state_dict": state}, tmp_path / "bad.pt")
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad.pt"), "--prompt", "x"])
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has shape" in err and "the config gives" in err, err
