"""Published numbers as data: published_results.csv (one row per published cell, with its source) and
papers.toml (each paper table described once). Read through bench.report.paper."""
