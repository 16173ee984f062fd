"""The reproduction study of prune_trainer (embedded MiniLM BERT on CoNLL-2003): plan, one-shot grids, report.

Not part of the installed package: run it from the repository root as ``python -m study {reproduce,report,
oneshot-grid,oneshot-table,oneshot-samples}``.
"""
