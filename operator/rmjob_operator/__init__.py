"""rmjob's Kubernetes operator: the RewardModelJob CRD and the kopf handlers that run it.

Kept import-light: importing the package (or :mod:`.spec`, :mod:`.crd`, :mod:`.render`)
pulls in neither kopf nor torch, so tests and ``python -m rmjob_operator.crd`` stay fast.
"""

GROUP = "rmjob.dev"
VERSION = "v1alpha1"
KIND = "RewardModelJob"
PLURAL = "rewardmodeljobs"
API_VERSION = f"{GROUP}/{VERSION}"
