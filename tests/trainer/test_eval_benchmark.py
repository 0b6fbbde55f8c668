"""--eval_benchmark: the benchmark scored during training (at each evaluation and at the end),
into log.jsonl, metrics.json, W&B, output_dir/benchmark.json + .png and status.training."""

import json
from pathlib import Path

import pytest

from rmjob_trainer import DataError
from rmjob_trainer.config import RewardConfig

PROMPTS = ["I watched the movie yesterday.", "How was the food?", "Tell me about the book."]
GOOD = ["It was wonderful, I loved every minute.", "Absolutely great, a charming evening!", "Splendid and cheerful."]
BAD = ["Terrible, grim and annoying.", "Bad, boring and far too long.", "Unpleasant, I hated it."]


def _benchmark_file(path: Path) -> Path:
    rows = [{"prompt": PROMPTS[i % 3], "chosen": GOOD[i % 3], "rejected": BAD[(i + 1) % 3],
             "subset": "x" if i < 4 else "y"} for i in range(7)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


class RecordingTracker:
    url = None

    def __init__(self):
        self.logs, self.images = [], []

    def log(self, metrics, step):
        self.logs.append((dict(metrics), step))

    def log_image(self, key, png_path):
        self.images.append((key, png_path))

    def log_table(self, *args):
        pass

    def finish(self):
        pass


class RecordingReporter:
    def __init__(self):
        self.reports = []

    def report(self, training, force=False):
        self.reports.append(dict(training))


def _train(cfg: RewardConfig):
    from rmjob_trainer import status, tracking
    from rmjob_trainer.train import train

    tracker, reporter = RecordingTracker(), RecordingReporter()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tracking, "start_run", lambda cfg, run_name: tracker)
        mp.setattr(status.StatusReporter, "from_env", classmethod(lambda cls, **_: reporter))
        metrics = train(cfg)
    return metrics, tracker, reporter.reports


def _config(model_dir, dataset_dir, output_dir, benchmark, **overrides) -> RewardConfig:
    values = dict(dataset_mixer={str(dataset_dir): 1.0}, model_name_or_path=str(model_dir), sanity_check=True,
                  sanity_check_max_samples=24, learning_rate=2e-3, per_device_train_batch_size=4,
                  per_device_eval_batch_size=8, num_train_epochs=1, num_evals=2, output_dir=str(output_dir),
                  run_name="benchmark-run", eval_benchmark=str(benchmark))
    return RewardConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def benchmarked(tiny_model_dir, bundled_dataset_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("benchmarked")
    cfg = _config(tiny_model_dir, bundled_dataset_dir, root / "out", _benchmark_file(root / "bench.jsonl"))
    return (cfg, *_train(cfg))


def test_benchmark_scored_at_each_evaluation_into_the_log_and_metrics(benchmarked):
    cfg, metrics, _, _ = benchmarked
    log = [json.loads(line) for line in open(Path(cfg.output_dir) / "log.jsonl")]
    assert [row["step"] for row in log if "benchmark/overall" in row] == [3, 6]  # 6 steps, 2 evaluations
    assert [row["step"] for row in log if "eval/rm/accuracy" in row] == [3, 6]
    assert {"benchmark/overall", "benchmark/tie_rate", "benchmark/subset/x", "benchmark/subset/y"} <= metrics.keys()
    assert json.loads((Path(cfg.output_dir) / "metrics.json").read_text())["benchmark/overall"] == \
        metrics["benchmark/overall"] == log[-1]["benchmark/overall"]


def test_final_benchmark_is_the_saved_models_score_and_the_report_is_written(benchmarked):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from rmjob_trainer.evaluate import evaluate_benchmark

    cfg, metrics, _, _ = benchmarked
    output_dir = Path(cfg.output_dir)
    report = json.loads((output_dir / "benchmark.json").read_text())
    assert (output_dir / "benchmark.png").read_bytes()[:4] == b"\x89PNG"
    model = AutoModelForSequenceClassification.from_pretrained(output_dir).eval()
    again = evaluate_benchmark(model, AutoTokenizer.from_pretrained(output_dir), cfg.eval_benchmark)
    rewards = [r for e in again["examples"] for r in e["chosen_rewards"] + e["rejected_rewards"]]
    logged = [r for e in report["examples"] for r in e["chosen_rewards"] + e["rejected_rewards"]]
    assert logged == pytest.approx(rewards, abs=1e-4)
    assert report["overall"] == again["overall"] == metrics["benchmark/overall"]
    assert {name: s["accuracy"] for name, s in report["subsets"].items()} == \
        {"x": metrics["benchmark/subset/x"], "y": metrics["benchmark/subset/y"]}


def test_benchmark_logged_to_wandb_once_per_scoring_with_its_plot(benchmarked):
    _, metrics, tracker, _ = benchmarked
    benchmark_logs = [(m, step) for m, step in tracker.logs if "benchmark/overall" in m]
    assert [step for _, step in benchmark_logs] == [12, 24]  # episodes of steps 3 and 6
    assert benchmark_logs[-1][0]["benchmark/overall"] == metrics["benchmark/overall"]
    assert sum("benchmark/overall" in m for m, _ in tracker.logs) == 2  # not also in the step's metrics
    assert [key for key, _ in tracker.images] == ["benchmark/rewards"] * 2


def test_status_training_carries_benchmark_accuracy_to_the_operator(benchmarked):
    from rmjob_operator.conditions import training_status

    _, metrics, _, reports = benchmarked
    assert "benchmarkAccuracy" not in reports[0]  # step 1, before any scoring
    final = reports[-1]
    assert final["done"] is True and final["benchmarkAccuracy"] == metrics["benchmark/overall"]
    assert training_status(final)["metrics"]["benchmarkAccuracy"] == metrics["benchmark/overall"]


def test_without_evaluations_the_final_model_is_still_scored(tiny_model_dir, bundled_dataset_dir, tmp_path):
    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path / "out", _benchmark_file(tmp_path / "b.jsonl"),
                  sanity_check_max_samples=8, num_evals=0)
    metrics, _, reports = _train(cfg)
    log = [json.loads(line) for line in open(tmp_path / "out" / "log.jsonl")]
    assert [row["step"] for row in log if "benchmark/overall" in row] == [2]
    assert "eval/rm/accuracy" not in metrics and reports[-1]["benchmarkAccuracy"] == metrics["benchmark/overall"]


@pytest.mark.parametrize("content,message", [
    (None, "--eval_benchmark: .*missing.jsonl"),
    ("", "--eval_benchmark: .*missing.jsonl: the file is empty"),
    ('{"prompt": "p", "chosen": "a", "subset": "s"}\n', "--eval_benchmark: .*missing column 'rejected'"),
], ids=["missing-file", "empty", "missing-column"])
def test_bad_benchmark_file_stops_the_run_before_training(tiny_model_dir, bundled_dataset_dir, tmp_path,
                                                          content, message):
    from rmjob_trainer.train import train

    benchmark = tmp_path / "missing.jsonl"
    if content is not None:
        benchmark.write_text(content)
    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path / "out", benchmark)
    with pytest.raises(DataError, match=message):
        train(cfg)
    assert not (tmp_path / "out").exists()  # nothing half-written
