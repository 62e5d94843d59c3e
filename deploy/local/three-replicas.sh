#!/usr/bin/env bash
# Three kemon-keys replicas on one PostgreSQL, on this machine: 127.0.0.1:50061, :50062 and
# :50063, each with its own Verify cache, all sharing one log in schema `kemon_local`.
#
#   deploy/local/three-replicas.sh [postgres://user@host:port/db]
#
# Default database: the local server (postgres://postgres@127.0.0.1:5432/test). The schema
# is created if missing and kept, so a second run continues the same log. Ctrl-C stops the
# replicas (gracefully: SIGTERM). Logs go to ./target/replicas/rN.log.
set -euo pipefail
cd "$(dirname "$0")/../.."

base="${1:-postgres://postgres@127.0.0.1:5432/test}"
schema=kemon_local
url="$base?options[search_path]=$schema"
psql -q -X "$base" -c "CREATE SCHEMA IF NOT EXISTS $schema"

cargo build --release --locked --bin kemon-keys
mkdir -p target/replicas
# One master key for all three (kept, like the schema, so that a second run can reveal keys).
key_file=target/replicas/master.key
[ -f "$key_file" ] || (umask 077 && openssl rand -hex 32 > "$key_file")

pids=()
trap 'kill -TERM "${pids[@]}" 2>/dev/null; wait' EXIT INT TERM
for n in 1 2 3; do
  KEMON_MASTER_KEY_FILE="$key_file" ./target/release/kemon-keys serve \
    --listen "127.0.0.1:5006$n" --database-url "$url" --replica-id "r$n" \
    --data-dir "target/replicas/r$n" >"target/replicas/r$n.log" 2>&1 &
  pids+=($!)
done
echo "replicas: 127.0.0.1:50061 127.0.0.1:50062 127.0.0.1:50063 (schema $schema); Ctrl-C stops"
wait
