"""`make bench` harness check at a tiny size: TRL, rmjob and rmjob with prefix sharing run on both
datasets and a result with every column is written.

No speed assertions (those belong to the benchmark, not the test suite)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(900)  # 6 runs of a few seconds each, each in a fresh process; minutes under load
def test_bench_quick(tmp_path):
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr[-3000:]
    (result_file,) = tmp_path.glob("*.json")
    assert result_file.with_suffix(".png").stat().st_size > 0
    result = json.loads(result_file.read_text())

    assert set(result["datasets"]) == {"multi-turn", "single-turn"}
    assert len(result["load_average"]["before"]) == len(result["load_average"]["after"]) == 3
    for dataset, run in result["datasets"].items():
        assert set(run["runs"]) == {"trl", "rmjob", "rmjob-shared"}, dataset
        for side, summary in run["summary"].items():
            assert summary["pairs_per_s"] > 0 and summary["tokens_per_s"] > summary["pairs_per_s"], (dataset, side)
            assert summary["peak_rss_mb"] > 0, (dataset, side)
            assert 0.0 <= summary["eval_accuracy"] <= 1.0, (dataset, side)
        # every side trained on the same pairs
        pairs = {side: runs[0]["pairs"] for side, runs in run["runs"].items()}
        assert pairs["rmjob"] == pairs["rmjob-shared"] <= pairs["trl"] == run["data"]["train_pairs"], dataset
        assert set(run["ratios"]) == {"rmjob", "rmjob-shared"} and run["ratios"]["rmjob-shared"]["pairs_per_s"] > 0
        assert run["data"]["padded_tokens_per_real_token"] >= 1.0
        assert 0.0 < run["data"]["prefix_sharing_tokens_saved"] < 0.5, dataset
    # the multi-turn pairs share most of their conversation, the single-turn ones a short prompt
    saved = {dataset: run["data"]["prefix_sharing_tokens_saved"] for dataset, run in result["datasets"].items()}
    assert saved["multi-turn"] > saved["single-turn"]
    assert result["machine"]["torch"]
