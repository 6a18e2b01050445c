"""Pure rules of the pipeline: no Kafka, HTTP, Faust or ClickHouse imports."""
