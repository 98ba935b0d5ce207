FROM python:3.11-slim
WORKDIR /app
COPY pyproject.toml README.md ./
COPY tally ./tally
COPY streams ./streams
COPY rating ./rating
COPY api ./api
COPY schemas ./schemas
COPY clickhouse ./clickhouse
COPY runtime ./runtime
RUN pip install --no-cache-dir .
ENV TALLY_API_HOST=0.0.0.0
EXPOSE 8000
ENTRYPOINT ["tally"]
CMD ["api"]
