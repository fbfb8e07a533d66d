#!/usr/bin/env python3
"""An HTTP relay for scripts/bench.sh that cuts bodies, as a flaky link does.

    cut-relay.py UPSTREAM FRACTION

Listens on 127.0.0.1 (a free port, printed on the first line of stdout) and
relays GET and HEAD requests to UPSTREAM with their Range and If-Range
headers. The first whole-body GET (no Range) of each path is cut after
FRACTION of its body: the connection closes with the announced length
unsent. Every other answer is relayed whole. GET /_relayed/PATH reports how
many body bytes the relay sent for PATH, so the benchmark can compare what
a resuming client cost the upstream with the size of the blob.
"""

import http.client
import http.server
import sys
import threading
import urllib.parse

UPSTREAM = urllib.parse.urlsplit(sys.argv[1])
FRACTION = float(sys.argv[2])
CHUNK = 64 * 1024

lock = threading.Lock()
relayed = {}  # path -> body bytes sent
cut_done = set()  # paths whose first whole GET was cut


class Relay(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        self.relay(head=True)

    def do_GET(self):
        if self.path.startswith("/_relayed/"):
            path = self.path[len("/_relayed"):]
            with lock:
                body = str(relayed.get(path, 0)).encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self.relay(head=False)

    def relay(self, head):
        upstream = http.client.HTTPConnection(UPSTREAM.hostname, UPSTREAM.port, timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() in ("range", "if-range", "accept", "authorization")}
        upstream.request("HEAD" if head else "GET", self.path, headers=headers)
        response = upstream.getresponse()
        length = response.getheader("Content-Length")
        cut_at = None
        if not head and "range" not in {k.lower() for k in headers} and length is not None:
            with lock:
                if self.path not in cut_done and "/blobs/" in self.path:
                    cut_done.add(self.path)
                    cut_at = int(int(length) * FRACTION)
        self.send_response(response.status)
        for name, value in response.getheaders():
            if name.lower() not in ("connection", "keep-alive", "transfer-encoding"):
                self.send_header(name, value)
        if length is None and not head:
            self.close_connection = True
        self.end_headers()
        sent = 0
        while not head:
            chunk = response.read(CHUNK)
            if not chunk:
                break
            if cut_at is not None and sent + len(chunk) >= cut_at:
                chunk = chunk[: cut_at - sent]
            self.wfile.write(chunk)
            sent += len(chunk)
            if cut_at is not None and sent >= cut_at:
                break
        upstream.close()
        with lock:
            relayed[self.path] = relayed.get(self.path, 0) + sent
        if cut_at is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)


server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Relay)
print(server.server_address[1], flush=True)
server.serve_forever()
