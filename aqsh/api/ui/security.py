"""Browser safety for the console and the API it calls.

CSRF: the identity is whatever the authenticating proxy says, and behind oauth2-proxy that is a
session cookie the browser attaches to every request to the host — a form on another site could
post to ``/tasks/deploy`` as the signed-in engineer. So a state-changing request that comes from
a browser (it carries ``Origin``, ``Cookie`` or ``Sec-Fetch-Site``) must also carry the custom
header ``X-Aqsh-Csrf: 1``. Another origin cannot add a custom header without a CORS preflight,
and aqsh answers no preflight, so only aqsh's own pages (same origin) can send it. Clients that
are not browsers (the CLI, curl, Go services) send none of those headers and are unaffected.
Chosen over a SameSite cookie + token: aqsh sets no cookies and keeps no sessions (identity is
the proxy's), and a header needs no server-side state.

Headers: every ``/ui`` response gets a Content-Security-Policy that allows only aqsh's own
script, style and connections (no inline script at all, no framing), ``nosniff``, no referrer
beyond the origin, and no caching of pages that show another user's task data.
"""

from __future__ import annotations

from aiohttp import web

from aqsh.api.errors import ApiError, Handler

CSRF_HEADER = "X-Aqsh-Csrf"
_STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_BROWSER_HEADERS = ("Origin", "Cookie", "Sec-Fetch-Site")

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
UI_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
}


def from_browser(request: web.Request) -> bool:
    return any(h in request.headers for h in _BROWSER_HEADERS)


@web.middleware
async def csrf_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Inside the error middleware, so the refusal is the usual JSON error."""
    if (request.method in _STATE_CHANGING and from_browser(request)
            and request.headers.get(CSRF_HEADER) != "1"):
        raise ApiError(403, "csrf_header_missing",
                       f"a state-changing request from a browser must carry {CSRF_HEADER}: 1 "
                       "(aqsh's console sends it; other sites cannot)")
    return await handler(request)


@web.middleware
async def ui_headers_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Outside the error middleware: error pages and JSON errors under /ui get the headers
    too."""
    response = await handler(request)
    if request.path == "/ui" or request.path.startswith("/ui/"):
        response.headers.update(UI_HEADERS)
        if not request.path.startswith("/ui/static/"):
            response.headers["Cache-Control"] = "no-store"
    return response
