"""What the tests share: real processes on free loopback ports (``processes``), raw HTTP on sockets
(``raw_http``), the in-process gateway (``wire``), Redis, TLS and HAProxy (``redis_server``, ``edge``),
the live-reload and override helpers, the Dockerfile reader, and the fuzz targets with their oracles.
"""
