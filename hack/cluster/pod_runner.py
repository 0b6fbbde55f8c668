#!/usr/bin/env python3
"""A pod runner for the local control plane (hack/cluster/cluster.py): a stand-in kubelet that
runs the pods bound to its node as local processes and writes their status back, so a Job's
pods really run. Standard library only.

    runner = PodRunner(cluster, node="runner-0", workdir=Path("/tmp/pods"))
    with runner:                      # registers the node, polls for pods, heartbeats
                                      # pods run under runner.workdir, /tmp/pods/runner-0
        kubectl annotate namespace NS <runner.namespace_annotations()>
        ...                           # pods of NS now run here

    python hack/cluster/pod_runner.py --node runner-0 --namespace NS   # same, until Ctrl-C

What a pod gets (in process mode, the default, the image is ignored: every container runs in
this Python environment; image mode is described at the end):

- **Node and placement.** The runner registers Node NAME with RUNNER_LABEL, RUNNER_TAINT and
  the label ``kubernetes.io/hostname=NAME``, plus a taint of its own
  (``rmjob.dev/pod-runner-node=NAME:NoSchedule``), reports it Ready every HEARTBEAT_S, and
  deletes it on stop. :meth:`PodRunner.namespace_annotations` pins a namespace's pods to this
  very node (node selector ``RUNNER_LABEL,kubernetes.io/hostname=NAME`` and both tolerations),
  so two runners (parallel test workers) never run each other's pods, and pods sent to runner
  nodes in general (RUNNER_NAMESPACE_ANNOTATIONS alone) never land here.
- **Processes.** Each container's ``command`` + ``args`` runs once (restartPolicy Never), in a
  session of its own (the whole process tree is stopped with it), stdout and stderr in
  ``WORKDIR/NODE/NS/POD/logs/CONTAINER.log`` (:meth:`PodRunner.log`). ``WORKDIR/NODE``
  (``PodRunner.workdir``) is the runner's own: stopping it removes that directory, and
  ``WORKDIR`` only if the runner created it and it is left empty, never what else is there.
  ``PATH`` starts with this Python's bin directory (so ``torchrun`` and ``python`` are the
  venv's); ``HOME`` is a per-pod directory; ``HOSTNAME`` is the pod's hostname;
  ``KUBERNETES_SERVICE_HOST=127.0.0.1`` and ``KUBERNETES_SERVICE_PORT`` name the API server, as
  the kubelet's service variables do.
  Nothing else leaks from the runner's environment.
- **Env.** ``value`` with ``$(VAR)`` expansion, ``fieldRef`` (metadata.name, namespace, uid,
  labels['k'], annotations['k'], spec.nodeName, spec.serviceAccountName, status.podIP,
  status.hostIP), ``secretKeyRef``, ``configMapKeyRef``; ``envFrom`` (``configMapRef``,
  ``secretRef``, ``prefix``, ``optional``), ``env`` taking precedence over it.
- **Volumes** become directories under ``WORKDIR/NS/POD/volumes/VOLUME``: emptyDir (empty),
  configMap and secret (their keys as files, ``items`` honoured), projected (serviceAccountToken:
  a real token from the TokenRequest API for the pod's ServiceAccount, bound to the pod;
  configMap ``kube-root-ca.crt``'s ``ca.crt``; downwardAPI fields), hostPath (the host path
  itself), persistentVolumeClaim (the host directory of the PersistentVolume the claim is bound
  to, a ``hostPath`` or ``local`` one: the cluster has no provisioner, so a test creates the
  PersistentVolume and Kubernetes binds the claim to it; the scheduler holds the pod until
  then). Anything else fails the pod with one message naming it.
- **Container paths.** Processes share the host's filesystem, so each ``volumeMounts[].mountPath``
  (``/etc/rmjob``, ``/output``, ``/cache``, the service-account directory, ...) is mapped to its
  volume's directory (plus ``subPath``) and every occurrence of a mount path as a whole path
  prefix is substituted in ``command``, ``args``, env values, ``workingDir`` and the text files
  of the pod's configMap, secret and projected volumes (so ``output_dir: /output`` in a mounted
  config file points at the pod's own output directory). Those volumes are read-only, so each
  container mounts a copy of its own (``WORKDIR/NODE/NS/POD/containers/CONTAINER/VOLUME``),
  rewritten once for that container's mounts. A mount path preceded by another path
  character (``/data/output``) is left alone. The one path read without being named anywhere,
  the service-account directory ``/var/run/secrets/kubernetes.io/serviceaccount``, is also
  given as ``RMJOB_SERVICE_ACCOUNT_DIR`` (the trainer's status reporter honours it).
  ``/dev/shm`` stays the host's.
- **Network and names.** Every pod shares the host's network: pod IP and host IP are
  127.0.0.1, and two pods must not listen on the same port at once. The pod DNS names of the
  namespace's headless Services, ``HOSTNAME.SERVICE`` (optionally ``.NS``, ``.NS.svc``,
  ``.NS.svc.cluster.local``; e.g. the rendezvous host ``NAME-0.NAME`` of an Indexed Job with
  subdomain NAME), are substituted with ``127.0.0.1`` wherever container paths are.
  Limitation: a pod's torchrun rendezvous store listens on every interface (``*:29500``), not
  127.0.0.1 only. torch 2.13's TCPStore server binds the wildcard address whatever host it is
  given; its one way round, a pre-bound ``master_listen_fd``, is not reachable from torchrun
  (``--rdzv-endpoint`` and ``--local-addr`` name hosts to connect to and advertise, not to bind).
- **Status.** Running (Ready, containers running, podIP 127.0.0.1) once the processes start,
  then Succeeded when every container exits 0, else Failed, with each container's exit code
  in ``state.terminated``; conditions others set (DisruptionTarget of an eviction) are kept, as
  the kubelet's strategic-merge status patches keep them. A pod being deleted has its processes stopped (SIGTERM, then
  SIGKILL after its grace period) and is then removed, as the kubelet does. Init containers,
  probes, resource limits, security contexts, restarts and token refresh are not emulated.
- **Runner death.** A watchdog process SIGKILLs the process groups of the runner's pods once
  the runner is gone, however it went (SIGKILL included). A runner started on a Node that
  already exists (a previous one died without deleting it) takes the Node over, as a
  restarted kubelet does, and fails its Running pods (container state ``terminated``, exit
  code 137, reason ``ContainerStatusUnknown``): their processes died with the old runner.

Image mode (``PodRunner(..., images=True)``, ``--images``, or ``RMJOB_POD_RUNNER_IMAGES=1``): each
container runs in its image, which must already be in local containers storage (``make images``
builds the project's two; nothing is pulled, a missing image fails the pod naming it), through
``buildah from`` + ``buildah run --isolation chroot`` (``podman run`` cannot start containers in
every sandbox). Differences from process mode:

- Volumes are bound at their mount paths (``-v DIR:mountPath``, ``:ro`` when ``readOnly``), so no
  container path is rewritten and ``RMJOB_SERVICE_ACCOUNT_DIR`` is not set; pod DNS names are
  still rewritten to 127.0.0.1 (chroot isolation shares the host's network). emptyDirs are
  world-writable, as the kubelet makes them, so the image's non-root user can write them.
- ``command``/``args`` override the image's entrypoint/cmd as in Kubernetes; the env is the
  image's plus the pod's plus ``HOSTNAME`` and ``KUBERNETES_SERVICE_HOST``/``_PORT``; the user is
  ``runAsUser[:runAsGroup]`` of the pod or container securityContext, else the image's USER.
  ``buildah run`` itself gets the runner's ``PATH`` and what configures containers storage
  (:data:`BUILDAH_ENV`: ``HOME`` and ``XDG_*`` for rootless storage, ``CONTAINERS_*``), so it
  finds the working container that ``buildah from`` made; none of it reaches the container.
- buildah has no read-only root: after the container exits the runner lists what it wrote to
  its own filesystem outside its mounts (``podman diff``; :meth:`PodRunner.root_writes`), and a
  container whose securityContext asks for ``readOnlyRootFilesystem`` and wrote there fails the
  pod, naming the paths. The working container is then removed.
- ``buildah run`` does not forward SIGTERM to the container, but its chroot runtime and the
  container's processes stay in its process group, so a deleted pod's group is signalled
  (SIGTERM, then SIGKILL), as in process mode.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

import cluster as local_cluster  # next to this file: on sys.path run as a script, put there by importers

# Run as a process of its own: the runner writes "+PGID" for each pod process group it starts
# and "-PGID" once that group is done; when its stdin closes (the runner exited, SIGKILL
# included), it SIGKILLs the groups still listed, so no pod outlives its runner.
WATCHDOG = """
import os, signal, sys
groups = set()
for line in sys.stdin:
    (groups.add if line[0] == "+" else groups.discard)(int(line[1:]))
for group in groups:
    try:
        os.killpg(group, signal.SIGKILL)
    except ProcessLookupError:
        pass
"""
HEARTBEAT_S = 10.0
POLL_S = 0.5
CLAIM_BIND_WAIT_S = 60
LOCALHOST = "127.0.0.1"
# Where buildah and podman find their storage and configuration (containers-storage.conf(5),
# containers.conf(5)): a `buildah run` without them would look in another store.
BUILDAH_ENV = ("HOME", "TMPDIR", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME", "XDG_DATA_HOME", "CONTAINERS_CONF",
               "CONTAINERS_STORAGE_CONF", "CONTAINERS_REGISTRIES_CONF", "STORAGE_DRIVER", "STORAGE_OPTS",
               "BUILDAH_ISOLATION")
SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
HOSTNAME_LABEL = "kubernetes.io/hostname"
NODE_TAINT_KEY = "rmjob.dev/pod-runner-node"
IMAGES_ENV = "RMJOB_POD_RUNNER_IMAGES"
DEFAULT_TOKEN_SECONDS = 3607  # what the API server's ServiceAccount admission projects


class ApiError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class PodUnsupported(RuntimeError):
    """Something in a pod the runner cannot emulate: the pod fails with this message."""


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Api:
    """Admin requests to the local API server (the cluster's admin client certificate)."""

    def __init__(self, server: str, pki: Path) -> None:
        self.server = server
        self.context = ssl.create_default_context(cafile=str(pki / "ca.crt"))
        self.context.load_cert_chain(str(pki / "admin.crt"), str(pki / "admin.key"))

    def __call__(self, method: str, path: str, body: dict | None = None,
                 content_type: str = "application/json") -> dict:
        request = urllib.request.Request(
            self.server + path, method=method, data=None if body is None else json.dumps(body).encode(),
            headers={"Content-Type": content_type, "Accept": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=30, context=self.context) as response:
                return json.loads(response.read() or b"{}")
        except urllib.error.HTTPError as error:
            detail = json.loads(error.read() or b"{}").get("message", error.reason)
            raise ApiError(error.code, f"{method} {path}: HTTP {error.code}: {detail}") from None


# ------------------------------------------------------------------------ pure helpers
def field_value(pod: dict, field_path: str) -> str:
    """The downward API's value of ``field_path`` for this pod."""
    meta, spec, status = pod["metadata"], pod["spec"], pod.get("status", {})
    keyed = re.fullmatch(r"metadata\.(labels|annotations)\['([^']+)'\]", field_path)
    if keyed:
        return meta.get(keyed.group(1), {}).get(keyed.group(2), "")
    simple = {
        "metadata.name": meta["name"], "metadata.namespace": meta["namespace"], "metadata.uid": meta["uid"],
        "spec.nodeName": spec.get("nodeName", ""), "spec.serviceAccountName": spec.get("serviceAccountName", ""),
        "status.podIP": LOCALHOST, "status.hostIP": LOCALHOST,
    }
    if field_path not in simple:
        raise PodUnsupported(f"downward API field {field_path!r} is not supported by the pod runner")
    return simple[field_path]


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' ``$(VAR)`` expansion: defined variables are replaced, ``$$`` escapes."""
    return re.sub(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
                  lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)), value)


def make_rewriter(mounts: dict[str, str], headless_services: list[str], namespace: str):
    """A function substituting container paths (``mounts``: mountPath -> host directory) and the
    pod DNS names of ``headless_services`` (-> 127.0.0.1) in one string."""
    paths = sorted((p.rstrip("/") for p in mounts if p.rstrip("/")), key=len, reverse=True)
    host_of = {p.rstrip("/"): str(mounts[p]) for p in mounts}
    path_re = re.compile(r"(?<![\w./-])(" + "|".join(map(re.escape, paths)) + r")(?=/|$|[^\w.-])") if paths else None
    ns = re.escape(namespace)
    name_re = re.compile(
        r"(?<![\w.-])[a-z0-9](?:[-a-z0-9]*[a-z0-9])?\.(?:" + "|".join(map(re.escape, headless_services))
        + rf")(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?![\w-]|\.\w)") if headless_services else None

    def rewrite(text: str) -> str:
        if path_re:
            text = path_re.sub(lambda m: host_of[m.group(1)], text)
        if name_re:
            text = name_re.sub(LOCALHOST, text)
        return text

    return rewrite


# ----------------------------------------------------------------------------- a pod
class _Pod:
    """One pod's processes and directories."""

    def __init__(self, runner: PodRunner, pod: dict) -> None:
        self.runner, self.pod = runner, pod
        meta = pod["metadata"]
        self.namespace, self.name, self.uid = meta["namespace"], meta["name"], meta["uid"]
        self.dir = runner.workdir / self.namespace / self.name
        self.processes: dict[str, subprocess.Popen] = {}
        # Image mode: container name -> (buildah's container, its mount targets in the image).
        self.working_containers: dict[str, tuple[str, tuple[str, ...]]] = {}
        self.started_at: dict[str, str] = {}
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.namespace}/{self.name}", daemon=True)

    # ---------------------------------------------------------------- preparation
    def _volume_dirs(self) -> dict[str, Path]:
        dirs = {}
        for volume in self.pod["spec"].get("volumes", []):
            name = volume["name"]
            if "hostPath" in volume:
                path = Path(volume["hostPath"]["path"])
                if volume["hostPath"].get("type") == "DirectoryOrCreate":
                    path.mkdir(parents=True, exist_ok=True)
                dirs[name] = path
                continue
            if "persistentVolumeClaim" in volume:
                dirs[name] = self._claim_dir(volume["persistentVolumeClaim"]["claimName"])
                continue
            path = self.dir / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in volume:
                self._write_keys(path, self._config_map(volume["configMap"]), volume["configMap"].get("items"))
            elif "secret" in volume:
                source = {"name": volume["secret"]["secretName"], "optional": volume["secret"].get("optional")}
                self._write_keys(path, self._secret(source), volume["secret"].get("items"))
            elif "projected" in volume:
                for source in volume["projected"]["sources"]:
                    self._write_projected(path, source)
            elif "emptyDir" not in volume:
                kind = next((k for k in volume if k != "name"), "?")
                raise PodUnsupported(f"volume {name!r} of type {kind} is not supported by the pod runner")
            dirs[name] = path
        return dirs

    def _claim_dir(self, claim_name: str) -> Path:
        """The host directory behind a claim: its bound PersistentVolume's hostPath or local path.

        Like the kubelet, waits for the claim to be bound (up to CLAIM_BIND_WAIT_S): the
        scheduler places a pod once the claim names its volume, before its status says Bound."""
        deadline = time.monotonic() + CLAIM_BIND_WAIT_S
        while True:
            try:
                claim = self.runner.api("GET", f"/api/v1/namespaces/{self.namespace}/persistentvolumeclaims/{claim_name}")
            except ApiError as error:
                raise PodUnsupported(f"persistentVolumeClaim {claim_name!r}: {error}") from None
            volume_name = claim.get("spec", {}).get("volumeName")
            if claim.get("status", {}).get("phase") == "Bound" and volume_name:
                break
            if time.monotonic() > deadline or self.stopping.wait(POLL_S):
                raise PodUnsupported(f"persistentVolumeClaim {claim_name!r} is not bound to a PersistentVolume")
        volume = self.runner.api("GET", f"/api/v1/persistentvolumes/{volume_name}")["spec"]
        source = volume.get("hostPath") or volume.get("local")
        if not source:
            kind = next((k for k in ("csi", "nfs", "iscsi") if k in volume), "its type")
            raise PodUnsupported(f"persistentVolumeClaim {claim_name!r}: PersistentVolume {volume_name} is "
                                 f"{kind}; the pod runner mounts hostPath and local volumes only")
        path = Path(source["path"])
        if not path.is_dir():
            raise PodUnsupported(f"persistentVolumeClaim {claim_name!r}: PersistentVolume {volume_name}'s "
                                 f"directory {path} does not exist")
        return path

    def _config_map(self, source: dict) -> dict[str, bytes]:
        try:
            found = self.runner.api("GET", f"/api/v1/namespaces/{self.namespace}/configmaps/{source['name']}")
        except ApiError as error:
            if error.status == 404 and source.get("optional"):
                return {}
            raise PodUnsupported(f"configMap {source['name']!r}: {error}") from None
        data = {k: v.encode() for k, v in found.get("data", {}).items()}
        data.update({k: base64.b64decode(v) for k, v in found.get("binaryData", {}).items()})
        return data

    def _secret(self, source: dict) -> dict[str, bytes]:
        try:
            found = self.runner.api("GET", f"/api/v1/namespaces/{self.namespace}/secrets/{source['name']}")
        except ApiError as error:
            if error.status == 404 and source.get("optional"):
                return {}
            raise PodUnsupported(f"secret {source['name']!r}: {error}") from None
        return {k: base64.b64decode(v) for k, v in found.get("data", {}).items()}

    @staticmethod
    def _write_keys(path: Path, data: dict[str, bytes], items: list[dict] | None) -> None:
        for key, target in ((i["key"], i["path"]) for i in items) if items else ((k, k) for k in data):
            if key in data:
                (path / target).parent.mkdir(parents=True, exist_ok=True)
                (path / target).write_bytes(data[key])

    def _write_projected(self, path: Path, source: dict) -> None:
        if "serviceAccountToken" in source:
            token = source["serviceAccountToken"]
            (path / token["path"]).write_text(self.runner.request_token(self.pod, token))
        elif "configMap" in source:
            self._write_keys(path, self._config_map(source["configMap"]), source["configMap"].get("items"))
        elif "secret" in source:
            self._write_keys(path, self._secret(source["secret"]), source["secret"].get("items"))
        elif "downwardAPI" in source:
            for item in source["downwardAPI"]["items"]:
                if "fieldRef" not in item:
                    raise PodUnsupported(f"projected downwardAPI item {item['path']!r}: only fieldRef is supported")
                (path / item["path"]).write_text(field_value(self.pod, item["fieldRef"]["fieldPath"]))
        else:
            raise PodUnsupported(f"projected source {', '.join(source)} is not supported by the pod runner")

    def _env(self, container: dict) -> dict[str, str]:
        """The container's variables as the kubelet builds them: ``envFrom`` sources in order
        (a later one wins), then ``env`` over them, its values expanding what came before."""
        env: dict[str, str] = {}
        for source in container.get("envFrom", []):
            if "configMapRef" in source:
                data = self._config_map(source["configMapRef"])
            elif "secretRef" in source:
                data = self._secret(source["secretRef"])
            else:
                raise PodUnsupported(f"envFrom {', '.join(source)} is not supported by the pod runner")
            env.update({source.get("prefix", "") + key: value.decode() for key, value in data.items()})
        for var in container.get("env", []):
            if "value" in var or "valueFrom" not in var:
                env[var["name"]] = expand(var.get("value", ""), env)
                continue
            source = var["valueFrom"]
            if "fieldRef" in source:
                env[var["name"]] = field_value(self.pod, source["fieldRef"]["fieldPath"])
            elif "secretKeyRef" in source or "configMapKeyRef" in source:
                ref = source.get("secretKeyRef") or source["configMapKeyRef"]
                data = self._secret(ref) if "secretKeyRef" in source else self._config_map(ref)
                if ref["key"] not in data:
                    if ref.get("optional"):
                        continue
                    raise PodUnsupported(f"env {var['name']}: key {ref['key']!r} not in {ref['name']!r}")
                env[var["name"]] = data[ref["key"]].decode()
            else:
                raise PodUnsupported(f"env {var['name']}: {', '.join(source)} is not supported by the pod runner")
        return env

    def _headless_services(self) -> list[str]:
        services = self.runner.api("GET", f"/api/v1/namespaces/{self.namespace}/services")["items"]
        return [s["metadata"]["name"] for s in services if s["spec"].get("clusterIP") == "None"]

    def _prepare(self) -> list[tuple[str, list[str], dict[str, str], Path]]:
        """Each container's (name, argv, env, working directory), everything materialized."""
        spec = self.pod["spec"]
        if spec.get("initContainers"):
            raise PodUnsupported("init containers are not supported by the pod runner")
        volume_dirs = self._volume_dirs()
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        services = self._headless_services()
        if self.runner.images:
            return [self._prepare_in_image(container, volume_dirs, services) for container in spec["containers"]]
        home = self.dir / "home"
        home.mkdir(parents=True, exist_ok=True)
        prepared = []
        for container in spec["containers"]:
            if not container.get("command"):
                raise PodUnsupported(f"container {container['name']!r} has no command (the image's "
                                     "entrypoint is unknown to the pod runner)")
            # Each container reads a copy of the file volumes rewritten for its own mounts: one
            # mount path can be another volume in each container (an emptyDir each at /tmp), and
            # a file rewritten twice would have its host paths rewritten again.
            volumes = {v["name"]: v for v in spec.get("volumes", [])}
            copies = {m["name"]: self.dir / "containers" / container["name"] / m["name"]
                      for m in container.get("volumeMounts", [])
                      if {"configMap", "secret", "projected"} & set(volumes[m["name"]])}
            mounts = {m["mountPath"]: copies.get(m["name"], volume_dirs[m["name"]]) / m.get("subPath", "")
                      for m in container.get("volumeMounts", [])}
            for mount in container.get("volumeMounts", []):
                if mount.get("subPath") and mount["name"] not in copies:  # created if missing, as the kubelet does
                    (volume_dirs[mount["name"]] / mount["subPath"]).mkdir(parents=True, exist_ok=True)
            rewrite = make_rewriter(mounts, services, self.namespace)
            for name, copy in copies.items():
                shutil.copytree(volume_dirs[name], copy)
                _rewrite_files(copy, rewrite)
            env = {
                "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', os.defpath)}",
                "HOME": str(home),
                "HOSTNAME": spec.get("hostname", self.name),
                "KUBERNETES_SERVICE_HOST": LOCALHOST,
                "KUBERNETES_SERVICE_PORT": self.runner.api_port,
                "KUBERNETES_SERVICE_PORT_HTTPS": self.runner.api_port,
            }
            if SERVICE_ACCOUNT_DIR in mounts:
                env["RMJOB_SERVICE_ACCOUNT_DIR"] = str(mounts[SERVICE_ACCOUNT_DIR])
            container_env = self._env(container)
            env.update({name: rewrite(value) for name, value in container_env.items()})
            argv = [rewrite(expand(arg, container_env))
                    for arg in [*container["command"], *container.get("args", [])]]
            workdir = Path(rewrite(container["workingDir"])) if container.get("workingDir") else self.dir
            prepared.append((container["name"], argv, env, workdir))
        return prepared

    def _prepare_in_image(self, container: dict, volume_dirs: dict[str, Path],
                          services: list[str]) -> tuple[str, list[str], dict[str, str], Path]:
        """(name, ``buildah run`` argv, its env, working directory) for a container run in its
        image; creates the working container."""
        spec, name = self.pod["spec"], container["name"]
        image = container.get("image", "")
        config = image_config(image)
        rewrite = make_rewriter({}, services, self.namespace)
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for mount in container.get("volumeMounts", []):
            volume = volumes[mount["name"]]
            if {"configMap", "secret", "projected"} & set(volume):
                _rewrite_files(volume_dirs[mount["name"]], rewrite)
            elif "emptyDir" in volume:
                volume_dirs[mount["name"]].chmod(0o777)
        container_env = self._env(container)
        command = container.get("command") or config.get("Entrypoint") or []
        args = container.get("args") or ([] if container.get("command") else config.get("Cmd") or [])
        argv = [rewrite(expand(arg, container_env)) for arg in [*command, *args]]
        if not argv:
            raise PodUnsupported(f"container {name!r}: neither the pod nor image {image!r} names a command")
        hostname = spec.get("hostname", self.name)
        env = {"HOSTNAME": hostname, "KUBERNETES_SERVICE_HOST": LOCALHOST,
               "KUBERNETES_SERVICE_PORT": self.runner.api_port, "KUBERNETES_SERVICE_PORT_HTTPS": self.runner.api_port,
               **{key: rewrite(value) for key, value in container_env.items()}}
        security = {**spec.get("securityContext", {}), **container.get("securityContext", {})}
        options = ["--hostname", hostname]
        if "runAsUser" in security:
            group = f":{security['runAsGroup']}" if "runAsGroup" in security else ""
            options += ["--user", f"{security['runAsUser']}{group}"]
        if container.get("workingDir"):
            options += ["--workingdir", container["workingDir"]]
        for key, value in env.items():
            options += ["-e", f"{key}={value}"]
        created = subprocess.run(["buildah", "from", "--pull=never", "--quiet", image],
                                 capture_output=True, text=True)
        if created.returncode != 0:
            raise PodUnsupported(f"container {name!r}: buildah from {image}: {_last_line(created.stderr)}")
        working = created.stdout.strip()
        self.working_containers[name] = (working, ())  # removed at the end even if what follows fails
        targets = _mount_targets(working, [m["mountPath"] for m in container.get("volumeMounts", [])])
        self.working_containers[name] = (working, tuple(targets))
        for mount, target in zip(container.get("volumeMounts", []), targets):
            host = volume_dirs[mount["name"]] / mount.get("subPath", "")
            options += ["-v", f"{host}:{target}{':ro' if mount.get('readOnly') else ''}"]
        run_argv = ["buildah", "run", "--isolation", "chroot", *options, working, "--", *argv]
        return name, run_argv, buildah_env(), self.dir

    def _finish_working_containers(self) -> str | None:
        """Image mode, once the containers have exited: records what each wrote outside its
        mounts, removes the working containers; why the pod fails, if one broke its read-only root."""
        violations = []
        for container in self.pod["spec"]["containers"]:
            working, targets = self.working_containers.pop(container["name"], (None, ()))
            if working is None:
                continue
            if container["name"] in self.processes:
                try:
                    writes = written_outside(working, targets)
                except (subprocess.CalledProcessError, OSError) as error:
                    violations.append(f"container {container['name']!r}: podman diff failed: {error}")
                    writes = []
                self.runner.recorded_root_writes[(self.namespace, self.name, container["name"])] = writes
                read_only = {**self.pod["spec"].get("securityContext", {}),
                             **container.get("securityContext", {})}.get("readOnlyRootFilesystem")
                if read_only and writes:
                    violations.append(f"container {container['name']!r} has readOnlyRootFilesystem but wrote "
                                      f"{', '.join(writes)}")
            subprocess.run(["buildah", "rm", working], capture_output=True)
        return "; ".join(violations) or None

    # --------------------------------------------------------------------- running
    def _run(self) -> None:
        try:
            prepared = self._prepare()
        except (PodUnsupported, ApiError, OSError) as error:
            self._finish_working_containers()
            self._write_status(failed_message=str(error))
            return
        for name, argv, env, workdir in prepared:
            with open(self.dir / "logs" / f"{name}.log", "ab") as log:
                try:
                    self.processes[name] = subprocess.Popen(
                        argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL, stdout=log,
                        stderr=subprocess.STDOUT, start_new_session=True)
                except OSError as error:
                    self._stop_processes(0)
                    self._unwatch_processes()
                    self._finish_working_containers()
                    self._write_status(failed_message=f"container {name!r}: {error}")
                    return
            self.runner.watch_group(self.processes[name].pid)
            self.started_at[name] = _now()
        self._write_status()
        while any(p.poll() is None for p in self.processes.values()):
            if self.stopping.wait(POLL_S):
                grace = self.pod["metadata"].get("deletionGracePeriodSeconds", 30)
                self._stop_processes(grace)
                break
        self._unwatch_processes()
        self._write_status(failed_message=self._finish_working_containers())

    def _unwatch_processes(self) -> None:
        for process in self.processes.values():
            self.runner.unwatch_group(process.pid)

    def _stop_processes(self, grace_s: float) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                _signal_group(process, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(process, signal.SIGKILL)
                process.wait()

    def _write_status(self, failed_message: str | None = None) -> None:
        now = _now()
        containers = self.pod["spec"]["containers"]
        codes = {c["name"]: exit_code(self.processes[c["name"]]) if c["name"] in self.processes else None
                 for c in containers}
        running = failed_message is None and any(code is None for code in codes.values())
        if failed_message is not None:
            phase = "Failed"
        elif running:
            phase = "Running"
        else:
            phase = "Succeeded" if all(code == 0 for code in codes.values()) else "Failed"
        statuses = []
        for container in containers:
            name, code = container["name"], codes[container["name"]]
            running_now = name in self.processes and code is None
            if name in self.processes and code is None:
                state = {"running": {"startedAt": self.started_at[name]}}
            elif name in self.processes:
                state = {"terminated": {"exitCode": code, "reason": "Completed" if code == 0 else "Error",
                                        "startedAt": self.started_at[name], "finishedAt": now,
                                        "containerID": f"runner://{self.processes[name].pid}"}}
            else:
                state = {"waiting": {"reason": "RunnerUnsupported", "message": failed_message}}
            statuses.append({"name": name, "image": container.get("image", ""), "imageID": "",
                             "containerID": f"runner://{self.processes[name].pid}" if name in self.processes else "",
                             "ready": running_now, "started": running_now,
                             "restartCount": 0, "state": state})
        ready = "True" if running else "False"
        conditions = [{"type": kind, "status": status, "lastTransitionTime": now}
                      for kind, status in (("PodReadyToStartContainers", "True"), ("Initialized", "True"),
                                           ("Ready", ready), ("ContainersReady", ready), ("PodScheduled", "True"))]
        status = {"phase": phase, "conditions": conditions, "containerStatuses": statuses,
                  "hostIP": LOCALHOST, "hostIPs": [{"ip": LOCALHOST}], "podIP": LOCALHOST,
                  "podIPs": [{"ip": LOCALHOST}], "startTime": self.pod.get("status", {}).get("startTime", now)}
        if failed_message is not None:
            status.update(reason="RunnerUnsupported", message=failed_message)
        self.runner.patch_pod_status(self.namespace, self.name, status)


def exit_code(process: subprocess.Popen) -> int | None:
    """The container's exit code as a kubelet reports it: 128+N for death by signal N (143 for
    SIGTERM, 137 for SIGKILL; a Job's podFailurePolicy onExitCodes matches these), where Python
    gives -N. None while it runs."""
    code = process.poll()
    return 128 - code if code is not None and code < 0 else code


def _rewrite_files(directory: Path, rewrite) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            try:
                text = path.read_text()
            except UnicodeDecodeError:
                continue  # binary data: no paths to rewrite
            if (new := rewrite(text)) != text:
                path.write_text(new)


def image_config(image: str) -> dict:
    """The OCI config (Entrypoint, Cmd, User, ...) of an image in local containers storage."""
    found = subprocess.run(["podman", "image", "inspect", "--format", "{{json .Config}}", image],
                           capture_output=True, text=True)
    if found.returncode != 0:
        raise PodUnsupported(f"image {image!r} is not in local containers storage (the pod runner's image "
                             f"mode pulls nothing): {_last_line(found.stderr)}")
    return json.loads(found.stdout)


def written_outside(working_container: str, allowed: tuple[str, ...]) -> list[str]:
    """What a container changed in its own filesystem outside the ``allowed`` paths (its mounts:
    a mount point shows when the runtime had to create it). A directory shows as changed when
    something below it did: only leaves count."""
    diff = subprocess.run(["podman", "diff", working_container], capture_output=True, text=True, check=True)
    paths = [line.split(" ", 1)[1] for line in diff.stdout.splitlines()]
    leaves = [p for p in paths if not any(other.startswith(p + "/") for other in paths)]
    return [p for p in leaves if not any(p == a or p.startswith(a + "/") for a in allowed)]


def _mount_targets(working_container: str, mount_paths: list[str]) -> list[str]:
    """Each mount path with the symlinks of the container's filesystem resolved, as runc
    resolves a mount's destination. buildah's chroot isolation does not: a volume bound at
    /var/run/secrets/... (Debian's /var/run is a link to /run) would not show in the container."""
    mounted = subprocess.run(["buildah", "mount", working_container], capture_output=True, text=True)
    if mounted.returncode != 0:
        raise PodUnsupported(f"buildah mount {working_container}: {_last_line(mounted.stderr)}")
    try:
        return [resolve_in_root(Path(mounted.stdout.strip()), path) for path in mount_paths]
    finally:
        subprocess.run(["buildah", "umount", working_container], capture_output=True)


def resolve_in_root(root: Path, path: str) -> str:
    """``path`` inside the filesystem at ``root``, its symlinks followed within ``root``."""
    pending = [part for part in path.split("/") if part]
    resolved: list[str] = []
    hops = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            resolved = resolved[:-1]
            continue
        if part == ".":
            continue
        candidate = root.joinpath(*resolved, part)
        if candidate.is_symlink():
            hops += 1
            if hops > 40:
                raise PodUnsupported(f"mount path {path!r}: too many levels of symbolic links in the image")
            target = os.readlink(candidate)
            if target.startswith("/"):
                resolved = []
            pending = [p for p in target.split("/") if p] + pending
            continue
        resolved.append(part)
    return "/" + "/".join(resolved)


def buildah_env() -> dict[str, str]:
    """The environment of a ``buildah run``: the runner's ``PATH`` and :data:`BUILDAH_ENV`."""
    return {"PATH": os.environ.get("PATH", os.defpath),
            **{key: value for key, value in os.environ.items() if key in BUILDAH_ENV}}


def _last_line(text: str) -> str:
    lines = text.strip().splitlines()
    return lines[-1] if lines else "(no message)"


def _signal_group(process: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


# ------------------------------------------------------------------------- the runner
class PodRunner:
    """Runs the pods bound to Node ``node`` of ``cluster`` (a cluster.py Cluster, or anything with
    ``server`` and ``pki``) under ``workdir``."""

    def __init__(self, cluster, node: str, workdir: Path, images: bool | None = None) -> None:
        self.api = Api(cluster.server, Path(cluster.pki))
        # Image mode (see the module's docstring); default from the environment.
        self.images = images if images is not None else os.environ.get(IMAGES_ENV, "") not in ("", "0")
        # Image mode: (namespace, pod, container) -> paths it wrote outside its mounts.
        self.recorded_root_writes: dict[tuple[str, str, str], list[str]] = {}
        self.api_port = str(urllib.parse.urlsplit(cluster.server).port)
        self.node = node
        self.parent_dir = Path(workdir)
        self._created_parent_dir = False
        self.workdir = self.parent_dir / node
        self._pods: dict[str, _Pod] = {}  # by uid
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name=f"pod-runner-{node}", daemon=True)
        self.errors: list[str] = []  # API failures of the loop, for a test's failure message
        self._watchdog: subprocess.Popen | None = None
        self._watchdog_lock = threading.Lock()

    def __enter__(self) -> PodRunner:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def namespace_annotations(self) -> dict[str, str]:
        """Annotations that send every pod of a namespace to this runner's node."""
        tolerations = [{"key": taint["key"], "operator": "Equal", "value": taint["value"], "effect": taint["effect"]}
                       for taint in self._taints()]
        return {
            "scheduler.alpha.kubernetes.io/node-selector": f"{'='.join(local_cluster.RUNNER_LABEL)},{HOSTNAME_LABEL}={self.node}",
            "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(tolerations),
        }

    def _taints(self) -> list[dict]:
        return [local_cluster.RUNNER_TAINT, {"key": NODE_TAINT_KEY, "value": self.node, "effect": "NoSchedule"}]

    def start(self) -> None:
        key, value = local_cluster.RUNNER_LABEL
        self._created_parent_dir = not self.parent_dir.exists()
        self.workdir.mkdir(parents=True, exist_ok=True)
        node = {
            "apiVersion": "v1", "kind": "Node",
            "metadata": {"name": self.node, "labels": {key: value, HOSTNAME_LABEL: self.node,
                                                       "kubernetes.io/os": "linux"}},
            "spec": {"taints": self._taints()},
            "status": self._node_status(),
        }
        try:
            self.api("POST", "/api/v1/nodes", node)
        except ApiError as error:
            if error.status != 409:
                raise
            self._adopt_node(node)
        # Its own session: a Ctrl-C to the runner's terminal must not kill it first.
        self._watchdog = subprocess.Popen([sys.executable, "-c", WATCHDOG], stdin=subprocess.PIPE, text=True,
                                          start_new_session=True)
        self._thread.start()

    def _adopt_node(self, node: dict) -> None:
        """Takes over Node ``node`` left by a runner that died, and fails the pods that were
        running there: the watchdog killed their processes."""
        merge = "application/merge-patch+json"
        self.api("PATCH", f"/api/v1/nodes/{self.node}", {"metadata": node["metadata"], "spec": node["spec"]},
                 content_type=merge)
        self.api("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": node["status"]}, content_type=merge)
        selector = urllib.parse.quote(f"spec.nodeName={self.node}")
        now = _now()
        for pod in self.api("GET", f"/api/v1/pods?fieldSelector={selector}")["items"]:
            if pod.get("status", {}).get("phase") != "Running":
                continue  # Pending pods never started: this runner runs them
            lost = {"exitCode": 137, "reason": "ContainerStatusUnknown", "finishedAt": now,
                    "message": "The container could not be located when the pod was terminated"}
            statuses = [{**status, "ready": False, "started": False, "state": {"terminated": lost}}
                        for status in pod["status"].get("containerStatuses", [])]
            conditions = [{**condition, "status": "False", "lastTransitionTime": now}
                          if condition["type"] in ("Ready", "ContainersReady") else condition
                          for condition in pod["status"].get("conditions", [])]
            self.patch_pod_status(pod["metadata"]["namespace"], pod["metadata"]["name"], {
                "phase": "Failed", "conditions": conditions, "containerStatuses": statuses,
                "reason": "PodRunnerRestarted",
                "message": f"the pod runner of node {self.node} restarted; the pod's processes died with it"})

    def watch_group(self, pgid: int) -> None:
        """Has the watchdog kill process group ``pgid`` if the runner dies before it ends."""
        self._tell_watchdog(f"+{pgid}")

    def unwatch_group(self, pgid: int) -> None:
        self._tell_watchdog(f"-{pgid}")

    def _tell_watchdog(self, line: str) -> None:
        with self._watchdog_lock:
            if self._watchdog.stdin.closed:
                return  # stop() gave up waiting for this pod: the watchdog has killed its groups
            self._watchdog.stdin.write(line + "\n")
            self._watchdog.stdin.flush()

    def stop(self) -> None:
        """Stops every process, deletes the node and the runner's own directory."""
        self._stop.set()
        self._thread.join(timeout=60)
        for pod in list(self._pods.values()):
            pod.stopping.set()
        for pod in list(self._pods.values()):
            pod.thread.join(timeout=60)
        if self._watchdog:
            # Groups still listed (a pod thread that did not finish in time) are killed now.
            with self._watchdog_lock:
                self._watchdog.stdin.close()
            self._watchdog.wait()
        try:
            self.api("DELETE", f"/api/v1/nodes/{self.node}")
        except (ApiError, OSError):
            pass
        shutil.rmtree(self.workdir, ignore_errors=True)
        if self._created_parent_dir:
            try:
                self.parent_dir.rmdir()
            except OSError:
                pass  # something else was put there meanwhile: not the runner's to delete

    def root_writes(self, namespace: str, pod: str, container: str) -> list[str] | None:
        """Image mode: what the finished container wrote to its own filesystem outside its
        mounts (None if it has not finished here)."""
        return self.recorded_root_writes.get((namespace, pod, container))

    def log(self, namespace: str, pod: str, container: str) -> str:
        path = self.workdir / namespace / pod / "logs" / f"{container}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def _node_status(self) -> dict:
        now = _now()
        capacity = {"cpu": str(os.cpu_count() or 1), "memory": "64Gi", "pods": "110"}
        return {
            "capacity": capacity, "allocatable": capacity,
            "addresses": [{"type": "InternalIP", "address": LOCALHOST}, {"type": "Hostname", "address": self.node}],
            "conditions": [{"type": "Ready", "status": "True", "reason": "PodRunnerReady",
                            "message": "hack/cluster/pod_runner.py runs this node's pods",
                            "lastHeartbeatTime": now, "lastTransitionTime": now}],
        }

    def request_token(self, pod: dict, source: dict) -> str:
        """A TokenRequest for the pod's ServiceAccount, bound to the pod (what the kubelet does)."""
        meta = pod["metadata"]
        account = pod["spec"].get("serviceAccountName") or "default"
        spec = {"expirationSeconds": source.get("expirationSeconds", DEFAULT_TOKEN_SECONDS),
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod", "name": meta["name"], "uid": meta["uid"]}}
        if source.get("audience"):
            spec["audiences"] = [source["audience"]]
        response = self.api("POST", f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{account}/token",
                            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest", "spec": spec})
        return response["status"]["token"]

    def patch_pod_status(self, namespace: str, name: str, status: dict) -> None:
        """A strategic merge, as the kubelet's: conditions merge by type, so one set by others
        (DisruptionTarget, from an eviction or preemption) is kept, and a Job's podFailurePolicy
        sees it; a JSON merge patch would replace the whole list."""
        try:
            self.api("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", {"status": status},
                     content_type="application/strategic-merge-patch+json")
        except (ApiError, OSError) as error:
            if not (isinstance(error, ApiError) and error.status == 404):  # deleted meanwhile
                self.errors.append(str(error))

    def _loop(self) -> None:
        last_heartbeat = time.monotonic()
        selector = urllib.parse.quote(f"spec.nodeName={self.node}")
        while not self._stop.wait(POLL_S):
            try:
                if time.monotonic() - last_heartbeat >= HEARTBEAT_S:
                    self.api("PATCH", f"/api/v1/nodes/{self.node}/status", {"status": self._node_status()},
                             content_type="application/merge-patch+json")
                    last_heartbeat = time.monotonic()
                pods = self.api("GET", f"/api/v1/pods?fieldSelector={selector}")["items"]
            except (ApiError, OSError) as error:
                self.errors.append(str(error))
                continue
            for pod in pods:
                self._sync(pod)

    def _sync(self, pod: dict) -> None:
        meta = pod["metadata"]
        known = self._pods.get(meta["uid"])
        if meta.get("deletionTimestamp"):
            if known:
                known.pod = pod
                known.stopping.set()
                if known.thread.is_alive():
                    return
            # Containers stopped (or never started): the kubelet's final delete.
            try:
                self.api("DELETE", f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}",
                         {"apiVersion": "v1", "kind": "DeleteOptions", "gracePeriodSeconds": 0,
                          "preconditions": {"uid": meta["uid"]}})
            except ApiError as error:
                if error.status not in (404, 409):
                    self.errors.append(str(error))
            return
        if known or pod.get("status", {}).get("phase") in ("Succeeded", "Failed"):
            return
        self._pods[meta["uid"]] = runner_pod = _Pod(self, pod)
        runner_pod.thread.start()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--node", default="runner-0", help="name of the Node to register (default runner-0)")
    parser.add_argument("--namespace", action="append", default=[],
                        help="annotate this namespace so its pods run here (repeatable)")
    parser.add_argument("--dir", type=Path, default=local_cluster.DEFAULT_DIR,
                        help="the cluster's state directory (default .cluster/)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="pods run under WORKDIR/NODE, removed on exit (default DIR/pods)")
    parser.add_argument("--images", action="store_true", default=None,
                        help=f"run each container in its image from local containers storage ({IMAGES_ENV}=1)")
    args = parser.parse_args(argv)
    cluster = local_cluster.Cluster(args.dir)
    runner = PodRunner(cluster, args.node, args.workdir or cluster.dir / "pods", images=args.images)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        runner.start()
        for namespace in args.namespace:
            runner.api("PATCH", f"/api/v1/namespaces/{namespace}",
                       {"metadata": {"annotations": runner.namespace_annotations()}},
                       content_type="application/merge-patch+json")
    except (ApiError, OSError, local_cluster.ClusterError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"pod runner: node {args.node} runs its pods under {runner.workdir}; Ctrl-C stops it")
    stop.wait()
    runner.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
