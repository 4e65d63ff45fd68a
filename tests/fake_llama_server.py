"""A stand-in for llama.cpp's `llama-server` in the bench tests: parses the arguments the harness
passes, answers /health, /completion (a label) and streamed /v1/chat/completions (one content event
per token, then usage), and appends its command line to $FAKE_PEER_LOG."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

TOKEN_DELAY_S = 0.002


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: object) -> None:
        pass

    def _json(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self._json({"status": "ok"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/completion":
            assert "root" in body["grammar"] and body["id_slot"] == 0
            self._json({"content": "Positive"})
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        n = int(body["max_tokens"])
        for _ in range(n):
            self._event({"choices": [{"index": 0, "delta": {"content": "la "}}]})
            time.sleep(TOKEN_DELAY_S)
        self._event({"choices": [], "usage": {"completion_tokens": n}})
        self.wfile.write(b"data: [DONE]\n\n")
        self.close_connection = True

    def _event(self, event: dict) -> None:
        self.wfile.write(b"data: " + json.dumps(event).encode() + b"\n\n")
        self.wfile.flush()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("-np", type=int, required=True)
    args, _ = parser.parse_known_args()
    with open(os.environ["FAKE_PEER_LOG"], "a") as log:
        log.write(json.dumps(sys.argv[1:]) + "\n")
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
