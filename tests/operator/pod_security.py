"""The Pod Security Standards' ``restricted`` profile, as the PodSecurity admission plugin
(k8s.io/pod-security-admission, policy/check_*.go, latest version) checks a pod template: the
API server refuses a Job's pods in a namespace labelled
``pod-security.kubernetes.io/enforce: restricted`` for any of these."""

from __future__ import annotations

from typing import Any

RESTRICTED_VOLUME_TYPES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim",
                           "projected", "secret"}
BASELINE_CAPABILITIES = {"AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
                         "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT"}


def restricted_violations(pod: dict[str, Any]) -> list[str]:
    """Why the restricted profile refuses the pod spec ``pod`` (empty: admitted)."""
    problems = []
    pod_context = pod.get("securityContext") or {}
    containers = [*pod.get("initContainers", []), *pod.get("containers", [])]
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            problems.append(f"{key}")
    for volume in pod.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUME_TYPES:
            problems.append(f"volume {volume['name']}: {', '.join(sorted(kinds - RESTRICTED_VOLUME_TYPES))}")
    if pod_context.get("runAsUser") == 0:
        problems.append("pod runAsUser 0")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    for container in containers:
        name = container["name"]
        context = container.get("securityContext") or {}
        if context.get("privileged"):
            problems.append(f"{name}: privileged")
        if context.get("allowPrivilegeEscalation") is not False:
            problems.append(f"{name}: allowPrivilegeEscalation != false")
        capabilities = context.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            problems.append(f"{name}: capabilities.drop does not include ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            problems.append(f"{name}: capabilities.add beyond NET_BIND_SERVICE")
        if not context.get("runAsNonRoot", pod_context.get("runAsNonRoot")):
            problems.append(f"{name}: runAsNonRoot != true")
        if context.get("runAsUser") == 0:
            problems.append(f"{name}: runAsUser 0")
        if (context.get("seccompProfile") or {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
            problems.append(f"{name}: seccompProfile not RuntimeDefault or Localhost")
        if any(port.get("hostPort") for port in container.get("ports", [])):
            problems.append(f"{name}: hostPort")
    return problems
