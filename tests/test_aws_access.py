"""AWS access of an integration with a role: STS AssumeRole (moto's, a real endpoint), with
credentials renewed before they expire, since one client follows a stream for hours."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from shoal.ingest import aws
from shoal.ingest.aws import AwsAccess

ROLE = "arn:aws:iam::123456789012:role/shoal-reader"


async def test_a_role_is_assumed_and_its_credentials_renewed_before_they_expire(moto_server):
    access = AwsAccess("AKIDSOURCE", "source-secret", role_arn=ROLE, external_id="ext-1", endpoint_url=moto_server)
    async with access.client("dynamodb", "us-east-1") as client:
        await client.list_tables()
        credentials = client._request_signer._credentials
        first = await credentials.get_frozen_credentials()
        assert first.access_key != "AKIDSOURCE" and first.token  # the role's, not the source keys
        # Near its expiry (within botocore's 15-minute advisory window), the next request renews it.
        credentials._expiry_time = datetime.now(timezone.utc) + timedelta(minutes=5)
        await client.list_tables()
        renewed = await credentials.get_frozen_credentials()
        assert renewed.access_key != first.access_key and renewed.token != first.token
        assert credentials._expiry_time > datetime.now(timezone.utc) + timedelta(minutes=30)


async def test_role_credentials_never_show_the_secrets(moto_server):
    access = AwsAccess("AKIDSOURCE", "source-secret", role_arn=ROLE, external_id="ext-1", endpoint_url=moto_server)
    assert "source-secret" not in repr(access) and "ext-1" not in repr(access)


async def test_clients_share_the_service_models_read_once(moto_server):
    """A source that keeps failing makes a client per retry: botocore's models are not read
    from disk again each time (that blocked the event loop ~70 ms per client)."""
    access = AwsAccess(access_key_id="test", secret_access_key="test", endpoint_url=moto_server)
    for _ in range(2):
        async with access.client("dynamodb", "us-east-1") as client:
            assert "TableNames" in await client.list_tables()
    assert aws._session().get_component("data_loader") is aws._session().get_component("data_loader")
