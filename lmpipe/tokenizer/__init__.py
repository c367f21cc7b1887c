"""The tokenizer: a lossless sentencepiece BPE wrapper (model.py), its training
(training.py) and the chat template that turns conversations into ids (chat_template.py)."""
