"""The commands that write or read Kafka topics: ``stream-meta produce`` (a synthetic stream into
the events topic), ``tail`` (predictions or dead letters out), ``export`` (a topic into a
recording for ``replay``), ``publish-model`` (a checkpoint as a signed model version) and
``keygen`` (the key pair that signs and verifies model versions)."""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stream_meta.cli.common import (
    Options,
    UsageError,
    emit,
    family_for,
    kafka_overrides,
    log,
    open_recorder,
    progress_bar,
    settings_from,
    stop_on_sigterm,
)

if TYPE_CHECKING:
    from stream_meta.cli.common import Subparsers


def _unreachable(settings: Any, exc: Exception) -> UsageError:
    """The error for brokers that cannot be reached (exit code 2)."""
    return UsageError(f"cannot reach Kafka at {settings.kafka.bootstrap_servers}: {exc}")


def _reader(settings: Any) -> Any:
    """A ``KafkaConsumer`` outside any group (manual assignment: nothing committed, no join);
    exits 2 with the reason when the brokers cannot be reached."""
    from kafka import KafkaConsumer

    try:
        return KafkaConsumer(**settings.kafka.client_config(), enable_auto_commit=False)
    except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
        raise _unreachable(settings, exc) from exc


# -- produce -----------------------------------------------------------------------------------
def add_produce_parser(sub: Subparsers, options: Options) -> None:
    pr = sub.add_parser(
        "produce",
        parents=[options.common, options.kafka],
        help="write a synthetic task stream to Kafka",
    )
    pr.add_argument("--events", type=int, default=10_000, help="events to send (0 = until stopped)")
    pr.add_argument("--tasks", type=int, default=1000)
    pr.add_argument("--family", choices=["sinusoid", "digits"], default="sinusoid")
    pr.add_argument("--scenario", help="write a drift scenario (see `stream-meta scenarios`)")
    pr.add_argument("--rate", type=float, help="events per second (default: as fast as possible)")
    pr.add_argument("--bad-fraction", type=float, default=0.0, help="share of invalid events")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument(
        "--run-id", help="prefix of the event ids (default: random, so runs never collide)"
    )
    pr.set_defaults(func=cmd_produce)


def cmd_produce(args: argparse.Namespace) -> int:
    settings = settings_from(args, {"kafka": kafka_overrides(args)})
    import numpy as np

    from stream_meta.kafka.topics import Topics

    source, family = _produce_source(args, settings)
    rng = np.random.default_rng(args.seed)
    topics = Topics.for_prefix(settings.kafka.topic_prefix)
    producer = _producer(settings, topics)
    topic = topics.events
    # event ids must stay unique across producer runs (the service de-duplicates by id)
    run_id = args.run_id or os.urandom(4).hex()
    sent, bad, elapsed = _send(args, producer, topic, source, family, rng, run_id)
    emit(
        {
            "topic": topic,
            "run_id": run_id,
            "events": sent,
            "bad": bad,
            "seconds": round(elapsed, 3),
            "events_per_s": round(sent / elapsed, 1) if elapsed else None,
        },
        args.json,
    )
    return 0


def _produce_source(args: argparse.Namespace, settings: Any) -> tuple[Any, Any]:
    """The ``(event, truth)`` stream to write (``--scenario``, else the synthetic stream of
    ``--family``) and its task family."""
    from stream_meta.sources import synthetic_source

    stream_kwargs = {**settings.stream.model_dump(), "tasks": args.tasks, "seed": args.seed}
    if args.scenario:
        from stream_meta.tasks.scenarios import get_scenario

        try:
            scenario = get_scenario(args.scenario)
        except ValueError as exc:
            raise UsageError(str(exc)) from exc
        seed = stream_kwargs.pop("seed")
        stream = scenario.stream(seed=seed, **stream_kwargs)
        family = stream.streams[0].family  # every regime has the same x_dim and kind
        source: Any = ((e.event, e.truth) for e in stream)
    else:
        family = family_for(args.family, split="test")
        source = synthetic_source(family, **stream_kwargs)
    return source, family


def _producer(settings: Any, topics: Any) -> Any:
    """A ``KafkaProducer`` (acks from all replicas), the topics created first when
    ``service.create_topics``; exits 2 with the reason when the brokers cannot be reached."""
    from kafka import KafkaAdminClient, KafkaProducer

    from stream_meta.kafka.topics import ensure_topics

    try:
        if settings.service.create_topics:
            admin = KafkaAdminClient(**settings.kafka.client_config())
            try:
                ensure_topics(
                    admin,
                    topics.all(),
                    settings.service.partitions,
                    settings.service.replication_factor,
                    compacted=topics.compacted,
                )
            finally:
                admin.close()
        return KafkaProducer(**settings.kafka.client_config(), acks="all", linger_ms=5)
    except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
        raise _unreachable(settings, exc) from exc


def _send(
    args: argparse.Namespace,
    producer: Any,
    topic: str,
    source: Any,
    family: Any,
    rng: Any,
    run_id: str,
) -> tuple[int, int, float]:
    """Send ``--events`` events (0: until SIGTERM or Ctrl-C) at ``--rate``, the producer
    flushed and closed at the end: ``(sent, bad, seconds)``."""
    from stream_meta.sources import bad_event

    stop = stop_on_sigterm()
    total = args.events or None  # 0: until interrupted
    bar = progress_bar(args, total, "produce")
    bad = sent = 0
    start = last_log = time.perf_counter()
    try:
        for event, _truth in source:
            if (total is not None and sent >= total) or stop.is_set():
                break
            event["event_id"] = f"{run_id}-{event['event_id']}"
            if rng.random() < args.bad_fraction:
                value, bad = bad_event(event, rng, family.x_dim), bad + 1
            else:
                value = json.dumps(event).encode()
            producer.send(topic, key=event["task_id"].encode(), value=value)
            sent += 1
            if bar is not None:
                bar.update(1)
            elif not args.quiet and time.perf_counter() - last_log > 10:
                last_log = time.perf_counter()
                log.info("%d events sent (%.0f/s)", sent, sent / (last_log - start))
            if args.rate:
                delay = start + sent / args.rate - time.perf_counter()
                if delay > 0:
                    stop.wait(delay)
    except KeyboardInterrupt:
        log.warning("interrupted")
    finally:
        producer.flush()
        elapsed = time.perf_counter() - start
        producer.close()
        if bar is not None:
            bar.close()
    return sent, bad, elapsed


# -- tail --------------------------------------------------------------------------------------
def add_tail_parser(sub: Subparsers, options: Options) -> None:
    tl = sub.add_parser(
        "tail",
        parents=[options.common, options.kafka],
        help="print predictions (or dead letters) as JSON lines",
    )
    tl.add_argument("--dead-letter", action="store_true", help="read the dead-letter topic")
    tl.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    tl.add_argument("--max", type=int, help="stop after N records")
    tl.add_argument("--timeout", type=float, help="stop after S seconds without a new record")
    tl.add_argument("--meta", action="store_true", help="wrap each value with partition/offset")
    tl.set_defaults(func=cmd_tail)


def cmd_tail(args: argparse.Namespace) -> int:
    """Print the records of the predictions (or dead-letter) topic as JSON lines."""
    settings = settings_from(args, {"kafka": kafka_overrides(args)})
    from kafka import TopicPartition

    from stream_meta.kafka.topics import Topics

    topics = Topics.for_prefix(settings.kafka.topic_prefix)
    topic = topics.dead_letter if args.dead_letter else topics.predictions
    consumer = _reader(settings)
    stop = stop_on_sigterm()
    shown = 0
    try:
        parts = consumer.partitions_for_topic(topic)
        if not parts:
            raise UsageError(
                f"topic {topic} does not exist (yet) on {settings.kafka.bootstrap_servers}"
            )
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(tps)  # manual assignment: instant, no group join
        if args.from_beginning:
            consumer.seek_to_beginning(*tps)
        else:
            consumer.seek_to_end(*tps)
        idle_since = time.monotonic()
        while not stop.is_set() and (args.max is None or shown < args.max):
            polled = consumer.poll(timeout_ms=200)
            records = [r for batch in polled.values() for r in batch]
            if not records:
                if args.timeout is not None and time.monotonic() - idle_since > args.timeout:
                    break
                continue
            idle_since = time.monotonic()
            for r in records:
                if args.max is not None and shown >= args.max:
                    break
                print(_shown(r, args.meta), flush=True)
                shown += 1
    except KeyboardInterrupt:
        pass
    finally:
        consumer.close()
    return 0


def _shown(record: Any, meta: bool) -> str:
    """A record's value as ``tail`` prints it (``--meta``: wrapped with its partition, offset
    and time)."""
    value = record.value.decode("utf-8", errors="replace")
    if not meta:
        return value
    obj = {
        "partition": record.partition,
        "offset": record.offset,
        "timestamp_ms": record.timestamp,
        "value": json.loads(value),
    }
    return json.dumps(obj)


# -- export ------------------------------------------------------------------------------------
def add_export_parser(sub: Subparsers, options: Options) -> None:
    ex = sub.add_parser(
        "export",
        parents=[options.common, options.kafka],
        help="copy a Kafka topic (between offsets or times) into a recording for replay",
    )
    ex.add_argument("--out", type=Path, required=True, help="recording directory to write")
    ex.add_argument("--topic", help="topic to export (default: <prefix>.events)")
    ex.add_argument("--from-offset", type=int, help="first offset of every partition")
    ex.add_argument("--to-offset", type=int, help="end offset (exclusive) of every partition")
    ex.add_argument("--since", help="first record time: epoch ms or ISO-8601 (UTC by default)")
    ex.add_argument("--until", help="last record time (inclusive): epoch ms or ISO-8601")
    ex.add_argument(
        "--idle-timeout",
        type=float,
        default=5.0,
        help="a partition is at its end after S seconds without a record (5)",
    )
    ex.add_argument("--max", type=int, help="stop after N events")
    ex.add_argument(
        "--format",
        choices=["jsonl", "parquet"],
        default="jsonl",
        help="gzipped JSON lines (default) or Parquet (needs pyarrow)",
    )
    ex.set_defaults(func=cmd_export)


def cmd_export(args: argparse.Namespace) -> int:
    """Copy a Kafka topic, between offsets or times, into a recording for ``replay``."""
    settings = settings_from(args, {"kafka": kafka_overrides(args)})

    from stream_meta.kafka.export import ExportRange, export_topic
    from stream_meta.kafka.topics import Topics

    topic = args.topic or Topics.for_prefix(settings.kafka.topic_prefix).events
    try:
        bounds = ExportRange(
            args.from_offset, args.to_offset, _time_ms(args.since), _time_ms(args.until)
        )
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    consumer = _reader(settings)
    try:
        with open_recorder(args.out, args.format) as recorder:
            summary = export_topic(
                consumer,
                topic,
                recorder,
                bounds,
                idle_timeout_s=args.idle_timeout,
                max_events=args.max,
                stop=stop_on_sigterm(),
            )
    except ValueError as exc:
        raise UsageError(f"{exc} on {settings.kafka.bootstrap_servers}") from exc
    finally:
        consumer.close()
    emit({**summary, "out": str(args.out)}, args.json)
    return 0


def _time_ms(text: str | None) -> int | None:
    """``--since``/``--until``: epoch milliseconds, or an ISO-8601 time (UTC unless it says).

    >>> _time_ms("1700000000000"), _time_ms("2024-01-01T00:00:00"), _time_ms(None)
    (1700000000000, 1704067200000, None)
    """
    if text is None:
        return None
    if text.isdigit():
        return int(text)
    from datetime import UTC, datetime

    try:
        t = datetime.fromisoformat(text)
    except ValueError as exc:
        raise UsageError(f"{text!r} is neither epoch milliseconds nor an ISO-8601 time") from exc
    return int((t if t.tzinfo else t.replace(tzinfo=UTC)).timestamp() * 1000)


# -- publish-model -----------------------------------------------------------------------------
def add_publish_model_parser(sub: Subparsers, options: Options) -> None:
    pm = sub.add_parser(
        "publish-model",
        parents=[options.common, options.kafka],
        help="publish a checkpoint as a model version that every serve replica adopts",
    )
    pm.add_argument("--checkpoint", type=Path, required=True, help="the model to publish")
    pm.add_argument(
        "--version",
        type=int,
        required=True,
        help="its version (replicas serve it when it is newer than theirs)",
    )
    pm.add_argument(
        "--signing-key",
        type=Path,
        default=None,
        help="the Ed25519 private key (PEM) that signs the version (default: the setting "
        "models.signing_key_file); without one, only with models.accept_unsigned=true",
    )
    pm.set_defaults(func=cmd_publish_model)


def cmd_publish_model(args: argparse.Namespace) -> int:
    """Publish a checkpoint as model ``--version`` on ``<prefix>.models`` for every replica."""
    settings = settings_from(args, {"kafka": kafka_overrides(args)})
    from kafka import KafkaAdminClient, KafkaProducer

    from stream_meta.kafka.model_signing import Signer, SigningError, signer_from_settings
    from stream_meta.kafka.model_topic import chunk_messages, publish_model
    from stream_meta.kafka.topics import Topics, ensure_topics
    from stream_meta.model_checkpoint import CheckpointError, load_checkpoint

    if args.version < 1:
        raise UsageError("--version must be >= 1")
    models = settings.models
    try:
        signer = (
            Signer.from_file(args.signing_key)
            if args.signing_key is not None
            else signer_from_settings(models)
        )
    except SigningError as exc:
        raise UsageError(str(exc)) from exc
    if signer is None and not models.accept_unsigned:
        raise UsageError(
            "no signing key: pass --signing-key (or set models.signing_key_file); replicas "
            "refuse unsigned versions unless models.accept_unsigned=true (development only)"
        )
    if signer is None:
        log.warning(
            "publishing model version %d UNSIGNED (models.accept_unsigned is on; development only)",
            args.version,
        )
    try:
        load_checkpoint(args.checkpoint)  # never publish what a replica would refuse
    except CheckpointError as exc:
        raise UsageError(str(exc)) from exc
    blob = args.checkpoint.read_bytes()
    topic = Topics.for_prefix(settings.kafka.topic_prefix).models
    try:
        admin = KafkaAdminClient(**settings.kafka.client_config())
        try:
            ensure_topics(admin, (topic,), 1, settings.service.replication_factor)
        finally:
            admin.close()
        producer = KafkaProducer(
            **settings.kafka.client_config(), acks="all", max_request_size=2 << 20
        )
    except Exception as exc:  # kafka-python raises NoBrokersAvailable and friends
        raise _unreachable(settings, exc) from exc
    try:
        digest = publish_model(producer, topic, blob, version=args.version, signer=signer)
    finally:
        producer.close()
    emit(
        {
            "topic": topic,
            "version": args.version,
            "bytes": len(blob),
            "sha256": digest,
            "chunks": len(chunk_messages(blob, version=args.version)),
            "key_id": signer.key_id.hex() if signer is not None else None,
        },
        args.json,
    )
    return 0


# -- keygen --------------------------------------------------------------------------------------
def add_keygen_parser(sub: Subparsers, options: Options) -> None:
    kg = sub.add_parser(
        "keygen",
        parents=[options.common],
        help="make an Ed25519 key pair that signs (private) and verifies (public) model versions",
    )
    kg.add_argument("--out", type=Path, required=True, help="the directory to write them to")
    kg.add_argument("--name", default="model-signing", help="file names: NAME.key and NAME.pub.pem")
    kg.set_defaults(func=cmd_keygen)


def cmd_keygen(args: argparse.Namespace) -> int:
    """Write ``NAME.key`` (private, mode 0600: models.signing_key_file of the publisher) and
    ``NAME.pub.pem`` (public: models.trusted_keys of the replicas); print the key id."""
    from stream_meta.kafka.model_signing import SigningError, generate_keys

    try:
        private, public, kid = generate_keys(args.out, args.name)
    except (SigningError, OSError) as exc:
        raise UsageError(str(exc)) from exc
    emit({"private_key": str(private), "public_key": str(public), "key_id": kid}, args.json)
    return 0
