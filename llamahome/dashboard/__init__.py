"""The dashboard: a local web app to watch, compare and sample from runs (`launch.job = @dashboard`).

`app.py` holds the Starlette app and its JSON API, `request_guard.py` the checks every request
passes first (loopback Host, same origin, body size), `run_files.py` reads run dirs, `server.py`
the gin job that serves it on loopback, `playground.py` the sampling endpoint's logic, and
`static/` the pages with their SVG plotter (no CDN: everything is served from the package).
"""
