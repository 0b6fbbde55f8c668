"""SIGTERM (a preempted, evicted or drained pod): every rank finishes the step in progress, the
step is checkpointed, the run exits with EXIT_PREEMPTED (torchrun included, through
rmjob-torchrun), and the same command resumes it to the final metrics of a run that was never
interrupted: same steps, same data order, same RNG."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from test_distributed import DS_CONFIGS, _flags
from test_preflight import USER_ENV, Workspace
from test_resume import ENV, _command, _config

from rmjob_trainer.preemption import EXIT_PREEMPTED, Preempted

RUN_TIMEOUT_S = 240
# rmjob-torchrun as the console script runs it (the script itself is only in an installed venv).
RMJOB_TORCHRUN = [sys.executable, "-c",
                  "import sys; from rmjob_trainer.preemption import torchrun; sys.exit(torchrun())"]


def _log(output_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def assert_same_run(got_dir: Path, want_dir: Path) -> None:
    """Same final metrics and the same logged steps (each step once) as the uninterrupted run."""
    got = json.loads((got_dir / "metrics.json").read_text())
    want = json.loads((want_dir / "metrics.json").read_text())
    got.pop("run_name"), want.pop("run_name")
    assert got.pop("settings") == want.pop("settings")
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6, abs=1e-6), key
    got_log, want_log = _log(got_dir), _log(want_dir)
    assert [line["step"] for line in got_log] == [line["step"] for line in want_log]
    for got_line, want_line in zip(got_log, want_log):
        assert got_line.keys() == want_line.keys(), got_line["step"]
        for key in want_line:
            assert got_line[key] == pytest.approx(want_line[key], rel=1e-6, abs=1e-6), (got_line["step"], key)


# --- one process, in this process: SIGTERM at a chosen step -----------------------------------
@pytest.fixture
def sigterm_action():
    """SIGTERM's action before the test, restored after it (a preempted train() leaves it ignored)."""
    action = signal.getsignal(signal.SIGTERM)
    yield action
    signal.signal(signal.SIGTERM, action)


@pytest.fixture(scope="module")
def uninterrupted(tiny_model_dir, bundled_dataset_dir, tmp_path_factory):
    """8 steps, evaluations after steps 4 and 8, no periodic checkpoints."""
    from rmjob_trainer.train import train

    output_dir = tmp_path_factory.mktemp("uninterrupted")
    train(_config(tiny_model_dir, bundled_dataset_dir, output_dir, num_evals=2, checkpointing_steps=None))
    return output_dir


def _sigterm_during_step(step: int):
    """A patch of DataOrder.micro_batch that sends this process SIGTERM while step ``step``
    (1-based) gathers its first micro-batch."""
    from rmjob_trainer.train import DataOrder

    micro_batch = DataOrder.micro_batch

    def with_sigterm(self, step_index, micro_step, rank):
        if step_index + 1 == step and micro_step == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_batch(self, step_index, micro_step, rank)

    return with_sigterm


@pytest.mark.parametrize("step,logged_steps", [(5, 5), (4, 3)], ids=["plain-step", "eval-step"])
def test_sigterm_checkpoints_the_step_and_the_rerun_ends_as_uninterrupted(
        step, logged_steps, uninterrupted, tiny_model_dir, bundled_dataset_dir, tmp_path, monkeypatch,
        sigterm_action):
    """Step 4 is an evaluation step: its evaluation is left to the resumed run (on the same
    weights), which logs the step once, with it."""
    from rmjob_trainer import train as train_module

    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path, num_evals=2, checkpointing_steps=None)
    with monkeypatch.context() as patch:
        patch.setattr(train_module.DataOrder, "micro_batch", _sigterm_during_step(step))
        with pytest.raises(Preempted) as stopped:
            train_module.train(cfg)
    assert stopped.value.code == EXIT_PREEMPTED and stopped.value.step == step
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # on its way out: see SigtermWatch
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [f"step_{step}"]
    assert not (tmp_path / "metrics.json").exists()
    assert [line["step"] for line in _log(tmp_path)] == list(range(1, logged_steps + 1))

    signal.signal(signal.SIGTERM, sigterm_action)
    assert train_module.train(cfg)["run_name"] == "first"
    assert signal.getsignal(signal.SIGTERM) == sigterm_action  # a run that finished gives it back
    assert_same_run(tmp_path, uninterrupted)


@pytest.mark.parametrize("during,checkpointing_steps", [("evaluate", None), ("save_checkpoint", 4)],
                         ids=["evaluation", "periodic-checkpoint"])
def test_sigterm_during_an_evaluation_or_a_checkpoint_stops_at_that_step(
        during, checkpointing_steps, uninterrupted, tiny_model_dir, bundled_dataset_dir, tmp_path, monkeypatch,
        sigterm_action):
    """Step 4 is evaluated (and checkpointed, every 4 steps): a SIGTERM meanwhile stops the run
    at step 4, without training step 5 and writing its checkpoint in the grace period first."""
    from rmjob_trainer import train as train_module

    cfg = _config(tiny_model_dir, bundled_dataset_dir, tmp_path, num_evals=2, checkpointing_steps=checkpointing_steps)
    unsignalled = getattr(train_module, during)
    sent = []

    def signalled(*args, **kwargs):
        if not sent:
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(True)
        return unsignalled(*args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(train_module, during, signalled)
        with pytest.raises(Preempted) as stopped:
            train_module.train(cfg)
    assert stopped.value.step == 4 and _checkpoints(tmp_path) == ["step_4"]
    assert [line["step"] for line in _log(tmp_path)] == [1, 2, 3, 4]

    signal.signal(signal.SIGTERM, sigterm_action)
    train_module.train(cfg)
    assert_same_run(tmp_path, uninterrupted)


def test_sigterm_in_the_last_step_finishes_the_run(uninterrupted, tiny_model_dir, bundled_dataset_dir, tmp_path,
                                                   monkeypatch, sigterm_action):
    """Nothing is left to resume after the last step: the run writes its outputs and returns."""
    from rmjob_trainer import train as train_module

    monkeypatch.setattr(train_module.DataOrder, "micro_batch", _sigterm_during_step(8))
    train_module.train(_config(tiny_model_dir, bundled_dataset_dir, tmp_path, num_evals=2, checkpointing_steps=None))
    assert not (tmp_path / "checkpoints").exists()
    assert_same_run(tmp_path, uninterrupted)


def test_sigterm_before_the_first_step_saves_nothing(tiny_model_dir, bundled_dataset_dir, tmp_path, monkeypatch,
                                                     sigterm_action):
    """Asked to stop while loading: there is no step to save, the run leaves at once."""
    from rmjob_trainer import train as train_module

    build_engine = train_module.build_engine

    def build_then_sigterm(*args, **kwargs):
        engine = build_engine(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return engine

    monkeypatch.setattr(train_module, "build_engine", build_then_sigterm)
    with pytest.raises(Preempted) as stopped:
        train_module.train(_config(tiny_model_dir, bundled_dataset_dir, tmp_path))
    assert stopped.value.step is None
    assert _log(tmp_path) == [] and not (tmp_path / "checkpoints").exists()


# --- rmjob-torchrun's exit status, with stand-in ranks ---------------------------------------
RANK_SCRIPT = """
import os, signal, sys, time
from pathlib import Path

rank, scenario, marks = os.environ["RANK"], sys.argv[1], Path(sys.argv[2])
(marks / f"started-{rank}").touch()
if scenario == "torchrun-signalled":
    time.sleep(300)  # SIGTERM's default action: ended by it
elif rank == "1":  # stopped for a preemption first
    while not (marks / "started-0").exists():
        time.sleep(0.01)
    (marks / "exited-1").touch()
    sys.exit(200)
elif scenario == "preempted-then-ended-by-torchrun":
    time.sleep(300)  # still shutting down when torchrun SIGTERMs it
else:  # "error-next-to-preempted": fails on its own, after rank 1 exited
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while not (marks / "exited-1").exists():
        time.sleep(0.01)
    time.sleep(0.5)
    sys.exit(3)
"""


@pytest.mark.parametrize("scenario,status", [
    ("torchrun-signalled", EXIT_PREEMPTED),
    ("preempted-then-ended-by-torchrun", EXIT_PREEMPTED),
    ("error-next-to-preempted", 1),  # torchrun's own status: an error is never retried as a preemption
])
def test_rmjob_torchrun_exit_status(scenario, status, tmp_path):
    """torchrun exits 1 in all three; rmjob-torchrun says which ones were preemptions."""
    (tmp_path / "rank.py").write_text(RANK_SCRIPT)
    with open(tmp_path / "torchrun.log", "w") as out:
        agent = subprocess.Popen([*RMJOB_TORCHRUN, "--standalone", "--nproc_per_node=2", str(tmp_path / "rank.py"),
                                  scenario, str(tmp_path)], env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        if scenario == "torchrun-signalled":
            deadline = time.monotonic() + RUN_TIMEOUT_S
            while not ((tmp_path / "started-0").exists() and (tmp_path / "started-1").exists()):
                assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()
                time.sleep(0.05)
            agent.send_signal(signal.SIGTERM)
        assert agent.wait(timeout=RUN_TIMEOUT_S) == status, (tmp_path / "torchrun.log").read_text()[-3000:]
    finally:
        if agent.poll() is None:
            for process in psutil.Process(agent.pid).children(recursive=True):
                process.kill()
            agent.kill()


def _without_stop_notices(output: str) -> str:
    return re.sub(r"^W\S* \S+ \d+ \S+api\.py:\d+\] Sending process \d+ closing signal SIGTERM\n?", "", output,
                  flags=re.M)


@pytest.mark.slow
def test_rmjob_torchrun_user_error_is_the_ranks_line_and_status_2(tmp_path, tiny_model_dir, bundled_dataset_dir):
    """torchrun follows the ranks' one-line error with its traceback and failure summary and
    exits 1; rmjob-torchrun adds nothing to the line and keeps its status 2."""
    ws = Workspace(tmp_path, tiny_model_dir, bundled_dataset_dir)
    line = (f"error: --model_name_or_path: no such directory: {tmp_path / 'typo'}; check the path (a Hub model id "
            "looks like org/name)")
    env = {k: v for k, v in os.environ.items() if k not in USER_ENV}
    result = subprocess.run([*RMJOB_TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "rmjob_trainer",
                             *ws.base(model_name_or_path=str(tmp_path / "typo"))],
                            capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, cwd=tmp_path,
                            timeout=RUN_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    assert output.count(line) == 2, output
    assert "Traceback" not in output and "ChildFailedError" not in output, output
    # nor torchrun's log of the failure; a rank still running when the other failed is stopped
    # with a notice (logged before torchrun knows how the first rank failed)
    assert _without_stop_notices(output.replace(line, "")).strip() == "", output
    assert not ws.out.exists()


USER_ERROR_RANK_SCRIPT = """
import os, signal, sys, time
if sys.argv[1] == "crash-next-to-user-error" and os.environ["RANK"] == "1":
    def crash(*_):  # when torchrun stops it, after rank 0's user error
        raise RuntimeError("a real crash")
    signal.signal(signal.SIGTERM, crash)
    time.sleep(120)
if sys.argv[1] == "user-error-next-to-a-running-rank" and os.environ["RANK"] == "1":
    time.sleep(120)  # until torchrun stops it (SIGTERM), before it reached its own check
print(f"error: rank {os.environ['RANK']}: a user mistake", file=sys.stderr, flush=True)
sys.exit(2)
"""


@pytest.mark.parametrize("scenario,extra,status", [
    ("user-error", ["--redirects", "3", "--log-dir", "LOGS"], 2),
    ("user-error-next-to-a-running-rank", [], 2),
    ("crash-next-to-user-error", [], 1),
])
def test_rmjob_torchrun_says_where_a_user_error_went_and_keeps_a_real_failure_whole(scenario, extra, status, tmp_path):
    """The ranks' error lines in files only: one line says so. A crash beside a user error is
    torchrun's failure, with every line torchrun logs about it."""
    (tmp_path / "rank.py").write_text(USER_ERROR_RANK_SCRIPT)
    extra = [str(tmp_path / "logs") if arg == "LOGS" else arg for arg in extra]
    result = subprocess.run([*RMJOB_TORCHRUN, "--standalone", "--nproc_per_node=2", *extra, str(tmp_path / "rank.py"),
                             scenario], env=ENV, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    output = result.stdout + result.stderr
    assert result.returncode == status, output[-3000:]
    if extra:
        assert "error: rank" not in output and "Traceback" not in output, output
        assert "rmjob-torchrun: the ranks stopped on a user error (exit status 2); their error lines are in " \
               "torchrun's --log-dir" in output
    elif status == 2:
        assert _without_stop_notices(output).strip() == "error: rank 0: a user mistake", output
    else:
        assert "failed (exitcode: 2)" in output and "ChildFailedError" in output, output


SLOW_STOP_RANK_SCRIPT = """
import os, signal, sys, time
from pathlib import Path

marks, stop = Path(sys.argv[1]), []
signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
(marks / f"started-{os.environ['RANK']}").touch()
while not stop:
    time.sleep(0.01)
time.sleep(5)  # the checkpoint
(marks / f"checkpointed-{os.environ['RANK']}").touch()
sys.exit(200)
"""


def test_rmjob_torchrun_waits_for_its_ranks_through_repeated_sigterms(tmp_path):
    """A pod deleted again (a shorter grace period) gets SIGTERM again: torchrun, the container's
    first process, keeps waiting for its ranks' checkpoint instead of exiting (and, in a
    container, taking them with it)."""
    (tmp_path / "rank.py").write_text(SLOW_STOP_RANK_SCRIPT)
    with open(tmp_path / "torchrun.log", "w") as out:
        agent = subprocess.Popen([*RMJOB_TORCHRUN, "--standalone", "--nproc_per_node=2", str(tmp_path / "rank.py"),
                                  str(tmp_path)], env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not ((tmp_path / "started-0").exists() and (tmp_path / "started-1").exists()):
            assert agent.poll() is None and time.monotonic() < deadline, (tmp_path / "torchrun.log").read_text()
            time.sleep(0.05)
        for _ in range(3):
            agent.send_signal(signal.SIGTERM)
            time.sleep(0.5)
        assert agent.wait(timeout=RUN_TIMEOUT_S) == EXIT_PREEMPTED, (tmp_path / "torchrun.log").read_text()[-3000:]
        assert (tmp_path / "checkpointed-0").exists() and (tmp_path / "checkpointed-1").exists()
    finally:
        if agent.poll() is None:
            agent.kill()
        for process in psutil.process_iter(["cmdline"]):
            if str(tmp_path / "rank.py") in (process.info["cmdline"] or []):
                process.kill()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_rmjob_torchrun_sigterm_after_its_ranks_finished_exits_0(tmp_path):
    """Two nodes: node 1's rank finishes first and its torchrun waits for node 0's (rank 0 saves
    the model, pushes it) when SIGTERM comes. Its work is done: exit 0, not 200, which would
    make the Job start a replacement that can no longer meet node 0."""
    import socket

    (tmp_path / "rank.py").write_text(
        "import os, time\nif os.environ['RANK'] == '0':\n    time.sleep(15)\n"
        f"else:\n    open({str(tmp_path / 'rank1.pid.tmp')!r}, 'w').write(str(os.getpid()))\n"
        f"    os.rename({str(tmp_path / 'rank1.pid.tmp')!r}, {str(tmp_path / 'rank1.pid')!r})\n")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    agents = [subprocess.Popen([*RMJOB_TORCHRUN, "--nnodes=2", f"--node_rank={node}", "--nproc_per_node=1",
                                "--master_addr=127.0.0.1", f"--master_port={port}", str(tmp_path / "rank.py")],
                               env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT) for node in (0, 1)]
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        # Its rank starts, then exits 0: watched by its own pid. "Any child of node 1", as
        # before, once let SIGTERM come before torchrun's handler was in place (exit -15, in a
        # CI run under load): another short-lived child came first.
        while not (tmp_path / "rank1.pid").exists():
            assert agents[1].poll() is None and time.monotonic() < deadline
            time.sleep(0.05)
        rank = int((tmp_path / "rank1.pid").read_text())
        while _alive(rank):
            time.sleep(0.05)
        time.sleep(1)
        assert agents[0].poll() is None and agents[1].poll() is None
        agents[1].send_signal(signal.SIGTERM)
        assert agents[1].wait(timeout=RUN_TIMEOUT_S) == 0
        assert agents[0].wait(timeout=RUN_TIMEOUT_S) == 0
    finally:
        for agent in agents:
            if agent.poll() is None:
                for process in psutil.Process(agent.pid).children(recursive=True):
                    process.kill()
                agent.kill()


def test_rmjob_torchrun_gives_ranks_time_for_a_checkpoint(monkeypatch):
    """torchrun SIGKILLs its ranks 30 s after forwarding SIGTERM by default, often before a large
    checkpoint is written; rmjob-torchrun leaves the limit to the pod's grace period, unless
    told otherwise."""
    import torch.distributed.run

    from rmjob_trainer.preemption import SHUTDOWN_TIMEOUT_S, torchrun

    seen = []
    monkeypatch.setattr(torch.distributed.run, "main",
                        lambda argv=None: seen.append(os.environ["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]))
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    assert torchrun([]) == 0
    monkeypatch.setenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", "90")
    assert torchrun([]) == 0
    assert seen == [str(SHUTDOWN_TIMEOUT_S), "90"] and SHUTDOWN_TIMEOUT_S > 30


# --- real signals to real trainers ------------------------------------------------------------
def _wait_for_steps(output_dir: Path, process: subprocess.Popen, steps: int, log: Path) -> None:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while not ((output_dir / "log.jsonl").exists() and len(_log(output_dir)) >= steps):
        assert process.poll() is None, f"exited {process.returncode} before step {steps}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no step {steps} after {RUN_TIMEOUT_S} s"
        time.sleep(0.05)


def _run_to_end(command: list[str], log: Path) -> None:
    with open(log, "w") as out:
        result = subprocess.run(command, env=ENV, stdout=out, stderr=subprocess.STDOUT, timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, log.read_text()[-4000:]


def _checkpoints(output_dir: Path) -> list[str]:
    return sorted(p.name for p in (output_dir / "checkpoints").iterdir())


@pytest.mark.xdist_group("distributed")  # timing-sensitive: not next to the multi-process tests
def test_one_process_sigterm_exits_preempted_and_resumes(tiny_model_dir, bundled_dataset_dir, tmp_path):
    """`python -m rmjob_trainer` as a pod's only process: SIGTERM mid-run, exit EXIT_PREEMPTED."""
    command = _command(tiny_model_dir, bundled_dataset_dir, tmp_path / "preempted")
    with open(tmp_path / "first.log", "w") as out:
        process = subprocess.Popen(command, env=ENV, stdout=out, stderr=subprocess.STDOUT)
    _wait_for_steps(tmp_path / "preempted", process, 5, tmp_path / "first.log")
    process.send_signal(signal.SIGTERM)
    assert process.wait(timeout=RUN_TIMEOUT_S) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    stopped_at = max(int(name.split("_")[1]) for name in _checkpoints(tmp_path / "preempted"))
    assert stopped_at >= 5 and f"checkpoint step_{stopped_at} written" in (tmp_path / "first.log").read_text()

    _run_to_end(command, tmp_path / "second.log")
    assert f"resuming from {tmp_path / 'preempted' / 'checkpoints' / f'step_{stopped_at}'}" in (
        tmp_path / "second.log").read_text()
    _run_to_end(_command(tiny_model_dir, bundled_dataset_dir, tmp_path / "uninterrupted"), tmp_path / "ref.log")
    assert_same_run(tmp_path / "preempted", tmp_path / "uninterrupted")


def _rank_process(agent: subprocess.Popen, rank: int) -> psutil.Process:
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while True:
        for child in psutil.Process(agent.pid).children():
            if child.environ().get("RANK") == str(rank):
                return child
        assert time.monotonic() < deadline, f"no rank {rank} under torchrun"
        time.sleep(0.05)


@pytest.mark.slow
@pytest.mark.timeout(4 * RUN_TIMEOUT_S)
@pytest.mark.xdist_group("distributed")
@pytest.mark.parametrize("engine,signalled", [(None, "torchrun"), ("deepspeed_zero2.yaml", "rank 1")],
                         ids=["ddp-torchrun-signalled", "zero2-one-rank-signalled"])
def test_two_processes_sigterm_checkpoint_exit_preempted_and_resume(
        engine, signalled, tiny_model_dir, bundled_dataset_dir, tmp_path):
    """torchrun (a pod's first process, which Kubernetes signals) forwards SIGTERM to its ranks;
    a rank on another node gets none and learns it from the others: here SIGTERM reaches rank 1
    alone. Either way both ranks checkpoint the same step and rmjob-torchrun exits
    EXIT_PREEMPTED, where torchrun would exit 1."""
    launcher = [*RMJOB_TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "rmjob_trainer"]

    def command(output_dir: Path) -> list[str]:
        args = _flags(tiny_model_dir, bundled_dataset_dir, output_dir, grad_accum=1)
        return [*launcher, *args, *(["--deepspeed", str(DS_CONFIGS / engine)] if engine else [])]

    preempted = tmp_path / "preempted"
    with open(tmp_path / "first.log", "w") as out:
        agent = subprocess.Popen(command(preempted), env=ENV, stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_for_steps(preempted, agent, 2, tmp_path / "first.log")
        (agent if signalled == "torchrun" else _rank_process(agent, 1)).send_signal(signal.SIGTERM)
        assert agent.wait(timeout=RUN_TIMEOUT_S) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-4000:]
    finally:
        if agent.poll() is None:
            for process in psutil.Process(agent.pid).children(recursive=True):
                process.kill()
            agent.kill()
    first_log = (tmp_path / "first.log").read_text()
    (checkpoint,) = _checkpoints(preempted)
    assert f"checkpoint {checkpoint} written" in first_log
    if engine:  # every rank's ZeRO shards and RNG state, in the one checkpoint
        names = {p.name for p in (preempted / "checkpoints" / checkpoint).rglob("*")}
        assert {"rng_rank0.pt", "rng_rank1.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= names
    assert not (preempted / "metrics.json").exists()

    _run_to_end(command(preempted), tmp_path / "second.log")
    assert f"resuming from {preempted / 'checkpoints' / checkpoint}" in (tmp_path / "second.log").read_text()
    _run_to_end(command(tmp_path / "uninterrupted"), tmp_path / "ref.log")
    assert_same_run(preempted, tmp_path / "uninterrupted")
