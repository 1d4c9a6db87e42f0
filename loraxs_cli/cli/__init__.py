"""The command-line layer: thin Typer commands over the core; nothing here imports torch at import time."""
