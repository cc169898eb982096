"""Command-line tools besides training: analyze, evaluate, plan, benchmark, convert, quick start."""
