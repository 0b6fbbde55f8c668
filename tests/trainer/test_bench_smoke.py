"""`make bench` harness check at a tiny size: both trainers run and a result is written.

No speed assertions (those belong to the benchmark, not the test suite)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_bench_quick(tmp_path):
    bench = subprocess.run([sys.executable, str(ROOT / "bench" / "run.py"), "--quick", "--out", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True)
    assert bench.returncode == 0, bench.stderr[-3000:]
    (result_file,) = tmp_path.glob("*.json")
    assert result_file.with_suffix(".png").stat().st_size > 0
    result = json.loads(result_file.read_text())

    assert set(result["runs"]) == {"rmjob", "trl"}
    for side, summary in result["summary"].items():
        assert summary["pairs_per_s"] > 0 and summary["tokens_per_s"] > summary["pairs_per_s"], side
        assert summary["peak_rss_mb"] > 0, side
        assert 0.0 <= summary["eval_accuracy"] <= 1.0, side
    # both trained on the same pairs
    assert result["runs"]["rmjob"][0]["pairs"] <= result["runs"]["trl"][0]["pairs"] == result["data"]["train_pairs"]
    assert result["ratios"]["pairs_per_s"] > 0
    assert result["machine"]["torch"] and result["data"]["padded_tokens_per_real_token"] >= 1.0
