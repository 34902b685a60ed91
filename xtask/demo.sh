#!/usr/bin/env bash
# cargo xtask demo: an agent calls "api.anthropic.com" with a placeholder key; the appliance
# injects the real key; the agent never sees it. Everything stays on this machine: the
# "Anthropic API" is a local HTTPS server on 127.77.200.1:443 with its own test CA, and the
# agent resolves api.anthropic.com there through a private /etc/hosts.
#
# Usage: demo.sh APPLIANCE_BINARY   (as root)
set -euo pipefail

APPLIANCE=$(realpath "$1")
WORK=$(mktemp -d /tmp/appliance-demo.XXXXXX)
UPSTREAM_IP=127.77.200.1
REAL_KEY="sk-ant-api03-REAL-demo-key-$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')"
PLACEHOLDER="sk-ant-placeholder"
SOCKET="$WORK/admin.sock"
PINS="/sys/fs/bpf/appliance-demo-$$"
AGENTS="appliance-demo-agents-$$"
DAEMON_PID=""
UPSTREAM_PID=""

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }

cleanup() {
    [ -n "$DAEMON_PID" ] && kill "$DAEMON_PID" 2>/dev/null && wait "$DAEMON_PID" 2>/dev/null || true
    [ -n "$UPSTREAM_PID" ] && kill "$UPSTREAM_PID" 2>/dev/null || true
    "$APPLIANCE" daemon --config /dev/null --detach-all --bpffs-dir "$PINS" >/dev/null 2>&1 || true
    CGROUP2=$(awk '$9 == "cgroup2" {print $5; exit}' /proc/self/mountinfo)
    find "$CGROUP2/$AGENTS" -depth -type d -exec rmdir {} \; 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

say "A test CA and a certificate for api.anthropic.com (the fake upstream's)"
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 2 \
    -subj "/CN=demo upstream CA" -keyout "$WORK/ca.key" -out "$WORK/ca.pem" 2>/dev/null
openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=api.anthropic.com" \
    -keyout "$WORK/server.key" -out "$WORK/server.csr" 2>/dev/null
printf 'subjectAltName=DNS:api.anthropic.com\n' > "$WORK/san.ext"
openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.pem" -CAkey "$WORK/ca.key" -CAcreateserial \
    -days 2 -extfile "$WORK/san.ext" -out "$WORK/server.pem" 2>/dev/null

say "The fake Anthropic API on $UPSTREAM_IP:443 (records the x-api-key it receives)"
cat > "$WORK/upstream.py" <<'PY'
import http.server, json, ssl, sys
work, ip = sys.argv[1], sys.argv[2]
class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with open(f"{work}/received-key", "w") as f:
            f.write(self.headers.get("x-api-key", ""))
        body = json.dumps({"id": "msg_demo", "type": "message", "role": "assistant",
            "model": "claude-demo", "content": [{"type": "text", "text": "Hello from the fake Anthropic API"}],
            "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": 3, "output_tokens": 7}}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
server = http.server.HTTPServer((ip, 443), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(f"{work}/server.pem", f"{work}/server.key")
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
PY
python3 "$WORK/upstream.py" "$WORK" "$UPSTREAM_IP" &
UPSTREAM_PID=$!

say "The appliance daemon (temporary state, its own socket, trusting the test CA upstream)"
"$APPLIANCE" daemon --config /dev/null --state-dir "$WORK/state" --socket "$SOCKET" \
    --bpffs-dir "$PINS" --agents-cgroup "$AGENTS" --port 15777 \
    --upstream-ca "$WORK/ca.pem" > "$WORK/daemon.log" 2>&1 &
DAEMON_PID=$!
for _ in $(seq 100); do [ -S "$SOCKET" ] && break; sleep 0.1; done
[ -S "$SOCKET" ] || { cat "$WORK/daemon.log"; echo "the daemon did not start"; exit 1; }
"$APPLIANCE" --socket "$SOCKET" status

say "An anthropic secret, its value read from stdin (never an argument)"
printf '%s' "$REAL_KEY" | "$APPLIANCE" --socket "$SOCKET" secret create anthropic --type anthropic --value-stdin
"$APPLIANCE" --socket "$SOCKET" ca export > "$WORK/appliance-ca.pem"

say "The agent: the official anthropic SDK when it can be installed, else curl"
printf '%s api.anthropic.com\n' "$UPSTREAM_IP" > "$WORK/hosts"
cat > "$WORK/agent.py" <<'PY'
import os, anthropic
print("agent sees ANTHROPIC_API_KEY =", os.environ["ANTHROPIC_API_KEY"])
message = anthropic.Anthropic().messages.create(
    model="claude-demo", max_tokens=32, messages=[{"role": "user", "content": "Hello"}])
print("agent got:", message.content[0].text)
PY
if timeout 180 python3 -m venv "$WORK/venv" >/dev/null 2>&1 \
    && timeout 180 "$WORK/venv/bin/pip" install --quiet anthropic >/dev/null 2>&1; then
    AGENT=("$WORK/venv/bin/python" "$WORK/agent.py")
    echo "using the anthropic SDK $("$WORK/venv/bin/python" -c 'import anthropic; print(anthropic.__version__)')"
else
    echo "anthropic SDK unavailable; using curl"
    AGENT=(curl -sS --fail https://api.anthropic.com/v1/messages -H "x-api-key: $PLACEHOLDER"
        -H "content-type: application/json" -d '{"model":"claude-demo","max_tokens":32,"messages":[]}')
fi
# The agent runs in an intercepted cgroup, trusting the appliance CA, with a private
# /etc/hosts (its own mount namespace; same network) and only the placeholder key.
"$APPLIANCE" --socket "$SOCKET" exec --agents-cgroup "$AGENTS" --cgroup agent -- \
    env ANTHROPIC_API_KEY="$PLACEHOLDER" SSL_CERT_FILE="$WORK/appliance-ca.pem" \
        CURL_CA_BUNDLE="$WORK/appliance-ca.pem" \
    unshare --mount sh -c 'mount --bind "$0" /etc/hosts && exec "$@"' "$WORK/hosts" "${AGENT[@]}" \
    | tee "$WORK/agent.out"

say "What the upstream received, and what the audit log says"
RECEIVED=$(cat "$WORK/received-key")
echo "upstream received x-api-key = ${RECEIVED:0:14}…"
"$APPLIANCE" --socket "$SOCKET" events
if [ "$RECEIVED" != "$REAL_KEY" ]; then
    echo "FAIL: the upstream did not receive the real key"; exit 1
fi
if grep -q "$REAL_KEY" "$WORK/agent.out" "$WORK/daemon.log"; then
    echo "FAIL: the real key leaked to the agent or the log"; exit 1
fi
say "demo passed: the upstream got the real key; the agent only ever held \"$PLACEHOLDER\""
