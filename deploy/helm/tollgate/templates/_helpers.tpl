{{/* Names and labels shared by every template. */}}

{{/* The objects' name: the release name, with "-tollgate" unless it already says so. */}}
{{- define "tollgate.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Labels that select this release's pods; they must never change after install. */}}
{{- define "tollgate.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tollgate.labels" -}}
{{ include "tollgate.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
The whole Tollgate config: .Values.config with listen, metrics and store set
from their own values. It fails the render on combinations that cannot work.
*/}}
{{- define "tollgate.config" -}}
{{- $config := deepCopy .Values.config -}}
{{- $_ := set $config "listen" (printf "0.0.0.0:%d" (int .Values.grpcPort)) -}}
{{- if .Values.metrics.enabled -}}
{{- $_ := set $config "metrics" (dict "listen" (printf "0.0.0.0:%d" (int .Values.metrics.port))) -}}
{{- else -}}
{{- $_ := unset $config "metrics" -}}
{{- end -}}
{{- $store := dict "kind" .Values.store.kind -}}
{{- if eq .Values.store.kind "memory" -}}
{{- with .Values.store.memory }}{{ $_ := set $store "memory" . }}{{ end -}}
{{- else if eq .Values.store.kind "redis" -}}
{{- if not .Values.store.redis.urls -}}
{{- fail "store.kind is redis: set store.redis.urls" -}}
{{- end -}}
{{- $_ := set $store "redis" .Values.store.redis -}}
{{- else -}}
{{- fail (printf "store.kind must be memory or redis, not %q" .Values.store.kind) -}}
{{- end -}}
{{- $_ := set $config "store" $store -}}
{{- toYaml $config -}}
{{- end -}}

{{/* drain_delay, when written in whole seconds, must fit in the grace period. */}}
{{- define "tollgate.checkGracePeriod" -}}
{{- $delay := toString (default "" .Values.config.drain_delay) -}}
{{- if regexMatch "^[0-9]+s$" $delay -}}
{{- if le (int .Values.terminationGracePeriodSeconds) (int (trimSuffix "s" $delay)) -}}
{{- fail (printf "terminationGracePeriodSeconds (%v) must exceed config.drain_delay (%s)" .Values.terminationGracePeriodSeconds $delay) -}}
{{- end -}}
{{- end -}}
{{- end -}}
