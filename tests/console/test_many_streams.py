"""1,000 streams: the streams page gets a page of them from ONE list call per refresh (never a
request per stream), the broker filtering and paging. The time to the first full table, and the
list call's own time (a fresh computation and a shared one), are printed, not asserted."""
from __future__ import annotations

import http.client
import json
import time

import pytest
from playwright.sync_api import expect

STREAMS = 1000


def _create_streams(proc, n: int) -> None:
    conn = http.client.HTTPConnection(proc.host, proc.http_port, timeout=30)   # one kept-alive connection
    try:
        for i in range(n):
            body = json.dumps({"name": f"bulk_{i:04d}", "partitions": 1 + i % 3}).encode()
            conn.request("POST", "/console/api/streams", body, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            assert resp.status == 201, resp.read()
            resp.read()
    finally:
        conn.close()


@pytest.mark.slow
def test_streams_page_lists_1000_streams_with_one_request(console_broker, new_tab):
    _create_streams(console_broker, STREAMS)
    tab = new_tab(console_broker)
    began = time.perf_counter()
    page = tab.open("streams")
    expect(page.locator("#stream-count")).to_have_text(f"{STREAMS:,} streams")
    shown = time.perf_counter() - began
    expect(page.locator("#streams tbody tr")).to_have_count(100)   # a page of rows, not 1,000
    expect(page.locator("#stream-page")).to_have_text("page 1 of 10")
    print(f"\nstreams page: {STREAMS} streams listed {shown * 1000:.0f} ms after navigation")

    page.click("#next-streams")
    expect(page.locator("#streams tbody tr").first).to_have_attribute("data-stream", "bulk_0100")
    page.fill("#stream-filter", "bulk_09")
    expect(page.locator("#stream-count")).to_have_text(f"{STREAMS:,} streams, 100 shown")
    expect(page.locator("#streams tbody tr").first).to_have_attribute("data-stream", "bulk_0900")
    row = page.locator("#streams tr[data-stream='bulk_0905']")
    expect(row.locator("td").nth(1)).to_have_text("3")       # 1 + 905 % 3 partitions
    assert any("filter=bulk_09" in r for r in tab.requests)   # filtered by the broker
    page.wait_for_timeout(2500)   # let the page poll again: still one list call per refresh
    tab.shot("streams-1000")

    api = [r for r in tab.requests if "/console/api/" in r]
    lists = [r for r in api if r.split("?")[0].endswith("/console/api/streams")]
    per_stream = [r for r in api if "/console/api/streams/" in r]
    print(f"console API requests: {len(api)} ({len(lists)} stream lists, {len(per_stream)} per stream)")
    assert per_stream == []
    assert 1 <= len(lists) <= len(api)
    assert {r.split("?")[0].rsplit("/", 1)[-1] for r in api} <= {"streams", "projects"}

    page.close()   # no more polls: the calls below are the only ones
    conn = http.client.HTTPConnection(console_broker.host, console_broker.http_port, timeout=30)
    try:
        took = []
        for _ in range(2):
            time.sleep(1.2)   # past the shared answer's second: the first call computes afresh
            began = time.perf_counter()
            conn.request("GET", "/console/api/streams?limit=100")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["total"] == STREAMS
            took.append(time.perf_counter() - began)
        began = time.perf_counter()
        conn.request("GET", "/console/api/streams?limit=100&offset=900")
        resp = conn.getresponse()
        resp.read()
        shared = time.perf_counter() - began
    finally:
        conn.close()
    print(f"list call for {STREAMS} streams: {took[0] * 1000:.0f} / {took[1] * 1000:.0f} ms computed, "
          f"{shared * 1000:.0f} ms from the shared answer")
