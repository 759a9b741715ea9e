"""The replay strategies on a user's tasks: ``train-baseline --data`` trains MAML and pre-trained
initialisations on a ``train --data`` checkpoint's training tasks in its units, and
``evaluate --data`` replays maml, finetune, scratch and nearest-task over the same test events
as the meta-model (tests/data/real/spruce: 79 trees, 13 measurements each)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from stream_meta.evaluation.baselines import load_init
from stream_meta.model_checkpoint import read_manifest, shipped_checkpoint
from stream_meta.testing.processes import cli

REAL = Path(__file__).resolve().parents[1] / "data" / "real"
LOG = str(REAL / "spruce.jsonl.gz")
STRATEGIES = ["maml", "finetune", "scratch", "nearest-task"]


def _ok(*args: str, timeout: float = 300) -> dict:
    done = cli(*args, "--json", "-q", timeout=timeout)
    assert done.returncode == 0, done.stderr.decode()
    return json.loads(done.stdout)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, dict]:
    """A spruce checkpoint (100 steps) and its two initialisations (100 steps each) in a
    baseline directory, named as evaluate --data looks for them; with train-baseline's output."""
    tmp = tmp_path_factory.mktemp("strategies")
    ckpt, bl = tmp / "spruce.safetensors", tmp / "baselines"
    common = ["--threads", "1", "--steps", "100"]
    _ok("train", "--data", LOG, "--schema", str(REAL / "spruce.toml"), "--out", str(ckpt), *common)
    outputs = {
        method: _ok(
            "train-baseline",
            "--data",
            LOG,
            "--checkpoint",
            str(ckpt),
            "--method",
            method,
            "--out",
            str(bl / f"spruce-{method}.safetensors"),
            *common,
        )
        for method in ("maml", "pretrained")
    }
    return ckpt, bl, outputs


def test_train_baseline_data_trains_in_the_checkpoints_units_on_its_training_tasks(
    trained: tuple[Path, Path, dict],
) -> None:
    ckpt, bl, outputs = trained
    model = read_manifest(ckpt)
    for method in ("maml", "pretrained"):
        init = load_init(bl / f"spruce-{method}.safetensors")
        assert init.method == method and init.family == "spruce"
        assert init.scaling is not None and init.scaling.to_dict() == model["scaling"]
        m = init.manifest
        assert m["scaling"] == model["scaling"] and m["model"] == model["model"]
        assert m["data"]["fingerprint"] == model["data"]["fingerprint"]
        assert m["data"]["split_seed"] == model["data"]["split_seed"]
        # the meta-model's episodes: its max_shots (largest training tree less one) and tasks
        assert m["training"]["episodes"]["max_shots"] == 12
        assert m["training"]["episodes"]["tasks"] == model["data"]["splits"]["train"]["tasks"]
        assert m["training"]["steps"] == 100 and m["training"]["budget"] == "--steps"
        train = outputs[method]["train"]
        assert train["best_step"] == 100 and math.isfinite(train["best_validation_loss"])
    tuned = load_init(bl / "spruce-pretrained.safetensors").manifest["training"]
    assert set(tuned["serve_lr_tuned_on_validation_tasks"]) == {
        "0.001",
        "0.003",
        "0.01",
        "0.03",
        "0.1",
    }
    assert load_init(bl / "spruce-pretrained.safetensors").loop.lr == tuned["serve_lr"]


def test_evaluate_data_replays_every_strategy_over_the_same_test_events(
    trained: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    ckpt, bl, _ = trained
    done = cli(
        "evaluate",
        "--data",
        LOG,
        "--checkpoint",
        str(ckpt),
        "--baseline-dir",
        str(bl),
        "--out",
        str(tmp_path / "r.json"),
        "--html",
        str(tmp_path / "r.html"),
        "-q",
        timeout=300,
    )
    assert done.returncode == 0, done.stderr.decode()
    report = json.loads((tmp_path / "r.json").read_text())
    runs = report["strategies"]
    assert list(runs)[-4:] == STRATEGIES and report["replay"]["strategies"] == STRATEGIES
    # the meta-model and the simple baselines are what train --data reported
    assert {k: runs[k] for k in read_manifest(ckpt)["metrics"]["test"]["strategies"]} == (
        read_manifest(ckpt)["metrics"]["test"]["strategies"]
    )
    for name in STRATEGIES:
        assert math.isfinite(runs[name]["loss"]), name
        # every support-size bucket the meta-model was scored in, no other
        filled = {b for b, v in runs[name]["buckets"].items() if v is not None}
        assert filled == {b for b, n in report["events_by_bucket"].items() if n}, name
    # the simple baselines keep their own comparison; best_strategy is over everything else
    others = {k: v["loss"] for k, v in runs.items() if k != "stream-meta"}
    assert report["best_strategy"] == min(others, key=lambda k: others[k])
    assert report["ratio_to_best_strategy"] == pytest.approx(
        runs["stream-meta"]["loss"] / others[report["best_strategy"]]
    )
    assert report["best_baseline"] not in STRATEGIES
    # real behaviour, with slack. Measured on this 100-step budget: stream-meta 0.155, maml
    # 0.303, finetune 0.240, scratch 0.240, pooled-linear 0.473, nearest-task 0.474 (with the
    # default budget, 3000 steps: stream-meta 0.068, maml 0.115, finetune 0.157; maml passes
    # scratch only after ~600 steps, too long for this test). Fitted in the model's units, the
    # gradient baselines start from the pooled linear fit and improve on it by adapting:
    for name in ("maml", "finetune"):
        assert runs[name]["loss"] < 0.75 * runs["pooled-linear"]["loss"], name
    gradient = min(runs[name]["loss"] for name in ("maml", "finetune", "scratch"))
    assert runs["stream-meta"]["loss"] < 0.85 * gradient
    # nearest-task never uses a task's own examples: it serves the adaptation of the nearest
    # indexed task (the training tasks are indexed first: warm start), never a copy of ours
    assert runs["nearest-task"]["loss"] != pytest.approx(runs["stream-meta"]["loss"], rel=1e-3)
    assert report["warm_start_events"] > report["events"]
    stdout = done.stdout.decode()
    assert "nearest-task" in stdout and "best of all" in stdout
    assert "best of all" in (tmp_path / "r.html").read_text()


def test_strategies_are_checked_before_any_replay(
    trained: tuple[Path, Path, dict], tmp_path: Path
) -> None:
    ckpt, _, _ = trained
    base = ["evaluate", "--data", LOG, "--checkpoint", str(ckpt), "-q"]
    full = cli(*base, "--strategy", "full")
    assert full.returncode == 2 and b"unknown strategy 'full'" in full.stderr
    nodir = cli(*base, "--strategy", "maml")
    assert nodir.returncode == 2 and b"train-baseline --data" in nodir.stderr
    empty = cli(*base, "--strategy", "finetune", "--baseline-dir", str(tmp_path))
    assert empty.returncode == 2 and b"spruce-pretrained.safetensors" in empty.stderr
    only = _ok(*base[:-1], "--strategy", "scratch", "--strategy", "scratch")
    assert [k for k in only["strategies"] if k in STRATEGIES] == ["scratch"]
    # without --baseline-dir the default needs no trained initialisation
    default = _ok(*base[:-1])
    assert [k for k in default["strategies"] if k in STRATEGIES] == ["scratch", "nearest-task"]


def test_train_baseline_data_is_refused_without_its_checkpoint_or_beside_a_family(
    tmp_path: Path,
) -> None:
    out = ["--method", "maml", "--out", str(tmp_path / "x.safetensors"), "-q"]
    alone = cli("train-baseline", "--data", LOG, *out)
    assert alone.returncode == 2 and b"needs --checkpoint" in alone.stderr
    both = cli("train-baseline", "--data", LOG, "--family", "sinusoid", *out)
    assert both.returncode == 2 and b"not allowed with argument" in both.stderr
    family = str(shipped_checkpoint("sinusoid"))
    shipped = cli("train-baseline", "--data", LOG, "--checkpoint", family, *out)
    assert shipped.returncode == 2 and b"was not trained on a log" in shipped.stderr
    assert not (tmp_path / "x.safetensors").exists()
