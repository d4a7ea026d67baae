"""A stand-in for a hosted OpenAI-compatible API, which cannot be reached from these machines:
HTTPS with the certificate it is given, one API key it accepts, each request it receives
written to a log (path, credentials, Host, body), and a mode: `serve` answers chat
completions, `429` refuses every one with `Retry-After`, `context` refuses every one as
longer than its context (400, OpenAI's `context_length_exceeded`), `bad` as a bad request
(400, `invalid_value`).

usage: hosted_provider.py PORT CERT KEY API_KEY MODE LOG PATH_PREFIX [CLIENT_CA]

With CLIENT_CA, only clients showing a certificate from that CA complete the handshake.
"""

import json
import ssl
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, cert, key, api_key, mode, log_path, prefix = sys.argv[1:8]
client_ca = sys.argv[8] if len(sys.argv) > 8 else None


class Provider(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def send_json(self, status, body, headers=()):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def record(self, body):
        entry = {
            "method": self.command,
            "path": self.path,
            "authorization": self.headers.get("authorization"),
            "host": self.headers.get("host"),
            "extra": self.headers.get("x-provider-project"),
            "body": body,
        }
        with open(log_path, "a") as log:
            log.write(json.dumps(entry) + "\n")

    def refuse_stranger(self):
        if self.headers.get("authorization") == f"Bearer {api_key}":
            return False
        error = {"message": "Incorrect API key", "type": "invalid_request_error", "code": "invalid_api_key"}
        self.send_json(401, {"error": error})
        return True

    def do_GET(self):
        self.record(None)
        if self.refuse_stranger():
            return
        if self.path == f"{prefix}/models":
            model = {"id": "provider-model", "object": "model", "owned_by": "provider"}
            return self.send_json(200, {"object": "list", "data": [model]})
        self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error", "code": None}})

    def do_POST(self):
        length = int(self.headers.get("content-length", "0"))
        body = json.loads(self.rfile.read(length) or b"{}")
        self.record(body)
        if self.refuse_stranger():
            return
        if mode == "context":
            error = {
                "message": "This model's maximum context length is 8192 tokens. However, your messages resulted in 9120 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
            return self.send_json(400, {"error": error})
        if mode == "bad":
            error = {"message": "'temperature' must be at most 2", "type": "invalid_request_error", "param": "temperature", "code": "invalid_value"}
            return self.send_json(400, {"error": error})
        if mode == "429":
            error = {"message": "Rate limit reached", "type": "requests", "code": "rate_limit_exceeded"}
            return self.send_json(429, {"error": error}, [("retry-after", "30")])
        if self.path != f"{prefix}/chat/completions":
            return self.send_json(404, {"error": {"message": "not found", "type": "invalid_request_error", "code": None}})
        answer = {
            "id": "chatcmpl-hosted",
            "object": "chat.completion",
            "created": 0,
            "model": body.get("model"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": "from the hosted provider"}, "finish_reason": "stop"}
            ],
            "usage": {"prompt_tokens": 11, "completion_tokens": 5, "total_tokens": 16},
        }
        limits = [("x-ratelimit-remaining-requests", "99"), ("x-ratelimit-reset-requests", "1s")]
        self.send_json(200, answer, limits)


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(cert, key)
if client_ca:
    context.verify_mode = ssl.CERT_REQUIRED
    context.load_verify_locations(client_ca)
server = ThreadingHTTPServer(("127.0.0.1", int(port)), Provider)
server.socket = context.wrap_socket(server.socket, server_side=True)
print("ready", flush=True)
server.serve_forever()
