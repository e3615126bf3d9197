"""The command line: typer commands that parse flags into the library's functions (zeroquant.pipeline) and print what
they return; nothing here computes a result."""
