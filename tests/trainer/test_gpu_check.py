"""`make gpu-check` (bench/gpu_check.py) on the CPU with a tiny model, so the plumbing stays
tested where no GPU is: the reward agreement of the trainer's variants, the attention actually
used, the throughput runs of rmjob and TRL, the JSON and the markdown block. No speed
assertions (those belong to the GPU run)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"


def _gpu_check():
    spec = importlib.util.spec_from_file_location("rmjob_gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.timeout(300)
def test_tiny_check_on_cpu(tmp_path):
    run = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=290)
    assert run.returncode == 0, run.stderr[-3000:]
    (result_file,) = tmp_path.glob("gpu-check-*.json")
    result = json.loads(result_file.read_text())

    assert result["passed"] and all(result["checks"].values()), result["checks"]
    agreement = result["agreement"]
    assert agreement["pairs"] == 10 and set(agreement["rewards"]) == {
        "fp32_padded", "bf16_padded", "bf16_padding_free", "bf16_prefix_shared"}
    # bf16 really ran (its rewards differ from fp32's), and the packed variants are within tolerance.
    assert 0 < agreement["bf16_padded_vs_fp32_max_diff"] <= agreement["tolerance"]
    tokens = agreement["tokens_computed"]
    assert tokens["bf16_padded"] >= tokens["bf16_padding_free"] > tokens["bf16_prefix_shared"] > 0
    # No flash-attn on the CPU: the packed variants run the trainer's per-sequence sdpa.
    assert result["attention"]["flash_attn_installed"] is False
    assert agreement["attention_used"]["bf16_padding_free"] == "sdpa_varlen"
    assert result["data"]["prefix_sharing_saves"] > 0

    for name in ("rmjob_padding_free", "rmjob_prefix_shared", "trl"):
        run_result = result["runs"][name]
        assert run_result["pairs_per_s"] > 0 and run_result["tokens_per_s"] > run_result["pairs_per_s"], name
        assert len(run_result["step_s"]) == result["settings"]["steps"] - 1, name
        assert run_result["peak_gpu_gib"] is None and run_result["mfu"] is None, name  # CPU: no GPU, no peak

    report = result_file.with_suffix(".md").read_text()
    assert report.startswith("### GPU check, ")
    padding_free = result["runs"]["rmjob_padding_free"]
    assert f"| rmjob padding-free | {padding_free['pairs_per_s']:.2f} | {padding_free['tokens_per_s']:.0f} |" in report


def test_throughput_times_the_steps_after_the_warm_up_but_not_the_last():
    gpu_check = _gpu_check()
    args = gpu_check.parse_args(["--steps", "5", "--warmup-steps", "1", "--batch-size", "4"])
    # step ends: step 1 (warm-up) at 10, steps 2-4 end at 11, 13, 16; the last (with its
    # evaluation) at 30: steps 2-4 timed, 12 pairs in 6 s
    run = gpu_check.throughput([10.0, 11.0, 13.0, 16.0, 30.0], args, {"tokens_per_pair": 100.0},
                               pair_flops=1e12, peak_tflops=4.0)
    assert run["timed_s"] == 6.0 and run["pairs_per_s"] == 2.0 and run["tokens_per_s"] == 200.0
    assert run["mfu"] == 0.5
    with pytest.raises(gpu_check.CheckError, match="trl: 3 step ends recorded, expected 5"):
        gpu_check.throughput([1.0, 2.0, 3.0], args, {"tokens_per_pair": 1.0}, 1.0, None, "trl")


def test_unmet_requirement_of_a_carried_package_is_named(monkeypatch):
    """A wheel carried without its dependencies to a machine whose pyarrow is too old: one line
    naming both, before anything runs."""
    gpu_check = _gpu_check()
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "1.0.0" if name == "pyarrow" else real_version(name))
    with pytest.raises(gpu_check.CheckError) as error:
        gpu_check.check_packages()
    pyarrow_needed = next(line for line in importlib.metadata.requires("datasets") if line.startswith("pyarrow"))
    assert f"datasets needs {pyarrow_needed}, found 1.0.0" in str(error.value)
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("args, message", [
    (["--steps", "4", "--warmup-steps", "3"], "--warmup-steps 3: must be at least 1 and at most --steps - 2 (2)"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--devic", "cpu"], "unrecognized arguments: --devic cpu"),
])
def test_bad_arguments_are_one_line(args, message):
    run = subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.returncode == 2
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"error: {message}")
