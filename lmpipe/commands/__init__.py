"""One module per `lmpipe` verb; each exposes `register(subparsers)`."""
