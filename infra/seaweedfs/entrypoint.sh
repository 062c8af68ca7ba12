#!/bin/sh
# SeaweedFS entrypoint for infra/compose.yaml: renders the S3 identities file from environment
# variables, then execs `weed` with the arguments given (compose's `command:`) plus -s3.config.
#
# Why a script: SeaweedFS reads identities only from a JSON file, and credentials must not live in the
# repository. The file is written at start into a tmpfs (never a volume, never the image), mode 0600.
#
# Three identities, least privilege:
#   admin   S3_ADMIN_ACCESS_KEY / S3_ADMIN_SECRET_KEY    everything; only the bucket job uses it
#   mlflow  S3_MLFLOW_ACCESS_KEY / S3_MLFLOW_SECRET_KEY  read/write/list on the bucket (proxied artifacts)
#   worker  S3_WORKER_ACCESS_KEY / S3_WORKER_SECRET_KEY  read/write/list on the bucket (the flow's stages)
# SeaweedFS scopes actions per bucket ("Read:<bucket>"); per-prefix limits need a store with IAM
# policies (AWS, MinIO, R2...): see infra/s3-worker-policy.json.
set -eu

BUCKET="${ADAPTFLOW_BUCKET:-adaptflow}"
CONFIG="${S3_CONFIG_PATH:-/run/seaweedfs/s3.json}"

# Values are pasted into JSON below: refuse anything that could break out of a JSON string, and say
# which variable is wrong (never its value).
check() {
    eval "value=\${$1:-}"
    case "$value" in
        "" | *[!A-Za-z0-9._+/=-]*)
            echo "entrypoint: $1 must be set and use only A-Z a-z 0-9 . _ + / = - (e.g. openssl rand -hex 20)" >&2
            exit 64 ;;
    esac
}
for var in S3_ADMIN_ACCESS_KEY S3_ADMIN_SECRET_KEY S3_MLFLOW_ACCESS_KEY S3_MLFLOW_SECRET_KEY \
           S3_WORKER_ACCESS_KEY S3_WORKER_SECRET_KEY BUCKET; do
    check "$var"
done

umask 077
mkdir -p "$(dirname "$CONFIG")"
cat > "$CONFIG" <<EOF
{
  "identities": [
    {
      "name": "admin",
      "credentials": [{"accessKey": "$S3_ADMIN_ACCESS_KEY", "secretKey": "$S3_ADMIN_SECRET_KEY"}],
      "actions": ["Admin", "Read", "List", "Tagging", "Write"]
    },
    {
      "name": "mlflow",
      "credentials": [{"accessKey": "$S3_MLFLOW_ACCESS_KEY", "secretKey": "$S3_MLFLOW_SECRET_KEY"}],
      "actions": ["Read:$BUCKET", "Write:$BUCKET", "List:$BUCKET"]
    },
    {
      "name": "worker",
      "credentials": [{"accessKey": "$S3_WORKER_ACCESS_KEY", "secretKey": "$S3_WORKER_SECRET_KEY"}],
      "actions": ["Read:$BUCKET", "Write:$BUCKET", "List:$BUCKET"]
    }
  ]
}
EOF

exec "${WEED:-weed}" "$@" -s3.config="$CONFIG"
