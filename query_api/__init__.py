"""Query API (Litestar, port 8080): read models over HTTP."""
