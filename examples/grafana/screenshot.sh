#!/usr/bin/env bash
# Screenshot of the Grafana dashboard's queries in a real Prometheus.
#
#   bash examples/grafana/screenshot.sh
#
# Builds the demo Caddy, runs it with Caddyfile.example, sends a few hundred
# requests (fresh tokens: cache misses; repeated tokens: cache hits; invalid
# tokens; token endpoint calls) while a local Prometheus scrapes Caddy's admin
# /metrics every 2s, then has headless Chromium take a picture of Prometheus'
# graph page with some of token-exchange-dashboard.json's queries, into
# examples/grafana/prometheus.png. Not part of CI.
#
# Needs: go, curl, python3, Debian's `prometheus` and `chromium` packages, and
# free ports 8080, 9001, 2019 (Caddyfile.example) and 9090 (Prometheus).
set -euo pipefail

cd "$(dirname "$0")/../.."
ROOT=$(pwd)
OUT=${OUT:-$ROOT/examples/grafana/prometheus.png}
CADDY=${CADDY:-/tmp/caddy}
ROUNDS=${ROUNDS:-6}

for cmd in go curl python3 prometheus chromium; do
	command -v "$cmd" >/dev/null || { echo "missing: $cmd" >&2; exit 1; }
done
for port in 8080 9001 2019 9090; do
	if curl -s -o /dev/null "http://127.0.0.1:$port/"; then
		echo "port $port is in use; stop whatever listens there first" >&2
		exit 1
	fi
done

TMP=$(mktemp -d)
PIDS=()
cleanup() {
	for pid in "${PIDS[@]}"; do
		kill "$pid" 2>/dev/null || true
	done
	for pid in "${PIDS[@]}"; do
		wait "$pid" 2>/dev/null || true
	done
	rm -rf "$TMP"
}
trap cleanup EXIT

echo "building $CADDY"
go build -o "$CADDY" ./examples/caddy

# Caddy's storage (the gateway's signing key) and autosave go to the temp dir.
echo "starting Caddy (logs: $TMP/caddy.log)"
XDG_DATA_HOME=$TMP/data XDG_CONFIG_HOME=$TMP/config \
	"$CADDY" run --config Caddyfile.example --adapter caddyfile >"$TMP/caddy.log" 2>&1 &
PIDS+=($!)

cat >"$TMP/prometheus.yml" <<'EOF'
global:
  scrape_interval: 2s
  evaluation_interval: 2s
scrape_configs:
  - job_name: caddy
    metrics_path: /metrics
    static_configs:
      - targets: ['localhost:2019']
EOF
echo "starting Prometheus (logs: $TMP/prometheus.log)"
prometheus --config.file="$TMP/prometheus.yml" --storage.tsdb.path="$TMP/tsdb" \
	--web.listen-address=127.0.0.1:9090 >"$TMP/prometheus.log" 2>&1 &
PIDS+=($!)

wait_for() { # url what
	for _ in $(seq 1 100); do
		if curl -sf -o /dev/null "$1"; then return 0; fi
		sleep 0.3
	done
	echo "$2 did not come up; logs:" >&2
	tail -n 30 "$TMP"/*.log >&2
	exit 1
}
wait_for http://localhost:2019/metrics "Caddy admin"
wait_for http://localhost:8080/.well-known/jwks.json "Caddy gateway"
wait_for http://127.0.0.1:9090/-/ready "Prometheus"

mint() { # sub scope [extra mint flags...]
	local sub=$1 scope=$2
	shift 2
	"$CADDY" token-exchange mint --key examples/demo-issuer/DEMO-ONLY-private-key.jwk \
		--iss https://demo-idp.example --aud http://localhost:8080 \
		--sub "$sub" --scope "$scope" "$@"
}
get() { # path token
	curl -s -o /dev/null -w '%{http_code}\n' -H "Authorization: Bearer $2" "http://localhost:8080$1" >>"$TMP/codes"
}
endpoint() { # token [secret]
	curl -s -o /dev/null -w '%{http_code}\n' -u "billing-svc:${2:-s3cret}" http://localhost:8080/oauth2/token \
		-d grant_type=urn:ietf:params:oauth:grant-type:token-exchange \
		-d subject_token="$1" \
		-d subject_token_type=urn:ietf:params:oauth:token-type:access_token \
		-d audience=https://billing.internal -d scope=billing.read >>"$TMP/codes"
}

# Let Prometheus take a few scrapes before the traffic starts.
sleep 6
echo "sending traffic: $ROUNDS rounds"
for round in $(seq 1 "$ROUNDS"); do
	# Fresh tokens (cache misses), each then repeated (cache hits).
	for i in $(seq 1 $((10 + 4 * round))); do
		tok=$(mint "user$round-$i" "orders.read orders.write")
		for _ in 1 2 3 4; do get /api/orders/1 "$tok"; done
	done
	# Another route.
	for i in $(seq 1 5); do
		tok=$(mint "cal$round-$i" "read:calendar")
		get /api/calendar/1 "$tok"
		get /api/calendar/1 "$tok"
	done
	# Invalid tokens: garbage, expired, wrong audience, missing scope.
	for i in $(seq 1 $((2 + round))); do
		get /api/orders/1 "not-a-jwt-$i"
	done
	get /api/orders/1 "$(mint "late$round" "orders.read" --ttl -5m)"
	get /api/orders/1 "$("$CADDY" token-exchange mint --key examples/demo-issuer/DEMO-ONLY-private-key.jwk \
		--iss https://demo-idp.example --aud https://elsewhere.example --sub "eve$round" --scope orders.read)"
	get /api/orders/1 "$(mint "noscope$round" "profile")"
	# The token endpoint (bcrypt cost 14: a second each), one bad secret.
	endpoint "$(mint "svc$round" "billing.read")"
	if ((round % 2 == 0)); then endpoint "$(mint "svc$round-x" "billing.read")" wrong-secret; fi
	sleep 12
done
echo "status codes:"; sort "$TMP/codes" | uniq -c
# Two more scrapes after the last request.
sleep 5

urlencode() { python3 -c 'import sys, urllib.parse; print(urllib.parse.quote(sys.argv[1], safe=""))' "$1"; }
QUERIES=(
	'sum by (outcome) (rate(caddy_token_exchange_exchanges_total[5m]))'
	'sum(rate(caddy_token_exchange_cache_requests_total{result="hit"}[5m])) / sum(rate(caddy_token_exchange_cache_requests_total[5m]))'
	'sum by (outcome) (rate(caddy_token_exchange_endpoint_requests_total[5m]))'
)
URL="http://127.0.0.1:9090/graph?"
for i in "${!QUERIES[@]}"; do
	stacked=1
	[[ $i == 1 ]] && stacked=0 # a ratio does not stack
	URL+="g$i.expr=$(urlencode "${QUERIES[$i]}")&g$i.tab=0&g$i.stacked=$stacked&g$i.range_input=2m&"
done

# The window is tall enough for the three panels: when the page does not fit,
# the classic UI's focus on the last query scrolls the picture.
echo "taking the screenshot: $OUT"
chromium --headless --no-sandbox --disable-gpu --hide-scrollbars \
	--user-data-dir="$TMP/chromium" --window-size=1400,2300 \
	--virtual-time-budget=10000 --screenshot="$OUT" "$URL" >"$TMP/chromium.log" 2>&1 || {
	cat "$TMP/chromium.log" >&2
	exit 1
}
ls -l "$OUT"
