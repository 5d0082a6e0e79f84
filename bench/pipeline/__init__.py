"""The pipeline benchmark's sections, one module each; bench/bench_pipeline.py runs them."""
