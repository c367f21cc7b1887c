"""Reading the record back: lineage of an artifact (lineage.py), the MLflow model registry
(registry.py), the pipeline-level run (pipeline_run.py) and replay of stage runs MLflow
missed (replay.py). The logger the stages write with is lmpipe/core/metric_logger.py."""
