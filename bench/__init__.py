"""The benchmark harness (issue 6): `python -m bench [--quick]`; results in bench/RESULTS.md."""
