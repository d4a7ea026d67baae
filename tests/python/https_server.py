"""An HTTPS server on loopback with the certificate it is given, standing in for an identity
provider's key set and a webhook receiver: GET /NAME answers the file DIR/NAME (JSON), and
every POST is answered 200 and written, with its headers, to DIR/posts.jsonl.

usage: https_server.py PORT CERT KEY DIR
"""

import json
import os
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, cert, key, root = sys.argv[1:5]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def answer(self, status, data):
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        path = os.path.join(root, os.path.basename(self.path))
        if not os.path.isfile(path):
            return self.answer(404, b"{}")
        with open(path, "rb") as f:
            self.answer(200, f.read())

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        entry = {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body.decode()}
        with open(os.path.join(root, "posts.jsonl"), "a") as log:
            log.write(json.dumps(entry) + "\n")
        self.answer(200, b"{}")


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
server = ThreadingHTTPServer(("127.0.0.1", int(port)), Handler)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
