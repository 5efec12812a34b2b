"""The method under study: DP-SAD and its variants (installed as bench.methods)."""
