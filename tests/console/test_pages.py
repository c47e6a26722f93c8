"""Each console page in headless Chromium against a real broker process (RocksDB): create a stream
through the form, put a record through the form and see it in the partition browser (JSON, text,
hex) and the live tail, rate charts on the stream page, an app's lag per partition, a streaming
query's rows arriving while records are put (and its cancel), a generator source's status and
counters (stop, start), and the error banner. A screenshot of each page is saved."""
from __future__ import annotations

import json
import re
import shutil
import threading
import uuid

from playwright.sync_api import expect

from .conftest import ARTIFACTS, http


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def _put(proc, stream: str, text: str, partition: int = 0) -> None:
    status, body = http(proc, "POST", f"/console/api/streams/{stream}/records",
                        {"data": text, "partition_id": partition})
    assert status == 201, body


def test_create_put_browse_and_tail(console_broker, new_tab):
    stream = _name("orders")
    tab = new_tab(console_broker)
    page = tab.open("streams")
    page.fill("#create-stream input[name=name]", stream)
    page.fill("#create-stream input[name=partitions]", "2")
    page.click("#create-stream button[type=submit]")
    row = page.locator(f"#streams tr[data-stream='{stream}']")
    expect(row).to_contain_text("2")

    # the live tail in a second tab of the same browser, started before the record is put
    tail = new_tab(console_broker, tab.page.context)
    tail_page = tail.open(f"tail/{stream}")
    expect(tail_page.locator("#tail-form select[name=partition] option")).to_have_count(2)
    tail_page.select_option("#tail-form select[name=partition]", "1")
    tail_page.click("#tail-start")
    expect(tail_page.locator("#tail-status")).to_contain_text("from sequence number 0")

    tab.go(f"put/{stream}")
    page.fill("#put-form input[name=partition]", "1")
    page.fill("#put-form textarea[name=data]", '{"order": 17, "items": ["tea", "milk"]}')
    page.click("#put-form button[type=submit]")
    expect(page.locator("#put-result")).to_contain_text("Stored in partition 1 at sequence number 0")
    tab.shot("put")

    expect(tail_page.locator("#tail tbody tr")).to_have_count(1)
    expect(tail_page.locator("#tail tbody pre")).to_contain_text('"order": 17')
    _put(console_broker, stream, "plain words", partition=1)
    expect(tail_page.locator("#tail tbody tr")).to_have_count(2)
    expect(tail_page.locator("#tail tbody tr").first).to_contain_text("plain words")
    tail.shot("tail")
    tail_page.click("#tail-stop")

    _put(console_broker, stream, "third", partition=1)
    tab.go(f"browse/{stream}")
    expect(page.locator("#browse-form select[name=partition] option")).to_have_count(2)
    page.select_option("#browse-form select[name=partition]", "1")
    page.select_option("#browse-form select[name=type]", "TRIM_HORIZON")
    page.click("#browse-form button[type=submit]")
    rows = page.locator("#records tbody tr")
    expect(rows).to_have_count(3)
    expect(rows.nth(0).locator("pre.data-json")).to_have_text(json.dumps({"order": 17, "items": ["tea", "milk"]},
                                                                          indent=2))
    expect(rows.nth(1).locator("pre.data-text")).to_have_text("plain words")
    tab.shot("browse")
    page.check("#browse-form input[name=hex]")
    expect(rows.nth(1).locator("pre.data-hex")).to_contain_text("70 6c 61 69 6e 20 77 6f")   # "plain wo"
    page.uncheck("#browse-form input[name=hex]")

    # the other cursor types
    page.select_option("#browse-form select[name=type]", "AFTER_SEQUENCE_NUMBER")
    page.fill("#browse-form input[name=seq]", "0")
    page.click("#browse-form button[type=submit]")
    expect(rows).to_have_count(2)
    expect(rows.nth(0)).to_contain_text("plain words")
    page.select_option("#browse-form select[name=type]", "AT_SEQUENCE_NUMBER")
    page.fill("#browse-form input[name=seq]", "2")
    page.click("#browse-form button[type=submit]")
    expect(rows).to_have_count(1)
    expect(rows.nth(0)).to_contain_text("third")
    page.select_option("#browse-form select[name=type]", "LATEST")
    page.click("#browse-form button[type=submit]")
    expect(page.locator("#browse-status")).to_contain_text("0 records")
    page.select_option("#browse-form select[name=type]", "AT_TIMESTAMP")
    page.fill("#browse-form input[name=time]", "2000-01-01T00:00:00")   # older than the retention: refused
    tab.allowed_statuses.add(400)
    page.click("#browse-form button[type=submit]")
    expect(page.locator("#banner")).to_be_visible()
    expect(page.locator("#banner-text")).to_contain_text("TIMESTAMP_EXPIRED")

    # paging: one record a page, the next page through the returned cursor
    page.select_option("#browse-form select[name=type]", "TRIM_HORIZON")
    page.fill("#browse-form input[name=limit]", "1")
    page.click("#browse-form button[type=submit]")
    expect(rows).to_have_count(1)
    expect(rows.nth(0)).to_contain_text('"order": 17')
    page.click("#next-page")
    expect(rows.nth(0)).to_contain_text("plain words")


def test_stream_page_partitions_and_rate_charts(console_broker, new_tab):
    stream = _name("metrics")
    assert http(console_broker, "POST", "/console/api/streams", {"name": stream, "partitions": 3})[0] == 201
    tab = new_tab(console_broker)
    page = tab.open(f"stream/{stream}")
    parts = page.locator("#partitions tbody tr")
    expect(parts).to_have_count(3)
    expect(parts.nth(0)).to_contain_text("ACTIVE")
    expect(parts.nth(0)).to_contain_text("0 \u2013 3074457345618258602")   # the hash range
    for i in range(5):
        _put(console_broker, stream, f"r{i}", partition=2)
    expect(parts.nth(2).locator("td").nth(5)).to_have_text("5")   # records held
    expect(parts.nth(2).locator("td").nth(4)).to_have_text("4")   # last seq
    # partition 2's colour (green, as in the charts) from a CSS class: the CSP allows no inline style
    expect(parts.nth(2).locator(".swatch")).to_have_css("color", "rgb(6, 118, 71)")
    # the in-rate chart's scale rose above its floor of 1 rec/s, and partition 2's line (green) is drawn
    page.wait_for_function("Number(document.getElementById('chart-in').dataset.max) > 1")
    page.wait_for_function("""() => {
        const c = document.getElementById('chart-in');
        const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let green = 0;
        for (let i = 0; i < d.length; i += 4) {
            if (d[i + 3] > 128 && d[i + 1] > d[i] + 60 && d[i + 1] > d[i + 2] + 30) green++;
        }
        return green > 20;
    }""")
    tab.shot("stream")


def test_apps_page_shows_lag_per_partition(console_broker, new_tab):
    stream, app = _name("events"), _name("billing")
    assert http(console_broker, "POST", "/console/api/streams", {"name": stream, "partitions": 2})[0] == 201
    for i in range(4):
        _put(console_broker, stream, f"e{i}", partition=0)
    _put(console_broker, stream, "x", partition=1)
    tab = new_tab(console_broker)
    page = tab.open("apps")
    page.fill("#create-app input[name=name]", app)
    page.click("#create-app button[type=submit]")
    expect(page.locator("#apps")).to_contain_text(app)
    # a consumer commits a checkpoint through the DIS door: sequence 1 of partition 0 was read
    status, body = http(console_broker, "POST", "/v2/default/checkpoints",
                        {"app_name": app, "checkpoint_type": "LAST_READ", "stream_name": stream,
                         "partition_id": "shardId-0000000000", "sequence_number": "1"})
    assert status == 201, body
    page.click(f"#apps a:text('{app}')")
    table = page.locator(f"table.lag[data-stream='{stream}']")
    expect(table.locator("tbody tr")).to_have_count(2)
    expect(table.locator("tbody tr").nth(0).locator(".lag-value")).to_have_text("2")   # seqs 2 and 3
    expect(table.locator("tbody tr").nth(1).locator(".lag-value")).to_have_text("1")   # no checkpoint: all
    expect(page.locator("#app-lag")).to_contain_text("total lag 3")
    tab.shot("apps")
    # a poll of unchanged data keeps the reader's text selection (rows were rebuilt every 2 s)
    selected = page.evaluate("""() => {
        const cell = document.querySelector('#apps tbody td');
        getSelection().selectAllChildren(cell);
        return getSelection().toString(); }""")
    page.wait_for_timeout(2500)
    assert selected and page.evaluate("() => getSelection().toString()") == selected
    # deleting an app (and every checkpoint of it) takes two clicks, as a stream's
    row = page.locator("#apps tbody tr", has_text=app)
    row.locator("button:text('delete')").click()
    page.wait_for_timeout(2500)   # a refresh in between: still armed
    row.locator("button:text('confirm delete')").click()
    expect(page.locator("#apps")).not_to_contain_text(app)


def test_a_stream_page_stops_polling_once_its_stream_is_gone(console_broker, new_tab):
    stream = _name("doomed")
    assert http(console_broker, "POST", "/console/api/streams", {"name": stream, "partitions": 1})[0] == 201
    tab = new_tab(console_broker)
    tab.allowed_statuses.add(404)   # the one poll that finds the stream gone
    page = tab.open(f"stream/{stream}")
    expect(page.locator("main")).to_contain_text(stream)
    asked: list[str] = []
    page.on("request", lambda request: asked.append(request.url) if f"/streams/{stream}" in request.url else None)
    assert http(console_broker, "DELETE", f"/console/api/streams/{stream}")[0] in (200, 204)
    expect(page.locator("#banner")).to_contain_text("STREAM_NOT_FOUND")
    seen = len(asked)
    page.wait_for_timeout(3000)   # it polled every second for ever
    assert len(asked) == seen, asked[seen:]


def test_sql_rows_arrive_while_records_are_put_and_cancel(console_broker, new_tab):
    stream = _name("clicks")
    assert http(console_broker, "POST", "/console/api/streams", {"name": stream, "partitions": 1})[0] == 201
    tab = new_tab(console_broker)
    page = tab.open("sql")
    page.fill("#sql", f"select raw from {stream}")
    page.click("#sql-run")
    expect(page.locator("#sql-status")).to_contain_text("Running")
    expect(page.locator("#sql-rows thead th")).to_have_text(["raw"])
    rows = page.locator("#sql-rows tbody tr")
    for i in range(3):
        _put(console_broker, stream, f"click-{i}")
        expect(rows).to_have_count(i + 1)   # each row shows up while the query runs
        expect(rows.nth(i)).to_have_text(f"click-{i}")
    tab.shot("sql")
    page.click("#sql-cancel")
    expect(page.locator("#sql-status")).to_contain_text("Cancelled after 3 rows")
    status, queries = http(console_broker, "GET", "/api/v1beta2/queries")
    assert status == 200
    assert [q["status"] for q in queries if q["sql"] == f"select raw from {stream}"] == ["canceled"]

    # a bounded query ends by itself; a bad one is a banner with its catalogue reason
    page.fill("#sql", f"select count() as n from table({stream})")
    page.click("#sql-run")
    expect(page.locator("#sql-status")).to_contain_text("Query finished after 1 rows")
    expect(rows).to_have_text(["3"])
    tab.allowed_statuses.add(404)   # the Timeplus-style status of STREAM_NOT_FOUND
    page.fill("#sql", "select nope from nowhere")
    page.click("#sql-run")
    expect(page.locator("#banner-text")).to_contain_text("STREAM_NOT_FOUND")


def test_sources_page_status_counters_stop_start(console_broker, new_tab):
    stream = _name("iot")
    columns = [{"name": "device", "type": "string"}, {"name": "number", "type": "float64"},
               {"name": "time", "type": "datetime64(3)"}]
    assert http(console_broker, "POST", "/api/v1beta2/streams", {"name": stream, "columns": columns})[0] == 201
    status, source = http(console_broker, "POST", "/api/v1beta2/sources", {
        "name": f"gen_{stream}", "type": "stream_generator", "stream": stream,
        "properties": {"template": "iot", "interval": "50ms"}})
    assert status == 201, source
    tab = new_tab(console_broker)
    page = tab.open(f"stream/{stream}")   # a typed stream shows its columns
    expect(page.locator("#columns")).to_contain_text("device string, number float64, time datetime64(3)")
    tab.go("sources")
    row = page.locator(f"#sources tr[data-source='gen_{stream}']")
    expect(row.locator(".source-status")).to_have_text("running")
    expect(row).to_contain_text("stream_generator")
    page.wait_for_function("""name => {
        const cell = document.querySelector(`#sources tr[data-source='${name}'] .rows-written`);
        return cell && Number(cell.textContent.replace(/,/g, '')) >= 5;
    }""", arg=f"gen_{stream}")
    tab.shot("sources")
    row.locator("button:text('Stop')").click()
    expect(row.locator(".source-status")).to_have_text("stopped")
    row.locator("button:text('Start')").click()
    expect(row.locator(".source-status")).to_have_text("running")
    row.locator("button:text('Stop')").click()
    expect(row.locator(".source-status")).to_have_text("stopped")


class _Writer(threading.Thread):
    """Puts a small JSON record into a stream every 50 ms (both partitions) while in its `with`."""

    def __init__(self, proc, stream: str) -> None:
        super().__init__(daemon=True)
        self.proc, self.stream, self.count = proc, stream, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.05):
            _put(self.proc, self.stream, json.dumps({"sensor": self.count % 7, "n": self.count}), self.count % 2)
            self.count += 1

    def __enter__(self) -> _Writer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.done.set()
        self.join()


def test_streams_page_rates_banner_delete_and_screenshot(console_broker, new_tab):
    """The streams page with some traffic (its screenshot is docs/console.png), a refused create
    in the error banner, and a delete."""
    names = [_name(n) for n in ("payments", "sensor_readings", "audit_log", "clickstream")]
    for i, name in enumerate(names):
        assert http(console_broker, "POST", "/console/api/streams", {"name": name, "partitions": i + 1})[0] == 201
    tab = new_tab(console_broker)
    page = tab.open("streams")
    busy = names[1]
    written = _Writer(console_broker, busy)
    with written:   # writes go on until the page has sampled a rate (two polls apart)
        rate = page.locator(f"#streams tr[data-stream='{busy}'] td.rate")
        expect(rate).not_to_have_text(re.compile("^(\u2013|0\\.0)$"))
        path = tab.shot("streams")
        shutil.copyfile(path, ARTIFACTS / "console.png")   # the README's screenshot (docs/console.png), by hand
    expect(page.locator(f"#streams tr[data-stream='{busy}'] td").nth(2)).to_have_text(f"{written.count:,}")

    tab.allowed_statuses.add(400)
    page.fill("#create-stream input[name=name]", names[0])
    page.click("#create-stream button[type=submit]")
    expect(page.locator("#banner-text")).to_contain_text("STREAM_EXISTS")
    page.click("#banner-close")
    expect(page.locator("#banner")).to_be_hidden()

    row = page.locator(f"#streams tr[data-stream='{names[3]}']")
    row.locator("button:text('delete')").click()
    page.wait_for_timeout(2500)   # a refresh rebuilds the rows: the delete stays armed
    row.locator("button:text('confirm delete')").click()
    expect(row).to_have_count(0)
    assert http(console_broker, "GET", f"/console/api/streams/{names[3]}")[0] == 404


def test_project_picker_switches_namespace(console_broker, new_tab):
    stream = _name("elsewhere")
    status, _ = call_in(console_broker, "team_b", "POST", "/console/api/streams", {"name": stream, "partitions": 1})
    assert status == 201
    tab = new_tab(console_broker)
    page = tab.open("streams")
    expect(page.locator("#stream-count")).to_have_text(re.compile(r"^\d+ streams?$"))   # default's, listed
    expect(page.locator(f"#streams tr[data-stream='{stream}']")).to_have_count(0)
    expect(page.locator("#projects option[value='team_b']")).to_have_count(1)   # offered by the picker
    page.fill("#project", "team_b")
    page.dispatch_event("#project", "change")
    expect(page.locator("#stream-count")).to_have_text("1 stream")
    expect(page.locator(f"#streams tr[data-stream='{stream}']")).to_have_count(1)
    page.reload()   # kept for the tab
    expect(page.locator("#project")).to_have_value("team_b")
    expect(page.locator("#stream-count")).to_have_text("1 stream")


def call_in(proc, project: str, method: str, path: str, body=None):
    return http(proc, method, f"{path}?project={project}", body)


def test_a_malformed_address_is_a_banner_not_an_uncaught_error(console_broker, new_tab):
    tab = new_tab(console_broker)
    page = tab.open("stream/%E0%A4%A")
    expect(page.locator("#banner-text")).to_contain_text("This address cannot be read")
    tab.go("streams")   # and the console goes on
    expect(page.locator("#stream-count")).to_have_text(re.compile(r"^\d+ streams?$"))


def test_leaving_the_tail_while_from_now_is_asked_starts_nothing(console_broker, new_tab):
    stream = _name("leaving")
    assert http(console_broker, "POST", "/console/api/streams", {"name": stream, "partitions": 1})[0] == 201
    tab = new_tab(console_broker)
    page = tab.open(f"tail/{stream}")
    expect(page.locator("#tail-form select[name=partition] option")).to_have_count(1)
    held = []
    page.route(re.compile(rf".*/console/api/streams/{stream}\?.*"), lambda route: held.append(route))   # held
    page.click("#tail-start")
    for _ in range(100):
        if held:
            break
        page.wait_for_timeout(50)
    assert held, "the page did not ask for the partition's head"
    tab.go("apps")   # leave while it is asked
    expect(page.locator("#apps")).to_be_visible()
    held[0].continue_()
    page.wait_for_timeout(500)
    expect(page.locator("#banner")).to_be_hidden()
    assert not [r for r in tab.requests if "/sluice/v1/tail" in r]   # no tail was opened for a page gone


def test_sql_page_keeps_the_newest_1000_rows_of_a_big_result(console_broker, new_tab):
    from client import Client
    stream = _name("big")
    with Client(console_broker.grpc_target) as c:
        c.create_stream(stream, 1)
        for start in range(0, 2500, 500):
            c.put_records(stream, [f"r{i}".encode() for i in range(start, start + 500)])
    tab = new_tab(console_broker)
    page = tab.open("sql")
    page.fill("#sql", f"select raw from table({stream})")
    page.click("#sql-run")
    expect(page.locator("#sql-status")).to_contain_text("Query finished after 2,500 rows")
    rows = page.locator("#sql-rows tbody tr")
    expect(rows).to_have_count(1000)
    expect(rows.first).to_have_text("r1500")
    expect(rows.last).to_have_text("r2499")


def test_stream_reader_splits_items_cut_across_chunks(console_broker, new_tab):
    """api.js stream() searches only the new text of each chunk: a separator cut in two is still found."""
    tab = new_tab(console_broker)
    page = tab.open("apps")
    items = page.evaluate("""async () => {
        const api = await import('/console/api.js');
        const chunks = ['one\\n', '\\ntw', 'o\\n\\nthr', 'ee', '\\n', '\\n\\n\\nfour'];
        const realFetch = window.fetch;
        window.fetch = async () => new Response(new ReadableStream({ start(c) {
            for (const part of chunks) c.enqueue(new TextEncoder().encode(part));
            c.close();
        } }));
        const got = [];
        try { await api.stream('/x', { split: '\\n\\n', onItem: (t) => got.push(t) }); }
        finally { window.fetch = realFetch; }
        return got;
    }""")
    assert items == ["one", "two", "three", "four"]


def test_at_most_three_live_streams_in_the_browser_across_tabs(console_broker, new_tab):
    """Six open streams would take all six connections a browser opens to a host and freeze the
    console: the fourth (a query or a tail, in any tab) is refused with a banner until one stops."""
    stream = _name("busy")
    assert http(console_broker, "POST", "/console/api/streams", {"name": stream, "partitions": 1})[0] == 201
    first = new_tab(console_broker)
    tabs = [first] + [new_tab(console_broker, first.page.context) for _ in range(2)]
    for tab in tabs:
        page = tab.open("sql")
        page.fill("#sql", f"select raw from {stream}")
        page.click("#sql-run")
        expect(page.locator("#sql-status")).to_contain_text("Running")
    fourth = new_tab(console_broker, first.page.context)
    page = fourth.open(f"tail/{stream}")
    expect(page.locator("#tail-form select[name=partition] option")).to_have_count(1)
    page.click("#tail-start")
    expect(page.locator("#banner-text")).to_contain_text("At most 3 live streams")
    expect(page.locator("#tail-start")).to_be_enabled()
    fourth.shot("too-many-streams")

    tabs[0].page.click("#sql-cancel")   # one stops: the slot is free again
    expect(tabs[0].page.locator("#sql-status")).to_contain_text("Cancelled")
    page.click("#banner-close")
    page.click("#tail-start")
    expect(page.locator("#tail-status")).to_contain_text("Tailing partition 0")
    _put(console_broker, stream, "through")
    expect(page.locator("#tail tbody tr")).to_have_count(1)
    for tab in tabs[1:]:
        tab.page.click("#sql-cancel")
    page.click("#tail-stop")
