# lastseen serve, for a PostgreSQL of your own (LASTSEEN_DATABASE_URL): the embedded PostgreSQL
# is not in the image. Build: docker build -t lastseen .
FROM python:3.11-slim-bookworm AS build
WORKDIR /src
COPY pyproject.toml README.md LICENSE ./
COPY src ./src
RUN pip install --no-cache-dir --prefix=/install .

FROM python:3.11-slim-bookworm
RUN useradd --system --uid 10001 --no-create-home --shell /usr/sbin/nologin lastseen \
    && install -d -o 10001 -g 10001 /var/lib/lastseen
COPY --from=build /install /usr/local
USER 10001
# The data directory holds the spool: mount a volume here that outlives the container.
ENV LASTSEEN_DATA_DIR=/var/lib/lastseen \
    LASTSEEN_LISTEN=0.0.0.0:9090 \
    LASTSEEN_LOG_FORMAT=json \
    PYTHONUNBUFFERED=1
VOLUME /var/lib/lastseen
EXPOSE 9090
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9090/health', timeout=2)"]
ENTRYPOINT ["lastseen"]
CMD ["serve"]
