# syntax=docker/dockerfile:1
# Regiongate container image.
#
#   version=$(python -c 'import gateway; print(gateway.__version__)')
#   docker build --build-arg VERSION="$version" -t "regiongate:$version" .
#   docker run --read-only -p 8080:8080 \
#     -v "$PWD/policy.yaml:/etc/regiongate/policy.yaml:ro" \
#     -v "$PWD/geoip:/var/lib/geoip:ro" -e REGIONGATE_GEOIP=/var/lib/geoip/GeoLite2-City.mmdb \
#     "regiongate:$version"
#
# VERSION has no default: the version is written once, in gateway/__init__.py, and the build
# installs exactly regiongate-$VERSION's wheel, so a missing or stale VERSION stops it.
#
# Mount points (nothing else is written, so the root filesystem can be read-only):
#   /etc/regiongate/policy.yaml   the policy (read-only); there is no default, so a forgotten
#                                 mount stops the container instead of enforcing a policy you did not choose
#   /var/lib/geoip                MaxMind-format databases (read-only), named in REGIONGATE_GEOIP
#   /run/regiongate/metrics       prometheus-client's multiprocess files: the only writable path
#                                 (a tmpfs or emptyDir; emptied at every start)
# Ports: 8080 is the proxy, the one to publish. 9090 is the control plane (/healthz /readyz
# /metrics): it listens on 0.0.0.0 so that probes and Prometheus can reach it, and must never be
# published to the internet.
# tests/deploy/test_deploy_image.py runs this file's ENV, ENTRYPOINT, CMD and HEALTHCHECK against the same
# wheel, as a non-root user on a read-only root filesystem.

ARG PYTHON_IMAGE=python:3.11.16-slim-trixie

# --- builder: the project's wheel and every dependency's wheel -------------------------------
FROM ${PYTHON_IMAGE} AS builder
ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY gateway ./gateway
COPY policies ./policies
RUN python -m pip wheel --wheel-dir /wheels .

# --- final: a virtualenv installed from those wheels only, no source, no compilers ----------
FROM ${PYTHON_IMAGE}
ARG PYTHON_IMAGE
ARG VERSION
ARG REVISION=unknown
LABEL org.opencontainers.image.title="regiongate" \
      org.opencontainers.image.description="Region-aware gateway for OpenAI-compatible model APIs: GeoIP policy, refusal, forwarding." \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/${PYTHON_IMAGE}"

# A fixed numeric user, so that Kubernetes' runAsNonRoot can verify it without a passwd lookup.
RUN groupadd --system --gid 10001 regiongate \
 && useradd --system --uid 10001 --gid regiongate --no-create-home --home-dir /nonexistent \
      --shell /usr/sbin/nologin regiongate

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/regiongate \
 && /opt/regiongate/bin/pip install --no-cache-dir --no-index --find-links=/wheels \
      "/wheels/regiongate-${VERSION:?build with --build-arg VERSION=gateway.__version__}-py3-none-any.whl" \
 && /opt/regiongate/bin/pip uninstall --yes pip \
 && install -d -o regiongate -g regiongate -m 0750 /run/regiongate/metrics \
 && install -d -m 0755 /etc/regiongate /var/lib/geoip

ENV PATH="/opt/regiongate/bin:${PATH}" \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PROMETHEUS_MULTIPROC_DIR=/run/regiongate/metrics \
    REGIONGATE_POLICY=/etc/regiongate/policy.yaml \
    REGIONGATE_HOST=0.0.0.0 \
    REGIONGATE_PORT=8080 \
    REGIONGATE_ADMIN_HOST=0.0.0.0 \
    REGIONGATE_ADMIN_PORT=9090

# With --read-only and no --tmpfs, Docker still gives this path an anonymous writable volume.
VOLUME ["/run/regiongate/metrics"]
USER 10001:10001
EXPOSE 8080 9090
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('REGIONGATE_ADMIN_PORT', '9090'), timeout=4)"]
ENTRYPOINT ["regiongate"]
CMD ["serve"]
