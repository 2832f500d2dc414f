#!/usr/bin/env python
"""The trainer on one GPU, end to end: bf16 DeepSpeed training with fla's kernels, sized for under 8 minutes on
one H100/H200 (Triton and fla autotuning included).

1. parity: ``model=tiny`` in bf16 on the GPU against fp32 on the CPU, same weights and batch: the first step's
   loss and gradients, for KDA and Gated DeltaNet, each with standard and block AttnRes.
2. training: ``model=kimi_linear_1b train=gpu`` on 4096-token rows through ``attnres-train`` (DeepSpeed, bf16):
   the loss falls; tokens/s, MFU (the model's exact FLOP count) and peak memory come from ``metrics.jsonl``;
   then the same with ``train.compile=true``.
3. preemption: a run stopped by SIGTERM at a step and relaunched against an uninterrupted run of the same
   config; its final checkpoint exported with ``attnres-export`` and loaded on the CPU, where its loss on a
   batch is compared with the checkpoint's on the GPU.
4. flash-attn: when installed, its MLA/GQA path against SDPA (the gpu-marked tests of tests/model).

Every part runs even when an earlier one failed, and the script exits 1 if any failed. Each launch has its own
time limit and all of them share ``--budget-s`` (480 s): what cannot start in time fails as not run. After every
part it rewrites ``benchmarks/results/gpu_train_<device>.json``: device, driver, library versions, each part's
config and figures, and ``mfu`` / ``tokens_per_s`` per training variant.

    python scripts/gpu_check_train.py                                  # on a CUDA machine
    python scripts/gpu_check_train.py --cpu-dry-run --out /tmp/dry.json   # every part at toy size on the CPU

``--cpu-dry-run`` runs the same code at toy sizes on the CPU (bf16 on the CPU stands in for the GPU in part 1;
part 2's compiled variant is not run because ``train.compile`` is CUDA-only), so that GPU minutes go to the GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from attnres_train.model import ModelConfig, build_model  # noqa: E402
from attnres_train.model.loss import language_model_loss  # noqa: E402
from bench_common import RESULTS_DIR, environment, one_process_environment  # noqa: E402

# bf16 keeps 8 significant bits: one rounding is ~0.4% relative, and a forward of a few layers compounds a few
# of them. Parity bounds, bf16 (GPU) against fp32 (CPU) on the same weights and batch:
LOSS_REL_TOL = 2e-2  # first-step loss
GRAD_NORM_REL_TOL = 5e-2  # norm of the whole gradient
GRAD_COSINE_MIN = 0.99  # cosine between the two whole gradients (a direction check the norm cannot make)
# A resumed run against an uninterrupted one: fla's kernels accumulate with atomics, so bf16 runs are not
# bitwise reproducible; each loss after the resume point must agree within this (relative).
RESUME_LOSS_REL_TOL = 2e-2
EXPORT_LOSS_REL_TOL = 2e-2  # the exported model on the CPU (fp32) against the checkpoint on the GPU (bf16)

PARITY_VARIANTS = [("kda", "standard"), ("kda", "block_attnres"), ("gdn", "standard"), ("gdn", "block_attnres")]


class CheckFailed(Exception):
    pass


class Budget:
    """The script's wall-clock budget: every launch gets at most its own limit and at most what is left, so that a
    hang in one part still leaves time for the report (a GPU lease ends the command at its own limit)."""

    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def limit(self, seconds: float) -> float:
        left = self.deadline - time.monotonic()
        if left < 5:
            raise CheckFailed("not run: the time budget (--budget-s) is spent")
        return min(seconds, left)


def sizes(dry_run: bool) -> dict:
    """Every size the parts use; the dry run's are toy sizes that exercise the same code."""
    if dry_run:
        return {"parity_seq_len": 64, "parity_rows": 2,
                "train": {"model": "tiny", "seq_len": 64, "micro_batch": 2, "grad_accum": 2, "steps": 6,
                          "log_every": 2},
                "resume": {"model": "tiny", "seq_len": 64, "micro_batch": 2, "steps": 6, "stop_after": 3},
                "limits_s": {"train": 240, "train_compiled": 240, "resume_launch": 240, "export": 240, "flash": 240}}
    return {"parity_seq_len": 512, "parity_rows": 2,
            # 2 x 2 rows of 4096 tokens per step: the planner puts kimi_linear_1b at ~53 GiB with micro-batches
            # of 2 (73 GiB with 4, too close to an H100's 80)
            "train": {"model": "kimi_linear_1b", "seq_len": 4096, "micro_batch": 2, "grad_accum": 2, "steps": 24,
                      "log_every": 4},
            # small-model steps take tens of milliseconds on a GPU: 14 steps after the stop point leave SIGTERM
            # ample time to land before the run would finish on its own
            "resume": {"model": "small", "seq_len": 1024, "micro_batch": 4, "steps": 20, "stop_after": 6},
            # per launch; start-up, autotuning and the final checkpoint (~28 GB for the 1B model) included
            "limits_s": {"train": 180, "train_compiled": 240, "resume_launch": 120, "export": 120, "flash": 120}}


def preset(name: str, **overrides) -> ModelConfig:
    fields = yaml.safe_load((REPO / "configs" / "model" / f"{name}.yaml").read_text())
    fields.update(overrides)
    return ModelConfig.from_mapping(fields)


# --------------------------------------------------------------------------------------------------------------
# 1. parity
# --------------------------------------------------------------------------------------------------------------

def first_step(model, input_ids, doc_ids, labels):
    """Loss and the flattened fp32 gradient of one forward/backward."""
    model.zero_grad(set_to_none=True)
    out = model(input_ids, doc_ids=doc_ids)
    loss = language_model_loss(out.logits, labels) + out.aux_loss
    loss.backward()
    grads = [p.grad.float().flatten().cpu() if p.grad is not None else torch.zeros(p.numel())
             for p in model.parameters()]
    return loss.item(), torch.cat(grads)


def check_parity(device: torch.device, size: dict) -> dict:
    results = {}
    for mixer, residual in PARITY_VARIANTS:
        name = f"{mixer}+{residual}"
        config = preset("tiny", linear_mixer=mixer, residual=residual)
        torch.manual_seed(0)
        reference = build_model(config)
        tested = build_model(config)
        tested.load_state_dict(reference.state_dict())
        tested = tested.to(device=device, dtype=torch.bfloat16)
        generator = torch.Generator().manual_seed(1)
        rows, seq_len = size["parity_rows"], size["parity_seq_len"]
        input_ids = torch.randint(0, config.vocab_size, (rows, seq_len), generator=generator)
        doc_ids = torch.zeros_like(input_ids)
        doc_ids[:, seq_len // 3:] = 1  # one document boundary per row: the packed path is the one training takes
        labels = input_ids.roll(-1, dims=1)
        ref_loss, ref_grad = first_step(reference, input_ids, doc_ids, labels)
        loss, grad = first_step(tested, input_ids.to(device), doc_ids.to(device), labels.to(device))
        figures = {
            "loss_fp32_cpu": ref_loss, "loss_bf16": loss,
            "loss_rel_err": abs(loss - ref_loss) / abs(ref_loss),
            "grad_norm_fp32_cpu": ref_grad.norm().item(), "grad_norm_bf16": grad.norm().item(),
            "grad_norm_rel_err": abs(grad.norm().item() - ref_grad.norm().item()) / ref_grad.norm().item(),
            "grad_cosine": torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0).item(),
        }
        figures["passed"] = (figures["loss_rel_err"] <= LOSS_REL_TOL
                             and figures["grad_norm_rel_err"] <= GRAD_NORM_REL_TOL
                             and figures["grad_cosine"] >= GRAD_COSINE_MIN)
        results[name] = figures
        print(f"  {name:22s} loss {ref_loss:.4f} vs {loss:.4f} (rel {figures['loss_rel_err']:.2e})  grad norm rel "
              f"{figures['grad_norm_rel_err']:.2e}  cosine {figures['grad_cosine']:.5f}  "
              f"{'ok' if figures['passed'] else 'FAILED'}")
    failed = [name for name, figures in results.items() if not figures["passed"]]
    if failed:
        raise CheckFailed(f"bf16 vs fp32 parity outside the bounds for {failed}", results)
    return {"tolerances": {"loss_rel": LOSS_REL_TOL, "grad_norm_rel": GRAD_NORM_REL_TOL,
                           "grad_cosine_min": GRAD_COSINE_MIN}, "variants": results}


# --------------------------------------------------------------------------------------------------------------
# training runs through the CLI
# --------------------------------------------------------------------------------------------------------------

def train_command(run_dir: Path, model: str, seq_len: int, micro_batch: int, grad_accum: int, steps: int,
                  log_every: int, dry_run: bool, extra: tuple[str, ...] = ()) -> list[str]:
    return [sys.executable, "-m", "attnres_train.train.cli", f"model={model}",
            "train=cpu_demo" if dry_run else "train=gpu", f"run_dir={run_dir}", f"data.seq_len={seq_len}",
            f"train.max_steps={steps}", f"train.micro_batch_size={micro_batch}",
            f"train.grad_accum_steps={grad_accum}", f"train.log_every={log_every}", "train.val_every=0",
            "train.val_batches=1", "train.checkpoint_every=0", "train.progress_bar=false", "train.resume=auto",
            "optim.warmup_steps=2", *extra]


def child_env() -> dict:
    env = one_process_environment()
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_to_end(command: list[str], log: Path, timeout_s: float) -> None:
    with log.open("w") as out:
        try:
            code = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO,
                                  timeout=timeout_s).returncode
        except subprocess.TimeoutExpired:
            raise CheckFailed(f"{' '.join(command[3:])}: no exit within {timeout_s:.0f} s (log: {log})") from None
    if code != 0:
        raise CheckFailed(f"{' '.join(command[3:])}: exit {code}; last lines:\n{tail(log)}")


def tail(log: Path, lines: int = 25) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def metrics(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise CheckFailed(f"{path}: missing")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def step_records(run_dir: Path) -> list[dict]:
    return [r for r in metrics(run_dir) if "loss" in r and "step" in r and "tokens_per_s" in r]


def training_figures(run_dir: Path) -> dict:
    """Loss trajectory and steady-state speed: the first logging window holds start-up, compilation and
    autotuning, so speed is the mean over the later windows."""
    records = step_records(run_dir)
    if len(records) < 3:
        raise CheckFailed(f"{run_dir}/metrics.jsonl: {len(records)} step records, expected at least 3")
    steady = records[1:]
    losses = [r["loss"] for r in records]
    if any(loss is None or not math.isfinite(loss) for loss in losses):
        raise CheckFailed(f"{run_dir}: non-finite loss in {losses}")
    mfus = [r["mfu"] for r in steady if r.get("mfu") is not None]
    figures = {
        "losses": {r["step"]: r["loss"] for r in records},
        "tokens_per_s": sum(r["tokens_per_s"] for r in steady) / len(steady),
        "step_time_s": sum(r["step_time_s"] for r in steady) / len(steady),
        "mfu": sum(mfus) / len(mfus) if mfus else None,
        "peak_memory_allocated_gib": max((r.get("peak_memory_allocated_bytes") or 0) for r in records) / 2**30,
        "peak_memory_reserved_gib": max((r.get("peak_memory_reserved_bytes") or 0) for r in records) / 2**30,
    }
    if not losses[-1] < losses[0] - 0.5:
        raise CheckFailed(f"{run_dir}: the loss did not fall (first {losses[0]:.3f}, last {losses[-1]:.3f})", figures)
    return figures


def check_training(work: Path, size: dict, dry_run: bool, budget: Budget) -> dict:
    t = size["train"]
    variants = {"eager": ()} if dry_run else {"eager": (), "compiled": ("train.compile=true",)}
    results, failures = {}, []
    for name, extra in variants.items():
        run_dir = work / f"train_{name}"
        start = time.perf_counter()
        try:
            run_to_end(train_command(run_dir, t["model"], t["seq_len"], t["micro_batch"], t["grad_accum"], t["steps"],
                                     t["log_every"], dry_run, extra), work / f"train_{name}.log",
                       budget.limit(size["limits_s"]["train_compiled" if extra else "train"]))
            figures = training_figures(run_dir)
            figures["passed"] = True
        except CheckFailed as failure:
            figures = {"passed": False, "error": str(failure.args[0]),
                       **(failure.args[1] if len(failure.args) > 1 else {})}
            failures.append(name)
        figures["wall_s"] = time.perf_counter() - start
        results[name] = figures
        mfu = figures.get("mfu")
        print(f"  {name:9s} {'ok' if figures['passed'] else 'FAILED'}  tokens/s {figures.get('tokens_per_s', 0):,.0f}  "
              f"MFU {'n/a' if mfu is None else f'{mfu:.1%}'}  peak {figures.get('peak_memory_allocated_gib', 0):.1f} "
              f"GiB  wall {figures['wall_s']:.0f} s")
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # a 1B model's optimizer state: ~15 GB
    config = {**t, "train_group": "cpu_demo" if dry_run else "gpu"}
    if dry_run:
        config["not_run"] = "train.compile=true: CUDA-only, not dry-run on the CPU"
    if failures:
        raise CheckFailed(f"training variants failed: {failures}", {"config": config, "variants": results})
    return {"config": config, "variants": results}


# --------------------------------------------------------------------------------------------------------------
# 3. preemption
# --------------------------------------------------------------------------------------------------------------

def stop_at_step(command: list[str], run_dir: Path, log: Path, step: int, timeout_s: float) -> int:
    """Launch ``command``, send SIGTERM once ``metrics.jsonl`` records ``step``, and return the last step the
    stopped run recorded."""
    with log.open("w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline and process.poll() is None:
                path = run_dir / "metrics.jsonl"
                if path.is_file() and any(r.get("step", 0) >= step for r in
                                          (json.loads(line) for line in path.read_text().splitlines() if line.strip())):
                    process.send_signal(signal.SIGTERM)
                    break
                time.sleep(0.05)
            code = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            raise CheckFailed(f"the run to stop at step {step} did not exit in {timeout_s:.0f} s (log: {log})") from None
    if code != 0:
        raise CheckFailed(f"the run stopped by SIGTERM exited {code}; last lines:\n{tail(log)}")
    if (run_dir / "FINISHED").exists():
        raise CheckFailed(f"the run meant to stop at step {step} finished before SIGTERM reached it")
    return max(r["step"] for r in step_records(run_dir))


def check_preemption(work: Path, size: dict, device: torch.device, dry_run: bool, budget: Budget) -> dict:
    r = size["resume"]
    straight, stopped = work / "resume_straight", work / "resume_stopped"

    def command(run_dir):
        return train_command(run_dir, r["model"], r["seq_len"], r["micro_batch"], 1, r["steps"], 1, dry_run)

    # The uninterrupted run and the run to stop share the machine; neither is timed.
    first_limit = budget.limit(size["limits_s"]["resume_launch"])  # nothing starts once the budget is spent
    reference = subprocess.Popen(command(straight), stdout=(work / "resume_straight.log").open("w"),
                                 stderr=subprocess.STDOUT, env=child_env(), cwd=REPO)
    try:
        stopped_at = stop_at_step(command(stopped), stopped, work / "resume_stopped.log", r["stop_after"], first_limit)
        checkpoints = sorted((stopped / "checkpoints").glob("step_*"))
        if not checkpoints or checkpoints[-1].name != f"step_{stopped_at:08d}":
            raise CheckFailed(f"SIGTERM at step {stopped_at}: expected checkpoint step_{stopped_at:08d}, found "
                              f"{[c.name for c in checkpoints]}")
        run_to_end(command(stopped), work / "resume_relaunch.log", budget.limit(size["limits_s"]["resume_launch"]))
        code = reference.wait(timeout=budget.limit(size["limits_s"]["resume_launch"]))
    except subprocess.TimeoutExpired:
        raise CheckFailed("the uninterrupted run did not finish within its time limit") from None
    finally:
        if reference.poll() is None:
            reference.kill()
            reference.wait()
    if code != 0:
        raise CheckFailed(f"the uninterrupted run failed:\n{tail(work / 'resume_straight.log')}")
    relaunch_log = (work / "resume_relaunch.log").read_text(errors="replace")
    if not re.search(rf"resum\w* .*step_{stopped_at:08d}", relaunch_log, re.IGNORECASE):
        raise CheckFailed(f"the relaunch did not say it resumed from step_{stopped_at:08d}:\n{tail(work / 'resume_relaunch.log')}")
    expected = {rec["step"]: rec["loss"] for rec in step_records(straight)}
    resumed = {rec["step"]: rec["loss"] for rec in step_records(stopped) if rec["step"] > stopped_at}
    if sorted(resumed) != list(range(stopped_at + 1, r["steps"] + 1)):
        raise CheckFailed(f"the resumed run logged steps {sorted(resumed)}, expected {stopped_at + 1}..{r['steps']}")
    differences = {step: abs(loss - expected[step]) / abs(expected[step]) for step, loss in resumed.items()}
    figures = {"config": r, "stopped_at_step": stopped_at, "losses_uninterrupted": expected,
               "losses_resumed": resumed, "max_loss_rel_diff": max(differences.values()),
               "tolerance_rel": RESUME_LOSS_REL_TOL}
    print(f"  SIGTERM at step {stopped_at}, resumed to {r['steps']}: max loss rel diff "
          f"{figures['max_loss_rel_diff']:.2e} (bound {RESUME_LOSS_REL_TOL:.0e})")
    if figures["max_loss_rel_diff"] > RESUME_LOSS_REL_TOL:
        raise CheckFailed("the resumed run's losses left the uninterrupted run's", figures)
    figures["export"] = check_export(work, sorted((stopped / "checkpoints").glob("step_*"))[-1], device, r,
                                     budget.limit(size["limits_s"]["export"]))
    return figures


def check_export(work: Path, checkpoint: Path, device: torch.device, r: dict, limit_s: float) -> dict:
    from attnres_train.generate.loading import load_for_generation

    exported = work / "exported"
    log = work / "export.log"
    run_to_end([sys.executable, "-m", "attnres_train.interop.export", str(checkpoint), str(exported)], log, limit_s)
    on_cpu = load_for_generation(exported, "cpu").model
    on_device = load_for_generation(checkpoint, device).model.to(torch.bfloat16)
    generator = torch.Generator().manual_seed(2)
    input_ids = torch.randint(0, on_cpu.config.vocab_size, (2, r["seq_len"]), generator=generator)
    labels = input_ids.roll(-1, dims=1)
    with torch.no_grad():
        cpu_loss = language_model_loss(on_cpu(input_ids).logits, labels).item()
        device_loss = language_model_loss(on_device(input_ids.to(device)).logits, labels.to(device)).item()
    figures = {"checkpoint": checkpoint.name, "format": json.loads((exported / "config.json").read_text()).get(
        "model_type"), "loss_exported_cpu_fp32": cpu_loss, "loss_checkpoint_bf16": device_loss,
               "loss_rel_diff": abs(cpu_loss - device_loss) / abs(device_loss), "tolerance_rel": EXPORT_LOSS_REL_TOL}
    print(f"  export of {checkpoint.name} ({figures['format']}): CPU fp32 loss {cpu_loss:.4f} vs checkpoint bf16 "
          f"{device_loss:.4f}")
    if not math.isfinite(cpu_loss) or figures["loss_rel_diff"] > EXPORT_LOSS_REL_TOL:
        raise CheckFailed("the exported model's loss on the CPU differs from the checkpoint's", figures)
    return figures


# --------------------------------------------------------------------------------------------------------------
# 4. flash-attn
# --------------------------------------------------------------------------------------------------------------

def check_flash_attention(work: Path, device: torch.device, limit_s: float, budget: Budget) -> dict:
    from attnres_train.model.mixers import attention_backend

    reason = ("no CUDA device" if device.type != "cuda" else
              None if attention_backend.flash_attn_available() else "flash_attn is not installed")
    if reason:
        print(f"  skipped: {reason}")
        return {"skipped": reason}
    log = work / "flash.log"
    run_to_end([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/model/test_attention.py", "-k", "flash"],
               log, budget.limit(limit_s))
    summary = tail(log, 1)
    print(f"  {summary}")
    return {"pytest": summary}


# --------------------------------------------------------------------------------------------------------------

def write_json(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(report, indent=2) + "\n")
    partial.replace(path)


def device_slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_") or "cpu"


def driver_version() -> str | None:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-dry-run", action="store_true", help="every part at toy size on the CPU")
    parser.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/gpu_train_<device>.json)")
    parser.add_argument("--work-dir", default=None, help="where the runs write (default: a temporary directory)")
    parser.add_argument("--parts", default="parity,training,preemption,flash_attention",
                        help="comma-separated subset of the parts to run")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="wall-clock budget of the whole check; parts it cannot start fail as not run (default 480)")
    args = parser.parse_args(argv)
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print("gpu_check_train.py: no CUDA device (use --cpu-dry-run on a CPU machine)", file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu_dry_run else "cuda")
    size = sizes(args.cpu_dry_run)
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="gpu_check_train_"))
    work.mkdir(parents=True, exist_ok=True)
    env = environment(device)
    report = {**env, "driver": driver_version(), "dry_run": args.cpu_dry_run, "train_preset": size["train"]["model"],
              "sizes": size, "parts": {}}
    budget = Budget(args.budget_s)
    parts = {
        "parity": lambda: check_parity(device, size),
        "training": lambda: check_training(work, size, args.cpu_dry_run, budget),
        "preemption": lambda: check_preemption(work, size, device, args.cpu_dry_run, budget),
        "flash_attention": lambda: check_flash_attention(work, device, size["limits_s"]["flash"], budget),
    }
    wanted = args.parts.split(",")
    unknown = sorted(set(wanted) - set(parts))
    if unknown:
        parser.error(f"--parts: unknown {unknown}; expected a subset of {list(parts)}")
    out = Path(args.out) if args.out else RESULTS_DIR / f"gpu_train_{device_slug(env['device'])}.json"
    started = time.perf_counter()
    for name in wanted:
        print(f"== {name}")
        start = time.perf_counter()
        try:
            result = {"passed": True, **parts[name]()}
        except CheckFailed as failure:
            result = {"passed": False, "error": failure.args[0],
                      **(failure.args[1] if len(failure.args) > 1 and isinstance(failure.args[1], dict) else {})}
        except Exception as error:  # a bug or a crash in one part must not hide the others' results
            result = {"passed": False, "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        result["wall_s"] = time.perf_counter() - start
        report["parts"][name] = result
        print(f"== {name}: {'passed' if result['passed'] else 'FAILED: ' + result['error']} "
              f"({result['wall_s']:.0f} s)")
        report["wall_s"] = time.perf_counter() - started
        training = report["parts"].get("training", {}).get("variants", {})
        report["mfu"] = {variant: figures.get("mfu") for variant, figures in training.items()}
        report["tokens_per_s"] = {variant: figures.get("tokens_per_s") for variant, figures in training.items()}
        write_json(out, report)  # after every part: a check stopped from outside still leaves what it measured
    print(f"wrote {out}")
    failed = [name for name, result in report["parts"].items() if not result["passed"]]
    print(f"gpu_check_train.py: {'FAILED parts: ' + ', '.join(failed) if failed else 'all parts passed'} "
          f"in {report['wall_s']:.0f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
