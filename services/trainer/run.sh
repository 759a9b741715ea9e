#!/bin/sh
# Launches the stream-meta trainer: `stream-meta trainer`, configured from the environment.
#
#   services/trainer/run.sh [trainer options...]
#   STREAM_META_KAFKA__BOOTSTRAP_SERVERS=localhost:29092 services/trainer/run.sh --metrics-port 9109
#
# Like services/adapter/run.sh: STREAM_META_* variables are read by stream-meta itself;
# TRAINER_CONFIG names a TOML settings file passed as --config. It execs the command, so
# SIGTERM reaches it (the trainer leaves the group; a standby takes over).
set -eu

repo_root=$(CDPATH='' cd -- "$(dirname -- "$0")/../.." && pwd)
if [ -x "$repo_root/.venv/bin/stream-meta" ]; then
    bin="$repo_root/.venv/bin/stream-meta"
else
    bin=stream-meta
fi

if [ -n "${TRAINER_CONFIG:-}" ]; then
    set -- --config "$TRAINER_CONFIG" "$@"
fi

exec "$bin" trainer "$@"
