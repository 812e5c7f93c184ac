# uproxy as a container image.
#
#   docker build -t uproxy .
#   docker run --rm --cap-add NET_ADMIN --cap-add NET_RAW -v "$PWD/manifests:/etc/uproxy:ro" uproxy
#
# It needs NET_ADMIN (netfilter rules, conntrack entries) and NET_RAW (iptables opens raw
# sockets), never --privileged. Rules go into the network namespace the container runs in: its
# own by default, the host's with --network host (which is how a node proxy runs).
#
# Two stages: the build stage has the compiler (python-iptables ships only as source, with a
# small C extension) and pip; the runtime stage gets the finished virtualenv and only what uproxy
# needs at run time: Debian's python3 (the same interpreter the virtualenv was made with), the
# iptables tools with libxtables/libip4tc (which python-iptables loads), iproute2 and conntrack.

# --- build -----------------------------------------------------------------------------------
FROM docker.io/library/debian:bookworm-slim AS build

# ca-certificates: pip (Debian's, which trusts /etc/ssl/certs) talks to PyPI over TLS. Behind a
# TLS-inspecting proxy, hand the build your CA the Debian way, and update-ca-certificates (run by
# this install) adds it: podman build -v /path/to/ca.crt:/usr/local/share/ca-certificates/x.crt:ro
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      ca-certificates python3 python3-venv python3-dev gcc libc6-dev \
 && apt-get clean && rm -rf /var/lib/apt/lists/*

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1

# Dependencies first, in their own layer: editing uproxy's code does not download them again.
# /opt/build holds the wheel builder, so it stays out of the runtime virtualenv.
COPY pyproject.toml /src/
RUN python3 -m venv /opt/uproxy \
 && python3 -m venv /opt/build \
 && /opt/build/bin/pip install hatchling \
 && python3 -c "import tomllib; print('\n'.join(tomllib.load(open('/src/pyproject.toml', 'rb'))['project']['dependencies']))" > /src/requirements.txt \
 && /opt/uproxy/bin/pip install -r /src/requirements.txt

COPY README.md /src/
COPY uproxy /src/uproxy
# The wheel ships the bundled examples (uproxy/examples), as a pip install does.
COPY examples /src/examples
RUN /opt/build/bin/pip wheel --no-deps --no-build-isolation --wheel-dir /tmp/wheels /src \
 && /opt/uproxy/bin/pip install --no-deps /tmp/wheels/*.whl \
 && /opt/uproxy/bin/pip uninstall -y pip setuptools

# --- runtime ---------------------------------------------------------------------------------
FROM docker.io/library/debian:bookworm-slim

ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="uproxy" \
      org.opencontainers.image.description="A Kubernetes-style service proxy: kube-proxy's userspace mode rebuilt properly" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.base.name="docker.io/library/debian:bookworm-slim" \
      io.uproxy.capabilities="NET_ADMIN,NET_RAW"

RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 iptables iproute2 conntrack \
 && apt-get clean && rm -rf /var/lib/apt/lists/*

COPY --from=build /opt/uproxy /opt/uproxy
# The bundled example, so that a bare `docker run` shows something; mount real manifests here.
COPY examples/services.yaml examples/endpoints.yaml /etc/uproxy/

ENV PATH=/opt/uproxy/bin:$PATH PYTHONUNBUFFERED=1

# /healthz answers 200 once the first sync has reached the kernel (and while syncs keep
# succeeding). It assumes the default --healthz-bind-address (0.0.0.0:10256).
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
  CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:10256/healthz', timeout=2)"]

EXPOSE 10256
# uproxy handles SIGTERM itself: stops accepting, lets connections finish, exits 0.
STOPSIGNAL SIGTERM
ENTRYPOINT ["uproxy"]
CMD ["run", "--config", "/etc/uproxy"]
