#!/usr/bin/env python3
"""Demo service "orders": a plain http.server app with no tracing code at all.

GET /order/<id> asks the payments service (PAYMENTS_URL) to authorise the order and answers
with JSON. Thread-per-request, keep-alive HTTP/1.1.
"""
import http.client
import json
import os
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlparse

PAYMENTS = urlparse(os.environ.get("PAYMENTS_URL", "http://127.0.0.1:18081"))


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        if not self.path.startswith("/order/"):
            return self.reply(404, {"error": "no such route"})
        order = self.path.split("/")[2].split("?")[0]
        conn = http.client.HTTPConnection(PAYMENTS.hostname, PAYMENTS.port, timeout=5)
        try:
            conn.request("POST", f"/pay?order={order}", body=b'{"amount": 42}',
                         headers={"Content-Type": "application/json"})
            resp = conn.getresponse()
            body = resp.read()
            status = 200 if resp.status == 200 else 502
            self.reply(status, {"order": order, "payment": resp.status, "detail": body.decode(errors="replace")})
        finally:
            conn.close()

    def reply(self, status, obj):
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    port = int(sys.argv[1]) if len(sys.argv) > 1 else 18080
    ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
