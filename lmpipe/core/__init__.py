"""What every stage stands on: names, paths, errors, params, files, records, the metric logger
and the stage runner. Nothing here imports torch."""
