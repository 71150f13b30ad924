"""Query API (Litestar, port 8080): read models over HTTP, operator actions, the live event
stream (SSE) and the dashboard."""
