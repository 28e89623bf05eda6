# The tandem image: the `tandem` CLI, run as `tandem worker --config ...` by the chart and
# by docker-compose.yml.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY connector ./connector
COPY schemas ./schemas
RUN pip install . && rm -rf /src

RUN useradd --uid 10001 --no-create-home --shell /usr/sbin/nologin tandem
USER 10001
WORKDIR /
EXPOSE 8080
ENTRYPOINT ["tandem"]
CMD ["worker", "--config", "/etc/tandem/tandem.yaml"]
