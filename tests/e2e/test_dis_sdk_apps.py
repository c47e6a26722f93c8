"""Consumer apps, checkpoints and consumer state through the unmodified official DIS SDK
(`huaweicloudsdkdis` v2) against a real broker (shared/spec/dis-api.md sections 2.9, 2.10, 4, 8.1).

The shared broker is used by other tests at the same time, so every app and stream name here is
unique and listings are read from a start name of our own.
"""
from __future__ import annotations

import base64
import re
import time
import uuid
from contextlib import contextmanager
from typing import Iterator

import pytest
from conftest import make_dis_client
from huaweicloudsdkcore.exceptions.exceptions import ClientRequestException
from huaweicloudsdkdis.v2 import (
    CommitCheckpointReq,
    CommitCheckpointRequest,
    CreateAppReq,
    CreateAppRequest,
    CreateStreamReq,
    CreateStreamRequest,
    DeleteAppRequest,
    DeleteCheckpointRequest,
    DeleteStreamRequest,
    ListAppRequest,
    PutRecordsRequest,
    PutRecordsRequestEntry,
    SendRecordsRequest,
    ShowAppRequest,
    ShowCheckpointRequest,
    ShowConsumerStateRequest,
    ShowStreamRequest,
)

REQUEST_ID = re.compile(r"[0-9a-f]{32}")
LAST_READ = "LAST_READ"


# -- helpers -----------------------------------------------------------------------------------

@pytest.fixture
def app_name() -> str:
    return f"app-{uuid.uuid4().hex[:12]}"


@contextmanager
def dis_error(code: str, status: int = 400) -> Iterator[list[ClientRequestException]]:
    """The block must raise the SDK's ClientRequestException with this status and DIS code."""
    caught: list[ClientRequestException] = []
    with pytest.raises(ClientRequestException) as info:
        yield caught
    exc = info.value
    caught.append(exc)
    assert (exc.status_code, exc.error_code) == (status, code), (exc.status_code, exc.error_code, exc.error_msg)
    assert exc.error_msg
    assert exc.request_id and REQUEST_ID.fullmatch(exc.request_id), exc.request_id


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def create_stream(client, name: str, partitions: int) -> None:  # type: ignore[no-untyped-def]
    resp = client.create_stream(CreateStreamRequest(body=CreateStreamReq(stream_name=name,
                                                                         partition_count=partitions)))
    assert resp.status_code == 201


def write(client, name: str, partition: str, count: int) -> list[str]:  # type: ignore[no-untyped-def]
    """`count` records into one partition; their sequence numbers."""
    resp = client.send_records(SendRecordsRequest(body=PutRecordsRequest(stream_name=name, records=[
        PutRecordsRequestEntry(data=base64.b64encode(b"r%d" % i).decode(), partition_id=partition)
        for i in range(count)])))
    assert resp.failed_record_count == 0
    return [r.sequence_number for r in resp.records]


def create_app(client, name: str):  # type: ignore[no-untyped-def]
    return client.create_app(CreateAppRequest(body=CreateAppReq(app_name=name)))


def commit(client, app: str, stream: str, partition: str, seq: str,  # type: ignore[no-untyped-def]
           metadata: str | None = None, checkpoint_type: str = LAST_READ):
    return client.commit_checkpoint(CommitCheckpointRequest(body=CommitCheckpointReq(
        app_name=app, checkpoint_type=checkpoint_type, stream_name=stream, partition_id=partition,
        sequence_number=seq, metadata=metadata)))


def show_checkpoint(client, app: str, stream: str, partition: str):  # type: ignore[no-untyped-def]
    return client.show_checkpoint(ShowCheckpointRequest(stream_name=stream, partition_id=partition, app_name=app,
                                                        checkpoint_type=LAST_READ))


def consumer_state(client, app: str, stream: str, limit: int = 10,  # type: ignore[no-untyped-def]
                   start: str | None = None):
    # the shape spec 8.1 captured: checkpoint_type and limit (start_partition_id when paging)
    return client.show_consumer_state(ShowConsumerStateRequest(app_name=app, stream_name=stream,
                                                               checkpoint_type=LAST_READ, limit=limit,
                                                               start_partition_id=start))


# -- apps --------------------------------------------------------------------------------------

def test_app_create_show_list_delete(dis_client, app_name):
    before = now_ms()
    resp = create_app(dis_client, app_name)
    assert resp.status_code == 201
    after = now_ms()

    shown = dis_client.show_app(ShowAppRequest(app_name=app_name))
    assert shown.status_code == 200
    assert shown.app_name == app_name
    assert isinstance(shown.app_id, str) and shown.app_id
    assert before <= shown.create_time <= after
    assert shown.commit_checkpoint_stream_names == []

    # listing from a start name just before ours (exclusive) finds it first
    listed = dis_client.list_app(ListAppRequest(limit=1, start_app_name=app_name[:-1]))
    assert listed.status_code == 200
    assert [a.app_name for a in listed.apps] == [app_name]
    assert listed.apps[0].app_id == shown.app_id and listed.apps[0].create_time == shown.create_time
    assert listed.total_number >= 1

    assert dis_client.delete_app(DeleteAppRequest(app_name=app_name)).status_code == 204
    with dis_error("DIS.4332") as caught:
        dis_client.show_app(ShowAppRequest(app_name=app_name))
    assert app_name in caught[0].error_msg
    after_delete = dis_client.list_app(ListAppRequest(limit=1, start_app_name=app_name[:-1]))
    assert app_name not in [a.app_name for a in after_delete.apps]


def test_list_app_pages_in_name_order(start_broker):
    client = make_dis_client(start_broker("--store", "memory").http_url)  # its own broker: exact totals
    names = [f"app-{i:02d}" for i in range(7)]
    for name in reversed(names):  # created out of order: the listing sorts
        create_app(client, name)
    first = client.list_app(ListAppRequest())
    assert (first.total_number, [a.app_name for a in first.apps], first.has_more_app) == (7, names, False)

    pages, start = [], None
    while True:
        page = client.list_app(ListAppRequest(limit=3, start_app_name=start))
        assert page.total_number == 7
        pages.append(([a.app_name for a in page.apps], page.has_more_app))
        if not page.has_more_app:
            break
        start = page.apps[-1].app_name
    assert pages == [(names[0:3], True), (names[3:6], True), (names[6:7], False)]
    # the start name is exclusive and need not exist
    page = client.list_app(ListAppRequest(limit=2, start_app_name="app-03x"))
    assert ([a.app_name for a in page.apps], page.has_more_app) == (["app-04", "app-05"], True)
    page = client.list_app(ListAppRequest(limit=3, start_app_name="app-03"))
    assert ([a.app_name for a in page.apps], page.has_more_app) == (names[4:7], False)
    page = client.list_app(ListAppRequest(limit=100, start_app_name="app-06"))
    assert (page.apps, page.has_more_app, page.total_number) == ([], False, 7)
    # more than the default page of 10
    for i in range(7, 12):
        create_app(client, f"app-{i:02d}")
    page = client.list_app(ListAppRequest())
    assert (len(page.apps), page.has_more_app, page.total_number) == (10, True, 12)


def test_list_app_default_and_limits(dis_client, app_name):
    create_app(dis_client, app_name)
    page = dis_client.list_app(ListAppRequest())
    assert page.status_code == 200 and len(page.apps) <= 10  # documented default page size
    assert len(page.apps) == min(10, page.total_number)
    assert page.has_more_app is (page.total_number > 10)
    for limit in (0, 101):
        with dis_error("DIS.4200"):
            dis_client.list_app(ListAppRequest(limit=limit))
    assert len(dis_client.list_app(ListAppRequest(limit=100)).apps) == min(100, page.total_number)


def test_app_errors(dis_client, app_name, stream_name):
    create_app(dis_client, app_name)
    with dis_error("DIS.4330") as caught:
        create_app(dis_client, app_name)
    assert app_name in caught[0].error_msg
    missing = app_name + "-missing"
    with dis_error("DIS.4332"):
        dis_client.show_app(ShowAppRequest(app_name=missing))
    with dis_error("DIS.4332"):
        dis_client.delete_app(DeleteAppRequest(app_name=missing))
    for bad in ("has space", "x" * 201, "dot.ted"):
        with dis_error("DIS.4200"):
            create_app(dis_client, bad)
    assert create_app(dis_client, "y" * 200).status_code == 201  # 200 characters is allowed
    dis_client.delete_app(DeleteAppRequest(app_name="y" * 200))
    with dis_error("DIS.4301"):
        dis_client.list_app(ListAppRequest(stream_name=stream_name))  # no such stream


# -- checkpoints -------------------------------------------------------------------------------

def test_commit_and_show_checkpoint(dis_client, app_name, stream_name):
    create_stream(dis_client, stream_name, 2)
    assert write(dis_client, stream_name, "0", 5) == ["0", "1", "2", "3", "4"]
    create_app(dis_client, app_name)

    resp = commit(dis_client, app_name, stream_name, "0", "3", metadata="offset note ✓")
    assert resp.status_code == 201
    got = show_checkpoint(dis_client, app_name, stream_name, "0")
    assert got.status_code == 200
    assert (got.sequence_number, got.metadata) == ("3", "offset note ✓")
    # both partition id forms name the same partition
    got = show_checkpoint(dis_client, app_name, stream_name, "shardId-0000000000")
    assert got.sequence_number == "3"

    # a later commit replaces it, and may move backwards within the valid range
    commit(dis_client, app_name, stream_name, "shardId-0000000000", "1")
    got = show_checkpoint(dis_client, app_name, stream_name, "0")
    assert (got.sequence_number, got.metadata) == ("1", "")
    commit(dis_client, app_name, stream_name, "0", "4", metadata="m" * 1000)  # the last record; 1000 chars ok
    assert show_checkpoint(dis_client, app_name, stream_name, "0").metadata == "m" * 1000

    # a partition without a checkpoint: 200 and no sequence_number (spec 2.10 recommendation)
    none = show_checkpoint(dis_client, app_name, stream_name, "1")
    assert none.status_code == 200 and none.sequence_number is None

    shown = dis_client.show_app(ShowAppRequest(app_name=app_name))
    assert shown.commit_checkpoint_stream_names == [stream_name]
    listed = dis_client.list_app(ListAppRequest(stream_name=stream_name, limit=100))
    assert [a.app_name for a in listed.apps] == [app_name]
    assert listed.apps[0].commit_checkpoint_stream_names == [stream_name]


def test_checkpoints_are_per_app_and_per_stream(dis_client, app_name, stream_name):
    other_stream = stream_name + "-b"
    for name in (stream_name, other_stream):
        create_stream(dis_client, name, 1)
        write(dis_client, name, "0", 3)
    other_app = app_name + "-b"
    create_app(dis_client, app_name)
    create_app(dis_client, other_app)
    commit(dis_client, app_name, stream_name, "0", "2")
    commit(dis_client, other_app, stream_name, "0", "0")
    commit(dis_client, app_name, other_stream, "0", "1")
    assert show_checkpoint(dis_client, app_name, stream_name, "0").sequence_number == "2"
    assert show_checkpoint(dis_client, other_app, stream_name, "0").sequence_number == "0"
    assert show_checkpoint(dis_client, app_name, other_stream, "0").sequence_number == "1"
    assert show_checkpoint(dis_client, other_app, other_stream, "0").sequence_number is None
    assert sorted(dis_client.show_app(ShowAppRequest(app_name=app_name)).commit_checkpoint_stream_names) == \
        sorted([stream_name, other_stream])
    listed = dis_client.list_app(ListAppRequest(stream_name=other_stream, limit=100))
    assert [a.app_name for a in listed.apps] == [app_name]


def test_delete_checkpoint_one_partition_or_all(dis_client, app_name, stream_name):
    create_stream(dis_client, stream_name, 3)
    for p in ("0", "1", "2"):
        write(dis_client, stream_name, p, 2)
    create_app(dis_client, app_name)
    for p in ("0", "1", "2"):
        commit(dis_client, app_name, stream_name, p, "1")

    resp = dis_client.delete_checkpoint(DeleteCheckpointRequest(stream_name=stream_name, app_name=app_name,
                                                                checkpoint_type=LAST_READ, partition_id="1"))
    assert resp.status_code == 204
    assert [show_checkpoint(dis_client, app_name, stream_name, p).sequence_number for p in ("0", "1", "2")] == \
        ["1", None, "1"]
    # deleting what is not there is not an error
    dis_client.delete_checkpoint(DeleteCheckpointRequest(stream_name=stream_name, app_name=app_name,
                                                         checkpoint_type=LAST_READ, partition_id="1"))

    # without partition_id: every partition of that stream
    resp = dis_client.delete_checkpoint(DeleteCheckpointRequest(stream_name=stream_name, app_name=app_name,
                                                                checkpoint_type=LAST_READ))
    assert resp.status_code == 204
    assert [show_checkpoint(dis_client, app_name, stream_name, p).sequence_number for p in ("0", "1", "2")] == \
        [None, None, None]
    assert dis_client.show_app(ShowAppRequest(app_name=app_name)).commit_checkpoint_stream_names == []
    with dis_error("DIS.4375"):
        consumer_state(dis_client, app_name, stream_name)


def test_checkpoint_errors(dis_client, app_name, stream_name):
    create_stream(dis_client, stream_name, 2)
    write(dis_client, stream_name, "0", 3)  # partition 0 holds 0..2, partition 1 is empty
    create_app(dis_client, app_name)

    with dis_error("DIS.4224") as caught:
        commit(dis_client, app_name, stream_name, "0", "3")  # one past the last record
    assert "[3]" in caught[0].error_msg and "[0]" in caught[0].error_msg and "[2]" in caught[0].error_msg
    with dis_error("DIS.4224"):
        commit(dis_client, app_name, stream_name, "0", "9223372036854775807")
    with dis_error("DIS.4224"):
        commit(dis_client, app_name, stream_name, "1", "0")  # nothing was written there
    with dis_error("DIS.4216"):
        commit(dis_client, app_name, stream_name, "0", "-1")
    with dis_error("DIS.4216"):
        commit(dis_client, app_name, stream_name, "0", "abc")
    with dis_error("DIS.4301") as caught:
        commit(dis_client, app_name, stream_name + "-nope", "0", "0")
    assert stream_name + "-nope" in caught[0].error_msg
    with dis_error("DIS.4332"):
        commit(dis_client, app_name + "-nope", stream_name, "0", "0")
    with dis_error("DIS.4302"):
        commit(dis_client, app_name, stream_name, "2", "0")
    with dis_error("DIS.4201"):
        commit(dis_client, app_name, stream_name, "part-zero", "0")
    for kind in ("LAST_COMMIT", "last_read"):
        with dis_error("DIS.4200"):
            commit(dis_client, app_name, stream_name, "0", "0", checkpoint_type=kind)
    with dis_error("DIS.4200"):
        commit(dis_client, app_name, stream_name, "0", "0", metadata="m" * 1001)

    with dis_error("DIS.4301"):
        show_checkpoint(dis_client, app_name, stream_name + "-nope", "0")
    with dis_error("DIS.4332"):
        show_checkpoint(dis_client, app_name + "-nope", stream_name, "0")
    with dis_error("DIS.4200"):
        dis_client.show_checkpoint(ShowCheckpointRequest(stream_name=stream_name, partition_id="0",
                                                         app_name=app_name, checkpoint_type="NEWEST"))
    with dis_error("DIS.4332"):
        dis_client.delete_checkpoint(DeleteCheckpointRequest(stream_name=stream_name, app_name=app_name + "-nope",
                                                             checkpoint_type=LAST_READ))
    with dis_error("DIS.4301"):
        dis_client.delete_checkpoint(DeleteCheckpointRequest(stream_name=stream_name + "-nope", app_name=app_name,
                                                             checkpoint_type=LAST_READ))
    # none of the refused commits left anything behind
    assert show_checkpoint(dis_client, app_name, stream_name, "0").sequence_number is None


# -- consumer state ----------------------------------------------------------------------------

def test_consumer_state(dis_client, app_name, stream_name):
    create_stream(dis_client, stream_name, 3)
    write(dis_client, stream_name, "0", 5)
    write(dis_client, stream_name, "1", 2)   # partition 2 stays empty
    create_app(dis_client, app_name)
    with dis_error("DIS.4375") as caught:    # nothing committed on this stream yet
        consumer_state(dis_client, app_name, stream_name)
    assert app_name in caught[0].error_msg and stream_name in caught[0].error_msg

    commit(dis_client, app_name, stream_name, "0", "3", metadata="m")
    state = consumer_state(dis_client, app_name, stream_name)
    assert state.status_code == 200
    assert (state.app_name, state.stream_name, state.has_more) == (app_name, stream_name, False)
    rows = {s.partition_id: s for s in state.partition_consuming_states}
    assert list(rows) == ["shardId-0000000000", "shardId-0000000001", "shardId-0000000002"]
    p0, p1, p2 = rows.values()
    assert (p0.sequence_number, p0.earliest_offset, p0.latest_offset) == ("3", 0, 4)
    assert (p1.sequence_number, p1.earliest_offset, p1.latest_offset) == (None, 0, 1)
    assert (p2.sequence_number, p2.earliest_offset) == (None, 0)
    assert p2.latest_offset < p2.earliest_offset  # empty: no latest record
    assert all(s.checkpoint_type == LAST_READ and s.status for s in rows.values())

    # consumer state follows new writes and new commits
    write(dis_client, stream_name, "0", 2)
    commit(dis_client, app_name, stream_name, "1", "1")
    rows = {s.partition_id: s for s in consumer_state(dis_client, app_name, stream_name).partition_consuming_states}
    assert (rows["shardId-0000000000"].sequence_number, rows["shardId-0000000000"].latest_offset) == ("3", 6)
    assert rows["shardId-0000000001"].sequence_number == "1"

    # paging: limit and an exclusive start partition, in either id form
    page = consumer_state(dis_client, app_name, stream_name, limit=2)
    assert [s.partition_id for s in page.partition_consuming_states] == ["shardId-0000000000", "shardId-0000000001"]
    assert page.has_more is True
    page = consumer_state(dis_client, app_name, stream_name, limit=2, start="shardId-0000000001")
    assert [s.partition_id for s in page.partition_consuming_states] == ["shardId-0000000002"]
    assert page.has_more is False
    page = consumer_state(dis_client, app_name, stream_name, limit=1, start="0")
    assert [s.partition_id for s in page.partition_consuming_states] == ["shardId-0000000001"]
    assert page.has_more is True
    # past the last partition: an empty page, as DescribeStream's paging gives
    for start in ("shardId-0000000002", "shardId-0000000007"):
        page = consumer_state(dis_client, app_name, stream_name, limit=2, start=start)
        assert (page.partition_consuming_states, page.has_more) == ([], False)
    assert dis_client.show_stream(ShowStreamRequest(stream_name=stream_name,
                                                    start_partition_id="shardId-0000000007")).partitions == []


def test_consumer_state_errors(dis_client, app_name, stream_name):
    create_stream(dis_client, stream_name, 1)
    write(dis_client, stream_name, "0", 1)
    create_app(dis_client, app_name)
    commit(dis_client, app_name, stream_name, "0", "0")
    with dis_error("DIS.4332"):
        consumer_state(dis_client, app_name + "-nope", stream_name)
    with dis_error("DIS.4301"):
        consumer_state(dis_client, app_name, stream_name + "-nope")
    with dis_error("DIS.4200"):
        dis_client.show_consumer_state(ShowConsumerStateRequest(app_name=app_name, stream_name=stream_name,
                                                                checkpoint_type="LATEST"))
    for limit in (0, 1001):
        with dis_error("DIS.4200"):
            consumer_state(dis_client, app_name, stream_name, limit=limit)
    with dis_error("DIS.4201"):
        consumer_state(dis_client, app_name, stream_name, start="bogus")
    # the SDK's own default (no limit) works too
    state = dis_client.show_consumer_state(ShowConsumerStateRequest(app_name=app_name, stream_name=stream_name,
                                                                    checkpoint_type=LAST_READ))
    assert [s.sequence_number for s in state.partition_consuming_states] == ["0"]


# -- lifetimes ---------------------------------------------------------------------------------

def test_deleting_the_app_deletes_its_checkpoints(dis_client, app_name, stream_name):
    create_stream(dis_client, stream_name, 1)
    write(dis_client, stream_name, "0", 2)
    create_app(dis_client, app_name)
    commit(dis_client, app_name, stream_name, "0", "1")
    old_id = dis_client.show_app(ShowAppRequest(app_name=app_name)).app_id
    dis_client.delete_app(DeleteAppRequest(app_name=app_name))
    with dis_error("DIS.4332"):
        show_checkpoint(dis_client, app_name, stream_name, "0")

    create_app(dis_client, app_name)  # the name is free again; the new app starts clean
    shown = dis_client.show_app(ShowAppRequest(app_name=app_name))
    assert shown.app_id != old_id and shown.commit_checkpoint_stream_names == []
    assert show_checkpoint(dis_client, app_name, stream_name, "0").sequence_number is None
    with dis_error("DIS.4375"):
        consumer_state(dis_client, app_name, stream_name)


def test_a_recreated_stream_does_not_inherit_checkpoints(dis_client, app_name, stream_name):
    create_stream(dis_client, stream_name, 1)
    write(dis_client, stream_name, "0", 3)
    create_app(dis_client, app_name)
    commit(dis_client, app_name, stream_name, "0", "2")
    dis_client.delete_stream(DeleteStreamRequest(stream_name=stream_name))
    assert dis_client.show_app(ShowAppRequest(app_name=app_name)).commit_checkpoint_stream_names == []

    create_stream(dis_client, stream_name, 1)
    write(dis_client, stream_name, "0", 3)
    assert show_checkpoint(dis_client, app_name, stream_name, "0").sequence_number is None
    with dis_error("DIS.4375"):
        consumer_state(dis_client, app_name, stream_name)


def test_apps_and_checkpoints_are_per_project(broker, app_name, stream_name):
    """The same app and stream names in two projects: two apps, two streams, separate checkpoints."""
    a = make_dis_client(broker.http_url, f"proj-{uuid.uuid4().hex[:12]}")
    b = make_dis_client(broker.http_url, f"proj-{uuid.uuid4().hex[:12]}")
    for client in (a, b):
        create_stream(client, stream_name, 1)
        write(client, stream_name, "0", 3)
        assert client.create_app(CreateAppRequest(body=CreateAppReq(app_name=app_name))).status_code == 201
    commit = CommitCheckpointReq(app_name=app_name, checkpoint_type=LAST_READ, stream_name=stream_name,
                                 partition_id="0", sequence_number="2", metadata="a's")
    assert a.commit_checkpoint(CommitCheckpointRequest(body=commit)).status_code == 201
    got_a = a.show_checkpoint(ShowCheckpointRequest(stream_name=stream_name, app_name=app_name,
                                                    checkpoint_type=LAST_READ, partition_id="0"))
    got_b = b.show_checkpoint(ShowCheckpointRequest(stream_name=stream_name, app_name=app_name,
                                                    checkpoint_type=LAST_READ, partition_id="0"))
    assert (got_a.sequence_number, got_a.metadata) == ("2", "a's")
    assert got_b.sequence_number is None  # B's app has committed nothing
    assert [x.app_name for x in a.list_app(ListAppRequest(limit=100)).apps] == [app_name]
    assert a.delete_app(DeleteAppRequest(app_name=app_name)).status_code == 204
    with dis_error("DIS.4332"):
        a.show_app(ShowAppRequest(app_name=app_name))
    assert b.show_app(ShowAppRequest(app_name=app_name)).app_name == app_name
