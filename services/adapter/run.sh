#!/bin/sh
# Launches the stream-meta adapter: `stream-meta serve`, configured from the environment.
#
#   services/adapter/run.sh [serve options...]
#   STREAM_META_KAFKA__BOOTSTRAP_SERVERS=localhost:29092 services/adapter/run.sh
#   ADAPTER_CONFIG=deploy/local.toml services/adapter/run.sh --group my-test-group
#
# stream-meta reads its STREAM_META_<SECTION>__<FIELD> variables itself. This script adds
# only ADAPTER_CONFIG, a TOML settings file passed as --config; it is deliberately not
# STREAM_META_-prefixed, because the service rejects STREAM_META_ variables it does not know.
# Precedence: ADAPTER_CONFIG file < STREAM_META_* variables < options given here.
#
# It runs the repository's .venv when there is one (make install), else `stream-meta` from
# PATH (the container image), and execs it, so signals reach the service directly: SIGTERM
# finishes the batch, flushes, commits and checkpoints before exiting.
set -eu

repo_root=$(CDPATH='' cd -- "$(dirname -- "$0")/../.." && pwd)
if [ -x "$repo_root/.venv/bin/stream-meta" ]; then
    bin="$repo_root/.venv/bin/stream-meta"
else
    bin=stream-meta
fi

if [ -n "${ADAPTER_CONFIG:-}" ]; then
    set -- --config "$ADAPTER_CONFIG" "$@"
fi

exec "$bin" serve "$@"
