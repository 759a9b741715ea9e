"""``stream-meta bandit-eval`` and ``stream-meta replay --off-policy`` end to end (small)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from stream_meta.tasks import BanditFamily, logged_stream
from stream_meta.testing.processes import cli


def test_bandit_eval_reports_every_strategy_and_meta_learns(tmp_path: Path) -> None:
    proc = cli("bandit-eval", "--users", "12", "--decisions", "20", "--at", "10", "--json", "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert set(out["strategies"]) == {"meta", "per-task-ts", "pooled", "random"}
    assert set(out["strategies"]["meta"]) == {"10", "20"}
    assert out["strategies"]["meta"]["20"]["mean"] < out["strategies"]["random"]["20"]["mean"]
    assert set(out["ratios"]) == {"per-task-ts", "pooled", "random"}


def test_bandit_eval_refuses_a_model_of_other_features() -> None:
    proc = cli("bandit-eval", "--users", "2", "--decisions", "1", "--family", "x")
    assert proc.returncode == 2
    sinusoid = cli("bandit-eval", "--users", "2", "--decisions", "1", "--checkpoint", _sinusoid())
    assert sinusoid.returncode == 2 and b"features" in sinusoid.stderr


def test_replay_off_policy_estimates_each_target_near_its_truth(tmp_path: Path) -> None:
    family = BanditFamily()
    rng = np.random.default_rng(3)
    log = tmp_path / "decisions.jsonl"
    events = logged_stream(family, family.sample_params(40, rng), 10, rng, epsilon=0.5)
    log.write_text("".join(json.dumps(e) + "\n" for e in events))
    report = tmp_path / "report"
    proc = cli("replay", str(log), "--off-policy", "--report", str(report), "--json", "-q")
    assert proc.returncode == 0, proc.stderr.decode()
    out = json.loads(proc.stdout)
    assert out["decisions"] == 400 and out["tasks"] == 40
    assert set(out["off_policy"]) == {"meta-ts", "per-task-ts", "random"}
    for name, r in out["off_policy"].items():
        assert abs(r["dr"]["value"] - r["truth"]) < 4 * r["dr"]["se"], name
    assert json.loads((report / "report.json").read_text())["decisions"] == 400
    empty = tmp_path / "plain.jsonl"
    empty.write_text(json.dumps({"event_id": "e", "task_id": "t", "x": [1.0], "y": 1.0}) + "\n")
    refused = cli("replay", str(empty), "--off-policy", "--report", str(report))
    assert refused.returncode == 2 and b"no logged decisions" in refused.stderr
    assert cli("replay", str(empty), "--report", str(report)).returncode == 2  # no --strategy
    delayed = cli("replay", str(log), "--off-policy", "--label-delay", "3", "--report", str(report))
    assert delayed.returncode == 2 and b"label-delay" in delayed.stderr


def _sinusoid() -> str:
    from stream_meta.model_checkpoint import shipped_checkpoint

    return str(shipped_checkpoint("sinusoid"))


def test_train_family_bandit_writes_a_model_bandit_eval_serves(tmp_path: Path) -> None:
    out = tmp_path / "bandit.safetensors"
    train = cli(
        "train",
        "--family",
        "bandit",
        "--steps",
        "5",
        "--eval-tasks",
        "10",
        "--threads",
        "1",
        "--family-arg",
        "quality=0",
        "--out",
        str(out),
        "--json",
        "-q",
    )
    assert train.returncode == 0, train.stderr.decode()
    assert json.loads(train.stdout)["family"] == "bandit"
    from stream_meta.model_checkpoint import load_checkpoint

    assert load_checkpoint(out)[1]["family_args"] == {"quality": 0.0}
    proc = cli(
        "bandit-eval",
        "--checkpoint",
        str(out),
        "--strategy",
        "meta",
        "--users",
        "3",
        "--decisions",
        "4",
        "--at",
        "2",
        "--family-arg",
        "quality=0",
        "--json",
        "-q",
    )
    assert proc.returncode == 0, proc.stderr.decode()
    assert set(json.loads(proc.stdout)["strategies"]["meta"]) == {"2", "4"}
    assert b"trained on the bandit population" not in proc.stderr  # the same population
    bad = cli("train", "--family", "bandit", "--family-arg", "spread=-1", "--out", str(out))
    assert bad.returncode == 2 and b"spread must be >= 0" in bad.stderr
    data = cli("train", "--data", "log.jsonl", "--family-arg", "spread=1", "--out", str(out))
    assert data.returncode == 2 and b"--family-arg goes with --family" in data.stderr


def test_bandit_eval_family_arg_reaches_the_simulator_and_bad_ones_are_refused() -> None:
    base = ("bandit-eval", "--strategy", "random", "--users", "3", "--decisions", "2", "--json")

    def run(*more: str) -> dict:
        proc = cli(*base, *more, "-q")
        assert proc.returncode == 0, proc.stderr.decode()
        return json.loads(proc.stdout)

    default, noisy = run(), run("--family-arg", "noise_std=1.5", "--family-arg", "quality=0")
    assert default["noise_std"] == 0.5 and default["family_args"] == {}
    assert noisy["noise_std"] == 1.5 and noisy["family_args"] == {"noise_std": 1.5, "quality": 0.0}
    assert noisy["curves"]["random"] != default["curves"]["random"]  # another population
    unknown = cli(*base, "--family-arg", "spred=0.6")
    assert unknown.returncode == 2 and b"no argument 'spred'" in unknown.stderr
    typed = cli(*base, "--family-arg", "archetypes=many")
    assert typed.returncode == 2 and b"archetypes must be an int" in typed.stderr
