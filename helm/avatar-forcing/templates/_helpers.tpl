{{/* Names --------------------------------------------------------------------------------- */}}

{{- define "avatar-forcing.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "avatar-forcing.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels: common to every object; selector labels per component (call with
     (dict "ctx" $ "component" "ray")). */}}

{{- define "avatar-forcing.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "avatar-forcing.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: avatar-forcing
{{- end -}}

{{- define "avatar-forcing.selectorLabels" -}}
app.kubernetes.io/name: {{ include "avatar-forcing.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "avatar-forcing.componentLabels" -}}
{{ include "avatar-forcing.labels" .ctx }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{/* Images ---------------------------------------------------------------------------------- */}}

{{- define "avatar-forcing.image" -}}
{{- printf "%s:%s" .Values.image.repository (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) -}}
{{- end -}}

{{- define "avatar-forcing.gpuImage" -}}
{{- printf "%s:%s" .Values.gpuImage.repository (default (printf "%s-gpu" .Chart.AppVersion) .Values.gpuImage.tag) -}}
{{- end -}}

{{/* The gateway's image: gateway.image.* where set, else the CPU image's. */}}
{{- define "avatar-forcing.gatewayImage" -}}
{{- $repository := default .Values.image.repository .Values.gateway.image.repository -}}
{{- $tag := default (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) .Values.gateway.image.tag -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/* Endpoints -------------------------------------------------------------------------------- */}}

{{/* The bridge's image: bridge.image.* where set, else the CPU image's. */}}
{{- define "avatar-forcing.bridgeImage" -}}
{{- $repository := default .Values.image.repository .Values.bridge.image.repository -}}
{{- $tag := default (default (printf "%s-cpu" .Chart.AppVersion) .Values.image.tag) .Values.bridge.image.tag -}}
{{- printf "%s:%s" $repository $tag -}}
{{- end -}}

{{/* REDIS_URL for the ConfigMap; empty when it comes from a Secret (redisEnv). */}}
{{- define "avatar-forcing.redisUrl" -}}
{{- if .Values.redis.inCluster.enabled -}}
{{- printf "redis://%s-redis:6379/0" (include "avatar-forcing.fullname" .) -}}
{{- else if not .Values.redis.external.existingSecret.name -}}
{{- .Values.redis.external.url -}}
{{- end -}}
{{- end -}}

{{/* Container env entries for REDIS_URL from an existing Secret (external Redis with credentials). */}}
{{- define "avatar-forcing.redisEnv" -}}
{{- if and (not .Values.redis.inCluster.enabled) .Values.redis.external.existingSecret.name }}
- name: REDIS_URL
  valueFrom:
    secretKeyRef:
      name: {{ .Values.redis.external.existingSecret.name }}
      key: {{ .Values.redis.external.existingSecret.key }}
{{- end }}
{{- end -}}

{{/* Container env entry for AVATAR_FORCING_AUTH_SECRET, from the auth Secret (never the ConfigMap):
     every pod that verifies or signs session tokens (Ray pods, the gateway) lists it. */}}
{{- define "avatar-forcing.authSecretEnv" -}}
- name: AVATAR_FORCING_AUTH_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ .Values.auth.existingSecret.name }}
      key: {{ .Values.auth.existingSecret.key }}
{{- end -}}

{{- define "avatar-forcing.otelEndpoint" -}}
{{- if .Values.otel.enabled -}}
{{- if .Values.otel.endpoint -}}
{{- .Values.otel.endpoint -}}
{{- else if .Values.otel.collector.enabled -}}
{{- printf "http://%s-otel-collector:4317" (include "avatar-forcing.fullname" .) -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Ray Serve config (serveConfigV2): the same document as deploy/serve/config.yaml, from values. */}}
{{- define "avatar-forcing.serveConfig" -}}
proxy_location: {{ .Values.serve.proxyLocation }}
http_options:
  host: 0.0.0.0
  port: {{ .Values.serve.httpPort }}
  keep_alive_timeout_s: 5
grpc_options:
  port: {{ .Values.serve.grpcPort }}
  grpc_servicer_functions:
    {{- toYaml .Values.serve.grpcServicerFunctions | nindent 4 }}
logging_config:
  encoding: {{ .Values.serve.logEncoding }}
  log_level: {{ .Values.logLevel }}
  enable_access_log: false
applications:
  - name: {{ .Values.serve.appName }}
    route_prefix: /
    import_path: {{ .Values.serve.importPath }}
    deployments:
      {{- range $name := list "session_ingress" "audio_features" "motion_encoder" "generator" "decoder" }}
      - name: {{ $name }}
        {{- toYaml (index $.Values.serve.deployments $name) | nindent 8 }}
      {{- end }}
{{- end -}}

{{/* The weights volume (read-only), from a PVC, a hostPath or a Secret. */}}
{{- define "avatar-forcing.weightsVolume" -}}
- name: weights
{{- if eq .Values.weights.source "pvc" }}
  persistentVolumeClaim:
    claimName: {{ .Values.weights.pvc.claimName }}
    readOnly: true
{{- else if eq .Values.weights.source "hostPath" }}
  hostPath:
    path: {{ .Values.weights.hostPath.path }}
    type: Directory
{{- else }}
  secret:
    secretName: {{ .Values.weights.secret.secretName }}
{{- end }}
{{- end -}}
