#!/usr/bin/env bash
# Make sure a Redis answers at $REDIS_URL (default redis://127.0.0.1:6379/0); start one if not.
set -euo pipefail
url=${REDIS_URL:-redis://127.0.0.1:6379/0}
ping() { .venv/bin/python -c "import redis,sys; redis.Redis.from_url('$url', socket_timeout=2).ping()" 2>/dev/null; }
ping && exit 0
if ! command -v redis-server >/dev/null; then
  echo "redis-server not found; installing it (Debian package redis-server)" >&2
  apt-get install -y -q redis-server >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q redis-server >/dev/null; }
fi
port=$(.venv/bin/python -c "from urllib.parse import urlparse; print(urlparse('$url').port or 6379)")
mkdir -p /tmp/avatar-forcing-redis
redis-server --daemonize yes --bind 127.0.0.1 --port "$port" --save "" --appendonly no \
  --dir /tmp/avatar-forcing-redis --logfile /tmp/avatar-forcing-redis/redis.log
for _ in $(seq 50); do ping && exit 0; sleep 0.1; done
echo "error: Redis did not come up on port $port" >&2; exit 1
