"""One module per CLI command (compare: amrepro/compare.py): plan -> science -> layout.py's writers, inside a
context.Context. No command imports another; heavy modules (torch, matplotlib) are imported inside them."""
