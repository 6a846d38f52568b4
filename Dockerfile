# syntax=docker/dockerfile:1
# The gateway as a container: slim Python, a non-root user, state in volumes.
# Build:  docker build -t federation-gateway .
# Run:    see docs/docker.md

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN python -m pip install --no-cache-dir --upgrade pip \
 && python -m pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN python -m pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway /var/lib/gateway \
 && chown gateway:gateway /var/lib/gateway && chmod 0700 /var/lib/gateway

# /etc/gateway: gateway.yaml, pki/ and keys/ (mount read-only; keys 0600, owned by uid 10001)
# /etc/gateway/rules: federation rules (mount read-only; edits are picked up by hot reload)
# /var/lib/gateway: the spool and mailboxes (data_dir)
VOLUME ["/etc/gateway", "/etc/gateway/rules", "/var/lib/gateway"]

# federation (mTLS, partners), client API (the org's clients), metrics (Prometheus)
EXPOSE 8443 8080 9090

USER gateway
WORKDIR /var/lib/gateway

HEALTHCHECK --interval=30s --timeout=5s --start-period=20s --retries=3 \
  CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:9090/healthz', timeout=4).status == 200 else 1)"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run", "-c", "/etc/gateway/gateway.yaml"]
