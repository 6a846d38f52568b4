# The gateway as a container image, built offline: no download happens inside
# the build, so it runs with `docker build --network none`.
#
#   python3.11 -m pip wheel --wheel-dir wheels .                # on the host, Python 3.11
#   docker build --network none -t federation-gateway .         # base: python:3.11-slim
#   docker build --network none --build-arg BASE=gateway-base:bookworm -t federation-gateway .
#
# BASE is any image with Python 3.11 (python3 -m venv working) and useradd:
# the official slim image for users, or a Debian base bootstrapped locally
# (deploy/docker/base.sh) for CI and air-gapped pipelines. See docs/docker.md.
ARG BASE=python:3.11-slim

FROM ${BASE} AS build
# The build context holds nothing but wheels/ (.dockerignore): no config, key
# or test data can reach the image.
COPY wheels/ /tmp/wheels/
RUN python3 -m venv /opt/gateway \
 && /opt/gateway/bin/python -m pip install --no-index --no-cache-dir --no-compile \
      --disable-pip-version-check --find-links /tmp/wheels federation-gateway \
 && /opt/gateway/bin/python -m pip uninstall --yes --quiet pip setuptools \
 && /opt/gateway/bin/python -m compileall -q /opt/gateway/lib \
 && /opt/gateway/bin/gateway --version

FROM ${BASE}
ENV PATH=/opt/gateway/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 gateway \
 && useradd --system --uid 10001 --gid gateway --home-dir /var/lib/gateway --no-create-home \
      --shell /usr/sbin/nologin gateway \
 && mkdir -p /etc/gateway /var/lib/gateway \
 && chown gateway:gateway /var/lib/gateway && chmod 0700 /var/lib/gateway
COPY --from=build /opt/gateway /opt/gateway

# /etc/gateway: gateway.yaml, rules.yaml, pki/ and keys/, bind-mounted read-only
#   (keys mode 0600 and owned by uid 10001; the gateway refuses any other mode).
# /var/lib/gateway: data_dir (spool, mailboxes, tokens, audit log), a volume.
VOLUME ["/var/lib/gateway"]

# federation (mTLS, partners), client API (the org's clients), metrics (Prometheus)
EXPOSE 8443 8080 9090

USER 10001:10001
WORKDIR /var/lib/gateway

# `gateway health` asks /readyz at the config's listen.metrics address.
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 \
  CMD ["gateway", "health", "-c", "/etc/gateway/gateway.yaml"]

# SIGTERM: stop accepting, finish what is in flight, exit 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["gateway"]
CMD ["run", "-c", "/etc/gateway/gateway.yaml"]
