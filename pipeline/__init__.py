"""Prefect orchestration of the DVC pipeline: flows, locks, the stage graph, the registry.

- `pipeline.flow.lmpipe_pipeline`  - one run of the stages (`lmpipe run`, `make run`)
- `pipeline.retrain.lmpipe_retrain` - scheduled retraining: re-check source, repro, promote,
  push, commit dvc.lock (the `prefect.yaml` deployments)
"""
