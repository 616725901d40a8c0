"""Request bodies → validated specs, and specs → response JSON (Rockset's shapes).

Validation happens here, before anything is created, so a bad request leaves no trace.
Secrets go in and never come out: `integration_json` names the kind of credentials only.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlsplit

from shoal.ingest.aws import AwsAccess
from shoal.ingest.pipeline import SourceConfig, SourceStatus
from shoal.sql.mapping import FieldMapping
from shoal.sql.planner import QueryError

from .errors import invalid

# Rockset's rule: letters, digits, dashes and underscores, starting with a letter or digit.
# Patterns are used with fullmatch: `$` also matches before a final newline.
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,99}")
DURATION = re.compile(r"PT(?:(\d{1,6}(?:\.\d{1,9})?)S)?|PT(?:(\d{1,6})M)")
KINESIS_STREAM_ARN = re.compile(r"arn:aws[a-z-]*:kinesis:[a-z0-9-]+:\d{12}:stream/[A-Za-z0-9_.-]{1,128}")
# DynamoDB's rule for a table's name, which may also come as the table's ARN.
TABLE_NAME = re.compile(r"(?:arn:aws[a-z-]*:dynamodb:[a-z0-9-]+:\d{12}:table/)?[A-Za-z0-9_.-]{3,255}")


def _table_name(name: str) -> str:
    if not TABLE_NAME.fullmatch(name):
        raise invalid(f"sources[0].dynamodb.table_name must be a DynamoDB table's name (3-255 letters, digits, "
                      f"'_', '-' or '.') or ARN; got {name!r}")
    return name


def check_name(kind: str, name: Any) -> str:
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise invalid(
            f"{kind} name must be 1-100 letters, digits, '-' or '_', starting with a letter or digit; got {name!r}"
        )
    return name


def _object(body: Any, where: str) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise invalid(f"{where} must be a JSON object")
    return body


def _string(body: dict, key: str, where: str, required: bool = True) -> str | None:
    value = body.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value:
        raise invalid(f"{where}.{key} must be a non-empty string")
    return value


def _known_fields(body: dict, allowed: set[str], where: str) -> None:
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise invalid(f"unknown field(s) in {where}: {', '.join(unknown)}")


# ------------------------------------------------------------------ integrations


@dataclass(frozen=True)
class IntegrationSpec:
    name: str
    description: str | None
    access: AwsAccess
    s3_export_bucket_name: str | None
    created_at: str


def parse_integration(body: Any, now: str) -> IntegrationSpec:
    body = _object(body, "body")
    _known_fields(body, {"name", "description", "dynamodb"}, "body")
    name = check_name("integration", body.get("name"))
    dynamodb = _object(body.get("dynamodb"), "dynamodb")
    _known_fields(dynamodb, {"aws_access_key", "aws_role", "s3_export_bucket_name", "endpoint_url"}, "dynamodb")
    if "aws_access_key" in dynamodb and "aws_role" in dynamodb:
        raise invalid("give either dynamodb.aws_access_key or dynamodb.aws_role, not both")
    endpoint_url = _string(dynamodb, "endpoint_url", "dynamodb", required=False)
    if endpoint_url is not None and urlsplit(endpoint_url).scheme not in ("http", "https"):
        raise invalid(f"dynamodb.endpoint_url must be an http:// or https:// URL; got {endpoint_url!r}")
    access: dict[str, Any] = {"endpoint_url": endpoint_url}
    if "aws_access_key" in dynamodb:
        keys = _object(dynamodb["aws_access_key"], "dynamodb.aws_access_key")
        access["access_key_id"] = _string(keys, "aws_access_key_id", "dynamodb.aws_access_key")
        access["secret_access_key"] = _string(keys, "aws_secret_access_key", "dynamodb.aws_access_key")
    elif "aws_role" in dynamodb:
        role = _object(dynamodb["aws_role"], "dynamodb.aws_role")
        access["role_arn"] = _string(role, "aws_role_arn", "dynamodb.aws_role")
        access["external_id"] = _string(role, "aws_external_id", "dynamodb.aws_role", required=False)
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid("description must be a string")
    return IntegrationSpec(
        name=name,
        description=description,
        access=AwsAccess(**access),
        s3_export_bucket_name=_string(dynamodb, "s3_export_bucket_name", "dynamodb", required=False),
        created_at=now,
    )


def integration_to_disk(spec: IntegrationSpec) -> dict[str, Any]:
    return {**asdict(spec), "access": asdict(spec.access)}


def integration_from_disk(data: dict[str, Any]) -> IntegrationSpec:
    return IntegrationSpec(**{**data, "access": AwsAccess(**data["access"])})


def integration_json(spec: IntegrationSpec, collections: list[str]) -> dict[str, Any]:
    access = spec.access
    credentials: dict[str, Any]
    if access.role_arn:
        credentials = {"aws_role": {"aws_role_arn": access.role_arn}}
    elif access.access_key_id:
        credentials = {"aws_access_key": {}}  # key id and secret are write-only
    else:
        credentials = {"default_credentials": {}}
    return {
        "name": spec.name,
        "description": spec.description,
        "created_at": spec.created_at,
        "dynamodb": {
            **credentials,
            "s3_export_bucket_name": spec.s3_export_bucket_name,
            "endpoint_url": access.endpoint_url,
        },
        "collections": collections,
    }


# ------------------------------------------------------------------ collections


@dataclass(frozen=True)
class CollectionSpec:
    workspace: str
    name: str
    description: str | None
    integration_name: str
    source: SourceConfig
    created_at: str
    field_mapping_sql: str | None = None  # Rockset's field_mapping_query.sql


def _poll_frequency(settings: dict) -> float:
    text = settings.get("dynamodb_stream_poll_frequency")
    if text is None:
        return SourceConfig.poll_interval_s
    match = DURATION.fullmatch(text) if isinstance(text, str) else None
    if not match or not any(match.groups()):
        raise invalid("settings.dynamodb_stream_poll_frequency must be an ISO-8601 duration like 'PT0.2S' or 'PT1S'")
    seconds = float(match.group(1)) if match.group(1) else 60.0 * int(match.group(2))
    if not 0.01 <= seconds <= 600:
        raise invalid("settings.dynamodb_stream_poll_frequency must be between PT0.01S and PT10M")
    return seconds


def parse_collection(workspace: str, body: Any, now: str) -> CollectionSpec:
    check_name("workspace", workspace)
    body = _object(body, "body")
    _known_fields(body, {"name", "description", "sources", "retention_secs", "field_mapping_query"}, "body")
    name = check_name("collection", body.get("name"))
    sources = body.get("sources")
    if not isinstance(sources, list) or len(sources) != 1:
        raise invalid("sources must be a list with exactly one DynamoDB source")
    source = _object(sources[0], "sources[0]")
    _known_fields(source, {"integration_name", "dynamodb"}, "sources[0]")
    integration_name = check_name("integration", source.get("integration_name"))
    dynamodb = _object(source.get("dynamodb"), "sources[0].dynamodb")
    _known_fields(dynamodb, {"table_name", "aws_region", "rcu", "use_scan_api", "settings", "kinesis_stream_arn"},
                  "sources[0].dynamodb")
    kinesis_stream_arn = dynamodb.get("kinesis_stream_arn")
    if kinesis_stream_arn is not None and (not isinstance(kinesis_stream_arn, str)
                                           or not KINESIS_STREAM_ARN.fullmatch(kinesis_stream_arn)):
        raise invalid("sources[0].dynamodb.kinesis_stream_arn must be a Kinesis stream ARN like "
                      "'arn:aws:kinesis:us-west-2:123456789012:stream/name'")
    rcu = dynamodb.get("rcu")
    if rcu is not None and (not isinstance(rcu, int) or isinstance(rcu, bool) or rcu < 1):
        raise invalid("sources[0].dynamodb.rcu must be a positive integer")
    use_scan_api = dynamodb.get("use_scan_api", True)
    if not isinstance(use_scan_api, bool):
        raise invalid("sources[0].dynamodb.use_scan_api must be true or false")
    settings = _object(dynamodb.get("settings", {}), "sources[0].dynamodb.settings")
    description = body.get("description")
    if description is not None and not isinstance(description, str):
        raise invalid("description must be a string")
    field_mapping_sql = _field_mapping(body.get("field_mapping_query"))
    return CollectionSpec(
        workspace=workspace,
        name=name,
        description=description,
        integration_name=integration_name,
        source=SourceConfig(
            table_name=_table_name(_string(dynamodb, "table_name", "sources[0].dynamodb")),
            region=_string(dynamodb, "aws_region", "sources[0].dynamodb", required=False) or "us-west-2",
            rcu=rcu,
            use_scan_api=use_scan_api,
            kinesis_stream_arn=kinesis_stream_arn,
            poll_interval_s=_poll_frequency(settings),
        ),
        created_at=now,
        field_mapping_sql=field_mapping_sql,
    )


def _field_mapping(value: Any) -> str | None:
    if value is None:
        return None
    mapping = _object(value, "field_mapping_query")
    _known_fields(mapping, {"sql"}, "field_mapping_query")
    sql = _string(mapping, "sql", "field_mapping_query")
    try:
        FieldMapping(sql)
    except QueryError as error:
        raise invalid(f"field_mapping_query.sql: {error}") from None
    return sql


def collection_to_disk(spec: CollectionSpec) -> dict[str, Any]:
    return {**asdict(spec), "source": asdict(spec.source)}


def collection_from_disk(data: dict[str, Any]) -> CollectionSpec:
    return CollectionSpec(**{**data, "source": SourceConfig(**data["source"])})


def _source_state(status: SourceStatus) -> str:
    if status.error:
        return "ERROR"
    if status.rebuilding:
        return "REBUILDING"
    return "WATCHING" if status.caught_up else "INITIALIZING"


def collection_json(spec: CollectionSpec, status: SourceStatus, doc_count: int, total_size: int, deleted: bool = False) -> dict[str, Any]:
    source = spec.source
    if deleted:
        state = "DELETED"
    else:
        state = "READY" if status.caught_up else "CREATED"
    return {
        "name": spec.name,
        "workspace": spec.workspace,
        "description": spec.description,
        "created_at": spec.created_at,
        "field_mapping_query": {"sql": spec.field_mapping_sql} if spec.field_mapping_sql else None,
        "status": state,
        "sources": [
            {
                "integration_name": spec.integration_name,
                "dynamodb": {
                    "table_name": source.table_name,
                    "aws_region": source.region,
                    "rcu": source.rcu,  # null: chosen from the table (status.scan_rcu_budget)
                    "use_scan_api": source.use_scan_api,
                    "kinesis_stream_arn": source.kinesis_stream_arn,  # our extension: changes from Kinesis
                    "settings": {"dynamodb_stream_poll_frequency": f"PT{source.poll_interval_s:g}S"},
                    "current_status": {
                        "state": status.state,
                        "initial_dump_completion_percentage": round(status.completion_percentage, 2),
                    },
                    "status": {
                        "scan_start_time": status.scan_start_time,
                        "scan_end_time": status.scan_end_time,
                        "scan_records_processed": status.scan_records_processed,
                        "scan_total_records": status.scan_total_records,
                        "scan_rcu_budget": status.scan_rcu_budget,
                        "scan_rcu_per_second": status.scan_rcu_per_second,
                        "scan_throttled_requests": status.scan_throttled_requests,
                        "state": status.state,
                        "stream_last_processed_at": status.stream_last_processed_at,
                        "stream_shards": status.stream_shards,
                        "stream_throttled_requests": status.stream_throttled_requests,
                    },
                },
                "status": {
                    "state": _source_state(status),
                    "message": status.error or status.rebuilding,
                    "last_error_at": status.error_at,
                    "retries": status.retries,
                },
            }
        ],
        "stats": {"doc_count": doc_count, "total_size": total_size, "sync_lag_ms": status.sync_lag_ms},
    }
