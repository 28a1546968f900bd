#!/usr/bin/env python3
"""A small HTTP/1.1 file server with byte ranges, for Strata's web
protocol tests (RFC 9110 section 14: Range, Accept-Ranges, Content-Range,
206 and 416), optionally over TLS.

Python's http.server has no ranges, so this adds them. Options that make
it misbehave on purpose test the client's defences:
  --no-ranges       never offer or honour ranges (200 with the whole file)
  --drop-first N    close the connection without an answer on the first N
                    ranged GETs (a flaky server: the client must retry)
  --wrong-range     answer every range from offset 0 (and say so)

The first line on stdout is "PORT <n>" once the server listens.
"""
import argparse
import http.server
import os
import re
import socketserver
import ssl
import sys
import threading

ARGS = None
DROPPED = 0
LOCK = threading.Lock()


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt, *args):
        if ARGS.log:
            sys.stderr.write("http_range: " + (fmt % args) + "\n")

    def _path(self):
        rel = self.path.split("?", 1)[0].lstrip("/")
        full = os.path.realpath(os.path.join(ARGS.root, rel))
        if not full.startswith(os.path.realpath(ARGS.root) + os.sep):
            return None
        return full if os.path.isfile(full) else None

    def _send(self, code, headers, body=b"", head=False):
        self.send_response(code)
        for k, v in headers:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if not head:
            self.wfile.write(body)

    def _serve(self, head):
        global DROPPED
        path = self._path()
        if path is None:
            self._send(404, [], b"not found\n", head)
            return
        size = os.path.getsize(path)
        common = [] if ARGS.no_ranges else [("Accept-Ranges", "bytes")]
        rng = None if ARGS.no_ranges else self.headers.get("Range")
        if rng is None:
            if head:
                self.send_response(200)
                for k, v in common:
                    self.send_header(k, v)
                self.send_header("Content-Length", str(size))
                self.end_headers()
                return
            with open(path, "rb") as f:
                self._send(200, common, f.read())
            return
        m = re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())
        if not m or (m.group(1) == "" and m.group(2) == ""):
            self._send(416, [("Content-Range", f"bytes */{size}")], b"", head)
            return
        if m.group(1) == "":
            start, end = max(0, size - int(m.group(2))), size - 1
        else:
            start = int(m.group(1))
            end = int(m.group(2)) if m.group(2) else size - 1
        end = min(end, size - 1)
        if start > end:
            self._send(416, [("Content-Range", f"bytes */{size}")], b"", head)
            return
        with LOCK:
            drop = DROPPED < ARGS.drop_first and not head
            if drop:
                DROPPED += 1
        if drop:
            self.close_connection = True
            self.connection.shutdown(2)
            return
        read_at = 0 if ARGS.wrong_range else start
        with open(path, "rb") as f:
            f.seek(read_at)
            body = f.read(end - start + 1)
        self._send(
            206,
            common
            + [("Content-Range", f"bytes {read_at}-{read_at + len(body) - 1}/{size}")],
            body,
            head,
        )

    def do_GET(self):
        self._serve(False)

    def do_HEAD(self):
        self._serve(True)


class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def main():
    global ARGS
    p = argparse.ArgumentParser()
    p.add_argument("root")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--cert")
    p.add_argument("--key")
    p.add_argument("--no-ranges", action="store_true")
    p.add_argument("--drop-first", type=int, default=0)
    p.add_argument("--wrong-range", action="store_true")
    p.add_argument("--log", action="store_true")
    ARGS = p.parse_args()
    srv = Server(("127.0.0.1", ARGS.port), Handler)
    if ARGS.cert:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.load_cert_chain(ARGS.cert, ARGS.key)
        srv.socket = ctx.wrap_socket(
            srv.socket, server_side=True, do_handshake_on_connect=False
        )
    print(f"PORT {srv.server_address[1]}", flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
