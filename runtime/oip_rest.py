"""The Open Inference Protocol v2 over HTTP/REST (KServe v2 / Triton), next to the gRPC server.

One data plane: the REST server holds the gRPC ``InferenceServicer`` and calls its ``handler`` lookup, the same
``ModelHandler`` objects, ``status.status_for`` and the same metrics, so both protocols give the same answers and
the same errors (gRPC code -> HTTP status in ``oip_rest_codec.HTTP_STATUS``; body ``{"error": "..."}``).

Endpoints: ``GET /v2/health/live``, ``/v2/health/ready``, ``/v2``, ``/v2/models/{m}[/versions/{v}]``,
``/v2/models/{m}[/versions/{v}]/ready`` and ``POST /v2/models/{m}[/versions/{v}]/infer``. Path segments are
URL-decoded (tail models are ``<model>@<split>``, sent as ``%40`` by tritonclient). An unknown model is 404 on
every endpoint (also ``/ready``, as KServe's REST server answers); a known model not ready is 503.

Standard library only (``http.server``, ``ssl``): nothing heavy on the device. Bounds: a body above the message
limit is refused with 413 before it is read; at most ``MAX_CONNECTIONS`` connections get a thread (more are
closed at once), and an idle keep-alive connection is closed after ``IDLE_TIMEOUT_S``; the TLS handshake runs on
the connection's thread, so a slow client never blocks accepting others. Auth: with a token every endpoint but
``/v2/health/*`` needs ``Authorization: Bearer <token>`` (health stays open for probes, as gRPC health does).
"""

from __future__ import annotations

import hmac
import logging
import socket
import ssl
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import unquote, urlsplit

import grpc

from edgeexit.errors import ConfigError, InvalidTensor
from edgeexit.runtime.oip_rest_codec import HEADER_LENGTH, dumps, encode_infer, http_status, metadata_json, parse_infer
from edgeexit.runtime.security import read_pem
from edgeexit.runtime.status import cap_message, clip, status_for

log = logging.getLogger("edgeexit.runtime.rest")

MAX_CONNECTIONS = 64  # connections served at once, one thread each
IDLE_TIMEOUT_S = 30.0  # an idle (keep-alive) or stalled connection is closed after this long
UNKNOWN_MODEL = "<unknown>"  # as oip_server's metrics label for names not served


class _Refusal(Exception):
    """An HTTP-level refusal (not an OIP error): status, message, extra headers."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.headers = status, headers or {}


class RestServer:
    """REST front of one ``InferenceServicer``: ``start()``, the bound ``port``, ``begin_stop()``/``close()``."""

    def __init__(self, servicer: Any, host: str, port: int, *, token: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, tls_client_ca: str | None = None,
                 max_message_bytes: int = 64 << 20):
        self.servicer, self.token, self.max_body = servicer, token, max_message_bytes
        self._expected = f"Bearer {token}".encode() if token else None
        self.tls = _tls_context(tls_cert, tls_key, tls_client_ca) if tls_cert else None
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        self._inflight = 0
        self._lock = threading.Condition()
        self.draining = False
        try:
            self.httpd = _Server((host, port), _handler_class(self))
        except OSError as e:
            raise ConfigError(f"cannot listen for HTTP on {host}:{port} ({e}); pick another --http-port") from e
        self.httpd.rest = self
        self.port = int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    def start(self) -> RestServer:
        self._thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="oip-rest", daemon=True)
        self._thread.start()
        return self

    def begin_stop(self) -> None:
        """Stop accepting; requests still arriving on open connections get 503 and ``Connection: close``."""
        self.draining = True
        if self._thread is not None:
            self.httpd.shutdown()
            self._thread = None

    def close(self, grace: float | None = 5.0) -> None:
        """Let in-flight requests finish within ``grace`` seconds, then close every socket."""
        self.begin_stop()
        deadline = time.monotonic() + (grace or 0.0)
        with self._lock:
            while self._inflight and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
        self.httpd.server_close_all()

    def _enter(self) -> None:
        with self._lock:
            self._inflight += 1

    def _leave(self) -> None:
        with self._lock:
            self._inflight -= 1
            self._lock.notify_all()

    # -- what each endpoint does (raising edgeexit errors or _Refusal) ---------------------------------------

    def route(self, method: str, path: str, headers: Any, body: Any) -> tuple[int, bytes, dict[str, str]]:
        parts = [unquote(p) for p in urlsplit(path).path.split("/") if p]
        if parts[:1] != ["v2"]:
            raise _Refusal(404, f"no such endpoint {clip(path)}; the OIP v2 REST API lives under /v2")
        rest = parts[1:]
        if rest in (["health", "live"], ["health", "ready"]):
            _allow(method, "GET")
            if rest[1] == "live":
                return 200, dumps({"live": True}), {}
            ready = not self.draining and all(h.ready() for h in self.servicer.handlers.values())
            return (200 if ready else 503), dumps({"ready": ready} if ready else {"error": "not ready"}), {}
        self._authorize(headers)
        if not rest:
            _allow(method, "GET")
            s = self.servicer
            return 200, dumps({"name": s.name, "version": s.version, "extensions": ["binary_tensor_data"]}), {}
        if rest[0] != "models" or len(rest) < 2:
            raise _Refusal(404, f"no such endpoint {clip(path)}; see /v2/models/<model>[/ready|/infer]")
        model, version, tail = rest[1], "", rest[2:]
        if tail[:1] == ["versions"] and len(tail) >= 2:
            version, tail = tail[1], tail[2:]
        if tail == []:
            _allow(method, "GET")
            return 200, dumps(metadata_json(self.servicer.handler(model, version).metadata())), {}
        if tail == ["ready"]:
            _allow(method, "GET")
            h = self.servicer.handler(model, version)  # unknown: ModelNotFound (404)
            if not h.ready():
                return 503, dumps({"error": f"model {clip(model)} is not ready"}), {}
            return 200, dumps({"name": model, "ready": True}), {}
        if tail == ["infer"]:
            _allow(method, "POST")
            return self._infer(model, version, headers, body())
        raise _Refusal(404, f"no such endpoint {clip(path)}; see /v2/models/<model>[/ready|/infer]")

    def _authorize(self, headers: Any) -> None:
        if self._expected is None:
            return
        got = headers.get("Authorization")
        challenge = {"WWW-Authenticate": "Bearer"}
        if got is None:
            raise _Refusal(401, "missing 'Authorization: Bearer <token>' header; this server requires a token",
                           challenge)
        if not hmac.compare_digest(got.encode("latin-1", "replace"), self._expected):
            raise _Refusal(401, "wrong bearer token; check the token file shared with the server", challenge)

    def _infer(self, model: str, version: str, headers: Any, body: bytes) -> tuple[int, bytes, dict[str, str]]:
        start, code = time.perf_counter(), grpc.StatusCode.OK
        try:
            header_length = _int_header(headers, HEADER_LENGTH)
            request, wants = parse_infer(body, header_length, model, version)
            handler = self.servicer.handler(model, version)
            response = handler.infer(request)
            data, json_len = encode_infer(model, getattr(handler, "version", "1"), request.id, response, wants)
        except Exception as e:  # noqa: BLE001 - every error becomes a status, as on gRPC
            code, message = status_for(e)
            return http_status(code), dumps({"error": message}), {}
        finally:
            label = model if model in self.servicer.handlers else UNKNOWN_MODEL
            self.servicer.metrics.observe_request(label, code.name, time.perf_counter() - start)
        if json_len is None:
            return 200, data, {}
        return 200, data, {HEADER_LENGTH: str(json_len), "Content-Type": "application/octet-stream"}


def _allow(method: str, allowed: str) -> None:
    if method != allowed:
        raise _Refusal(405, f"use {allowed} on this endpoint, not {method}", {"Allow": allowed})


def _int_header(headers: Any, name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(value)
    except ValueError:
        raise InvalidTensor(f"header {name} must be an integer (the JSON part's length), got {clip(value)}") from None


def _tls_context(cert: str, key: str | None, client_ca: str | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    read_pem(cert, "TLS certificate")  # the same checks and messages as the gRPC side
    read_pem(key or "", "TLS key")
    try:
        ctx.load_cert_chain(cert, key)
        if client_ca:
            ctx.load_verify_locations(cafile=str(client_ca))
            ctx.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as e:
        raise ConfigError(f"cannot use TLS certificate {cert} with key {key} ({e}); pass a matching PEM pair") from e
    return ctx


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    allow_reuse_port = False  # port 0 must give a port nobody else is serving on
    rest: RestServer

    def __init__(self, address: tuple[str, int], handler: type) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self._open: set[socket.socket] = set()
        self._open_lock = threading.Lock()
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.rest._slots.acquire(blocking=False):  # bounded: refuse rather than spawn a thread
            log.warning("REST connection refused: %d connections already open", MAX_CONNECTIONS)
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)  # starts process_request_thread
        except Exception:
            self.rest._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        conn = request
        try:
            request.settimeout(IDLE_TIMEOUT_S)
            if self.rest.tls is not None:  # handshake here, on the connection's own thread
                try:
                    conn = self.rest.tls.wrap_socket(request, server_side=True)
                except (ssl.SSLError, OSError) as e:
                    log.info("REST TLS handshake with %s failed: %s", client_address[0], e)
                    return
            with self._open_lock:
                self._open.add(conn)
            self.finish_request(conn, client_address)
        except Exception:  # noqa: BLE001 - one connection's failure never stops the server
            self.handle_error(conn, client_address)
        finally:
            with self._open_lock:
                self._open.discard(conn)
            self.shutdown_request(conn)
            self.rest._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:  # never a traceback on stderr
        log.warning("REST connection from %s failed", client_address[0], exc_info=True)

    def server_close_all(self) -> None:
        self.server_close()
        with self._open_lock:
            sockets = list(self._open)
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


def _handler_class(rest: RestServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive, as tritonclient's connection pool expects
        server_version = "edgeexit"
        sys_version = ""

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def do_PUT(self) -> None:
            self._serve("PUT")

        def do_DELETE(self) -> None:
            self._serve("DELETE")

        def _serve(self, method: str) -> None:
            rest._enter()
            try:
                if rest.draining:
                    raise _Refusal(503, "the server is shutting down; retry on another replica")
                status, data, headers = rest.route(method, self.path, self.headers, self._body)
            except _Refusal as e:
                status, data, headers = e.status, dumps({"error": e.args[0]}), e.headers
            except Exception as e:  # noqa: BLE001 - status_for logs the unexpected; the server keeps serving
                code, message = status_for(e)
                status, data, headers = http_status(code), dumps({"error": message}), {}
            finally:
                rest._leave()
            self._reply(status, data, headers)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding"):
                raise _Refusal(411, "chunked bodies are not supported; send Content-Length")
            if self.headers.get("Content-Encoding", "identity") != "identity":
                raise _Refusal(415, "compressed request bodies are not supported; send the body uncompressed")
            try:
                length = int(self.headers.get("Content-Length", ""))
            except ValueError:
                raise _Refusal(411, "send a Content-Length header with the body") from None
            if length < 0 or length > rest.max_body:
                raise _Refusal(413, f"the body has {length} bytes, above this server's limit of {rest.max_body} "
                                    "(--max-message-mb); send fewer rows per request")
            data = self.rfile.read(length)
            if len(data) != length:
                raise _Refusal(400, f"the body ended after {len(data)} of {length} bytes")
            self._body_read = True
            return data

        def _reply(self, status: int, data: bytes, headers: dict[str, str]) -> None:
            # A body we did not read would be parsed as the next request: close such connections.
            headers_in = getattr(self, "headers", None)  # absent when the request line itself was bad
            sent_body = headers_in is not None and (headers_in.get("Content-Length", "0") != "0"
                                                    or headers_in.get("Transfer-Encoding"))
            if sent_body and not getattr(self, "_body_read", False) or rest.draining:
                self.close_connection = True
            self._body_read = False
            self.send_response(status)
            self.send_header("Content-Type", headers.pop("Content-Type", "application/json"))
            self.send_header("Content-Length", str(len(data)))
            for k, v in headers.items():
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            # http.server's own refusals (bad request line, huge headers, unknown method): JSON, not HTML.
            self.close_connection = True
            try:
                self._reply(code, dumps({"error": cap_message(message or explain or "bad request")}), {})
            except OSError:
                pass

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
            log.debug("%s %s", self.address_string(), format % args)

    return Handler
