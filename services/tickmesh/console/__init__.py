"""The live console: a small web page and JSON/SSE API over the router's orchestrator API.

It lists a tenant's lifetimes, streams one lifetime's events (WatchLifetime) as a live
timeline, shows its tokens and cost, and pauses, resumes, aborts or signals it. The page is
plain HTML, CSS and JavaScript served from ``static/``: nothing is built at run time.
"""

from .app import build_app, serve

__all__ = ["build_app", "serve"]
