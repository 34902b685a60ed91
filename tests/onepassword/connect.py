"""A stand-in for a 1Password Connect server, for the tests: the endpoints the appliance uses,
as 1Password documents them (list vaults with a filter, get a vault, list items with a
filter, get an item), with their error answers. The vaults are read from a JSON file on
every request, so a test changes an item by rewriting the file; a "fail" entry there
({"status": 503, "message": "..."}) makes every request fail that way.

Usage: connect.py DATA_FILE TOKEN REQUEST_LOG; prints the port it listens on (127.0.0.1).
"""
import http.server
import json
import re
import sys
import urllib.parse

data_file, token, request_log = sys.argv[1:4]
FILTER = re.compile(r'^(name|title) eq "((?:[^"\\]|\\.)*)"$')


def load():
    with open(data_file) as f:
        return json.load(f)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, status, body):
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def error(self, status, message):
        self.answer(status, {"status": status, "message": message})

    def do_GET(self):
        url = urllib.parse.urlsplit(self.path)
        with open(request_log, "a") as log:
            log.write(json.dumps({"path": url.path, "query": url.query}) + "\n")
        if self.headers.get("Authorization") != "Bearer " + token:
            return self.error(401, "Invalid token signature")
        data = load()
        if data.get("fail"):
            return self.error(data["fail"]["status"], data["fail"]["message"])
        wanted = None
        query = urllib.parse.parse_qs(url.query)
        if "filter" in query:
            match = FILTER.match(query["filter"][0])
            if not match:
                return self.error(400, "Invalid filter")
            wanted = (match.group(1), match.group(2).replace('\\"', '"').replace("\\\\", "\\"))
        parts = [part for part in url.path.split("/") if part]
        vaults = data["vaults"]
        if parts == ["v1", "vaults"]:
            listed = [v for v in vaults if wanted is None or (wanted[0] == "name" and v["name"] == wanted[1])]
            return self.answer(200, [{"id": v["id"], "name": v["name"]} for v in listed])
        if len(parts) >= 3 and parts[:2] == ["v1", "vaults"]:
            vault = next((v for v in vaults if v["id"] == parts[2]), None)
            if vault is None:
                return self.error(404, "Invalid Vault UUID")
            if len(parts) == 3:
                return self.answer(200, {"id": vault["id"], "name": vault["name"]})
            if len(parts) == 4 and parts[3] == "items":
                items = [i for i in vault["items"] if wanted is None or (wanted[0] == "title" and i["title"] == wanted[1])]
                return self.answer(200, [{"id": i["id"], "title": i["title"], "vault": {"id": vault["id"]}} for i in items])
            if len(parts) == 5 and parts[3] == "items":
                item = next((i for i in vault["items"] if i["id"] == parts[4]), None)
                if item is None:
                    return self.error(404, "Invalid Item UUID")
                return self.answer(200, dict(item, vault={"id": vault["id"]}))
        return self.error(404, "Not found")

    def log_message(self, *args):
        pass


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
