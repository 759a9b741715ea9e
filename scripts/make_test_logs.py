"""Record the shipped scenarios as small logs under ``tests/data/logs`` (regression fixtures).

Each log is a recording directory (``events-1.jsonl.gz``, the format ``--record`` writes) of a
slice of the scenario's seed-0 stream: the 3,000 events before and after each drift point (a
recording that started mid-stream, as a real one may), or the first 6,000 events of a
stationary scenario (digit pixels rounded to 3 decimals). Three malformed messages are recorded
among them: a replay must reject them, never crash. ``tests/data/logs/manifest.json`` lists the
slices and where the drift points fall in each log; ``expected.json`` the losses measured on
them when they were made (the regression floor of tests/integration/test_scenario_logs.py).

    .venv/bin/python -m scripts.make_test_logs
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from stream_meta.recording import EventRecorder
from stream_meta.tasks.scenarios import SCENARIOS

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "logs"
HALF = 3000
#: malformed messages recorded among the events (position in the log, raw bytes)
BAD = (
    (100, b"{not json"),
    (2000, b'{"event_id": "bad", "task_id": "t", "x": [1.0, 2.0]}'),
    (4000, b"\xff\xfe not utf-8"),
)


def slices(drift_points: tuple[int, ...]) -> list[tuple[int, int]]:
    if not drift_points:
        return [(0, 2 * HALF)]
    return [(max(0, d - HALF), d + HALF) for d in drift_points]


def _encode(event: dict, family: str) -> bytes:
    if family == "digits":  # 64 pixels an event: 3 decimals keep the fixture small
        event = {**event, "x": [round(v, 3) for v in event["x"]]}
    return json.dumps(event, separators=(",", ":")).encode()


def main() -> None:
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    manifest = {}
    for name, scenario in SCENARIOS.items():
        parts = slices(scenario.drift_points)
        stream = scenario.stream(seed=0)
        events = list(stream.iter_events(parts[-1][1]))
        raws = [
            _encode(ev.event, scenario.model_family) for lo, hi in parts for ev in events[lo:hi]
        ]
        for pos, bad in BAD:
            raws.insert(pos, bad)
        with EventRecorder(OUT / name) as rec:
            rec.events(raws, start=0)
        drifts, offset = [], 0
        for (lo, hi), d in zip(parts, scenario.drift_points, strict=False):
            at = offset + d - lo
            drifts.append(at + sum(1 for pos, _ in BAD if pos <= at))
            offset += hi - lo
        manifest[name] = {
            "slices": parts,
            "events": len(raws),
            "malformed": len(BAD),
            "drift_points_in_log": drifts,
        }
        print(f"{name}: {len(raws)} events {parts}")
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    write_expected(manifest)


def write_expected(manifest: dict) -> None:
    """``expected.json``: each log's prequential loss under the shipped model (no meta-update)
    and with no adaptation, measured now; tests/integration/test_scenario_logs.py fails when a
    change makes the first more than 10% worse."""
    expected = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in manifest:
            family = SCENARIOS[name].model_family
            out = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "stream_meta",
                    "replay",
                    str(OUT / name),
                    "--family",
                    family,
                    "--strategy",
                    "no-meta-update",
                    "--strategy",
                    "global",
                    "--report",
                    tmp,
                    "--json",
                    "-q",
                ],
                check=True,
                capture_output=True,
            ).stdout
            runs = json.loads(out)["strategies"]
            expected[name] = {s: round(r["prequential_loss"], 6) for s, r in runs.items()}
            print(f"{name}: {expected[name]}")
    (OUT / "expected.json").write_text(json.dumps(expected, indent=2) + "\n")


if __name__ == "__main__":
    main()
