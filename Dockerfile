# ckptkeeper as a sidecar: watches a training job's output volume and prunes its checkpoints.
#   docker build -t ckptkeeper .
#   docker run --rm -v "$PWD/outputs:/outputs" ckptkeeper watch /outputs --keep best:1,last:5,epoch:all
# It includes the s3 extra (s3fs): --archive-to s3://bucket/prefix works, with the AWS variables passed in.
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY ckptkeeper ./ckptkeeper
RUN python3 -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --quiet build==1.2.2.post1 \
    && /opt/build/bin/python -m build --wheel --outdir /dist . \
    && python3 -m venv /opt/ckptkeeper \
    && set -- /dist/*.whl \
    && /opt/ckptkeeper/bin/pip install --no-cache-dir --quiet "$1[s3]" \
    && /opt/ckptkeeper/bin/pip uninstall --yes --quiet pip

FROM ${BASE_IMAGE}
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="ckptkeeper" \
      org.opencontainers.image.description="Declarative retention for training checkpoints, as a sidecar" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.source="https://github.com/ckptkeeper/ckptkeeper"
COPY --from=build /opt/ckptkeeper /opt/ckptkeeper
RUN groupadd --system --gid 10001 ckptkeeper \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin ckptkeeper
ENV PATH=/opt/ckptkeeper/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    CKPTKEEPER_METRICS_PORT=9100
USER 10001:10001
EXPOSE 9100
# /healthz fails when the file watcher is dead or the last reconcile is too old.
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ['CKPTKEEPER_METRICS_PORT'] + '/healthz', timeout=4)"]
ENTRYPOINT ["ckptkeeper"]
CMD ["--help"]
