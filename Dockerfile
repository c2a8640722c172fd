# Web Asset Server for Specify: Debian, Paste, an unprivileged `specify` user, attachments in a volume.
FROM debian:bookworm-slim

# System packages: the same list the README's set-up installs (deploy/packages.txt).
COPY deploy/packages.txt deploy/install-packages.sh /tmp/deploy/
RUN sh /tmp/deploy/install-packages.sh /tmp/deploy/packages.txt \
    && rm -rf /var/lib/apt/lists/* /tmp/deploy

RUN groupadd --gid 999 specify \
    && useradd --uid 999 --gid 999 --create-home --home-dir /home/specify specify

WORKDIR /home/specify/web-asset-server
COPY requirements.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir -r requirements.txt
COPY *.py ./
COPY storages ./storages
COPY engines ./engines
COPY views ./views

RUN mkdir -p /home/specify/attachments && chown specify:specify /home/specify/attachments
VOLUME /home/specify/attachments

# Existing deployments set SERVER_NAME, SERVER_PORT, ATTACHMENT_KEY and DEBUG_MODE; these are read as they are.
ENV HOST=0.0.0.0 \
    PORT=8080 \
    BASE_DIR=/home/specify/attachments \
    PYTHONUNBUFFERED=1

USER 999:999
# (999:999 is the `specify` user and group made above; numeric so that runAsNonRoot checks can see it)
EXPOSE 8080
# The check asks the port the server listens on (PORT), so it stays right when PORT is changed.
HEALTHCHECK --interval=30s --timeout=10s --start-period=20s \
    CMD ["/opt/venv/bin/python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['PORT'], timeout=8)"]
CMD ["/opt/venv/bin/python", "server.py"]
