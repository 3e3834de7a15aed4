"""Helpers shared by test folders: tiny trainable runs (``tiny_runs``) and small corpora on disk
(``corpora``). Fixtures stay in the conftest files; these are plain functions."""
