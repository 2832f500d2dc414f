"""A real (tiny, ZeRO-3) training checkpoint leaves the framework: native Kimi Linear export with logits equal to
transformers' own model, import back to identical tensors, attnres-eval, and the CLI refusals."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from cli_helpers import BIN_DIR, TINY_ARGS, check_ok, run, run_train

from attnres_train.interop.pretrained import build_pretrained_model, initial_weights, read_model_source
from attnres_train.interop.kimi_linear import InteropError

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("zero3")
    run_dir = root / "run"
    check_ok(run_train([*TINY_ARGS, "model.residual=standard", "parallel=zero3", "train.max_steps=2",
                        f"run_dir={run_dir}"], cwd=root))
    return run_dir / "checkpoints" / "step_00000002"


@pytest.fixture(scope="module")
def native_dir(zero3_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("native") / "model"
    result = check_ok(run([str(BIN_DIR / "attnres-export"), str(zero3_checkpoint), str(out)], cwd=out.parent))
    assert "kimi_linear" in result.stdout
    return out


def test_zero3_shards_are_read_like_deepspeeds_own_converter(zero3_checkpoint):
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ours = read_model_source(zero3_checkpoint).state
    theirs = get_fp32_state_dict_from_zero_checkpoint(str(zero3_checkpoint.parent), tag=zero3_checkpoint.name)
    assert set(ours) == set(theirs)
    for name, value in theirs.items():
        assert torch.equal(ours[name], value), name


NATIVE_LOGITS = textwrap.dedent("""
    import sys
    sys.modules["fla"] = None  # transformers would call fla's GPU kernels when fla is importable
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
    assert type(model).__name__ == "KimiLinearForCausalLM", type(model)
    ids = torch.load(sys.argv[2])
    with torch.no_grad():
        torch.save(model(ids).logits, sys.argv[3])
""")


def test_native_export_gives_transformers_the_same_logits(native_dir, zero3_checkpoint, tmp_path):
    config = json.loads((native_dir / "config.json").read_text())
    assert config["model_type"] == "kimi_linear" and config["layer_types"][-1] == "full_attention"
    ids = torch.randint(0, 256, (2, 48), generator=torch.Generator().manual_seed(0))
    torch.save(ids, tmp_path / "ids.pt")
    script = tmp_path / "native_logits.py"
    script.write_text(NATIVE_LOGITS)
    check_ok(subprocess.run([sys.executable, str(script), str(native_dir), str(tmp_path / "ids.pt"),
                             str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300))
    theirs = torch.load(tmp_path / "logits.pt")
    with torch.no_grad():
        ours = build_pretrained_model(read_model_source(zero3_checkpoint)).eval()(ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-4, rtol=0)


def test_import_of_the_export_gives_identical_tensors(native_dir, zero3_checkpoint):
    saved = read_model_source(zero3_checkpoint)
    imported = read_model_source(native_dir)
    assert imported.kind == "kimi_linear" and imported.tokenizer == "byte"
    assert set(imported.state) == set(saved.state)
    for name, value in saved.state.items():
        assert torch.equal(imported.state[name], value), name
    weights = initial_weights(str(native_dir), saved.model_cfg)  # train.init_from
    assert all(torch.equal(weights[name], value) for name, value in saved.state.items())


def test_a_run_started_from_the_export_has_its_loss_on_the_first_batch(native_dir, tmp_path):
    """attnres-train ... train.init_from=EXPORT: step 1's logged loss is the exported model's loss on the batch the
    run trained on (a run from its own random init, or any other weights, logs another loss)."""
    import yaml

    from attnres_train.data import build_train_loader
    from attnres_train.generate import load_for_generation
    from attnres_train.model.loss import language_model_loss

    run_dir = tmp_path / "run"
    check_ok(run_train([*TINY_ARGS, "model.residual=standard", "train.max_steps=1", f"train.init_from={native_dir}",
                        "train.val_every=0", f"run_dir={run_dir}"], cwd=tmp_path))
    logged = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert logged["step"] == 1
    resolved = yaml.safe_load((run_dir / "resolved_config.yaml").read_text())
    train = resolved["train"]
    loader = build_train_loader(resolved["data"], micro_batch_size=train["micro_batch_size"], seed=train["seed"],
                                grad_accum_steps=train["grad_accum_steps"])
    batch = next(loader)
    model = load_for_generation(native_dir).model
    with torch.no_grad():
        loss = language_model_loss(model(batch["input_ids"], doc_ids=batch["doc_ids"]).logits, batch["labels"])
    assert logged["loss"] == pytest.approx(float(loss), rel=1e-5)


def test_init_from_names_every_field_that_differs(native_dir, zero3_checkpoint):
    cfg = read_model_source(zero3_checkpoint).model_cfg
    other = type(cfg).from_mapping({**cfg.to_dict(), "hidden_size": 32, "routed_scaling_factor": 2.0})
    with pytest.raises(InteropError, match=r"set model.hidden_size=64 \(this run: 32\), "
                                           r"model.routed_scaling_factor=1.0 \(this run: 2.0\)"):
        initial_weights(str(native_dir), other)


def test_eval_matches_the_runs_validation_loss(zero3_checkpoint):
    run_dir = zero3_checkpoint.parent.parent
    val_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in line][-1]["val_loss"]
    result = check_ok(run([str(BIN_DIR / "attnres-eval"), str(zero3_checkpoint), "--data", "seq_len=64",
                           "--batches", "1", "--batch-size", "2"], cwd=run_dir))
    (record,) = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert record["source"] == "stdlib" and record["tokens"] == 128 and record["bytes"] <= 128
    assert record["loss"] == pytest.approx(val_loss, rel=1e-5)
    assert record["bits_per_byte"] == pytest.approx(record["loss"] * record["tokens"] / record["bytes"] / 0.6931471805599453)


def test_generate_and_eval_read_the_native_export_like_the_checkpoint(native_dir, zero3_checkpoint, capsys):
    import io

    from attnres_train.evaluation.held_out import main as eval_main
    from attnres_train.generate.cli import parse_args, run as generate_run

    run_dir = zero3_checkpoint.parent.parent
    val_loss = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
                if "val_loss" in line][-1]["val_loss"]
    eval_main([str(native_dir), "--data", "seq_len=64", "--batches", "1", "--batch-size", "2"])
    (record,) = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert record["loss"] == pytest.approx(val_loss, rel=1e-5)
    texts = []
    for path in (zero3_checkpoint, native_dir):
        out = io.StringIO()
        generate_run(parse_args([str(path), "--prompt", "def ", "--max-new-tokens", "8", "--temperature", "0"]), out)
        texts.append(out.getvalue())
    assert texts[0] == texts[1] and texts[0].startswith("def ")


def test_cli_refusals_are_one_line_and_nonzero(native_dir, zero3_checkpoint, tmp_path):
    export = str(BIN_DIR / "attnres-export")
    cases = {
        "exists": ([export, str(zero3_checkpoint), str(native_dir)], "not overwriting"),
        "not_a_model": ([export, str(tmp_path), str(tmp_path / "out")], "neither a complete training checkpoint"),
        "own_format_forced_native": ([export, str(zero3_checkpoint), str(tmp_path / "o2"), "--format", "kimi_linear",
                                      "--tokenizer", "missing-dir/"], "cannot be loaded"),
    }
    for name, (command, message) in cases.items():
        result = run(command, cwd=tmp_path)
        assert result.returncode == 2, (name, result.stderr)
        assert message in result.stderr and "Traceback" not in result.stderr, (name, result.stderr)
    no_tokenizer = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(native_dir), str(no_tokenizer)], check=True)
    (no_tokenizer / "attnres_tokenizer.json").unlink()
    result = run([str(BIN_DIR / "attnres-eval"), str(no_tokenizer)], cwd=tmp_path)
    assert result.returncode == 2 and "no tokenizer found" in result.stderr and "Traceback" not in result.stderr
