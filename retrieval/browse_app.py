"""The retrieval browser's web application (Flask): JSON routes over an ``retrieval.browse_index.BrowseIndex`` and the
static page in ``retrieval/browse_static/`` (plain HTML/CSS/JS, no build step, nothing fetched from elsewhere).

Routes (all GET):
    /                              the page; its state is in the URL (?q=... | ?caption=ID | ?image=ID | ?view=eval)
    /api/info                      what is loaded (mode, split, sizes, limits)
    /api/search?q=TEXT&k=K         a sentence -> top-K images
    /api/caption/<id>?k=K          a caption of the split -> top-K images
    /api/image/<id>?k=K            an image -> top-K captions, its ground-truth captions and their ranks
    /api/eval?direction=D&page=P&per_page=N   R@K / Med r and one page of the worst-ranked queries
    /image/<id>                    a JPEG thumbnail of gallery image <id>;  /image/<id>/full: the file itself

Images are found by their id in the loaded gallery only, never by a path taken from the request. Every error is a
short JSON ``{"error": message, "status": code}`` (HTML for pages), never a stack trace; unexpected exceptions are
logged on the server and answered with a generic 500.
"""
from __future__ import annotations

import logging
from html import escape
from pathlib import Path

from flask import Flask, Response, jsonify, request, send_file
from werkzeug.exceptions import HTTPException
from werkzeug.serving import WSGIRequestHandler

from .browse_index import BrowseError, BrowseIndex
from .browse_limits import MAX_K, MAX_PER_PAGE, MAX_QUERY_CHARS

STATIC = Path(__file__).resolve().parent / "browse_static"
log = logging.getLogger("retrieval.browse")
_CSP = "default-src 'self'; img-src 'self' data: blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"


def _int_arg(name: str, default: int | None, lo: int, hi: int) -> int | None:
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BrowseError(f"{name}={raw[:40]!r}: expected an integer from {lo} to {hi}") from None
    if not lo <= value <= hi:
        raise BrowseError(f"{name}={value}: expected an integer from {lo} to {hi}")
    return value


def _wants_json() -> bool:
    return request.path.startswith(("/api/", "/image/"))


def _error(status: int, message: str) -> Response:
    if _wants_json():
        resp = jsonify({"error": message, "status": status})
    else:
        resp = Response(f"<!doctype html><title>{status}</title><h1>{status}</h1><p>{escape(message)}</p>"
                        f"<p><a href=\"/\">back to the browser</a></p>", mimetype="text/html")
    resp.status_code = status
    return resp


def create_app(index: BrowseIndex) -> Flask:
    """The Flask app serving ``index`` (a ``BrowseIndex``); use its ``test_client()`` in tests."""
    app = Flask("retrieval.browse", static_folder=str(STATIC), static_url_path="/static")
    app.json.sort_keys = False

    @app.after_request
    def headers(resp: Response) -> Response:
        resp.headers.setdefault("Content-Security-Policy", _CSP)
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "no-referrer"
        if request.path.startswith("/api/"):
            resp.headers["Cache-Control"] = "no-store"
        return resp

    @app.errorhandler(BrowseError)
    def bad_request(e: BrowseError) -> Response:
        return _error(e.status, str(e))

    @app.errorhandler(HTTPException)
    def http_error(e: HTTPException) -> Response:
        msg = {404: f"not found: {request.path[:200]} (images and captions are addressed by id, e.g. /image/0; "
                    f"the page is /)", 405: f"method {request.method} is not allowed here (use GET)"}
        return _error(e.code or 500, msg.get(e.code, e.description or e.name))

    @app.errorhandler(Exception)
    def internal(e: Exception) -> Response:
        log.exception("error while answering %s", request.full_path)
        return _error(500, "internal error while answering this request (the server's log has the details)")

    @app.get("/")
    def page() -> Response:
        return app.send_static_file("index.html")

    @app.get("/api/info")
    def info() -> Response:
        return jsonify(index.info())

    @app.get("/api/search")
    def search() -> Response:
        return jsonify(index.search(request.args.get("q", ""), _int_arg("k", None, 1, MAX_K)))

    @app.get("/api/caption/<int:cid>")
    def caption(cid: int) -> Response:
        return jsonify(index.caption(cid, _int_arg("k", None, 1, MAX_K)))

    @app.get("/api/image/<int:iid>")
    def image(iid: int) -> Response:
        return jsonify(index.image(iid, _int_arg("k", None, 1, MAX_K)))

    @app.get("/api/eval")
    def evaluation() -> Response:
        direction = request.args.get("direction") or (next(iter(index.ranks), "t2i"))
        return jsonify(index.worst(direction, _int_arg("page", 0, 0, 10**9),
                                   _int_arg("per_page", 20, 1, MAX_PER_PAGE)))

    @app.get("/image/<int:iid>")
    def thumbnail(iid: int) -> Response:
        resp = Response(index.thumbnail(iid), mimetype="image/jpeg")
        resp.headers["Cache-Control"] = "private, max-age=3600"
        return resp

    @app.get("/image/<int:iid>/full")
    def full_image(iid: int) -> Response:
        return send_file(index.image_file(iid), max_age=3600)

    return app


class JSONErrorRequestHandler(WSGIRequestHandler):
    """werkzeug's request handler, but the errors the HTTP server answers itself, before the app sees the request
    (a request line over 64 KiB: 414; malformed requests: 400; ...), come back as the app's JSON error too, with
    the same security headers, instead of http.server's HTML page."""

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        import json

        if code == 414:
            message = (f"the request line is over 64 KiB: a query is at most {MAX_QUERY_CHARS} characters (and k "
                       f"at most {MAX_K})")
        elif message is None:
            message = self.responses.get(code, ("error",))[0]
        self.log_error("code %d, message %s", code, message)
        body = json.dumps({"error": message, "status": code}).encode()
        self.send_response(code)
        self.send_header("Connection", "close")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Content-Security-Policy", _CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)
