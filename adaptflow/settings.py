"""Endpoints and credentials, read from the ecosystem's own env vars, falling back to the local stack.

Precedence: environment variables (AWS_*, MLFLOW_TRACKING_URI, PREFECT_API_URL, ADAPTFLOW_*) win; whatever
they leave unset is taken from a running local stack's state files (``<state_dir>/stack.json`` and the 0600
``<state_dir>/credentials.json``) written by ``adaptflow stack up``. A user who points adaptflow at their own
AWS S3 / MinIO / R2 only sets the endpoint and credentials; no stack is needed then.
"""

from __future__ import annotations

import os
from pathlib import Path

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from adaptflow.stack_state import DEFAULT_STATE_DIR, read_stack_state


class Settings(BaseSettings):
    """Where the S3 store, the MLflow tracking server and the Prefect API live."""

    model_config = SettingsConfigDict(extra="ignore", populate_by_name=True)

    s3_endpoint_url: str | None = Field(
        None, validation_alias=AliasChoices("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
    )
    aws_access_key_id: str | None = Field(None, validation_alias="AWS_ACCESS_KEY_ID")
    aws_secret_access_key: SecretStr | None = Field(None, validation_alias="AWS_SECRET_ACCESS_KEY")
    aws_region: str = Field("us-east-1", validation_alias=AliasChoices("AWS_DEFAULT_REGION", "AWS_REGION"))
    mlflow_tracking_uri: str | None = Field(None, validation_alias="MLFLOW_TRACKING_URI")
    prefect_api_url: str | None = Field(None, validation_alias="PREFECT_API_URL")
    bucket: str = Field("adaptflow", validation_alias="ADAPTFLOW_BUCKET")
    state_dir: Path = Field(DEFAULT_STATE_DIR, validation_alias="ADAPTFLOW_STATE_DIR")
    cache_dir: Path = Field(
        Path.home() / ".cache" / "adaptflow", validation_alias="ADAPTFLOW_CACHE_DIR"
    )
    from_stack: bool = False  # True when some value came from the local stack's state files

    @property
    def secret_key(self) -> str | None:
        """The S3 secret key in clear, for boto3 only (never log it)."""
        return self.aws_secret_access_key.get_secret_value() if self.aws_secret_access_key else None

    def process_env(self) -> dict[str, str]:
        """Env vars that make a child process (a worker, an MLflow/pyfunc subprocess) see the same services."""
        env = {
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint_url,
            "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint_url,
            "AWS_ACCESS_KEY_ID": self.aws_access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.aws_region,
            "MLFLOW_TRACKING_URI": self.mlflow_tracking_uri,
            "PREFECT_API_URL": self.prefect_api_url,
            "ADAPTFLOW_BUCKET": self.bucket,
            "ADAPTFLOW_STATE_DIR": str(self.state_dir),
            "ADAPTFLOW_CACHE_DIR": str(self.cache_dir),
        }
        return {k: v for k, v in env.items() if v}


def load_settings(state_dir: Path | str | None = None, **overrides) -> Settings:
    """Settings from the environment, with gaps filled from the local stack in ``state_dir``.

    Args:
        state_dir: the stack's state dir; default ADAPTFLOW_STATE_DIR or ./.adaptflow.
        overrides: explicit values (field names) that win over everything.
    """
    if state_dir is not None:
        overrides["state_dir"] = Path(state_dir)
    settings = Settings(**overrides)
    state = read_stack_state(settings.state_dir)
    services, creds = state.services, state.credentials
    fill: dict = {}
    if not settings.s3_endpoint_url and services.get("s3", {}).get("url"):
        fill["s3_endpoint_url"] = services["s3"]["url"]
        if not settings.aws_access_key_id and creds:
            fill["aws_access_key_id"] = creds["aws_access_key_id"]
            fill["aws_secret_access_key"] = SecretStr(creds["aws_secret_access_key"])
        if "ADAPTFLOW_BUCKET" not in os.environ and services["s3"].get("bucket"):
            fill["bucket"] = services["s3"]["bucket"]
    if not settings.mlflow_tracking_uri and services.get("mlflow", {}).get("url"):
        fill["mlflow_tracking_uri"] = services["mlflow"]["url"]
    if not settings.prefect_api_url and services.get("prefect", {}).get("api_url"):
        fill["prefect_api_url"] = services["prefect"]["api_url"]
    if fill:
        settings = settings.model_copy(update={**fill, "from_stack": True})
    return settings
