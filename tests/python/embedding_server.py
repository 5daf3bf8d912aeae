"""An OpenAI-compatible /v1/embeddings endpoint that is down for a while: the dependency-outage tests' embedder.

    embedding_server.py PORT_FILE DOWN_SECONDS [MAX_DELAY_MS]

Answers 503 to every request for DOWN_SECONDS after its first request, then deterministic unit vectors of the
requested model's dimension (the `dimensions` field, else 64), one per input text. Writes the port it listens on
to PORT_FILE; prints one line per request to stderr ("503" or "200 N") so a test can count the attempts.
With MAX_DELAY_MS, each answer with vectors is delayed by 0..MAX_DELAY_MS ms, chosen by the first text's digest (so
concurrent requests finish out of order, the same way every time).
While a file PORT_FILE.gate exists, requests are held before they are answered ("held" when one starts waiting,
"released" when it goes on): a test closes the gate to catch a worker with every task waiting on its embedder.
"""
import hashlib
import json
import math
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port_file, down_seconds = sys.argv[1], float(sys.argv[2])
max_delay_ms = int(sys.argv[3]) if len(sys.argv) > 3 else 0
first_request = None


def vector(text, dimension):
    values = []
    counter = 0
    while len(values) < dimension:
        digest = hashlib.sha256(f"{counter}:{text}".encode("utf-8", "surrogatepass")).digest()
        values.extend((b - 127.5) for b in digest)
        counter += 1
    values = values[:dimension]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        global first_request
        length = int(self.headers.get("Content-Length", "0"))
        request = json.loads(self.rfile.read(length) or b"{}")
        now = time.monotonic()
        if first_request is None:
            first_request = now
        if now - first_request < down_seconds:
            body = b'{"error": {"message": "model is loading", "type": "overloaded"}}'
            self.send_response(503)
            print("503", file=sys.stderr, flush=True)
        else:
            gate = port_file + ".gate"
            if os.path.exists(gate):
                print("held", file=sys.stderr, flush=True)
                while os.path.exists(gate):
                    time.sleep(0.01)
                print("released", file=sys.stderr, flush=True)
            texts = request.get("input", [])
            if max_delay_ms and texts:
                digest = hashlib.sha256(str(texts[0]).encode("utf-8", "surrogatepass")).digest()
                time.sleep(int.from_bytes(digest[:4], "big") % max_delay_ms / 1000)
            dimension = int(request.get("dimensions") or 64)
            data = [{"index": i, "embedding": vector(t, dimension), "object": "embedding"} for i, t in enumerate(texts)]
            body = json.dumps({"object": "list", "model": "outage-test-model", "data": data}).encode()
            self.send_response(200)
            print(f"200 {len(texts)}", file=sys.stderr, flush=True)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
with open(port_file + ".tmp", "w") as handle:
    handle.write(str(server.server_address[1]))
os.replace(port_file + ".tmp", port_file)
server.serve_forever()
