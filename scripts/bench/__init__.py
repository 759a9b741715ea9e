"""Measure the targets of issues #2 to #6 into ``docs/BENCHMARKS.md`` and ``docs/benchmarks.json``.

    python -m scripts.bench [--quick] [--only NAME[,NAME]] [--checkpoint-dir DIR]
        [--out docs/BENCHMARKS.md] [--json-out PATH]

    (``make bench ARGS="--quick"`` runs the same.)

Every number in the report is measured by the run that writes it; nothing is copied from an
earlier run. A target that is missed is reported as missed, with the measured value. The only
numbers not measured here are the published results quoted beside the sinusoid table, labelled
as such, and the training time, which is read from the checkpoint's manifest (this script does
not re-train).

Sections (``--only`` takes these names), a module each (:mod:`.registry` lists them):

* ``sinusoid`` (:mod:`.fewshot`): ``stream-meta evaluate --family sinusoid --shots 1 5 10
  20``: MSE targets at 5/10/20 shots; training time from the checkpoint manifest.
* ``neighbours`` (:mod:`.fewshot`): ``stream-meta run`` on the clustered synthetic stream with
  and without neighbour retrieval (``--k-neighbours 8`` / ``0``): prequential loss at 1 and 2
  shots; plus ``stream-meta evaluate`` with and without neighbours on unclustered held-out
  tasks (context).
* ``digits`` (:mod:`.fewshot`): ``stream-meta evaluate --family digits --shots 1 5``: accuracy
  against the nearest-centroid baseline on the same episodes.
* ``latency`` (:mod:`.fewshot`): ``adapt_latency_ms_p50``/``p99`` of ``stream-meta evaluate``
  (one task at a time, one torch thread), run pinned to one core with ``taskset -c 0`` where
  available.
* ``throughput`` (:mod:`.throughput`): ``stream-meta run`` over a stream that reaches 10,000
  live tasks, and the library's ``run_stream`` timed only once 10,000 tasks are live.
* ``memory`` (:mod:`.memory`): bytes per live task at 100,000 tasks, from the library's own
  estimate and from the growth of the process's resident memory (in a fresh process).
* ``index`` (:mod:`.index`): micro-benchmarks of the FAISS task index (also a command of its
  own: ``python -m scripts.bench.index``).
* ``serve`` (:mod:`.serve`): ``stream-meta serve`` through a local Tansu broker (issue 3):
  sustained throughput of one consumer, end-to-end latency at 2,000 events/s, start-up to the
  first prediction (mechanics in :mod:`.serve_runs`).
* ``drift`` (:mod:`.drift`): ``stream-meta run --scenario --no-meta-update`` on the sinusoid
  drift scenarios (issue 4): delay from each drift point to the first alarm, false alarms on
  stationary streams (3 seeds of 100,000 events), beside a periodic-alarm baseline.
* ``meta_update`` (:mod:`.meta_update`): the same scenarios with meta-updates (issue 4): the
  prequential loss after the promoted update against the pre-drift level, beside no update and
  blind periodic retraining on the same events; the old family's held-out loss before and
  after; batch latency while a background update trains.
* ``replay`` (:mod:`.replay`): ``stream-meta replay --strategy all`` on a recording of every
  shipped scenario (``run --record``, to 10,000 events past the last drift point;
  ``--quick``: the logs of tests/data/logs) (issue 5): prequential loss of the system against
  its ablations and the baselines, the sinusoid 10-shot MSE and adaptation latency against
  MAML's, and replay speed of a 100,000-event recording.
* ``scale`` (:mod:`.scale`): ``stream-meta serve`` replicas through a local Tansu broker
  (issue 6): 1 -> 2 replicas on a pre-loaded topic, kill-and-restart cycles under a steady
  stream (nothing may be lost), and a soak at 2,000 events/s (memory, lag, errors); mechanics
  in :mod:`.scale_runs` (``python -m scripts.bench.scale soak SECONDS`` runs the soak alone).

* ``real`` (:mod:`.real`): ``stream-meta train --data`` on the real data sets of
  ``tests/data/real`` (issue 14) and the speed of ``train --data`` and ``run`` on 3 features.
* ``retrieval`` (:mod:`.retrieval`): the shipped sinusoid model on a stream of related tasks
  (history around fresh cluster centres, probes of the same clusters under new ids) and on its
  control without relations (issue 15): probe query loss per shot count with no retrieval,
  attention and retrieval, beside an oracle same-cluster neighbour and the exact Bayes mixture
  over the stored tasks, the fraction of the attainable gain realised; adaptation p50 and
  events/s with 10,000 live tasks, ``retrieval=False`` against the default in the same run.
* ``experts`` (:mod:`.experts`): ``stream-meta run --scenario`` on the amplitude-shift,
  new-family and recurring sinusoid scenarios (issue 15) with no update, experts (the default)
  and the single-model behaviour (``meta_update.max_experts=1``) on the same events: the loss
  over the 10,000 events after the first promotion (per support size), the old family's loss
  served by the last set of experts, the delay until a returning family is routed back to its
  old expert, and events/s.

* ``bandits`` (:mod:`.bandits`): ``stream-meta bandit-eval`` on new users of the bandit
  simulator (issue 16): cumulative regret after 20 and 200 decisions of the meta-model's
  Thompson sampling against per-task linear Thompson sampling from scratch, a pooled linear
  bandit and random choice; context rows (no targets) of the same comparison on harder
  populations, ``diffuse``, ``linear`` and both at once, each with its own model (trained by
  the section with the shipped recipe unless a matching one is kept under
  ``build/bench-bandit-populations``: ~3 x 5 minutes the first time); ``stream-meta replay
  --off-policy`` IPS and DR estimates on logged decision streams of the simulator against each
  target's true value.

``--quick`` shrinks every size for a smoke run; its report says so at the top and must not be
committed as the project's numbers. The CLI is run with the default settings: ``STREAM_META_*``
variables are removed from the environment of every command (and the library measurements use
the defaults too).

The rest of the package: :mod:`.runner` (the command line), :mod:`.report` (the markdown and
JSON), :mod:`.common` (helpers every section uses; it imports no section), :mod:`.sizes`,
:mod:`.library` (the engine without the CLI), :mod:`.harness` (the broker, ``produce`` and
``serve`` replicas of the Kafka sections, on ``stream_meta.testing``, the test suite's own
tools), :mod:`.passthrough` (the serve section's baseline process), :mod:`.scale_stats`.
This file imports nothing, so that every module can be imported (or run with ``python -m``)
on its own.
"""
