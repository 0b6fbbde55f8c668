"""Rank 0 -> ``RewardModelJob`` ``status.training``: live progress for the operator and ``kubectl``.

Active only inside a job the operator launched (it sets ``RMJOB_JOB_NAME`` and
``RMJOB_NAMESPACE``). Uses the official ``kubernetes`` client with the pod's in-cluster
configuration: the service-account token file is read again after it rotates (the kubelet
replaces projected tokens well before they expire), and each patch retries 429/5xx answers,
refused connections and timeouts with exponential backoff. Reporting is best effort: a failing
API server must never stop or slow training, so errors are logged once and swallowed, every
request is bounded, and the training loop hands its reports to a :class:`ReportSender`
thread instead of waiting for the API server.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kubernetes.client import Configuration

logger = logging.getLogger(__name__)

SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
GROUP, VERSION, PLURAL = "rmjob.dev", "v1alpha1", "rewardmodeljobs"
FIELD_MANAGER = "rmjob-trainer"  # who wrote status.training, in the object's managedFields
MERGE_PATCH = "application/merge-patch+json"
CONNECT_TIMEOUT_S, READ_TIMEOUT_S = 3.0, 5.0
# urllib3 sleeps 0, 1, 2 s between the 4 attempts: a refused connection gives up after ~3 s, an
# API server that accepts but never answers after ~23 s; either way on the sender's thread.
RETRIES, BACKOFF_FACTOR_S = 3, 0.5
RETRY_STATUSES = (429, 500, 502, 503, 504)


def _retry_policy():
    from urllib3.util.retry import Retry

    # A merge patch of status.training is idempotent: PATCH may be sent again (urllib3 retries
    # only idempotent methods by default), including after a read timeout.
    return Retry(total=RETRIES, backoff_factor=BACKOFF_FACTOR_S, status_forcelist=RETRY_STATUSES,
                 allowed_methods=None, raise_on_status=False)


def _in_cluster_configuration(account_dir: str) -> Configuration:
    """The pod's API server, CA and token, with the client's own token refresh (the file is read
    again when the token it holds is a minute old)."""
    from kubernetes.client import Configuration
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = Configuration()
    # The loader's default environment is the os.environ of its import, which a later
    # replacement of os.environ (datasets' map with num_proc does one) leaves behind.
    InClusterConfigLoader(token_filename=os.path.join(account_dir, "token"),
                          cert_filename=os.path.join(account_dir, "ca.crt"),
                          environ=os.environ).load_and_set(configuration)
    refresh = configuration.refresh_api_key_hook

    def refresh_without_line_end(config: Configuration) -> None:
        # The loader sends the file's text as is; a token file that ends in a newline (written
        # by hand or by a tool) would make an invalid Authorization header.
        refresh(config)
        config.api_key["BearerToken"] = config.api_key["BearerToken"].strip()
        # Each call of the loader's hook installs that hook again, in place of this one.
        config.refresh_api_key_hook = refresh_without_line_end

    configuration.refresh_api_key_hook = refresh_without_line_end
    return configuration


class StatusReporter:
    """Merge-patches ``status.training`` of one RewardModelJob through the kubernetes client."""

    def __init__(self, configuration: Configuration, namespace: str, name: str, *, min_interval: float = 10.0,
                 timeout: float | tuple[float, float] = (CONNECT_TIMEOUT_S, READ_TIMEOUT_S)) -> None:
        """``timeout``: per attempt, in seconds, total or (connect, read)."""
        from kubernetes.client import ApiClient, CustomObjectsApi

        configuration.retries = _retry_policy()
        self.api = CustomObjectsApi(ApiClient(configuration))
        self.host = configuration.host
        self.namespace, self.name = namespace, name
        self.min_interval = min_interval
        self.timeout = timeout
        self._last_sent = float("-inf")
        self._warned = False

    @classmethod
    def from_env(cls, min_interval: float | None = None) -> StatusReporter | None:
        """A reporter for the job named by the environment, or None outside an operator-launched job.

        ``RMJOB_KUBE_API`` overrides the API URL (tests, ``kubectl proxy``; no credentials);
        otherwise the in-cluster service host, token and CA are used, from
        ``RMJOB_SERVICE_ACCOUNT_DIR`` when set (a pod run outside a container,
        hack/cluster/pod_runner.py), else the standard directory. ``RMJOB_STATUS_INTERVAL`` sets
        the minimum seconds between reports (default 10).
        """
        name, namespace = os.environ.get("RMJOB_JOB_NAME"), os.environ.get("RMJOB_NAMESPACE")
        if not name or not namespace:
            return None  # before importing kubernetes: a run outside Kubernetes may not have it
        from kubernetes.client import Configuration
        from kubernetes.config import ConfigException

        if min_interval is None:
            min_interval = float(os.environ.get("RMJOB_STATUS_INTERVAL", "10"))
        api = os.environ.get("RMJOB_KUBE_API")
        if api:
            return cls(Configuration(host=api.rstrip("/")), namespace, name, min_interval=min_interval)
        try:
            account_dir = os.environ.get("RMJOB_SERVICE_ACCOUNT_DIR") or SERVICE_ACCOUNT_DIR
            configuration = _in_cluster_configuration(account_dir)
        except ConfigException as e:
            logger.warning("RMJOB_JOB_NAME is set but no Kubernetes API is reachable (%s); status reports are off", e)
            return None
        return cls(configuration, namespace, name, min_interval=min_interval)

    def report(self, training: dict, force: bool = False) -> bool:
        """Merge-patch ``status.training``; throttled to one call per ``min_interval`` unless ``force``.

        Blocks for the request and its retries (bounded). Returns whether the patch was sent and
        accepted. Never raises.
        """
        now = time.monotonic()
        if not force and now - self._last_sent < self.min_interval:
            return False
        self._last_sent = now
        update_time = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {"status": {"training": {**training, "updateTime": update_time}}}
        try:
            self.api.patch_namespaced_custom_object_status(
                GROUP, VERSION, self.namespace, PLURAL, self.name, body, field_manager=FIELD_MANAGER,
                _content_type=MERGE_PATCH, _request_timeout=self.timeout)
            return True
        except Exception as e:  # noqa: BLE001 - best effort: training must go on whatever the API says
            if not self._warned:
                # An ApiException's text goes on with the response's headers and body.
                reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
                logger.warning("could not report status of %s/%s to %s: %s (further failures are silent)",
                               self.namespace, self.name, self.host, reason)
                self._warned = True
            return False


class ReportSender:
    """Sends a reporter's reports from a thread of its own, so that the training loop never waits
    for the API server. Only the newest report waits to be sent (each one is a full snapshot); a
    forced one stays forced when a newer report replaces it."""

    def __init__(self, reporter: StatusReporter) -> None:
        self.reporter = reporter
        self._pending: tuple[dict, bool] | None = None
        self._busy = False
        self._closed = False
        self._changed = threading.Condition()
        threading.Thread(target=self._send_until_closed, name="rmjob-status", daemon=True).start()

    def report(self, training: dict, force: bool = False) -> None:
        """Queue ``training`` (replacing a report not yet sent) and return at once."""
        with self._changed:
            if self._pending is not None:
                force = force or self._pending[1]
            self._pending = (training, force)
            self._changed.notify_all()

    def close(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for the queued report to be sent; whether it was. The
        thread ends once it has nothing left to send; it is a daemon: a report still in flight
        afterwards does not keep the process alive."""
        deadline = time.monotonic() + timeout
        with self._changed:
            self._closed = True
            self._changed.notify_all()
            while self._pending is not None or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._changed.wait(left)
        return True

    def _send_until_closed(self) -> None:
        while True:
            with self._changed:
                while self._pending is None:
                    if self._closed:
                        return
                    self._changed.wait()
                (training, force), self._pending, self._busy = self._pending, None, True
            try:
                self.reporter.report(training, force)
            finally:
                with self._changed:
                    self._busy = False
                    self._changed.notify_all()
