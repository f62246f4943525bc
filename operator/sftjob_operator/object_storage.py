"""S3-compatible object storage in a trainer pod: the env that carries the credentials.

Pure. The credentials come from the job's Secret (`spec.secrets.s3`) as the names every S3
client reads (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY: the convention of KServe's storage
initializer, Kubeflow Pipelines and the AWS SDKs), through secretKeyRef, so they never reach
the ConfigMap or the SFTJob. The endpoint and region are not secret: the trainer reads them
from the spec (`spec.objectStorage`) in its config.
"""

from __future__ import annotations

from typing import Any

from .api import SFTJobSpec

ENV_ACCESS_KEY_ID = "AWS_ACCESS_KEY_ID"
ENV_SECRET_ACCESS_KEY = "AWS_SECRET_ACCESS_KEY"
# What the operator may set in a pod (profile_api.OPERATOR_SET_ENV protects them).
CREDENTIAL_ENV = (ENV_ACCESS_KEY_ID, ENV_SECRET_ACCESS_KEY)
# Names a tenant could use to send the credentials elsewhere or trust another CA: protected
# like HF_ENDPOINT (policy.PROTECTED_ENV_REASONS).
ENDPOINT_ENV = ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3")
TLS_ENV = ("AWS_CA_BUNDLE",)


def credentials_env(spec: SFTJobSpec) -> list[dict[str, Any]]:
    """The pod env giving the trainer the S3 key pair from the job's Secret, if it names one."""
    ref = spec.secrets.s3
    if ref is None:
        return []
    return [
        {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": key}}}
        for name, key in (
            (ENV_ACCESS_KEY_ID, ref.accessKeyIdKey),
            (ENV_SECRET_ACCESS_KEY, ref.secretAccessKeyKey),
        )
    ]
