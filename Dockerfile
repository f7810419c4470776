# syntax=docker/dockerfile:1
FROM python:3.12-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY numbers ./numbers
RUN pip wheel --no-cache-dir --wheel-dir /wheels '.[postgres]'

FROM python:3.12-slim
RUN useradd --system --uid 10001 --home /var/lib/assist-gateway --create-home gateway
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && python -m gateway.geo prepare
USER gateway
WORKDIR /var/lib/assist-gateway
# `serve` runs gunicorn: a master that loads the number plan and boundary data once and
# GATEWAY_WORKERS worker processes of GATEWAY_THREADS threads.  SQLite (the default) is one
# process's database: for more workers set GATEWAY_DATABASE_URL=postgresql://... too.
# SIGTERM stops it gracefully (webhooks in flight are answered, queued steps written):
# give it 25 s (docker stop -t 25, Compose stop_grace_period, Kubernetes' default 30 s).
ENV GATEWAY_DATABASE_URL=sqlite:////var/lib/assist-gateway/gateway.sqlite3 \
    GATEWAY_WORKERS=1 \
    GATEWAY_THREADS=8 \
    PYTHONUNBUFFERED=1
STOPSIGNAL SIGTERM
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --retries=3 \
  CMD python -c "import urllib.request,sys; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2).status == 200 else 1)"
ENTRYPOINT ["assist-gateway"]
CMD ["serve", "--host", "0.0.0.0", "--port", "8080"]
