"""The HTTP tests' upstream: a small JSON service on loopback, standard library only.

Usage: http_upstream.py PORT LOG [CERT KEY CLIENT_CA]

With CERT, KEY and CLIENT_CA it serves HTTPS and requires a client certificate signed
by CLIENT_CA.

Every request it receives is appended to LOG as one JSON line (method, the raw path as
it arrived, headers, body), before it answers: the tests read LOG to see what reached
the upstream, not only what the client was told.

  /echo/...        any method: what it received, as JSON
  /users/N         a JSON record holding an email, a phone and a card number
  /orders          POST: "creates" an order (the log is the upstream's state)
  /stream?n=&ms=   chunked text/plain lines, one every ms milliseconds
  /events?n=&ms=   server-sent events, each with an email in its data
  /binary          application/octet-stream
  /gzip            gzip-compressed JSON
  /big?bytes=N     a JSON document of about N bytes
  anything else    {"path": ...}, 200
"""

import gzip
import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PORT = int(sys.argv[1])
LOG = sys.argv[2]
LOG_LOCK = threading.Lock()

USER = {
    "id": 1,
    "name": "Alice Example",
    "email": "alice@example.com",
    "phone": "+1 555 123 4567",
    "card": "4111 1111 1111 1111",
}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def read_body(self):
        length = self.headers.get("Content-Length")
        if length:
            return self.rfile.read(int(length))
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            data = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    self.rfile.readline()
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return b""

    def send_json(self, value, status=200, extra=()):
        body = json.dumps(value).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Set-Cookie", "upstream-session=s3cr3t")
        for name, value in extra:
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
        self.wfile.flush()

    def handle_any(self):
        body = self.read_body()
        received = {
            "method": self.command,
            "path": self.path,
            "headers": {k.lower(): v for k, v in self.headers.items()},
            "body": body.decode("utf-8", "replace"),
        }
        if TLS:
            received["client_cert"] = dict(
                x[0] for x in self.connection.getpeercert()["subject"]
            )
        with LOG_LOCK, open(LOG, "a") as log:
            log.write(json.dumps(received) + "\n")
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        path = url.path
        if path.startswith("/echo"):
            self.send_json(received)
        elif path.startswith("/users/"):
            self.send_json(
                dict(USER, id=path.rsplit("/", 1)[1]),
                extra=[("X-Owner", USER["email"])],
            )
        elif path == "/orders" and self.command == "POST":
            self.send_json({"created": True}, status=201)
        elif path in ("/stream", "/events"):
            events = path == "/events"
            self.send_response(200)
            self.send_header(
                "Content-Type", "text/event-stream" if events else "text/plain"
            )
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            try:
                for i in range(int(query.get("n", "5"))):
                    if events:
                        line = 'data: {"n": %d, "email": "bob@example.com"}\n\n' % i
                    else:
                        line = "line %d for carol@example.com\n" % i
                    self.chunk(line.encode())
                    time.sleep(int(query.get("ms", "0")) / 1000)
                self.chunk(b"")
            except (BrokenPipeError, ConnectionResetError):
                with LOG_LOCK, open(LOG, "a") as log:
                    log.write(json.dumps({"stream_cut": path}) + "\n")
        elif path == "/binary":
            data = b"\x00\x01card 4111111111111111\xff"
            self.send_response(200)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path == "/gzip":
            data = gzip.compress(json.dumps(USER).encode())
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "gzip")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        elif path == "/big":
            n = int(query.get("bytes", "1000"))
            self.send_json({"padding": "x" * n})
        else:
            self.send_json({"path": self.path})

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_OPTIONS = handle_any


TLS = len(sys.argv) > 3
ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
if TLS:
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(sys.argv[3], sys.argv[4])
    context.load_verify_locations(sys.argv[5])
    context.verify_mode = ssl.CERT_REQUIRED
    server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
