"""``python -m rmjob_operator``: run the RewardModelJob operator (kopf) with JSON logs.

Credentials: the in-cluster service account, else KUBECONFIG / ~/.kube/config (see
``handlers.login``). Standalone by default; ``--peering NAME`` joins a kopf peering group
so that only one of several replicas handles the jobs.

Outside a cluster, a kubeconfig that cannot be used or an API server that does not answer
within ``--startup-timeout`` ends the process with one ``error:`` line (kopf itself would
retry forever, a traceback a minute). In a pod, where the API server is the cluster's own and
a blip at start is transient, kopf's retrying is kept.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
import time
from pathlib import Path

import aiohttp
import kopf
import yaml

from rmjob_operator import GROUP, VERSION

EXIT_STARTUP_ERROR = 1
RETRY_INTERVAL = 1.0  # seconds between attempts to reach the API server at start


class StartupError(Exception):
    """The operator cannot start where it was started; the message says why and what to do."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rmjob-operator", description="Run the RewardModelJob operator (kopf).")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", dest="namespaces", action="append", default=[], metavar="NS",
                       help="Namespace to watch (repeatable; globs like 'team-*' allowed). Default: all.")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="Watch every namespace (the default when no --namespace is given).")
    parser.add_argument("--liveness", metavar="URL",
                        help="Serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz.")
    parser.add_argument("--metrics-address", metavar="HOST:PORT",
                        help="Serve Prometheus metrics at http://HOST:PORT/metrics, e.g. 0.0.0.0:9090 "
                             "(default: not served).")
    parser.add_argument("--peering", metavar="NAME",
                        help="Coordinate with other replicas via this kopf peering object (default: standalone).")
    parser.add_argument("--log-format", choices=["json", "plain", "full"], default="json",
                        help="Log line format (default: json, one object per line).")
    parser.add_argument("--startup-timeout", type=float, default=30.0, metavar="SECONDS",
                        help="Outside a cluster: how long to wait for the API server at start before "
                             "giving up (default: 30). In a pod the operator keeps retrying.")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    return parser.parse_args(argv)


# --- start-up checks -------------------------------------------------------------------


def _kubeconfig_paths() -> str:
    return os.environ.get("KUBECONFIG") or "~/.kube/config"


def kubeconfig_connection(settings: kopf.OperatorSettings) -> kopf.ConnectionInfo:
    """What kopf's kubeconfig login will use, read the same way, or a StartupError naming the file."""
    where = _kubeconfig_paths()
    try:
        info = kopf.login_with_kubeconfig(settings=settings)
    except OSError as exc:
        raise StartupError(f"cannot read the kubeconfig {exc.filename}: {exc.strerror}; point KUBECONFIG "
                           "at a readable kubeconfig file") from None
    except yaml.YAMLError:
        raise StartupError(f"the kubeconfig {where} is not valid YAML; check the file KUBECONFIG points at") from None
    except kopf.LoginError:
        raise StartupError(f"the kubeconfig {where} sets no current-context; run `kubectl config use-context "
                           "NAME`") from None
    except KeyError as exc:
        raise StartupError(f"the kubeconfig {where} refers to {exc.args[0]!r} in its current context but does "
                           "not define it; fix the context or choose another with `kubectl config "
                           "use-context NAME`") from None
    except (AttributeError, TypeError, ValueError) as exc:
        raise StartupError(f"the kubeconfig {where} is not a usable kubeconfig ({exc}); check the file "
                           "KUBECONFIG points at") from None
    if info is None:
        raise StartupError("no Kubernetes credentials: KUBECONFIG is not set, ~/.kube/config does not exist and "
                           "this is not a pod with a service account; set KUBECONFIG")
    if not info.server:
        raise StartupError(f"the kubeconfig {where}: the current context's cluster has no server; fix the "
                           "cluster entry")
    if not (info.token or info.username or info.certificate_path or info.certificate_data):
        _refuse_credential_plugins(where)
    return info


def _refuse_credential_plugins(where: str) -> None:
    """kopf reads tokens, client certificates and passwords from a kubeconfig, never an ``exec``
    plugin (EKS, GKE, AKS, kubelogin) or an ``auth-provider`` without a cached token: the
    operator would send no credentials at all and loop on 401s. Its kubernetes-client
    piggybacking would run them, but that client is not in the operator's image."""
    paths = [os.path.expanduser(p.strip()) for p in _kubeconfig_paths().split(os.pathsep) if p.strip()]
    configs = [yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {} for path in paths]  # kopf read them
    current = next(c["current-context"] for c in configs if c.get("current-context"))
    context = next(i["context"] for c in configs for i in c.get("contexts", []) if i["name"] == current)
    user = next((i.get("user") or {} for c in configs for i in c.get("users", []) if i["name"] == context["user"]), {})
    if "exec" in user:
        plugin = f"exec plugin `{user['exec'].get('command', '?')}`"
    elif "auth-provider" in user:
        plugin = f"auth-provider {user['auth-provider'].get('name', '?')!r}"
    else:
        return
    raise StartupError(f"the kubeconfig {where}: user {context['user']!r} gets its credentials from an {plugin}, "
                       "which the operator cannot run; use a kubeconfig with a token (e.g. from `kubectl create "
                       "token SERVICE_ACCOUNT`) or a client certificate, or run the operator in the cluster")


async def wait_for_api_server(info: kopf.ConnectionInfo, timeout: float) -> None:
    """Until the API server answers, at most ``timeout`` seconds; a credentials rejection is final.

    Asks for the RewardModelJob API group, which needs credentials (``/version`` is public, so
    it would pass a kubeconfig whose credentials kopf cannot use): 401 is no or bad credentials,
    403 the anonymous user a server without anonymous access to discovery sees."""
    try:
        ssl_context = info.as_ssl_context()
    except (OSError, ValueError) as exc:
        raise StartupError(f"the kubeconfig {_kubeconfig_paths()} has unusable TLS settings ({exc}); check its "
                           "certificate-authority and client certificate entries") from None
    deadline = time.monotonic() + timeout
    url = f"{info.server.rstrip('/')}/apis/{GROUP}/{VERSION}"
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context),
                                     headers=info.as_http_headers(), trust_env=info.trust_env) as session:
        while True:
            try:
                request_timeout = aiohttp.ClientTimeout(total=max(deadline - time.monotonic(), 0.1))
                async with session.get(url, proxy=info.proxy_url, timeout=request_timeout) as response:
                    if response.status in (401, 403):
                        raise StartupError(f"the API server {info.server} rejected the kubeconfig's credentials "
                                           f"({response.status} {response.reason}); log in again or fix the user "
                                           f"in {_kubeconfig_paths()}")
                    return
            except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
                reason = str(exc) or type(exc).__name__
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise StartupError(f"cannot reach the Kubernetes API server {info.server} ({reason}) within "
                                   f"{timeout:g} s; check that the cluster is running and that the kubeconfig's "
                                   "current context points at it")
            await asyncio.sleep(min(RETRY_INTERVAL, remaining))


def check_cluster_access(timeout: float) -> None:
    """Outside a cluster: a usable kubeconfig and an API server that answers. In a pod (no
    KUBECONFIG, a service account, as ``handlers.login`` decides): nothing, kopf retries."""
    settings = kopf.OperatorSettings()
    if not os.environ.get("KUBECONFIG") and kopf.login_with_service_account(settings=settings):
        return
    asyncio.run(wait_for_api_server(kubeconfig_connection(settings), timeout))


def serve_metrics(address: str) -> None:
    from rmjob_operator import metrics

    try:
        metrics.serve(address)
    except metrics.MetricsAddressError as exc:
        raise StartupError(str(exc)) from None
    except OSError as exc:
        raise StartupError(f"cannot serve metrics on {address}: {exc.strerror or exc}; choose another "
                           "--metrics-address") from None


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    try:
        if args.metrics_address:
            serve_metrics(args.metrics_address)
        check_cluster_access(args.startup_timeout)
    except StartupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(EXIT_STARTUP_ERROR)
    kopf.configure(verbose=args.verbose, log_format=kopf.LogFormat[args.log_format.upper()])
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)

    from rmjob_operator import handlers  # noqa: F401  # registers the handlers

    kopf.run(
        standalone=args.peering is None,
        peering_name=args.peering,
        clusterwide=not args.namespaces,
        namespaces=args.namespaces,
        liveness_endpoint=args.liveness,
    )


if __name__ == "__main__":
    main()
