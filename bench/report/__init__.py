"""The report: the targets checked against the measurements (analysis), cost tables, the
Markdown and JSON written, and the table helpers they share."""
