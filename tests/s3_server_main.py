"""A local S3 server for the tests: moto in server mode, with authentication on.

Run by tests/s3_kit.py under the S3 server's own Python (moto needs botocore, whose
python-dateutil<3 cannot share an environment with kubernetes' >=3; `make install` builds
.venv-s3server for it). Creates one IAM user allowed s3:*, prints one JSON line
{endpoint, accessKeyId, secretAccessKey} and serves until stdin closes.
"""

from __future__ import annotations

import json
import os
import sys

# Requests are authenticated (a wrong key pair is refused as on AWS) after the first three:
# the ones below that create the user, its policy and its key.
os.environ["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"

import boto3  # noqa: E402
from moto.server import ThreadedMotoServer  # noqa: E402

ALLOW_S3 = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}],
}


def main() -> None:
    port = int(sys.argv[1])
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client(
        "iam",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bootstrap",
        aws_secret_access_key="bootstrap",
    )
    iam.create_user(UserName="sftjob-tests")
    iam.put_user_policy(
        UserName="sftjob-tests", PolicyName="s3", PolicyDocument=json.dumps(ALLOW_S3)
    )
    key = iam.create_access_key(UserName="sftjob-tests")["AccessKey"]
    print(
        json.dumps(
            {
                "endpoint": endpoint,
                "accessKeyId": key["AccessKeyId"],
                "secretAccessKey": key["SecretAccessKey"],
            }
        ),
        flush=True,
    )
    sys.stdin.read()  # the test closes it (or dies) when done
    server.stop()


if __name__ == "__main__":
    main()
