"""bench/client_latency.py --smoke end to end (~8-10 s): its own server process, the real client, prompt changes."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_bench():
    spec = importlib.util.spec_from_file_location("client_latency", ROOT / "bench" / "client_latency.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, mod)  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_smoke_run_measures_decodable_first_fragments_and_prompt_latency(tmp_path):
    out = tmp_path / "latency.json"
    rc = load_bench().main(["--smoke", "--decoder", "taehv", "--sessions", "1", "--switches", "1", "--seconds", "0",
                            "--switch-gap", "0.2", "--jitter-buffer", "0", "--json", str(out)])
    assert rc == 0
    (row,) = json.loads(out.read_text())["rows"]
    assert "error" not in row, row.get("error")
    assert row["server_exit"] == 0  # the server process shut down cleanly on SIGINT
    assert row["cold_engine"]["warmup_s"] > 0 and not row["cold_engine"]["warmup_failed"]
    assert len(row["sessions"]) == 2  # the cold one + 1 warm
    for s in row["sessions"]:
        assert s["first_decoded_frames"] == s["fragment"]["frames"] > 0  # the first fragment decodes, every frame
        assert tuple(s["decoded_size"]) == (128, 128)
        assert 0 < s["start_to_fragment_s"] <= s["start_to_decoded_s"]
        (sw,) = s["switches"]
        assert sw["received_s"] is not None and sw["seq"] > 0  # status.prompt_seq named the new prompt's fragment
        assert sw["decoded_s"] >= sw["received_s"] and sw["shown_s"] is not None
        assert s["end"] == "stopped" and s["decode_errors"] == 0
    assert row["prompt_received_s"]["n"] == 1 and row["prompt_missed"] == 0
