#!/usr/bin/env bash
# The appliance against its peers doing the same work, one run (`cargo xtask bench --peers`).
#
# Every proxy terminates TLS 1.3 with its own certificate, sets `Authorization`, and forwards
# over verified TLS 1.3 to a kept-alive nginx upstream that answers ~30 bytes echoing the
# header. The proxies (nginx with one worker, HAProxy with one thread, the appliance
# intercepting through its eBPF redirect) are pinned alone to the last CPU; the load
# generator and the upstream share the first. "direct" is the client straight to the
# upstream; "pass-through" is the appliance relaying a host without a secret.
#
# Columns: wrk -c32 keep-alive requests/s and its p99; wrk -c1 p50/p99 and the p50 added over
# direct; the proxy's CPU time per keep-alive request (utime+stime of all its threads); full
# TLS handshakes/s (h2load --h1, 200 fresh connections, no resumption, best of 5); KiB of
# RSS per idle kept-alive TLS connection (500 connections after one request each). Then
# rounds that alternate direct/pass-through and nginx/appliance, for medians and spreads, and
# the appliance's RSS: fresh and idle, under 10,000 idle intercepted connections.
#
# Root, in the project checkout, release binary built. Env: PEERS_SECONDS (keep-alive
# figure, default 6), PEERS_ROUNDS (default 5), PEERS_PERF=<prefix> to `perf record` each
# proxy during its keep-alive and handshake figures (into <prefix>.<path>[.handshakes]; build with frame pointers and set
# PEERS_APPLIANCE=<binary> for call graphs), PEERS_PATHS="appliance nginx" to measure only some
# paths (the table alone: rounds and the 10,000 connections need every path), PEERS_IDLE_ONLY=1
# for the 10,000 idle connections alone, on a daemon that served no load before them.
#
# Names resolve through a private /etc/hosts in a mount namespace of this script's own: the
# host's file is never touched.
set -uo pipefail

if [ -z "${PEERS_IN_NAMESPACE:-}" ]; then
  exec env PEERS_IN_NAMESPACE=1 unshare --mount --propagation private -- bash "$0" "$@"
fi

ROOT=$(pwd)
APP=${PEERS_APPLIANCE:-$ROOT/target/release/appliance}
[ -x "$APP" ] || { echo "build first: cargo build --release -p appliance" >&2; exit 2; }
for tool in nginx haproxy wrk h2load python3 openssl taskset; do
  command -v "$tool" >/dev/null || { echo "$tool is missing: run cargo xtask setup" >&2; exit 2; }
done
SECONDS_KA=${PEERS_SECONDS:-6}
ROUNDS=${PEERS_ROUNDS:-5}
LAST_CPU=$(($(nproc) - 1))
[ "$LAST_CPU" -ge 1 ] || { echo "needs two CPUs: proxies on one, load and upstream on the other" >&2; exit 2; }
ulimit -n "$(ulimit -Hn)"

# Loopback addresses of our own: a free /24 of 127/8 where nothing listens.
NET=""
for _ in $(seq 50); do
  candidate=127.$((RANDOM % 150 + 100)).$((RANDOM % 250 + 1))
  if ! ss -Hltn | awk '{print $4}' | grep -q "^$candidate\."; then NET=$candidate; break; fi
done
[ -n "$NET" ] || { echo "no free loopback range found" >&2; exit 2; }
UP=$NET.2 NGX_ADDR=$NET.3 HAP_ADDR=$NET.5

W=$(mktemp -d /tmp/appliance-peers.XXXX)
BPFFS=/sys/fs/bpf/appliance-peers-$$
CGROUP=appliance-peers-$$
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done
  wait 2>/dev/null
  "$APP" daemon --detach-all --bpffs-dir "$BPFFS" >/dev/null 2>&1
  rmdir "$BPFFS" 2>/dev/null
  for dir in "/sys/fs/cgroup/$CGROUP" "/sys/fs/cgroup/unified/$CGROUP"; do
    [ -d "$dir" ] && find "$dir" -depth -type d -exec rmdir {} + 2>/dev/null
  done
  rm -rf "$W"
}
trap cleanup EXIT
cd "$W" || exit 2

cp /etc/hosts hosts
for name in bench.test pass-bench.test; do echo "$UP $name" >>hosts; done
echo "$NGX_ADDR nginx-bench.test" >>hosts
echo "$HAP_ADDR haproxy-bench.test" >>hosts
mount --bind "$W/hosts" /etc/hosts || exit 2

openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 -subj /CN=bench-ca \
  -keyout ca.key -out ca.pem 2>/dev/null
printf "subjectAltName=DNS:bench.test,DNS:pass-bench.test,DNS:nginx-bench.test,DNS:haproxy-bench.test\n" >ext
for n in up px; do
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj /CN=bench.test -keyout $n.key -out $n.csr 2>/dev/null
  openssl x509 -req -in $n.csr -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile ext -out $n.pem 2>/dev/null
done
cat px.pem px.key >px.both

cat >up.conf <<NG
worker_processes 1; daemon off; pid $W/up.pid; error_log $W/up.err;
events { worker_connections 16384; }
http { access_log off;
  server { listen $UP:443 ssl; ssl_certificate $W/up.pem; ssl_certificate_key $W/up.key;
    ssl_protocols TLSv1.3; keepalive_requests 1000000;
    location / { return 200 "auth=\$http_authorization\n"; } } }
NG
taskset -c 0 nginx -c "$W/up.conf" & PIDS+=($!)

cat >px.conf <<NG
worker_processes 1; daemon off; pid $W/px.pid; error_log $W/px.err;
events { worker_connections 16384; }
http { access_log off;
  upstream up { server $UP:443; keepalive 64; }
  server { listen $NGX_ADDR:443 ssl; ssl_certificate $W/px.pem; ssl_certificate_key $W/px.key;
    ssl_protocols TLSv1.3; keepalive_requests 1000000;
    location / { proxy_pass https://up; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_set_header Host bench.test; proxy_set_header Authorization "Bearer REAL-SECRET";
      proxy_ssl_server_name on; proxy_ssl_name bench.test; proxy_ssl_verify on;
      proxy_ssl_protocols TLSv1.3; proxy_ssl_trusted_certificate $W/ca.pem;
      proxy_ssl_session_reuse on; } } }
NG
taskset -c "$LAST_CPU" nginx -c "$W/px.conf" & PIDS+=($!); NGX_MASTER=$!

cat >hap.cfg <<HA
global
  nbthread 1
  maxconn 8000
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 60s
  timeout server 60s
frontend fe
  bind $HAP_ADDR:443 ssl crt $W/px.both
  http-request set-header Host bench.test
  http-request set-header Authorization "Bearer REAL-SECRET"
  default_backend be
backend be
  http-reuse always
  server up $UP:443 ssl verify required ca-file $W/ca.pem sni str(bench.test) check-sni bench.test
HA
taskset -c "$LAST_CPU" haproxy -f hap.cfg & PIDS+=($!); HAP=$!

export APPLIANCE_SOCKET=$W/admin.sock APPLIANCE_AGENTS_CGROUP=$CGROUP
started=$(date +%s%N)
taskset -c "$LAST_CPU" "$APP" daemon --socket "$W/admin.sock" --state-dir "$W/state" --port 15480 \
  --bpffs-dir "$BPFFS" --upstream-ca "$W/ca.pem" >"$W/daemon.log" 2>&1 & PIDS+=($!); APD=$!
for _ in $(seq 300); do "$APP" secret list >/dev/null 2>&1 && break; sleep 0.02; done
START_MS=$(( ($(date +%s%N) - started) / 1000000 ))
sleep 2
rss_of() { ps -o rss= -p "$(echo "$@" | tr ' ' ,)" | awk '{s+=$1} END{print s}'; }
NGX_WORKER=$(pgrep -P $NGX_MASTER | head -1)
FRESH_RSS=$(rss_of $APD)
NGX_IDLE=$(rss_of $NGX_MASTER $NGX_WORKER)
HAP_IDLE=$(rss_of $HAP)
printf 'REAL-SECRET' | "$APP" secret create bench --host bench.test --header authorization \
  --format 'Bearer {value}' --value-stdin >/dev/null || { cat daemon.log >&2; exit 1; }
sleep 1

url_of() {
  case $1 in
    direct) echo https://bench.test/ ;; nginx) echo https://nginx-bench.test/ ;;
    haproxy) echo https://haproxy-bench.test/ ;; appliance) echo https://bench.test/ ;;
    pass-through) echo https://pass-bench.test/ ;;
  esac
}
# The appliance's paths run in an agent cgroup (`appliance exec`); the others run plain.
client() {
  case $1 in
    appliance | pass-through) shift; "$APP" exec -- "$@" ;;
    *) shift; "$@" ;;
  esac
}
pid_of() { case $1 in nginx) echo "$NGX_WORKER" ;; haproxy) echo $HAP ;; appliance | pass-through) echo $APD ;; *) echo "" ;; esac; }
expect_of() { case $1 in direct | pass-through) echo "auth=" ;; appliance) echo "auth=Bearer ***********" ;; *) echo "auth=Bearer REAL-SECRET" ;; esac; }

for p in direct nginx haproxy appliance pass-through; do
  got=$(client $p curl -sk "$(url_of $p)")
  [ "$got" = "$(expect_of $p)" ] || { echo "$p answers '$got', not '$(expect_of $p)'" >&2; cat daemon.log >&2; exit 1; }
done

HZ=$(getconf CLK_TCK)
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# keep-alive requests/s (wrk -c32) and its p99 in µs
keepalive() { client "$1" taskset -c 0 wrk -t1 -c32 -d"$2"s --latency "$(url_of "$1")" 2>&1; }
rps_of() { awk '/Requests\/sec/{print int($2)}'; }
micros() { awk -v q="$1" '$1==q {v=$2; if (v ~ /ms$/) {sub("ms","",v); v*=1000} else if (v ~ /us$/) {sub("us","",v)} else if (v ~ /s$/) {sub("s","",v); v*=1e6}; printf "%d", v}'; }

# idle KiB per connection: N TLS connections kept open after one request each
idle_conns() { # path count -> prints "rss_before rss_after" of the proxy
  local p=$1 n=$2 pid; pid=$(pid_of "$1")
  local before after; before=$(rss_of $pid)
  rm -f idle-ready
  client "$p" python3 - "$(url_of "$p")" "$n" "$W/idle-ready" <<'PY' &
import socket, ssl, sys, time, urllib.parse
url, count, ready = urllib.parse.urlsplit(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
context = ssl._create_unverified_context()
kept = []
for _ in range(count):
    s = context.wrap_socket(socket.create_connection((url.hostname, 443)), server_hostname=url.hostname)
    s.sendall(b"GET / HTTP/1.1\r\nHost: " + url.hostname.encode() + b"\r\n\r\n")
    s.recv(4096)
    kept.append(s)
open(ready, "w").close()
time.sleep(4)
PY
  local holder=$!
  for _ in $(seq 1200); do [ -e idle-ready ] && break; sleep 0.1; done
  sleep 1
  after=$(rss_of $pid)
  wait $holder
  echo "$before $after"
}

declare -A KA P50
ALL_PATHS="direct nginx haproxy appliance pass-through"
PATHS=${PEERS_PATHS:-$ALL_PATHS}
[ -n "${PEERS_IDLE_ONLY:-}" ] && PATHS=""
if [ -n "$PATHS" ]; then
  printf "\n| path | keep-alive r/s | p99 c=32 | p50 c=1 | p99 c=1 | added p50 | CPU µs/req | full handshakes/s | KiB/idle conn |\n"
  printf "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
fi
for p in $PATHS; do
  pid=$(pid_of $p)
  c0=0; [ -n "$pid" ] && c0=$(ticks "$pid")
  if [ -n "$pid" ] && [ -n "${PEERS_PERF:-}" ]; then
    perf record -e cpu-clock -F 999 -g -p "$pid" -o "$PEERS_PERF.$p" -- sleep "$SECONDS_KA" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  out=$(keepalive $p "$SECONDS_KA")
  [ -n "${perf_pid:-}" ] && { wait "$perf_pid"; perf_pid=""; }
  ka=$(echo "$out" | rps_of); ka99=$(echo "$out" | micros 99%)
  cpr="–"
  if [ -n "$pid" ]; then
    c1=$(ticks "$pid")
    cpr=$(awk -v d=$((c1 - c0)) -v r="$ka" -v t="$SECONDS_KA" -v hz="$HZ" 'BEGIN{printf "%.1f", d/hz*1e6/(r*t)}')
  fi
  lat=$(client $p taskset -c 0 wrk -t1 -c1 -d3s --latency "$(url_of $p)" 2>&1)
  p50=$(echo "$lat" | micros 50%); p99=$(echo "$lat" | micros 99%)
  KA[$p]=$ka; P50[$p]=$p50
  added="–"; [ $p != direct ] && [ -n "${P50[direct]:-}" ] && added=$((p50 - P50[direct]))
  hs=0
  if [ -n "$pid" ] && [ -n "${PEERS_PERF:-}" ]; then
    perf record -e cpu-clock -F 999 -g -p "$pid" -o "$PEERS_PERF.$p.handshakes" >/dev/null 2>&1 &
    perf_pid=$!
  fi
  for _ in 1 2 3 4 5; do
    r=$(client $p taskset -c 0 h2load --h1 -c 200 -n 200 "$(url_of $p)" 2>&1 | awk '/^finished in/{gsub(",","",$4); print int($4)}')
    [ "${r:-0}" -gt "$hs" ] && hs=$r
  done
  [ -n "${perf_pid:-}" ] && { kill -INT "$perf_pid"; wait "$perf_pid"; perf_pid=""; }
  idle="–"
  if [ -n "$pid" ]; then
    read -r before after < <(idle_conns $p 500)
    idle=$(((after - before) / 500))
  fi
  printf "| %s | %s | %s | %s | %s | %s | %s | %s | %s |\n" $p "$ka" "$ka99" "$p50" "$p99" "$added" "$cpr" "$hs" "$idle"
done

# Rounds: alternate each pair so drift hits both sides alike; the ratio of each round, then
# the median and the spread.
ratio_rounds() { # a b -> "median min max" of b/a keep-alive
  local a=$1 b=$2 ratios=()
  for _ in $(seq "$ROUNDS"); do
    ra=$(keepalive "$a" 3 | rps_of); rb=$(keepalive "$b" 3 | rps_of)
    ratios+=("$(awk -v a="$ra" -v b="$rb" 'BEGIN{printf "%.2f", b/a}')")
  done
  printf "%s\n" "${ratios[@]}" | sort -n | awk '{v[NR]=$1} END{printf "%s %s %s", v[int((NR+1)/2)], v[1], v[NR]}'
}
if [ -z "${PEERS_IDLE_ONLY:-}" ]; then
  [ "$PATHS" = "$ALL_PATHS" ] || exit 0
  read -r pt_med pt_min pt_max < <(ratio_rounds direct pass-through)
  read -r ap_med ap_min ap_max < <(ratio_rounds nginx appliance)
  printf "\n%s rounds of 3 s, keep-alive: pass-through / direct median %s (%s–%s); appliance / nginx median %s (%s–%s)\n" \
    "$ROUNDS" "$pt_med" "$pt_min" "$pt_max" "$ap_med" "$ap_min" "$ap_max"
fi

read -r before after < <(idle_conns appliance 10000)
printf "appliance: started in %s ms; RSS fresh %s KiB, %s KiB with 10,000 idle intercepted connections (%s KiB each)\n" \
  "$START_MS" "$FRESH_RSS" "$after" "$(awk -v a="$after" -v b="$before" 'BEGIN{printf "%.1f", (a - b) / 10000}')"
printf "idle RSS: nginx %s KiB (master + worker), HAProxy %s KiB\n" "$NGX_IDLE" "$HAP_IDLE"
printf "machine: %s, %s CPUs, Linux %s, %s\n" "$(awk -F': ' '/model name/{print $2; exit}' /proc/cpuinfo)" \
  "$(nproc)" "$(uname -r)" "$(date -u +%F)"
