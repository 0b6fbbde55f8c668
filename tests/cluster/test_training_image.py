"""Training inside the real trainer image through the control plane (issue 13): the CPU example
(manifests/examples/cpu-local.yaml) with ``image: localhost/rmjob-trainer:dev-cpu``, reconciled
by the operator process, its Indexed Job's two pods run by the pod runner in image mode
(``buildah run``), as the image's user, writing only their volumes. Also the image mode's
read-only root check, on the (small) operator image."""

from __future__ import annotations

import json
import time

import pytest
import yaml
from test_training import EXAMPLE, get_json, node_data

from conftest import IMAGE_UID, pod_runner_module

TRAINING_TIMEOUT_S = 900  # two CPU processes on a shared two-core machine
# What tests/deploy/test_images.py and tests/trainer/test_train.py hold the tiny model to.
ACCURACY_BAR = 0.9


def readable_by_all(directory):
    """The node's data as the image's user can read it: save_pretrained writes
    model.safetensors 0600, and the data here is prepared by whoever runs the test."""
    for path in [directory, *directory.rglob("*")]:
        path.chmod(path.stat().st_mode | (0o555 if path.is_dir() else 0o444))
    return directory


@pytest.mark.cluster
@pytest.mark.images
@pytest.mark.slow
@pytest.mark.timeout(TRAINING_TIMEOUT_S + 600)
def test_cpu_example_trains_inside_the_trainer_image(
        host_rendezvous_port, trainer_image, kubectl, namespace, image_pod_runner, rmj_crd, start_operator,
        tmp_path):
    runner = image_pod_runner
    job = yaml.safe_load(EXAMPLE.read_text())
    (volume,) = job["spec"]["resources"]["volumes"]
    volume["hostPath"]["path"] = str(readable_by_all(node_data(tmp_path / "node")))
    job["spec"]["resources"]["image"] = trainer_image
    job["metadata"]["namespace"] = namespace
    name = job["metadata"]["name"]
    operator = start_operator([namespace])
    kubectl("apply", "-f", "-", input=json.dumps(job))

    deadline = time.monotonic() + TRAINING_TIMEOUT_S
    while (status := get_json(kubectl, "rmj", name, "-n", namespace).get("status") or {}).get("phase") not in (
            "Succeeded", "Failed") and time.monotonic() < deadline:
        time.sleep(2)
    pods = get_json(kubectl, "pods", "-n", namespace, "-l", f"batch.kubernetes.io/job-name={name}")["items"]
    # A pod the Job controller has not seen finish yet may still be running: wait for both.
    while any(runner.root_writes(namespace, p["metadata"]["name"], "pytorch") is None for p in pods) \
            and time.monotonic() < deadline:
        time.sleep(1)
    logs = "\n".join(f"--- {p['metadata']['name']}:\n{runner.log(namespace, p['metadata']['name'], 'pytorch')[-3000:]}"
                     for p in pods)
    assert status.get("phase") == "Succeeded", (
        f"status: {status}\n{logs}\n--- operator:\n{operator.log()[-3000:]}\nrunner errors: {runner.errors}")

    assert sorted(p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == ["0", "1"]
    for pod in pods:
        pod_name = pod["metadata"]["name"]
        (container,) = pod["spec"]["containers"]
        assert container["image"] == trainer_image
        assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
        # Nothing written to the image's own filesystem: everything went to the pod's volumes.
        assert runner.root_writes(namespace, pod_name, "pytorch") == [], logs
        volumes = runner.workdir / namespace / pod_name / "volumes"
        written_by_the_image = {p for p in volumes.rglob("*") if p.stat().st_uid == IMAGE_UID}
        assert written_by_the_image, f"{pod_name} wrote nothing as uid {IMAGE_UID}"
        # Only under the output and cache volumes (the config, token and shm volumes stay as made).
        assert {p.relative_to(volumes).parts[0] for p in written_by_the_image} <= {"rmjob-output", "rmjob-cache"}
        assert {p.stat().st_uid for p in (volumes / "rmjob-output").rglob("*")} <= {IMAGE_UID}

    assert status["topology"]["worldSize"] == 2
    # Rank 0 reported through the API server with the token bound at the standard path.
    training = status.get("training")
    assert training, f"no status.training: {status}\n{logs}"
    assert training["done"] is True and training["step"] == training["totalSteps"] > 0
    assert training["evalAccuracy"] >= ACCURACY_BAR
    assert status["metrics"]["evalAccuracy"] == training["evalAccuracy"]
    # Rank 0 (index 0's pod) saved the model in its output volume.
    rank0 = next(p["metadata"]["name"] for p in pods
                 if p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] == "0")
    assert list((runner.workdir / namespace / rank0 / "volumes" / "rmjob-output").rglob("config.json"))


@pytest.mark.cluster
@pytest.mark.images
@pytest.mark.timeout(600)
def test_image_mode_fails_a_pod_that_writes_its_read_only_root(operator_image, kubectl, namespace, image_pod_runner):
    """buildah has no read-only root: the runner checks what the container wrote instead."""
    def pod(name: str, read_only: bool) -> dict:
        return {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": namespace},
            "spec": {"restartPolicy": "Never", "automountServiceAccountToken": False,
                     "volumes": [{"name": "scratch", "emptyDir": {}}],
                     "containers": [{
                         "name": "main", "image": operator_image, "command": ["sh", "-c"],
                         "args": ["id -u > /scratch/uid && touch /tmp/stray"],
                         "securityContext": {"readOnlyRootFilesystem": read_only},
                         "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}]},
        }

    kubectl("apply", "-f", "-", input=json.dumps({"apiVersion": "v1", "kind": "List",
                                                  "items": [pod("strict", True), pod("lax", False)]}))
    deadline = time.monotonic() + 300
    while (phases := {n: get_json(kubectl, "pod", n, "-n", namespace)["status"].get("phase") for n in ("strict", "lax")}) \
            != {"strict": "Failed", "lax": "Succeeded"} and time.monotonic() < deadline:
        time.sleep(1)

    assert phases == {"strict": "Failed", "lax": "Succeeded"}, (phases, image_pod_runner.errors,
                                                                image_pod_runner.log(namespace, "strict", "main"))
    strict = get_json(kubectl, "pod", "strict", "-n", namespace)["status"]
    assert strict["message"] == "container 'main' has readOnlyRootFilesystem but wrote /tmp/stray"
    assert strict["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    assert image_pod_runner.root_writes(namespace, "lax", "main") == ["/tmp/stray"]
    # The image's user (the pod names none), in the image's filesystem, the emptyDir bound at its path.
    uid = (image_pod_runner.workdir / namespace / "lax" / "volumes" / "scratch" / "uid").read_text().strip()
    assert uid == str(IMAGE_UID)


def test_mount_targets_follow_the_images_symlinks(tmp_path):
    """Debian's /var/run is a link to /run: the service-account volume must be bound at
    /run/secrets/..., or buildah's chroot leaves /var/run/secrets/... empty in the container."""
    root = tmp_path / "rootfs"
    (root / "run").mkdir(parents=True)
    (root / "var").mkdir()
    (root / "var" / "run").symlink_to("/run")
    (root / "opt" / "app").mkdir(parents=True)
    (root / "current").symlink_to("opt/app")
    resolve = pod_runner_module.resolve_in_root

    assert resolve(root, "/var/run/secrets/kubernetes.io/serviceaccount") == "/run/secrets/kubernetes.io/serviceaccount"
    assert resolve(root, "/current/data") == "/opt/app/data"
    assert resolve(root, "/output") == "/output"
    (root / "loop").symlink_to("/loop")
    with pytest.raises(pod_runner_module.PodUnsupported, match="too many levels of symbolic links"):
        resolve(root, "/loop/x")
