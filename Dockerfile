FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tally ./tally
COPY streams ./streams
COPY rating ./rating
COPY api ./api
COPY schemas ./schemas
COPY clickhouse ./clickhouse
COPY billing ./billing
COPY runtime ./runtime
COPY tally_client ./tally_client
RUN pip install --no-cache-dir .
ENV TALLY_API_HOST=0.0.0.0
# 8000: `tally api`; 9464: `tally worker`'s /metrics, /healthz, /readyz
EXPOSE 8000 9464
ENTRYPOINT ["tally"]
CMD ["api"]
