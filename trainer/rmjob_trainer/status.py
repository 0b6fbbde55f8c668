"""Rank 0 -> ``RewardModelJob`` ``status.training``: live progress for the operator and ``kubectl``.

Active only inside a job the operator launched (it sets ``RMJOB_JOB_NAME`` and
``RMJOB_NAMESPACE``). Uses the pod's service-account token with the stdlib HTTP client,
so the trainer needs no Kubernetes library. Reporting is best effort: a failing API
server must never stop training, so errors are logged once and swallowed.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import ssl
import time
import urllib.request

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP_VERSION = "rmjob.dev/v1alpha1"


class StatusReporter:
    def __init__(self, api: str, namespace: str, name: str, *, token: str | None = None,
                 ssl_context: ssl.SSLContext | None = None, min_interval: float = 10.0,
                 timeout: float = 5.0) -> None:
        self.url = f"{api.rstrip('/')}/apis/{GROUP_VERSION}/namespaces/{namespace}/rewardmodeljobs/{name}/status"
        self.min_interval = min_interval
        self.timeout = timeout
        self._token = token
        self._ssl_context = ssl_context
        self._last_sent = float("-inf")
        self._warned = False

    @classmethod
    def from_env(cls, min_interval: float | None = None) -> StatusReporter | None:
        """A reporter for the job named by the environment, or None outside an operator-launched job.

        ``RMJOB_KUBE_API`` overrides the API URL (tests, ``kubectl proxy``); otherwise the
        in-cluster service host, token and CA are used, from ``RMJOB_SERVICE_ACCOUNT_DIR`` when
        set (a pod run outside a container, hack/cluster/pod_runner.py), else the standard
        directory. ``RMJOB_STATUS_INTERVAL`` sets the minimum seconds between reports (default 10).
        """
        name, namespace = os.environ.get("RMJOB_JOB_NAME"), os.environ.get("RMJOB_NAMESPACE")
        if not name or not namespace:
            return None
        if min_interval is None:
            min_interval = float(os.environ.get("RMJOB_STATUS_INTERVAL", "10"))
        api = os.environ.get("RMJOB_KUBE_API")
        if api:
            return cls(api, namespace, name, min_interval=min_interval)
        host, port = os.environ.get("KUBERNETES_SERVICE_HOST"), os.environ.get("KUBERNETES_SERVICE_PORT", "443")
        account_dir = os.environ.get("RMJOB_SERVICE_ACCOUNT_DIR") or SERVICE_ACCOUNT_DIR
        token_path = os.path.join(account_dir, "token")
        if not host or not os.path.exists(token_path):
            logger.warning("RMJOB_JOB_NAME is set but no Kubernetes API is reachable; status reports are off")
            return None
        if ":" in host:  # IPv6 literal
            host = f"[{host}]"
        with open(token_path, encoding="utf-8") as f:
            token = f.read().strip()
        ssl_context = ssl.create_default_context(cafile=os.path.join(account_dir, "ca.crt"))
        return cls(f"https://{host}:{port}", namespace, name, token=token, ssl_context=ssl_context,
                   min_interval=min_interval)

    def report(self, training: dict, force: bool = False) -> bool:
        """Merge-patch ``status.training``; throttled to one call per ``min_interval`` unless ``force``.

        Returns whether the patch was sent and accepted. Never raises.
        """
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval:
            return False
        self._last_sent = now
        update_time = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = json.dumps({"status": {"training": {**training, "updateTime": update_time}}}).encode()
        request = urllib.request.Request(self.url, data=body, method="PATCH",
                                         headers={"Content-Type": "application/merge-patch+json"})
        if self._token:
            request.add_header("Authorization", f"Bearer {self._token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout, context=self._ssl_context):
                return True
        except Exception as e:  # noqa: BLE001 - best effort: training must go on whatever the API says
            if not self._warned:
                logger.warning("could not report status to %s: %s (further failures are silent)", self.url, e)
                self._warned = True
            return False
