"""The `lmpipe` command line (main.py), one module per verb."""
