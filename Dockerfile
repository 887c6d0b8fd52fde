# The gradwatch collector, without TensorFlow: `docker build -t gradwatch-collector .`
# Kubernetes: deploy/kubernetes/; Docker Compose: deploy/compose/compose.yaml.
FROM python:3.11-slim AS build
WORKDIR /src
# What the package is built from (pyproject.toml maps these folders into `gradwatch`).
COPY pyproject.toml README.md ./
COPY gradwatch gradwatch
COPY agent agent
COPY collector collector
COPY proto proto
RUN python -m venv /opt/gradwatch \
 && /opt/gradwatch/bin/pip install --no-cache-dir ".[collector]"

FROM python:3.11-slim
COPY --from=build /opt/gradwatch /opt/gradwatch
ENV PATH=/opt/gradwatch/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# A numeric USER, so that Kubernetes' runAsNonRoot can check it without a passwd lookup.
RUN useradd --uid 65532 --user-group --no-create-home --shell /usr/sbin/nologin gradwatch
USER 65532:65532
EXPOSE 8470 8471
ENTRYPOINT ["gradwatch", "collector"]
CMD ["--grpc-address", "0.0.0.0:8470", "--metrics-address", "0.0.0.0:8471"]
