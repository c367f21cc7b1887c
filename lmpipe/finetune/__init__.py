"""Instruction finetuning: templated, masked examples (examples.py), padded batches
(batches.py), LoRA adapters through peft (lora.py) and the steps SFT and LoRA share
(tuning.py)."""
