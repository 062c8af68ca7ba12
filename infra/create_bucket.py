"""One-shot job for infra/compose.yaml: create the artifact bucket, then exit 0.

Runs with the S3 *admin* identity, so the long-running services (MLflow, workers) never need the right to
create buckets. Idempotent: an existing bucket owned by the same account is success. Path-style addressing,
as everywhere in adaptflow: a virtual-host style request would ask DNS for ``<bucket>.seaweedfs``.

Env: AWS_ENDPOINT_URL_S3, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, ADAPTFLOW_BUCKET.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

ATTEMPTS = 30
PAUSE_S = 2.0


def main() -> int:
    bucket = os.environ.get("ADAPTFLOW_BUCKET", "adaptflow")
    endpoint = os.environ["AWS_ENDPOINT_URL_S3"]
    s3 = boto3.client("s3", endpoint_url=endpoint,
                      config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))
    for attempt in range(1, ATTEMPTS + 1):
        try:
            s3.create_bucket(Bucket=bucket)
            print(f"created bucket {bucket!r} at {endpoint}")
            return 0
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "BucketAlreadyOwnedByYou":
                print(f"bucket {bucket!r} already exists at {endpoint}")
                return 0
            if code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
                # Retrying cannot fix credentials: say which ones to check (never their values).
                print(f"S3 refused the admin credentials ({code}): check S3_ADMIN_ACCESS_KEY / "
                      "S3_ADMIN_SECRET_KEY in .env", file=sys.stderr)
                return 1
            last = f"{code}: {exc}"
        except BotoCoreError as exc:
            last = str(exc)
        # SeaweedFS's filer can lag its S3 gateway for a moment after /healthz answers.
        print(f"attempt {attempt}/{ATTEMPTS}: {last}; retrying in {PAUSE_S:.0f}s", file=sys.stderr)
        time.sleep(PAUSE_S)
    print(f"could not create bucket {bucket!r} at {endpoint}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
