"""The data: fetching raw files (fetch, archive), turning them into documents and splits
(text, instruct, sources), the published Parquet files (corpus), the token files (tokens) and
the training batches drawn from them (batches)."""
