"""AWS clients for one integration: access key, assumed role, or the default credential chain.

Credentials live only in memory and in the integration file (owner-only); never in logs or
errors. Endpoints: the integration's `endpoint_url` (DynamoDB-compatible endpoints such as
moto or DynamoDB Local) wins; otherwise botocore honours AWS_ENDPOINT_URL[_DYNAMODB] itself.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import AsyncIterator

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session

# Ingest loops retry with their own backoff and report failures in the collection status,
# so botocore gives up quickly instead of hiding a fault behind long retries.
_CONFIG = AioConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30)


@dataclass(frozen=True)
class AwsAccess:
    access_key_id: str | None = None
    secret_access_key: str | None = None
    role_arn: str | None = None
    external_id: str | None = None
    endpoint_url: str | None = None

    def __repr__(self) -> str:  # never print secrets, whoever logs this object
        return f"AwsAccess(role_arn={self.role_arn!r}, endpoint_url={self.endpoint_url!r})"

    @contextlib.asynccontextmanager
    async def client(self, service: str, region: str, config: AioConfig | None = None) -> AsyncIterator:
        """An aiobotocore client for `service`; with a role, through STS AssumeRole.

        `config` overrides the defaults above (the scan brings its own retry policy)."""
        session = get_session()
        keys = {}
        if self.access_key_id and self.secret_access_key:
            keys = {"aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key}
        if self.role_arn:
            keys = await self._assume_role(session, region, keys)
        async with session.create_client(
            service, region_name=region, endpoint_url=self.endpoint_url,
            config=_CONFIG.merge(config) if config else _CONFIG, **keys
        ) as client:
            yield client

    async def _assume_role(self, session, region: str, keys: dict) -> dict:
        arguments = {"RoleArn": self.role_arn, "RoleSessionName": "shoal"}
        if self.external_id:
            arguments["ExternalId"] = self.external_id
        async with session.create_client(
            "sts", region_name=region, endpoint_url=self.endpoint_url, config=_CONFIG, **keys
        ) as sts:
            credentials = (await sts.assume_role(**arguments))["Credentials"]
        return {
            "aws_access_key_id": credentials["AccessKeyId"],
            "aws_secret_access_key": credentials["SecretAccessKey"],
            "aws_session_token": credentials["SessionToken"],
        }
