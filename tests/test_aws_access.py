"""AWS access of an integration with a role: STS AssumeRole (moto's, a real endpoint), with
credentials renewed before they expire, since one client follows a stream for hours."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

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
