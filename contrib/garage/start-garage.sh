#!/usr/bin/env bash
# A throwaway one-node Garage S3 server on 127.0.0.1, for trying keepfs's S3 storage and
# for the benchmark (the tests start their own, see tests/common/garage.rs).
#   GARAGE_DIR (default /tmp/keepfs-garage) holds its config, data, log and env.sh;
#   GARAGE_PORT (default 3900) is the S3 port. Afterwards `. $GARAGE_DIR/env.sh` gives
#   AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, S3_ENDPOINT, S3_REGION, S3_BUCKET.
# Stop it with: kill "$(cat $GARAGE_DIR/pid)".
set -euo pipefail
DIR=${GARAGE_DIR:-/tmp/keepfs-garage}
PORT=${GARAGE_PORT:-3900}
BUCKET=${S3_BUCKET:-keepfs}
export PATH="$HOME/.cargo/bin:$PATH"
command -v garage >/dev/null || cargo install --locked garage
if [ -f "$DIR/pid" ] && kill -0 "$(cat "$DIR/pid")" 2>/dev/null; then
  echo "garage is running (pid $(cat "$DIR/pid")); . $DIR/env.sh" >&2
  exit 0
fi
mkdir -p "$DIR"
cat >"$DIR/garage.toml" <<TOML
metadata_dir = "$DIR/meta"
data_dir = "$DIR/data"
db_engine = "sqlite"
replication_factor = 1
rpc_bind_addr = "127.0.0.1:$((PORT + 1))"
rpc_public_addr = "127.0.0.1:$((PORT + 1))"
rpc_secret = "$(od -An -N32 -tx1 /dev/urandom | tr -d ' \n')"
[s3_api]
s3_region = "garage"
api_bind_addr = "127.0.0.1:$PORT"
root_domain = ".s3.garage.localhost"
[admin]
api_bind_addr = "127.0.0.1:$((PORT + 3))"
TOML
g() { garage -c "$DIR/garage.toml" "$@"; }
setsid garage -c "$DIR/garage.toml" server >"$DIR/server.log" 2>&1 </dev/null &
echo $! >"$DIR/pid"
for _ in $(seq 100); do g status >/dev/null 2>&1 && break; sleep 0.2; done
node=$(g node id -q | cut -d@ -f1)
g layout assign -z dc1 -c 20G "$node" >/dev/null
g layout apply --version 1 >/dev/null
key=$(g key create keepfs)
g bucket create "$BUCKET" >/dev/null
g bucket allow --read --write --owner "$BUCKET" --key keepfs >/dev/null
cat >"$DIR/env.sh" <<ENV
export AWS_ACCESS_KEY_ID=$(awk '/Key ID:/ {print $3}' <<<"$key")
export AWS_SECRET_ACCESS_KEY=$(awk '/Secret key:/ {print $3}' <<<"$key")
export S3_ENDPOINT=http://127.0.0.1:$PORT
export S3_REGION=garage
export S3_BUCKET=$BUCKET
ENV
echo "garage on 127.0.0.1:$PORT, bucket $BUCKET; . $DIR/env.sh" >&2
