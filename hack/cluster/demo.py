#!/usr/bin/env python3
"""``make demo-cluster``: a RewardModelJob trained through a local Kubernetes control plane.

Starts the control plane (hack/cluster/cluster.py) unless it is running, installs the CRD, runs the operator (``python -m rmjob_operator``) and a pod runner
(hack/cluster/pod_runner.py) as local processes, puts a tiny model and the bundled data where
manifests/examples/cpu-local.yaml expects them (/tmp/rmjob-cpu-local), applies that example in
namespace ``rmjob-demo``, shows ``kubectl get rmj`` until the job finishes and prints its status.
Then it deletes that namespace and detaches from the control plane, which stops it when the
demo was its last user and nobody started it by hand (``make cluster-up``'s cluster is left
running, without the demo's job; so is one that a test session still uses).
Exits 0 when the job Succeeded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cluster as local_cluster  # noqa: E402 - next to this file, imported as the tests import it
import pod_runner  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
KUBECTL = REPO / ".tools" / "bin" / "kubectl"
EXAMPLE = REPO / "manifests" / "examples" / "cpu-local.yaml"
NODE_DATA = Path("/tmp/rmjob-cpu-local")  # the example's hostPath
NAMESPACE = "rmjob-demo"
JOB = "rm-cpu-local"
TIMEOUT_S = 900


def kubectl(cluster, *args: str, input: str | None = None, check: bool = True) -> str:
    result = subprocess.run([str(KUBECTL), *args], input=input, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)})
    if check and result.returncode != 0:
        raise SystemExit(f"error: kubectl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def prepare_node_data() -> None:
    """The tiny base model and the bundled data on the 'node' (this machine), built offline."""
    from rmjob_trainer.tiny import BUNDLED_DATASET_DIR, build_tiny_model

    if not (NODE_DATA / "tiny-base" / "config.json").exists():
        print(f"building the tiny base model in {NODE_DATA / 'tiny-base'}")
        build_tiny_model(NODE_DATA / "tiny-base")
    shutil.copytree(BUNDLED_DATASET_DIR, NODE_DATA / "sentiment_tiny", dirs_exist_ok=True)


def main() -> int:
    cluster = local_cluster.Cluster()
    print("attaching to the local control plane (started unless it runs)")
    try:
        # A user like a test session: whoever detaches last stops a cluster not started by hand,
        # so neither the demo nor a test run stops it under the other.
        started = cluster.attach()
    except local_cluster.ClusterError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print("local control plane started" if started else "using the running local control plane")
    try:
        return run_demo(cluster)
    finally:
        # Leaves the cluster as it found it: tests that share a running cluster expect no jobs.
        kubectl(cluster, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=120s", check=False)
        if cluster.detach():
            print("local control plane stopped")


def run_demo(cluster) -> int:
    kubectl(cluster, "apply", "--server-side", "--force-conflicts", "-f", str(REPO / "manifests" / "crd.yaml"))
    kubectl(cluster, "wait", "--for=condition=Established", "crd/rewardmodeljobs.rmjob.dev", "--timeout=60s")
    # What an interrupted earlier run left behind goes first.
    kubectl(cluster, "delete", "namespace", NAMESPACE, "--ignore-not-found", "--wait=true", "--timeout=120s")
    kubectl(cluster, "create", "namespace", NAMESPACE)
    kubectl(cluster, "wait", "--for=create", "serviceaccount/default", "-n", NAMESPACE, "--timeout=60s")
    prepare_node_data()

    runner = pod_runner.PodRunner(cluster, "runner-demo", cluster.dir / "pods" / "runner-demo")
    operator_log = cluster.logs / "demo-operator.log"
    with runner, open(operator_log, "ab") as log:
        kubectl(cluster, "annotate", "--overwrite", "namespace", NAMESPACE,
                *(f"{key}={value}" for key, value in runner.namespace_annotations().items()))
        operator = subprocess.Popen(
            [sys.executable, "-m", "rmjob_operator", f"--namespace={NAMESPACE}", "--log-format=plain"],
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig)}, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, cwd=REPO)
        print(f"operator running (log: {operator_log}); pods run by {runner.node} under {runner.workdir}")
        try:
            print(kubectl(cluster, "apply", "-n", NAMESPACE, "-f", str(EXAMPLE)).strip())
            phase = watch(cluster)
            status = json.loads(kubectl(cluster, "get", "rmj", JOB, "-n", NAMESPACE, "-o", "json")).get("status", {})
            status.pop("kopf", None)  # the operator framework's bookkeeping, not the job's
            print("\nfinal status:")
            print(json.dumps(status, indent=2))
            if phase != "Succeeded":
                pods = kubectl(cluster, "get", "pods", "-n", NAMESPACE, "-o", "name",
                               "-l", f"batch.kubernetes.io/job-name={JOB}").split()
                for pod in pods:
                    name = pod.split("/", 1)[1]
                    print(f"\n--- {name} (last lines):\n{runner.log(NAMESPACE, name, 'pytorch')[-2000:]}")
        finally:
            operator.terminate()
            operator.wait(timeout=30)
    return 0 if phase == "Succeeded" else 1


def watch(cluster) -> str:
    """Prints `kubectl get rmj` whenever it changes until the job finishes; the final phase."""
    deadline, shown = time.monotonic() + TIMEOUT_S, None
    print()
    while time.monotonic() < deadline:
        rows = kubectl(cluster, "get", "rmj", JOB, "-n", NAMESPACE, check=False).strip().splitlines()
        # A row per change of anything but the last column (Age, which changes every second).
        if len(rows) == 2 and rows[1].rsplit(None, 1)[0] != shown:
            print(rows[1] if shown else "\n".join(rows))
            shown = rows[1].rsplit(None, 1)[0]
        phase = kubectl(cluster, "get", "rmj", JOB, "-n", NAMESPACE, "-o", "jsonpath={.status.phase}", check=False)
        if phase in ("Succeeded", "Failed"):
            return phase
        time.sleep(2)
    return f"not finished after {TIMEOUT_S}s"


if __name__ == "__main__":
    sys.exit(main())
