# lastseen serve, for a PostgreSQL of your own (LASTSEEN_DATABASE_URL): the embedded PostgreSQL
# is not in the image. Build: make image (docker build -t lastseen . does the same).
# BASE is any Debian-like image with Python >= 3.11 and its venv module: the official image by
# default; the container tests build on a bookworm base of Debian's own packages.
ARG BASE=python:3.11-slim-bookworm

FROM ${BASE} AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
# A virtual environment, copied whole into the runtime stage: the same layout whatever the
# base's Python puts where.
RUN python3 -m venv /opt/venv && /opt/venv/bin/pip install --no-cache-dir .

FROM ${BASE}
RUN groupadd --system --gid 10001 lastseen \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin lastseen \
    && install -d -o 10001 -g 10001 /var/lib/lastseen
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
# The data directory holds the spool: mount a volume here that outlives the container.
ENV PATH=/opt/venv/bin:$PATH \
    LASTSEEN_DATA_DIR=/var/lib/lastseen \
    LASTSEEN_LISTEN=0.0.0.0:9090 \
    LASTSEEN_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
VOLUME /var/lib/lastseen
EXPOSE 9090
# On the port of LASTSEEN_LISTEN, whatever it is set to when the container runs.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; port = os.environ.get('LASTSEEN_LISTEN', ':9090').rpartition(':')[2]; urllib.request.urlopen(f'http://127.0.0.1:{port}/health', timeout=2)"]
ENTRYPOINT ["lastseen"]
CMD ["serve"]
