{{- define "tandem.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "tandem.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tandem.selectorLabels" -}}
app.kubernetes.io/name: {{ include "tandem.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tandem.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{ include "tandem.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end -}}

{{/* The security part of one cluster's config; SASL credentials come from env. */}}
{{- define "tandem.security" -}}
security_protocol: {{ .c.securityProtocol }}
{{- if .c.saslMechanism }}
sasl_mechanism: {{ .c.saslMechanism }}
{{- end }}
{{- if .c.tls.existingSecret }}
ssl_cafile: /etc/tandem/tls/{{ .side }}/{{ .c.tls.caKey }}
{{- if .c.tls.certKey }}
ssl_certfile: /etc/tandem/tls/{{ .side }}/{{ .c.tls.certKey }}
{{- end }}
{{- if .c.tls.keyKey }}
ssl_keyfile: /etc/tandem/tls/{{ .side }}/{{ .c.tls.keyKey }}
{{- end }}
{{- end }}
{{- end -}}

{{/* SASL username and password of one cluster, from its Secret, as TANDEM_* env vars. */}}
{{- define "tandem.saslEnv" -}}
- name: TANDEM_{{ .side | upper }}__SASL_USERNAME
  valueFrom:
    secretKeyRef:
      name: {{ .c.sasl.existingSecret }}
      key: {{ .c.sasl.usernameKey }}
- name: TANDEM_{{ .side | upper }}__SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .c.sasl.existingSecret }}
      key: {{ .c.sasl.passwordKey }}
{{- end -}}
