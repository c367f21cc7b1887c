"""The count-based baseline: n-gram models over token ids. model.py (storage and scoring, the
maths in its docstring), estimate.py (Kneser-Ney and add-k), hashtable.py (n-grams packed
into 64-bit keys), arpa.py (KenLM-compatible files), store.py (the model folder),
sampling.py (text from the model)."""
