"""/metrics on prometheus_client: exact values, the names that tests, bench/serve_cpu.py and dashboards
read, and the histograms of chunk time, time to first fragment and prompt-switch latency."""

from __future__ import annotations

import time

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from streamgen import protocol as P
from streamgen.server.metrics import Metrics
from test_server import FPC, Raw, server  # noqa: F401 - the server fixture

# every series a reader of /metrics relies on (tests/test_server.py, tests/test_reliability.py, bench/serve_cpu.py)
NAMES = ("sessions", "connections", "sessions_started_total", "fragments_generated_total", "frames_generated_total",
         "fragment_bytes_total", "fragments_sent_total", "bytes_sent_total", "fragments_dropped_total",
         "generate_seconds_total", "encode_seconds_total", "bad_messages_total", "generation_fps",
         "send_queue_fragments", "send_queue_fragments_max", "fragment_log_bytes", "stuck_subscribers")
HISTOGRAMS = ("chunk_seconds", "time_to_first_fragment_seconds", "prompt_switch_seconds")


def samples(text: str) -> dict[str, float]:
    """The text format, parsed by prometheus_client's own parser: {'name{k="v"}': value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[s.name + (f"{{{labels}}}" if labels else "")] = s.value
    return out


def test_values_are_exact_and_round_trip():
    m = Metrics()
    m.counter("bytes_sent_total", "bytes")
    m.inc("bytes_sent_total", 1234567890)
    m.inc("bytes_sent_total", 1)
    m.gauge("ratio", "a ratio", fn=lambda: 0.1 + 0.2)
    text = m.render()
    assert "1.23457e+09" not in text  # what the old %g formatting wrote
    got = samples(text)
    assert got["streamgen_bytes_sent_total"] == 1234567891.0
    assert got["streamgen_ratio"] == 0.1 + 0.2


def test_kinds_labels_and_undeclared_names():
    m = Metrics()
    m.counter("errors_total", "errors by code", labels=("code",))
    m.gauge("pool_free", "free slots")
    m.gauge("queue", "queued by kind", labels=("kind",), fn=lambda: {("a",): 2, ("b",): 5})
    m.histogram("wait_seconds", "waits", buckets=(0.1, 1.0, float("inf")))
    text = m.render()
    assert "streamgen_errors_total{" not in text  # a labelled series has no sample before its first use
    m.inc("errors_total", code="busy")
    m.inc("errors_total", 2, code="busy")
    m.set("pool_free", 3)
    for v in (0.05, 0.5, 0.7, 4.0):
        m.observe("wait_seconds", v)
    got = samples(m.render())
    assert got['streamgen_errors_total{code="busy"}'] == 3
    assert got["streamgen_pool_free"] == 3
    assert got['streamgen_queue{kind="a"}'] == 2 and got['streamgen_queue{kind="b"}'] == 5
    assert [got[f'streamgen_wait_seconds_bucket{{le="{le}"}}'] for le in ("0.1", "1.0", "+Inf")] == [1, 3, 4]
    assert got["streamgen_wait_seconds_count"] == 4 and got["streamgen_wait_seconds_sum"] == pytest.approx(5.25)
    with pytest.raises(KeyError, match="errors_totl"):
        m.inc("errors_totl", code="busy")
    with pytest.raises(ValueError, match="declared twice"):
        m.gauge("pool_free", "again")


def test_two_servers_in_one_process_keep_their_own_series():
    a, b = Metrics(), Metrics()
    for m in (a, b):
        m.counter("sessions_started_total", "sessions")
    a.inc("sessions_started_total")
    assert samples(a.render())["streamgen_sessions_started_total"] == 1
    assert samples(b.render())["streamgen_sessions_started_total"] == 0


async def test_server_metrics_histograms_of_a_session_with_a_prompt_switch(server):
    delay = 0.05
    srv = await server(max_lead_s=None, delay_s=delay)
    c = await Raw.open(srv.url)
    t0 = time.monotonic()
    await c.send(P.Start(prompt="red", chunks=8))
    got: list = []
    await c.until(P.Fragment, collect=got)
    await c.until(P.Fragment, collect=got)
    t_prompt = time.monotonic()
    await c.send(P.Prompt(prompt="blue"))
    assert (await c.until(P.End, collect=got)).reason == "done"
    elapsed, since_prompt = time.monotonic() - t0, time.monotonic() - t_prompt
    await c.close()
    async with aiohttp.ClientSession() as http:
        r = await http.get(srv.http + "/metrics")
        assert r.headers["Content-Type"].startswith("text/plain")
        m = samples(await r.text())
    missing = [n for n in NAMES if f"streamgen_{n}" not in m]
    assert not missing, missing
    assert m["streamgen_fragments_generated_total"] == 8 and m["streamgen_frames_generated_total"] == 8 * FPC
    # one chunk per fragment, each at least the source's delay; generation is serial, and each
    # chunk's encode overlaps the next chunk's generation
    assert m["streamgen_chunk_seconds_count"] == 8
    assert 8 * delay <= m["streamgen_generate_seconds_total"] <= elapsed
    assert 8 * delay <= m["streamgen_chunk_seconds_sum"] <= elapsed + m["streamgen_encode_seconds_total"]
    assert m['streamgen_chunk_seconds_bucket{le="+Inf"}'] == 8
    assert m['streamgen_chunk_seconds_bucket{le="0.025"}'] == 0  # none faster than the 0.05 s delay
    # one session, one first fragment: after at least one chunk's delay, before the test saw it all
    assert m["streamgen_time_to_first_fragment_seconds_count"] == 1
    assert delay <= m["streamgen_time_to_first_fragment_seconds_sum"] <= elapsed
    # one prompt change, shown at most a few chunks later (the stream is unpaced: fragments run ahead)
    assert m["streamgen_prompt_switch_seconds_count"] == 1
    assert 0 < m["streamgen_prompt_switch_seconds_sum"] <= since_prompt
