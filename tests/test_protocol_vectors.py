"""streamgen.protocol against the language-neutral golden vectors in protocol/vectors/."""

import base64
import json
from dataclasses import replace
from pathlib import Path

import pytest

from streamgen import protocol as P

ROOT = Path(__file__).resolve().parents[1] / "protocol"
VECTORS = sorted((ROOT / "vectors").glob("*.json"))


def from_json(obj):
    if isinstance(obj, dict):
        if set(obj) == {"$bin"}:
            return base64.b64decode(obj["$bin"])
        return {k: from_json(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [from_json(v) for v in obj]
    return obj


def load(path):
    doc = json.loads(path.read_text())
    data = (path.parent / doc["bytes_file"]).read_bytes()
    limits = replace(P.DEFAULT_LIMITS, **doc.get("limits", {}))
    return doc, data, limits


def test_vector_set_is_complete():
    docs = [json.loads(p.read_text()) for p in VECTORS]
    assert sum(d["valid"] for d in docs) >= 20 and sum(not d["valid"] for d in docs) >= 40
    covered = {d["message"]["type"] for d in docs if d["valid"]}
    assert covered == set(P.SCHEMA), "every message type needs a valid vector"
    codes = {d["error"]["code"] for d in docs if not d["valid"]}
    assert {"bad_message", "unknown_type", "bad_field", "too_large", "unsupported_version"} <= codes


@pytest.mark.parametrize("path", [p for p in VECTORS if json.loads(p.read_text())["valid"]], ids=lambda p: p.stem)
def test_valid_vector_round_trips_byte_identically(path):
    doc, data, limits = load(path)
    wire = from_json(doc["message"])
    msg = P.from_map(wire, limits)
    assert P.encode(msg, limits) == data
    decoded = P.decode(data, doc["direction"], limits)
    assert decoded == msg
    assert P.to_map(decoded, limits) == wire
    assert list(P.to_map(decoded, limits)) == list(wire), "canonical key order"


@pytest.mark.parametrize("path", [p for p in VECTORS if not json.loads(p.read_text())["valid"]], ids=lambda p: p.stem)
def test_invalid_vector_gives_the_specified_error(path):
    doc, data, limits = load(path)
    with pytest.raises(P.ProtocolError) as ei:
        P.decode(data, doc["direction"], limits)
    err = ei.value
    assert (err.code, err.field) == (doc["error"]["code"], doc["error"]["field"]), err.message
    assert err.fatal == (err.code == "unsupported_version")
    if err.field not in (None, "type"):
        assert err.field in err.message, "the message names the field"


def test_schema_json_matches_the_implementation():
    assert json.loads((ROOT / "schema.json").read_text()) == P.schema_json()


SEQUENCES = sorted((ROOT / "vectors" / "sequences").glob("*.json"))


@pytest.mark.parametrize("path", SEQUENCES, ids=lambda p: p.stem)
def test_state_machine_sequence(path):
    import msgpack

    doc = json.loads(path.read_text())
    conn = P.ServerConnection() if doc["side"] == "server" else P.ClientConnection()
    for i, step in enumerate(doc["steps"]):
        where = f"step {i}: {step}"
        if "recv" in step:
            def op():
                return conn.receive(msgpack.packb(from_json(step["recv"]), use_bin_type=True))
        else:
            def op():
                return conn.send(P.from_map(from_json(step["send"])))
        expect = step["expect"]
        if isinstance(expect, dict):
            with pytest.raises(P.ProtocolError) as ei:
                op()
            assert (ei.value.code, ei.value.field) == (expect["code"], expect["field"]), where
        else:
            out = op()
            assert (out is None) == (expect == "ignored"), where
        if "phase" in step:
            assert conn.phase.value == step["phase"], where
