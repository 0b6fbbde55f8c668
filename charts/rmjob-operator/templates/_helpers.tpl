{{/* Names and labels. */}}
{{- define "rmjob-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "rmjob-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else if contains (include "rmjob-operator.name" .) .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name (include "rmjob-operator.name" .) | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}

{{- define "rmjob-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "rmjob-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "rmjob-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "rmjob-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: rmjob
{{- end }}

{{- define "rmjob-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "rmjob-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "rmjob-operator.subjects" -}}
- kind: ServiceAccount
  name: {{ include "rmjob-operator.serviceAccountName" . }}
  namespace: {{ .Release.Namespace }}
{{- end }}

{{- define "rmjob-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "rmjob-operator.trainerImage" -}}
{{- printf "%s:%s" .Values.trainerImage.repository (default .Chart.AppVersion .Values.trainerImage.tag) }}
{{- end }}

{{/* "true" when the operator's permissions are namespaced (Roles), "" for a ClusterRole:
with rbac.scope=namespace, and whenever watchNamespaces names the namespaces (an operator
confined to them needs no rights elsewhere). */}}
{{- define "rmjob-operator.namespaced" -}}
{{- if or (eq .Values.rbac.scope "namespace") .Values.watchNamespaces }}true{{ end }}
{{- end }}

{{/* "true" when the operator watches every namespace (kopf --all-namespaces). */}}
{{- define "rmjob-operator.clusterwide" -}}
{{- if eq (include "rmjob-operator.watchNamespaces" .) "[]" }}true{{ end }}
{{- end }}

{{/* The namespaces the operator watches, as a JSON list; [] means all of them. */}}
{{- define "rmjob-operator.watchNamespaces" -}}
{{- if .Values.watchNamespaces }}
{{- .Values.watchNamespaces | uniq | toJson }}
{{- else if include "rmjob-operator.namespaced" . }}
{{- list .Release.Namespace | toJson }}
{{- else }}
{{- list | toJson }}
{{- end }}
{{- end }}

{{/*
Namespaced permissions: exactly the API calls the operator makes (rmjob_operator/handlers.py,
kube.py) plus kopf's own; tests/deploy/test_rbac.py records the calls of a real run and
compares. manifests/rbac.yaml carries the same rules.
*/}}
{{- define "rmjob-operator.namespacedRules" -}}
# kopf lists and watches the jobs; handlers read one back before patching its status.
- apiGroups: [rmjob.dev]
  resources: [rewardmodeljobs]
  verbs: [get, list, watch]
# The operator writes only status (kopf's bookkeeping included). Holding this verb is also
# what lets it create the per-job trainer Role granting it (Kubernetes' escalation rule).
- apiGroups: [rmjob.dev]
  resources: [rewardmodeljobs/status]
  verbs: [patch]
# Children carry ownerReferences with blockOwnerDeletion, which the
# OwnerReferencesPermissionEnforcement admission plugin allows only with this verb.
- apiGroups: [rmjob.dev]
  resources: [rewardmodeljobs/finalizers]
  verbs: [update]
# Children are created once and read back on a conflict; the garbage collector deletes them
# (a spec.storage claim with retainOnDelete excepted). An existingClaim is read for its
# access modes.
- apiGroups: [""]
  resources: [configmaps, persistentvolumeclaims, services, serviceaccounts]
  verbs: [get, create]
- apiGroups: [rbac.authorization.k8s.io]
  resources: [roles, rolebindings]
  verbs: [get, create]
# The workload is watched for its status and patched for in-flight runPolicy changes.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch]
- apiGroups: [kubeflow.org]
  resources: [pytorchjobs]
  verbs: [get, list, watch, create, patch]
# kopf.event() and the phase-change events; Warning events are watched for a workload
# whose controller cannot create pods (FailedCreate).
- apiGroups: [""]
  resources: [events]
  verbs: [create, list, watch]
{{- if and .Values.peering.enabled (not (include "rmjob-operator.clusterwide" .)) }}
- apiGroups: [kopf.dev]
  resources: [kopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}

{{/* Cluster-scoped: kopf watches CRDs to notice resources appearing (e.g. Kubeflow's). */}}
{{- define "rmjob-operator.clusterRules" -}}
- apiGroups: [apiextensions.k8s.io]
  resources: [customresourcedefinitions]
  verbs: [list, watch]
{{- if not (include "rmjob-operator.clusterwide" .) }}
# kopf confined to namespaces lists and watches them to follow the watched ones; refused, it
# retries for about a minute at every start before it handles any job.
- apiGroups: [""]
  resources: [namespaces]
  verbs: [list, watch]
{{- end }}
{{- if and .Values.peering.enabled (include "rmjob-operator.clusterwide" .) }}
- apiGroups: [kopf.dev]
  resources: [clusterkopfpeerings]
  verbs: [get, list, watch, patch]
{{- end }}
{{- end }}
