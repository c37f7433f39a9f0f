{{/* Chart name, overridable. */}}
{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Resource name prefix: the release name, plus the chart name unless the release name already
contains it (release "kubetune" gives "kubetune-controller", not "kubetune-kubetune-controller").
Truncated so that the longest suffix ("-leader-election") still fits in 63 characters.
*/}}
{{- define "kubetune.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 47 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 47 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels on every object. */}}
{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
{{- end }}

{{/*
Selects the controller pods. The component label matters: trainer pods share
app.kubernetes.io/name=kubetune but carry component=trainer.
*/}}
{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (printf "%s-controller" (include "kubetune.fullname" .)) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kubetune.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "kubetune.reportKeySecret" -}}
{{- default (printf "%s-report-key" (include "kubetune.fullname" .)) .Values.report.keySecret }}
{{- end }}

{{- define "kubetune.leaseName" -}}
{{- default (printf "%s-controller" (include "kubetune.fullname" .)) .Values.leaderElection.leaseName }}
{{- end }}

{{- define "kubetune.studyClaimName" -}}
{{- default (printf "%s-study" (include "kubetune.fullname" .)) .Values.studyStorage.persistence.existingClaim }}
{{- end }}

{{/* True (non-empty) when the Optuna study lives in SQLite on the pod's volume. */}}
{{- define "kubetune.sqliteStudy" -}}
{{- if not (or .Values.studyStorage.url .Values.studyStorage.existingSecret) }}true{{ end }}
{{- end }}

{{/*
The namespaces the controller watches, comma-separated; empty with clusterWide (every
namespace). Unless listed in watchNamespaces: the release namespace. Refuses the two at once.
*/}}
{{- define "kubetune.watchNamespaces" -}}
{{- if .Values.clusterWide }}
{{- if .Values.watchNamespaces }}
{{- fail "clusterWide: true watches every namespace: leave watchNamespaces empty, or set clusterWide: false to watch only the listed namespaces" }}
{{- end }}
{{- else }}
{{- join "," (uniq (.Values.watchNamespaces | default (list .Release.Namespace))) }}
{{- end }}
{{- end }}

{{/*
The namespaced rules the controller needs wherever it watches FineTuneJobs. Shared by the
ClusterRole (clusterWide) and the per-namespace Roles so the two can never drift.
*/}}
{{- define "kubetune.namespacedRules" -}}
# FineTuneJobs and FineTuneSweeps: reconcile them; kopf patches finalizers and its progress
# annotations; sweeps create trial FineTuneJobs and delete pruned/extra ones.
- apiGroups: [kubetune.io]
  resources: [finetunejobs, finetunesweeps]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [kubetune.io]
  resources: [finetunejobs/status, finetunesweeps/status]
  verbs: [get, patch, update]
# The Indexed Job that runs a training gang; failed attempts' Jobs kept (bounded), then deleted.
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
# Per-job trainer config (ConfigMap) and rendezvous headless Service.
- apiGroups: [""]
  resources: [configmaps, services]
  verbs: [get, list, watch, create, patch, delete]
# Gang state and the trainer's termination message (final metrics); read-only.
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
# get (by name): a job's credentials Secret exists (never copied anywhere). Nothing here
# creates Secrets: sweep report tokens derive from the controller's own key (report-key Role).
- apiGroups: [""]
  resources: [secrets]
  verbs: [get]
# blockOwnerDeletion on children needs update on the owner's finalizers subresource.
- apiGroups: [kubetune.io]
  resources: [finetunejobs/finalizers, finetunesweeps/finalizers]
  verbs: [update]
# Kubernetes Events on every transition (kopf posts core/v1 events).
- apiGroups: ["", events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end }}
