"""``python -m rmjob_operator``: run the RewardModelJob operator (kopf) with JSON logs.

Credentials: the in-cluster service account, else KUBECONFIG / ~/.kube/config (see
``handlers.login``). Standalone by default; ``--peering NAME`` joins a kopf peering group
so that only one of several replicas handles the jobs.
"""

from __future__ import annotations

import argparse
import logging

import kopf


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="rmjob-operator", description="Run the RewardModelJob operator (kopf).")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", dest="namespaces", action="append", default=[], metavar="NS",
                       help="Namespace to watch (repeatable; globs like 'team-*' allowed). Default: all.")
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="Watch every namespace (the default when no --namespace is given).")
    parser.add_argument("--liveness", metavar="URL",
                        help="Serve a liveness endpoint, e.g. http://0.0.0.0:8080/healthz.")
    parser.add_argument("--peering", metavar="NAME",
                        help="Coordinate with other replicas via this kopf peering object (default: standalone).")
    parser.add_argument("--log-format", choices=["json", "plain", "full"], default="json",
                        help="Log line format (default: json, one object per line).")
    parser.add_argument("-v", "--verbose", action="store_true", help="Debug logging.")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
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
