"""Reporting: many runs and certifications as one table and one plot, and published logs imported.

`scan` finds runs and certifications (shards merged), `table` makes one row per certification, every
number computed from the TSV rows by the code `certify` uses, `render` formats the table (Markdown,
CSV, rich) and draws the curves, `import_logs` turns Cohen-format logs of other tools into
certification directories.
"""
