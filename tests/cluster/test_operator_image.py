"""The operator started from its image (issue 13) reconciles a RewardModelJob against the real
local API server, as the identity the chart's ClusterRole gives it: the image's entrypoint
under `buildah run --isolation chroot` (which shares the host's network, so the API server and
the liveness endpoint are both on 127.0.0.1), the kubeconfig mounted like a Secret."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import urllib.request
from pathlib import Path

import pytest
from rmj import cpu_spec, rmj, wait_for_phase, wait_until

from conftest import IMAGE_UID, OperatorIdentity, pod_runner_module

pytestmark = [pytest.mark.cluster, pytest.mark.images]

KUBECONFIG_PATH = "/etc/rmjob/kubeconfig"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def group_processes(pgid: int) -> dict[int, tuple[str, int]]:
    """pid -> (command line, real uid) of every process in process group ``pgid``."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            uid = int(next(line for line in (entry / "status").read_text().splitlines()
                           if line.startswith("Uid:")).split()[1])
        except (OSError, ProcessLookupError):
            continue  # exited meanwhile
        found[int(entry.name)] = (cmdline, uid)
    return found


@pytest.fixture
def identity(cluster, kubectl, rmj_crd, namespace, tmp_path):
    """What the chart grants an operator confined to the test's namespace (watchNamespaces): the
    image's default `--all-namespaces` would reconcile other tests' jobs in the shared cluster."""
    created = OperatorIdentity(cluster, kubectl, tmp_path, f"watchNamespaces={{{namespace}}}")
    yield created
    created.delete()


@pytest.mark.timeout(900)
def test_operator_image_reconciles_a_job_against_the_real_api_server(
        operator_image, cluster, kubectl, namespace, identity, tmp_path):
    # What a Secret volume gives the pod: a file its user can read (the original is root's, 0600).
    kubeconfig = tmp_path / "kubeconfig"
    shutil.copy(identity.kubeconfig, kubeconfig)
    kubeconfig.chmod(0o644)
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    entrypoint = pod_runner_module.image_config(operator_image)["Entrypoint"]
    working = subprocess.run(["buildah", "from", "--pull=never", "--quiet", operator_image],
                             capture_output=True, text=True, check=True).stdout.strip()
    log_path = tmp_path / "operator.log"
    try:
        with open(log_path, "wb") as log:
            # Its own process group: buildah run does not forward SIGTERM, the group gets it.
            process = subprocess.Popen(
                ["buildah", "run", "--isolation", "chroot", "-v", f"{kubeconfig}:{KUBECONFIG_PATH}:ro",
                 "-e", f"KUBECONFIG={KUBECONFIG_PATH}", working, "--",
                 *entrypoint, f"--namespace={namespace}", f"--liveness={liveness}"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            kubectl("apply", "-f", "-", input=json.dumps(rmj("rm-image", namespace, cpu_spec())))
            job = wait_until(lambda: kubectl("get", "job", "rm-image", "-n", namespace, "-o", "name",
                                             check=False).stdout.strip(), timeout=180, message="the Job rm-image")
            assert job == "job.batch/rm-image"
            status = wait_for_phase(kubectl, namespace, "rm-image", "Succeeded", timeout=180)
            with urllib.request.urlopen(liveness, timeout=10) as response:
                assert response.status == 200
            operators = [(cmd, uid) for pid, (cmd, uid) in group_processes(process.pid).items()
                         if "rmjob_operator" in cmd and not cmd.startswith("buildah")]
        finally:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        logs = log_path.read_text(errors="replace")
        # The image's own python, as the image's user.
        assert operators and {uid for _, uid in operators} == {IMAGE_UID}, (operators, logs[-3000:])
        assert "created Job rm-image" in logs
        assert status["phase"] == "Succeeded"
        # The chart runs the operator with a read-only root filesystem and an emptyDir at /tmp.
        assert pod_runner_module.written_outside(working, ("/tmp", KUBECONFIG_PATH)) == []
    finally:
        print(log_path.read_text(errors="replace")[-5000:])  # shown by pytest if the test fails
        subprocess.run(["buildah", "rm", working], capture_output=True)
