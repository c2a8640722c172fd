"""The benchmarks: each compares the server against a baseline measured in the same run (`make bench…`; they run
as modules, `python -m bench.<name>`, from the project's folder)."""
