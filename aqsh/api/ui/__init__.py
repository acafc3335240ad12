"""The console at /ui: server-rendered pages over the API (``pages``) and the browser-safety
rules they and the API share (``security``)."""

from aqsh.api.ui.pages import add_routes
from aqsh.api.ui.security import csrf_middleware, ui_headers_middleware

__all__ = ["add_routes", "csrf_middleware", "ui_headers_middleware"]
