{{/*
Names, labels, and the Deployment and Service every tickmesh service shares. Each service's
own templates (<service>-deployment.yaml, <service>-service.yaml) call these with
(dict "root" $ "key" "<values key>" "name" "<service name>").
*/}}

{{- define "tickmesh.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tickmesh.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "tickmesh.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "tickmesh.labels" -}}
helm.sh/chart: {{ include "tickmesh.chart" . }}
app.kubernetes.io/name: {{ include "tickmesh.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels of one service: (dict "root" $ "name" "router"). */}}
{{- define "tickmesh.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tickmesh.name" .root }}
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .name }}
{{- end }}

{{/* The image of one service: its own tag, else the chart-wide tag, else appVersion. */}}
{{- define "tickmesh.image" -}}
{{- $values := .root.Values }}
{{- $own := index $values .key }}
{{- $tag := default (default .root.Chart.AppVersion $values.image.tag) $own.image.tag }}
{{- printf "%s:%s" $values.image.repository $tag }}
{{- end }}

{{/* The settings' environment prefix of a service: executor-pool -> TICKMESH_EXECUTOR_POOL_. */}}
{{- define "tickmesh.envPrefix" -}}
{{- printf "TICKMESH_%s_" (. | replace "-" "_" | upper) }}
{{- end }}

{{/* The tenant user a service logs in to NATS as. */}}
{{- define "tickmesh.natsRole" -}}
{{- if eq . "executor-pool" }}executor{{ else }}service{{ end }}
{{- end }}

{{/* How a probe asks the gRPC health service (values.probes.mode). */}}
{{- define "tickmesh.probeAction" -}}
{{- if eq .probes.mode "grpc" }}
grpc:
  port: {{ .ports.grpc }}
{{- else if eq .probes.mode "exec" }}
exec:
  command: ["/opt/venv/bin/python", "/usr/local/lib/tickmesh/healthcheck.py", "127.0.0.1:{{ .ports.grpc }}"]
{{- else }}
{{- fail "probes.mode must be grpc or exec" }}
{{- end }}
{{- end }}

{{/* PostgreSQL's URL from its Secret (the state service and the migrate Job). */}}
{{- define "tickmesh.storeUrlEnv" -}}
- name: TICKMESH_STATE_STORE_URL
  valueFrom:
    secretKeyRef:
      name: {{ required "postgresql.existingSecret is required: a Secret holding the state store's URL" .Values.postgresql.existingSecret }}
      key: {{ .Values.postgresql.storeUrlKey }}
{{- end }}

{{/*
The Deployment of one service. Everything that differs between services comes from its values
(replicas, resources, env, scheduling) and from which backing services it talks to: state reads
PostgreSQL, state and the executor pool S3, router, guardrail and state Redis.
*/}}
{{- define "tickmesh.deployment" -}}
{{- $root := .root }}
{{- $values := $root.Values }}
{{- $svc := index $values .key }}
{{- $prefix := include "tickmesh.envPrefix" .name }}
{{- $usesRedis := has .name (list "router" "guardrail" "state") }}
{{- $usesS3 := has .name (list "state" "executor-pool") }}
apiVersion: apps/v1
kind: Deployment
metadata:
  name: {{ include "tickmesh.fullname" $root }}-{{ .name }}
  labels:
    {{- include "tickmesh.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
spec:
  replicas: {{ $svc.replicas }}
  revisionHistoryLimit: 5
  strategy:
    type: RollingUpdate
    rollingUpdate:
      maxSurge: 1
      maxUnavailable: 0
  selector:
    matchLabels:
      {{- include "tickmesh.selectorLabels" (dict "root" $root "name" .name) | nindent 6 }}
  template:
    metadata:
      labels:
        {{- include "tickmesh.selectorLabels" (dict "root" $root "name" .name) | nindent 8 }}
      annotations:
        checksum/config: {{ include (print $root.Template.BasePath "/configmap.yaml") $root | sha256sum }}
        {{- with $svc.podAnnotations }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
    spec:
      {{- with $values.serviceAccountName }}
      serviceAccountName: {{ . }}
      {{- end }}
      automountServiceAccountToken: false
      {{- with $values.imagePullSecrets }}
      imagePullSecrets:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      securityContext:
        {{- toYaml $values.podSecurityContext | nindent 8 }}
      terminationGracePeriodSeconds: {{ $values.terminationGracePeriodSeconds }}
      containers:
        - name: {{ .name }}
          image: {{ include "tickmesh.image" . | quote }}
          imagePullPolicy: {{ $values.image.pullPolicy }}
          args: ["serve", {{ .name | quote }}]
          securityContext:
            {{- toYaml $values.securityContext | nindent 12 }}
          ports:
            - name: grpc
              containerPort: {{ $values.ports.grpc }}
              protocol: TCP
            - name: metrics
              containerPort: {{ $values.ports.metrics }}
              protocol: TCP
          env:
            - name: TICKMESH_CONFIG
              value: /etc/tickmesh/tickmesh.yaml
            - name: {{ $prefix }}GRPC_LISTEN
              value: "0.0.0.0:{{ $values.ports.grpc }}"
            - name: {{ $prefix }}METRICS_LISTEN
              value: "0.0.0.0:{{ $values.ports.metrics }}"
            - name: {{ $prefix }}INSTANCE
              valueFrom:
                fieldRef:
                  fieldPath: metadata.name
            {{- if $values.natsAuth.existingSecret }}
            - name: {{ $prefix }}NATS_TENANT_DIR
              value: {{ $values.natsAuth.mountPath | quote }}
            {{- end }}
            {{- if $values.natsTls.existingSecret }}
            - name: {{ $prefix }}NATS_TLS_CA
              value: {{ printf "%s/ca.crt" $values.natsTls.mountPath | quote }}
            - name: {{ $prefix }}NATS_TLS_CERT
              value: {{ printf "%s/tls.crt" $values.natsTls.mountPath | quote }}
            - name: {{ $prefix }}NATS_TLS_KEY
              value: {{ printf "%s/tls.key" $values.natsTls.mountPath | quote }}
            {{- end }}
            {{- if eq .name "state" }}
            {{- include "tickmesh.storeUrlEnv" $root | nindent 12 }}
            {{- end }}
            {{- if eq .name "router" }}
            # Fork, replay, and the records of lifetimes past finished_retention_s
            # (GetLifetime, ListLifetimes) are read from the state service.
            - name: TICKMESH_ROUTER_STATE_TARGET
              value: "{{ include "tickmesh.fullname" $root }}-state:{{ $values.ports.grpc }}"
            {{- end }}
            {{- if and $usesRedis $values.redis.existingSecret }}
            - name: {{ $prefix }}USAGE_COUNTER_URL
              valueFrom:
                secretKeyRef:
                  name: {{ $values.redis.existingSecret }}
                  key: {{ $values.redis.urlKey }}
            {{- end }}
            {{- if and $usesS3 $values.s3.existingSecret }}
            - name: {{ $prefix }}S3_ACCESS_KEY_ID
              valueFrom:
                secretKeyRef:
                  name: {{ $values.s3.existingSecret }}
                  key: {{ $values.s3.accessKeyIdKey }}
            - name: {{ $prefix }}S3_SECRET_ACCESS_KEY
              valueFrom:
                secretKeyRef:
                  name: {{ $values.s3.existingSecret }}
                  key: {{ $values.s3.secretAccessKeyKey }}
            {{- end }}
            {{- range $name, $value := $svc.env }}
            {{- if not (hasPrefix $prefix $name) }}
            {{- fail (printf "%s.env: %s is not a %s setting (TICKMESH_<SERVICE>_<FIELD>)" $.key $name $prefix) }}
            {{- end }}
            - name: {{ $name }}
              value: {{ $value | toString | quote }}
            {{- end }}
            {{- with $svc.extraEnv }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
          {{- range $probe := list "startup" "readiness" "liveness" }}
          {{ $probe }}Probe:
            {{- include "tickmesh.probeAction" $values | trim | nindent 12 }}
            {{- toYaml (index $values.probes $probe) | nindent 12 }}
          {{- end }}
          {{- with $svc.resources }}
          resources:
            {{- toYaml . | nindent 12 }}
          {{- end }}
          volumeMounts:
            - name: config
              mountPath: /etc/tickmesh/tickmesh.yaml
              subPath: tickmesh.yaml
              readOnly: true
            - name: tmp
              mountPath: /tmp
            {{- if $values.natsAuth.existingSecret }}
            - name: nats-auth
              mountPath: {{ $values.natsAuth.mountPath }}
              readOnly: true
            {{- end }}
            {{- if $values.natsTls.existingSecret }}
            - name: nats-tls
              mountPath: {{ $values.natsTls.mountPath }}
              readOnly: true
            {{- end }}
            {{- with $values.extraVolumeMounts }}
            {{- toYaml . | nindent 12 }}
            {{- end }}
      volumes:
        - name: config
          configMap:
            name: {{ include "tickmesh.fullname" $root }}-config
        - name: tmp
          emptyDir: {}
        {{- if $values.natsAuth.existingSecret }}
        {{- $role := include "tickmesh.natsRole" .name }}
        - name: nats-auth
          secret:
            secretName: {{ $values.natsAuth.existingSecret }}
            defaultMode: 0440
            # Only this service's role, laid out as a tenant directory.
            items:
              {{- range $tenant := $values.config.tenants }}
              - key: {{ printf "%s-%s.nk" $tenant $role }}
                path: {{ printf "creds/%s/%s.nk" $tenant $role }}
              {{- end }}
        {{- end }}
        {{- if $values.natsTls.existingSecret }}
        - name: nats-tls
          secret:
            secretName: {{ $values.natsTls.existingSecret }}
            defaultMode: 0440
        {{- end }}
        {{- with $values.extraVolumes }}
        {{- toYaml . | nindent 8 }}
        {{- end }}
      {{- with $svc.nodeSelector }}
      nodeSelector:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.tolerations }}
      tolerations:
        {{- toYaml . | nindent 8 }}
      {{- end }}
      {{- with $svc.affinity }}
      affinity:
        {{- toYaml . | nindent 8 }}
      {{- end }}
{{- end }}

{{/* The Service of one service: its gRPC port and its metrics port. */}}
{{- define "tickmesh.service" -}}
{{- $root := .root }}
{{- $svc := index $root.Values .key }}
apiVersion: v1
kind: Service
metadata:
  name: {{ include "tickmesh.fullname" $root }}-{{ .name }}
  labels:
    {{- include "tickmesh.labels" $root | nindent 4 }}
    app.kubernetes.io/component: {{ .name }}
  {{- with $svc.service.annotations }}
  annotations:
    {{- toYaml . | nindent 4 }}
  {{- end }}
spec:
  type: {{ $svc.service.type }}
  selector:
    {{- include "tickmesh.selectorLabels" (dict "root" $root "name" .name) | nindent 4 }}
  ports:
    - name: grpc
      port: {{ $root.Values.ports.grpc }}
      targetPort: grpc
      protocol: TCP
      appProtocol: kubernetes.io/h2c
    - name: metrics
      port: {{ $root.Values.ports.metrics }}
      targetPort: metrics
      protocol: TCP
{{- end }}
