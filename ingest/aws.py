"""AWS clients for one integration: access key, assumed role, or the default credential chain.

Credentials live only in memory and in the integration file (owner-only); never in logs or
errors. Endpoints: the integration's `endpoint_url` (DynamoDB-compatible endpoints such as
moto or DynamoDB Local) wins; otherwise botocore honours AWS_ENDPOINT_URL[_DYNAMODB] itself.
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass
from typing import AsyncIterator

from aiobotocore.config import AioConfig
from aiobotocore.credentials import AioCredentialResolver, AioRefreshableCredentials
from aiobotocore.session import AioSession, get_session
from botocore.credentials import CredentialProvider
from botocore.loaders import create_loader

# A credential header as a request line or an AWS message quotes it (`Authorization: ...`,
# `x-amz-security-token:...`, also with escapes or spaces before the colon), to the line's or
# the quote's end.
_SECRET_HEADER = re.compile(r"(?i)((?:authorization|x-amz-security-token)[^:'\"\n]{0,20}:)[^'\"\n]*")


def without_secrets(text: str) -> str:
    """`text` with the value of every credential header it quotes replaced: for status and logs."""
    return _SECRET_HEADER.sub(r"\1 (not shown)", text)


# Ingest loops retry with their own backoff and report failures in the collection status,
# so botocore gives up quickly instead of hiding a fault behind long retries.
_CONFIG = AioConfig(retries={"max_attempts": 2, "mode": "standard"}, connect_timeout=5, read_timeout=30)
# botocore's service models and endpoint rules, read from disk once per process: a new
# session reads them again (~70 ms of JSON parsing on the event loop, at every retry of a
# failing source). Sessions stay per client: an assumed role's credentials belong to one.
_MODELS = create_loader()


def _session() -> AioSession:
    session = get_session()
    session.register_component("data_loader", _MODELS)
    return session


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
        session = _session()
        keys = {}
        if self.access_key_id and self.secret_access_key:
            keys = {"aws_access_key_id": self.access_key_id, "aws_secret_access_key": self.secret_access_key}
        if self.role_arn:
            await self._use_assumed_role(session, region, keys)
            keys = {}  # the session's refreshing credentials sign every request
        async with session.create_client(
            service, region_name=region, endpoint_url=self.endpoint_url,
            config=_CONFIG.merge(config) if config else _CONFIG, **keys
        ) as client:
            yield client

    async def _use_assumed_role(self, session: AioSession, region: str, keys: dict) -> None:
        """Give `session` the role's credentials, renewed by AssumeRole before they expire (the
        stream is followed by one client for hours; a role's credentials last one by default).
        botocore renews them 15 minutes before their expiry, or at once after it."""
        arguments = {"RoleArn": self.role_arn, "RoleSessionName": "shoal"}
        if self.external_id:
            arguments["ExternalId"] = self.external_id

        async def assume_role() -> dict:
            async with _session().create_client(
                "sts", region_name=region, endpoint_url=self.endpoint_url, config=_CONFIG, **keys
            ) as sts:
                credentials = (await sts.assume_role(**arguments))["Credentials"]
            return {
                "access_key": credentials["AccessKeyId"],
                "secret_key": credentials["SecretAccessKey"],
                "token": credentials["SessionToken"],
                "expiry_time": credentials["Expiration"].isoformat(),
            }

        credentials = AioRefreshableCredentials.create_from_metadata(
            await assume_role(), refresh_using=assume_role, method="assume-role"
        )
        session.register_component("credential_provider", AioCredentialResolver([_Given(credentials)]))


class _Given(CredentialProvider):
    """A credential provider that hands out credentials made elsewhere (the assumed role's)."""

    METHOD = "shoal-assumed-role"

    def __init__(self, credentials: AioRefreshableCredentials) -> None:
        super().__init__()
        self._credentials = credentials

    async def load(self) -> AioRefreshableCredentials:
        return self._credentials
