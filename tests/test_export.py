"""The bulk load's export path (`use_scan_api: false`): export to S3, files, hand-off, resume.

Real parts only: moto in server mode holds the table and the bucket. moto's own export (one
`data/<uuid>.gz`, no manifest) is read directly; AWS's layout, an export that takes time, and
a role that may not enable point-in-time recovery come from `ExportDouble` (a test double in
front of moto speaking DynamoDB's and S3's wire protocols, see its docstring). The reader's
checks are also tested in this process against moto's S3 through aiobotocore. Expectations
come from the items written here (`compare_collection`), never from Shoal's own account.
"""

from __future__ import annotations

import asyncio
import base64
import gzip
import hashlib
import json
import random
import time
import uuid
from datetime import datetime

import boto3
import orjson
import pytest
from botocore.config import Config

from export_double import ExportDouble
from shoal.index.collection import Change
from shoal.ingest.aws import AwsAccess
from shoal.ingest.export import (
    ExportFile,
    ExportLoader,
    ExportProblem,
    export_decoder,
    export_files,
    from_ranges,
    s3_chunks,
    to_ranges,
)
from shoal.ingest.pipeline import _after_bulk_load_began
from support import AWS_ENV, Dynamo, ShoalProcess, compare_collection, wait_until

COLL = "exported"
N_ITEMS = 600


# --------------------------------------------------------------------------- helpers


def make_item(rng: random.Random, i: int) -> dict:
    """~300 bytes, every attribute type (binary sort keys avoided: moto's stream records
    encode binary `Keys` twice, which would break the replay after the bulk load)."""
    return {
        "pk": {"S": f"p{i % 97:03d}"},
        "sk": {"N": str(i)},
        "blob": {"B": i.to_bytes(4, "big")},
        "n": {"N": str(rng.randint(-10**9, 10**9))},
        "price": {"N": f"{rng.randint(0, 10**6)}.{rng.choice(['25', '5', '125'])}"},  # exact in binary
        "big": {"N": "1234567890123456789012345678901234567"},
        "text": {"S": "".join(rng.choices("abcdefghij klmnopqrstuvwxyzé", k=rng.randint(100, 200)))},
        "flag": {"BOOL": rng.random() < 0.5},
        "none": {"NULL": True},
        "tags": {"SS": rng.sample(["red", "green", "blue", "cyan"], rng.randint(1, 3))},
        "nums": {"NS": ["1", "2.5"]},
        "bins": {"BS": [b"\x00", b"\xff"]},
        "m": {"M": {"x": {"N": str(i)}, "l": {"L": [{"S": "a"}, {"NULL": True}]}}},
    }


def doc_id(item: dict) -> str:
    return json.dumps([item["pk"]["S"], item["sk"]["N"]], separators=(",", ":"))


def s3_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id=AWS_ENV["AWS_ACCESS_KEY_ID"],
                        aws_secret_access_key=AWS_ENV["AWS_SECRET_ACCESS_KEY"], config=Config(retries={"max_attempts": 1}))


@pytest.fixture
def bucket(moto_server: str) -> str:
    name = f"exports-{uuid.uuid4().hex[:10]}"
    s3_client(moto_server).create_bucket(Bucket=name)
    return name


@pytest.fixture
def table(moto_server: str, table_name: str) -> dict[str, dict]:
    """A fresh table of N_ITEMS items: {_id: item}. Its stream is enabled only after they were
    written, as on a table older than the stream's 24 h: only the bulk load can bring them."""
    ddb = Dynamo(moto_server)
    ddb.client.create_table(
        TableName=table_name, BillingMode="PAY_PER_REQUEST",
        AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"}, {"AttributeName": "sk", "AttributeType": "N"}],
        KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"}, {"AttributeName": "sk", "KeyType": "RANGE"}])
    rng = random.Random(5)
    items = [make_item(rng, i) for i in range(N_ITEMS)]
    ddb.batch_write(table_name, items)
    ddb.client.update_table(TableName=table_name,
                            StreamSpecification={"StreamEnabled": True, "StreamViewType": "NEW_AND_OLD_IMAGES"})
    assert ddb.client.describe_table(TableName=table_name)["Table"].get("LatestStreamArn")
    return {doc_id(item): item for item in items}


def table_model(moto_server: str, name: str) -> dict[str, dict]:
    return {doc_id(item): item for item in Dynamo(moto_server).scan_all(name)}


def pitr_status(moto_server: str, name: str) -> str:
    described = Dynamo(moto_server).client.describe_continuous_backups(TableName=name)
    return described["ContinuousBackupsDescription"]["PointInTimeRecoveryDescription"]["PointInTimeRecoveryStatus"]


async def start_export_collection(shoal: ShoalProcess, endpoint: str, table_name: str, bucket: str | None) -> None:
    dynamodb: dict = {"aws_access_key": {"aws_access_key_id": AWS_ENV["AWS_ACCESS_KEY_ID"],
                                         "aws_secret_access_key": AWS_ENV["AWS_SECRET_ACCESS_KEY"]},
                      "endpoint_url": endpoint}
    if bucket:
        dynamodb["s3_export_bucket_name"] = bucket
    r = await shoal.request("POST", "/v1/orgs/self/integrations", {"name": "exporting", "dynamodb": dynamodb})
    assert r.status == 200, r
    body = {"name": COLL, "sources": [{"integration_name": "exporting", "dynamodb": {
        "table_name": table_name, "aws_region": "us-east-1", "use_scan_api": False}}]}
    r = await shoal.request("POST", "/v1/orgs/self/ws/commons/collections", body)
    assert r.status == 200, r


def source(collection: dict) -> dict:
    return collection["sources"][0]


async def wait_state(shoal: ShoalProcess, state: str) -> dict:
    async def reached():
        collection = await shoal.get_collection(COLL)
        return collection if source(collection)["dynamodb"]["status"]["state"] == state else None
    return await wait_until(reached, 30, 0.1, f"state {state}", describe=lambda: shoal.get_collection(COLL))


async def assert_collection_equals(shoal: ShoalProcess, model: dict[str, dict]) -> None:
    rows = await shoal.query(f"SELECT * FROM commons.{COLL}", limit=len(model) + 100)
    problems = compare_collection(rows, model)
    assert not problems, "\n".join(problems)


def saved_checkpoint(shoal: ShoalProcess) -> dict:
    manifest = shoal.data_dir / "collections" / "commons" / COLL / "index" / "manifest.json"
    return orjson.loads(manifest.read_bytes())["checkpoint"]


# --------------------------------------------------------------------------- the reader, in process


def write_export(s3, bucket: str, prefix: str, files: list[list[dict]], *, keys_from_root: bool = True,
                 summary_count: int | None = None, counts: list[int] | None = None) -> str:
    """AWS's layout in moto's S3, built by hand; returns the manifest-summary key. AWS's own
    example names keys without the prefix (`keys_from_root` False), real exports with it."""
    export_id = f"{int(time.time() * 1000):014d}-{uuid.uuid4().hex[:8]}"
    base = f"AWSDynamoDB/{export_id}"
    named = (lambda key: f"{prefix}/{key}") if keys_from_root else (lambda key: key)
    lines = []
    for n, items in enumerate(files):
        data = gzip.compress(b"".join(orjson.dumps({"Item": item}) + b"\n" for item in items))
        key = f"{base}/data/file{n}.json.gz"
        s3.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)
        lines.append(orjson.dumps({"itemCount": counts[n] if counts else len(items), "etag": hashlib.md5(data).hexdigest(),
                                   "md5Checksum": base64.b64encode(hashlib.md5(data).digest()).decode(),
                                   "dataFileS3Key": named(key)}))
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{base}/manifest-files.json", Body=b"\n".join(lines))
    summary = {"version": "2020-06-30", "itemCount": sum(map(len, files)) if summary_count is None else summary_count,
               "manifestFilesS3Key": named(f"{base}/manifest-files.json"), "outputFormat": "DYNAMODB_JSON"}
    s3.put_object(Bucket=bucket, Key=f"{prefix}/{base}/manifest-summary.json", Body=orjson.dumps(summary))
    return named(f"{base}/manifest-summary.json")


def wire_item(i: int) -> dict:
    """An item as it appears in an export file: binary as base64 text."""
    return {"pk": {"S": f"k{i}"}, "b": {"B": base64.b64encode(bytes([i % 256])).decode()}, "n": {"N": str(i)}}


async def load(moto_server: str, bucket: str, description: dict) -> dict[str, dict]:
    async with AwsAccess(AWS_ENV["AWS_ACCESS_KEY_ID"], AWS_ENV["AWS_SECRET_ACCESS_KEY"],
                         endpoint_url=moto_server).client("s3", "us-east-1") as s3:
        files, total = await export_files(s3, description)
        loaded: dict[str, dict] = {}

        async def apply(batches):
            for batch in batches:
                loaded.update((change.id, change.doc) for change in batch.changes)
        await ExportLoader(s3_chunks(s3, bucket), export_decoder(("pk",), "t")).run(enumerate(files), apply)
    assert total is None or total == len(loaded)
    return loaded


@pytest.mark.parametrize("keys_from_root", [True, False])
async def test_reader_follows_aws_layout(moto_server, bucket, keys_from_root):
    s3 = s3_client(moto_server)
    files = [[wire_item(i) for i in range(n * 100, n * 100 + 100)] for n in range(3)] + [[]]  # an empty partition
    manifest = write_export(s3, bucket, "pre/fix", files, keys_from_root=keys_from_root)
    loaded = await load(moto_server, bucket, {"S3Bucket": bucket, "S3Prefix": "pre/fix", "ExportManifest": manifest,
                                              "ExportArn": "arn"})
    assert loaded == {f"k{i}": {"pk": f"k{i}", "b": bytes([i % 256]), "n": i} for i in range(300)}
    # without ExportManifest in DescribeExport, the summary is found under the prefix
    assert len(await load(moto_server, bucket, {"S3Bucket": bucket, "S3Prefix": "pre/fix", "ExportArn": "arn"})) == 300


async def test_reader_refuses_counts_and_checksums_that_do_not_match(moto_server, bucket):
    s3 = s3_client(moto_server)
    files = [[wire_item(i) for i in range(n * 50, n * 50 + 50)] for n in range(2)]
    description = {"S3Bucket": bucket, "S3Prefix": "p1", "ExportArn": "arn"}
    bad_summary = write_export(s3, bucket, "p1", files, summary_count=99)
    with pytest.raises(ExportProblem, match="summary says 99"):
        await load(moto_server, bucket, {**description, "ExportManifest": bad_summary})
    bad_count = write_export(s3, bucket, "p2", files, counts=[49, 51])
    # Files are read in parallel: either one's mismatch may be found first.
    with pytest.raises(ExportProblem, match="holds 50 items, but the export's manifest says (49|51)"):
        await load(moto_server, bucket, {**description, "S3Prefix": "p2", "ExportManifest": bad_count})
    good = write_export(s3, bucket, "p3", files)
    data_key = next(o["Key"] for o in s3.list_objects_v2(Bucket=bucket, Prefix="p3/")["Contents"] if o["Key"].endswith("file1.json.gz"))
    original = gzip.decompress(s3.get_object(Bucket=bucket, Key=data_key)["Body"].read())
    s3.put_object(Bucket=bucket, Key=data_key, Body=gzip.compress(original.replace(b'"k99"', b'"k9x"')))
    with pytest.raises(ExportProblem, match="has MD5 .* but the export's manifest says"):
        await load(moto_server, bucket, {**description, "S3Prefix": "p3", "ExportManifest": good})


async def test_reader_streams_chunks_split_anywhere_and_gzip_members():
    """Lines cut across chunks and a file of two gzip members (allowed by gzip) decode whole;
    a file cut short is refused."""
    lines = [orjson.dumps({"Item": wire_item(i)}) + b"\n" for i in range(40)]
    data = gzip.compress(b"".join(lines[:15])) + gzip.compress(b"".join(lines[15:]))
    md5 = base64.b64encode(hashlib.md5(data).digest()).decode()
    received: list[str] = []

    def chunks_of(blob: bytes, size: int):
        async def chunks(key):
            for at in range(0, len(blob), size):
                yield blob[at:at + size]
        return chunks

    async def apply(batches):
        received.extend(change.id for batch in batches for change in batch.changes)

    for size in (7, 64, len(data)):
        received.clear()
        loader = ExportLoader(chunks_of(data, size), export_decoder(("pk",), "t"))
        await loader.run([(0, ExportFile("f", 40, md5))], apply)
        assert received == [f"k{i}" for i in range(40)], size
    with pytest.raises(ExportProblem, match="ends in the middle of its gzip stream"):
        await ExportLoader(chunks_of(data[:-9], 64), export_decoder(("pk",), "t")).run([(0, ExportFile("f", None, None))], apply)


def test_done_files_round_trip_as_ranges():
    assert to_ranges({5, 0, 1, 2, 7, 8}) == [[0, 2], [5, 5], [7, 8]]
    assert from_ranges(to_ranges({5, 0, 1, 2, 7, 8})) == {0, 1, 2, 5, 7, 8}
    assert to_ranges([]) == []


# --------------------------------------------------------------------------- Shoal end to end


async def test_moto_export_end_to_end(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    """moto's own export (no manifest) loads the table; PITR, off in moto, is turned on."""
    assert pitr_status(moto_server, table_name) == "DISABLED"
    await start_export_collection(shoal, moto_server, table_name, bucket)
    collection = await shoal.wait_ready(COLL, timeout=60)
    status = source(collection)["dynamodb"]["status"]
    assert status["scan_records_processed"] == status["scan_total_records"] == N_ITEMS, status
    assert status["scan_end_time"] and status["scan_rcu_budget"] is None, status
    assert pitr_status(moto_server, table_name) == "ENABLED"
    keys = [o["Key"] for o in s3_client(moto_server).list_objects_v2(Bucket=bucket)["Contents"]]
    assert len(keys) == 1 and keys[0].startswith(f"shoal-exports/{table_name}/"), keys
    await assert_collection_equals(shoal, table)


async def test_export_path_needs_a_bucket(moto_server, table_name, shoal: ShoalProcess):
    r = await shoal.request("POST", "/v1/orgs/self/integrations", {"name": "nobucket", "dynamodb": {"endpoint_url": moto_server}})
    assert r.status == 200, r
    body = {"name": COLL, "sources": [{"integration_name": "nobucket", "dynamodb": {
        "table_name": table_name, "use_scan_api": False}}]}
    r = await shoal.request("POST", "/v1/orgs/self/ws/commons/collections", body)
    assert r.status == 400 and "s3_export_bucket_name" in r.body["message"], r


async def test_aws_layout_end_to_end(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    with ExportDouble(moto_server, real_layout=True, files=4) as double:
        await start_export_collection(shoal, double.url, table_name, bucket)
        collection = await shoal.wait_ready(COLL, timeout=60)
        assert double.exports_started == 1
        data_gets = {key: n for key, n in double.gets.items() if "/data/" in key}
        assert len(data_gets) == 4 and set(data_gets.values()) == {1}, double.gets
    assert source(collection)["dynamodb"]["status"]["scan_records_processed"] == N_ITEMS
    await assert_collection_equals(shoal, table)


async def test_checksum_mismatch_is_shown_and_retried(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    with ExportDouble(moto_server, real_layout=True, files=3) as double:
        double.corrupt_file = 1
        await start_export_collection(shoal, double.url, table_name, bucket)

        async def failed_twice():
            collection = await shoal.get_collection(COLL)
            health = source(collection)["status"]
            return collection if health["state"] == "ERROR" and health["retries"] >= 2 else None
        collection = await wait_until(failed_twice, 30, 0.2, "the checksum error, twice", describe=lambda: shoal.get_collection(COLL))
        message = source(collection)["status"]["message"]
        assert "MD5" in message and "manifest" in message, message
        assert collection["status"] != "READY"
        assert double.exports_started == 1, "a retry exported again instead of reading the files again"


async def test_changes_during_the_export_end_up_right(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    """Writes after the stream position was taken but before the export's point in time, and
    writes while DynamoDB is exporting: updates, deletes, inserts, and an insert deleted again.
    After the hand-off the collection equals the table (nothing lost, nothing resurrected)."""
    ddb = Dynamo(moto_server)
    ids = list(table)
    rng = random.Random(9)

    def key(doc: str) -> dict:
        return {"pk": table[doc]["pk"], "sk": table[doc]["sk"]}

    def before_the_export() -> None:
        ddb.client.update_item(TableName=table_name, Key=key(ids[0]), UpdateExpression="SET n = :v",
                               ExpressionAttributeValues={":v": {"N": "-1"}})
        ddb.client.delete_item(TableName=table_name, Key=key(ids[1]))
        ddb.client.put_item(TableName=table_name, Item=make_item(rng, 10_000))

    with ExportDouble(moto_server) as double:
        double.before_export(before_the_export)
        double.hold_exports()
        await start_export_collection(shoal, double.url, table_name, bucket)
        await wait_until(lambda: double.completed_seen, 30, 0.05, "moto to finish writing the export")
        assert source(await shoal.get_collection(COLL))["dynamodb"]["status"]["state"] == "EXPORTING_TO_S3"
        for doc in ids[2:12]:  # updated while exporting
            ddb.client.update_item(TableName=table_name, Key=key(doc), UpdateExpression="SET #t = :v",
                                   ExpressionAttributeNames={"#t": "text"}, ExpressionAttributeValues={":v": {"S": f"changed during the export {doc}"}})
        for doc in ids[12:20]:  # deleted while exporting: the export has them, the stream removes them
            ddb.client.delete_item(TableName=table_name, Key=key(doc))
        ddb.client.put_item(TableName=table_name, Item=make_item(rng, 10_001))
        short_lived = make_item(rng, 10_002)
        ddb.client.put_item(TableName=table_name, Item=short_lived)
        ddb.client.delete_item(TableName=table_name, Key={"pk": short_lived["pk"], "sk": short_lived["sk"]})
        ddb.client.delete_item(TableName=table_name, Key=key(ids[0]))  # updated before, deleted during
        double.release_exports()
        await shoal.wait_ready(COLL, timeout=60)
    model = table_model(moto_server, table_name)
    assert len(model) == N_ITEMS - 1 + 1 - 8 + 1 - 1
    await assert_collection_equals(shoal, model)


async def test_pitr_off_and_not_allowed_to_enable_it(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    with ExportDouble(moto_server) as double:
        double.deny_pitr_update = True
        await start_export_collection(shoal, double.url, table_name, bucket)

        async def errored():
            collection = await shoal.get_collection(COLL)
            return collection if source(collection)["status"]["state"] == "ERROR" else None
        collection = await wait_until(errored, 30, 0.1, "the PITR error", describe=lambda: shoal.get_collection(COLL))
        message = source(collection)["status"]["message"]
        assert "point-in-time recovery is off" in message and "dynamodb:UpdateContinuousBackups" in message, message
        assert "update-continuous-backups" in message, message
        assert double.exports_started == 0
        double.deny_pitr_update = False  # the user grants the permission: the retry goes on by itself
        await shoal.wait_ready(COLL, timeout=60)
    await assert_collection_equals(shoal, table)


async def test_restart_while_exporting_does_not_export_again(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    with ExportDouble(moto_server) as double:
        double.hold_exports()
        await start_export_collection(shoal, double.url, table_name, bucket)
        await wait_state(shoal, "EXPORTING_TO_S3")
        await wait_until(lambda: double.exports_started, 30, 0.05, "the export to start")
        await wait_until(lambda: saved_checkpoint(shoal)["scan"]["export"]["arn"], 10, 0.05, "the ARN in the checkpoint")
        shoal.kill()
        shoal.start()
        await wait_state(shoal, "EXPORTING_TO_S3")
        double.release_exports()
        await shoal.wait_ready(COLL, timeout=60)
        assert double.exports_started == 1
    await assert_collection_equals(shoal, table)


async def test_restart_while_downloading_skips_the_files_applied(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    """Three of four files applied, the fourth stuck; SIGKILL; after the restart only the fourth
    is read again (and the manifests), and the collection equals the table."""
    with ExportDouble(moto_server, real_layout=True, files=4) as double:
        double.block_files("/data/")  # every data file waits...
        await start_export_collection(shoal, double.url, table_name, bucket)
        await wait_until(lambda: sum(n for key, n in double.gets.items() if "/data/" in key) == 4, 30, 0.05, "four GETs")
        stuck = sorted(key for key in double.gets if "/data/" in key)[2]
        double.block_files(stuck)  # ...then all but one go on

        def three_done():
            export = saved_checkpoint(shoal)["scan"]["export"]
            return len(from_ranges(export.get("done", []))) == 3
        await wait_until(three_done, 30, 0.05, "three files applied", describe=lambda: saved_checkpoint(shoal))
        assert from_ranges(saved_checkpoint(shoal)["scan"]["export"]["done"]) == {0, 1, 3}
        shoal.kill()
        before = dict(double.gets)
        double.unblock_files()
        shoal.start()
        await shoal.wait_ready(COLL, timeout=60)
        again = {key: n - before.get(key, 0) for key, n in double.gets.items() if n > before.get(key, 0)}
        assert double.exports_started == 1
    assert {key for key in again if "/data/" in key} == {stuck}, again
    assert source(await shoal.get_collection(COLL))["dynamodb"]["status"]["scan_records_processed"] == N_ITEMS
    await assert_collection_equals(shoal, table)


async def test_an_export_gone_after_a_restart_is_loaded_anew_from_its_first_file(
        moto_server, table, table_name, bucket, shoal: ShoalProcess):
    """Files of an export applied, SIGKILL, and the export is gone (expired) at the restart: the
    retry takes a new export and reads every one of its files, not only those the old one had
    left; the table changed meanwhile, so the new files hold other items."""
    with ExportDouble(moto_server, real_layout=True, files=4) as double:
        double.block_files("/data/")
        await start_export_collection(shoal, double.url, table_name, bucket)
        await wait_until(lambda: sum(n for key, n in double.gets.items() if "/data/" in key) == 4, 30, 0.05, "four GETs")
        double.block_files(sorted(key for key in double.gets if "/data/" in key)[2])
        await wait_until(lambda: len(from_ranges(saved_checkpoint(shoal)["scan"]["export"].get("done", []))) == 3,
                         30, 0.05, "three files applied", describe=lambda: saved_checkpoint(shoal))
        shoal.kill()
        double.forget_exports()
        double.unblock_files()
        rng = random.Random(4)
        Dynamo(moto_server).batch_write(table_name, [make_item(rng, 20_000 + i) for i in range(40)])
        shoal.start()
        await shoal.wait_ready(COLL, timeout=60)
        assert double.exports_started == 2
    model = table_model(moto_server, table_name)
    assert source(await shoal.get_collection(COLL))["dynamodb"]["status"]["scan_records_processed"] == len(model)
    await assert_collection_equals(shoal, model)


async def test_the_stream_is_replayed_from_the_exports_point_in_time(
        moto_server, table, table_name, bucket, shoal: ShoalProcess):
    """DynamoDB may export the table as of a time before it was asked: the stream's changes
    since that time are not in the files, so the replay must keep them."""
    with ExportDouble(moto_server, real_layout=True) as double:
        double.export_time_lag_s = 600
        await start_export_collection(shoal, double.url, table_name, bucket)
        await shoal.wait_ready(COLL, timeout=60)
    scan = saved_checkpoint(shoal)["scan"]
    exported = datetime.fromisoformat(scan["export_time"]).timestamp()
    assert exported <= datetime.fromisoformat(scan["start_time"]).timestamp() - 590, scan
    now_us = int(time.time() * 1_000_000)
    meta = {"table": table_name, "event": "MODIFY", "sequence_number": "1"}
    changes = [Change("after the export", None, now_us - 300_000_000, meta),
               Change("before the export", None, now_us - 900_000_000, meta)]
    assert [c.id for c in _after_bulk_load_began(changes, saved_checkpoint(shoal))] == ["after the export"]


async def test_a_failing_export_is_not_started_again_and_again(moto_server, table, table_name, bucket, shoal: ShoalProcess):
    """An export is billed by the table's size: after a failed one the next starts at once, and
    after that only minutes later (EXPORT_RETRY_S), whatever the pipeline's own retries; the
    status says why it failed and when the next one starts."""
    with ExportDouble(moto_server) as double:
        double.fail_exports = ("S3NoSuchBucket", "The specified bucket does not exist")
        await start_export_collection(shoal, double.url, table_name, bucket)

        async def waiting():
            health = source(await shoal.get_collection(COLL))["status"]
            return health if "the next one starts at" in (health["message"] or "") else None
        health = await wait_until(waiting, 30, 0.1, "the export's failure", describe=lambda: shoal.get_collection(COLL))
        assert "S3NoSuchBucket: The specified bucket does not exist" in health["message"], health
        assert "Export 2 of the table failed" in health["message"], health
        retries = health["retries"]
        await asyncio.sleep(6)  # the pipeline retries after 1, 2, 4 s ...
        assert source(await shoal.get_collection(COLL))["status"]["retries"] > retries
        assert double.exports_started == 2
