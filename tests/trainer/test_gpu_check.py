"""`make gpu-check` (bench/gpu_check.py) on the CPU with a tiny model, so the plumbing stays
tested where no GPU is: the reward agreement of the trainer's variants, the attention actually
used, the throughput runs of rmjob and TRL, the JSON and the markdown block. No speed
assertions (those belong to the GPU run)."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "bench" / "gpu_check.py"
sys.path.append(str(SCRIPT.parent))  # the bench scripts are scripts, not a package
import gpu_check  # noqa: E402


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
        f"{precision}_{layout}" for precision in ("fp32", "bf16")
        for layout in ("padded", "padding_free", "prefix_shared")}
    # The fp32 comparison is the strict one: its tolerance is below what bf16 itself costs (so it
    # sees what bf16's rounding hides), and the packed fp32 variants are within it.
    assert max(agreement["max_diff_vs_fp32_padded"].values()) <= agreement["fp32_tolerance"] \
        < agreement["bf16_padded_vs_fp32_max_diff"]
    tokens = agreement["tokens_computed"]
    for precision in ("fp32", "bf16"):
        assert tokens[f"{precision}_padded"] >= tokens[f"{precision}_padding_free"] \
            > tokens[f"{precision}_prefix_shared"] > 0
    # No flash-attn on the CPU: the packed variants run the trainer's per-sequence sdpa, and the
    # report says so and why.
    assert result["attention"]["flash_attn_installed"] is False
    assert set(agreement["attention_used"].values()) == {"sdpa", "sdpa_varlen"}
    assert result["attention"]["kernel"] == "sdpa (--device cpu: flash-attention needs CUDA)"
    assert result["data"]["prefix_sharing_saves"] > 0

    for name in ("rmjob_padding_free", "rmjob_prefix_shared", "trl"):
        run_result = result["runs"][name]
        assert run_result["pairs_per_s"] > 0 and run_result["tokens_per_s"] > run_result["pairs_per_s"], name
        assert len(run_result["step_s"]) == result["settings"]["steps"] - 1, name
        assert run_result["peak_gpu_gib"] is None and run_result["mfu"] is None, name  # CPU: no GPU, no peak

    report = result_file.with_suffix(".md").read_text()
    assert report.startswith("### GPU check, ")
    assert "Attention: sdpa (--device cpu: flash-attention needs CUDA)." in report
    shared = agreement["max_diff_vs_fp32_padded"]["fp32_prefix_shared"]
    assert f"| fp32 prefix-shared | {shared:.1e} | {tokens['fp32_prefix_shared']} | sdpa_varlen |" in report
    padding_free = result["runs"]["rmjob_padding_free"]
    assert f"| rmjob padding-free | {padding_free['pairs_per_s']:.2f} | {padding_free['tokens_per_s']:.0f} |" in report


@pytest.mark.timeout(300)
def test_rejected_positions_restarting_at_zero_fail_the_fp32_agreement(tmp_path, monkeypatch):
    """A prefix-sharing bug that bf16's rounding hides on the tiny model (review 11's mutant 2:
    the rejected answer's positions restart at 0 instead of following the shared prefix, so
    its rotary embedding is wrong): the fp32 comparison flags prefix sharing, and only it."""
    import torch

    from rmjob_trainer import prefix_sharing

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    args = gpu_check.parse_args(["--device", "cpu", "--tiny"])
    model = gpu_check.build_model(args, tmp_path)
    data = gpu_check.write_data(tmp_path / "data", 8, args.agreement_pairs + 8, args.max_length, args.seed)
    collate_shared = prefix_sharing.collate_shared

    def rejected_positions_from_zero(chosen, rejected):
        batch = collate_shared(chosen, rejected)
        positions = batch["position_ids"][0].clone()
        for _, chosen_end, end, _ in batch["shared_pairs"]:
            positions[chosen_end:end] = torch.arange(end - chosen_end)
        return {**batch, "position_ids": positions[None]}

    monkeypatch.setattr(prefix_sharing, "collate_shared", rejected_positions_from_zero)
    agreement = gpu_check.agreement(args, model, data, None, flash_installed=False)
    differences, tolerance = agreement["max_diff_vs_fp32_padded"], agreement["fp32_tolerance"]
    assert differences["fp32_prefix_shared"] > tolerance >= differences["fp32_padding_free"], differences
    assert agreement["fp32_rewards_agree"] is False


@pytest.mark.parametrize("gpu, peak", [("NVIDIA H200", 989.4), ("NVIDIA H100 80GB HBM3", 989.4), (None, None)])
def test_peak_of_a_known_gpu_or_none_on_the_cpu(gpu, peak):
    args = gpu_check.parse_args([])
    assert gpu_check.peak_tflops_of(args, {} if gpu is None else {"gpu": gpu}) == peak


@pytest.mark.parametrize("gpu", ["NVIDIA H100 PCIe", "NVIDIA H200 NVL", "NVIDIA GH200 480GB", "NVIDIA H100 NVL"])
def test_other_gpus_need_their_peak_given(gpu):
    """Their names contain H100 or H200, their peaks are not the SXM parts'."""
    with pytest.raises(gpu_check.CheckError) as error:
        gpu_check.peak_tflops_of(gpu_check.parse_args([]), {"gpu": gpu})
    assert str(error.value) == (f"GPU {gpu!r} has no known dense bf16 peak (known: NVIDIA H100 80GB HBM3, "
                                "NVIDIA H200): pass --peak-tflops for its MFU")
    assert gpu_check.peak_tflops_of(gpu_check.parse_args(["--peak-tflops", "756"]), {"gpu": gpu}) == 756


def test_the_report_says_why_flash_attention_did_not_run(monkeypatch):
    """The H200 image has no flash_attn: the check then runs sdpa on CUDA, and says so."""
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: None)
    assert gpu_check.attention_kernel("cuda", flash_installed=False) == "sdpa (flash_attn not installed)"
    monkeypatch.setattr(gpu_check.importlib.util, "find_spec", lambda name: object())
    assert gpu_check.attention_kernel("cuda", flash_installed=False).startswith(
        "sdpa (flash_attn installed, but transformers cannot use it")
    assert gpu_check.attention_kernel("cuda", flash_installed=True) == "flash_attention_2 (flash_attn installed)"


def test_throughput_times_the_steps_after_the_warm_up_but_not_the_last():
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
