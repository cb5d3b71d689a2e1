"""Coverage-guided fuzzing of the target's byte-facing state machines (issue 7).

targets.py holds the fuzz targets (plain functions of one ``bytes`` argument that raise on a
bug); run.py drives them with atheris (libFuzzer, coverage-guided) or, where atheris is not
installed, with a small built-in coverage-guided mutator; seed.py writes the seed corpus.
"""
