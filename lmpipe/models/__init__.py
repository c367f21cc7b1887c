"""The neural models: one readable file each (transformer.py, rnn.py), their configs
(configs.py), building/saving/loading (store.py) and sampling (sampling.py)."""
