"""A table printed with rich and, where a file is given, written to it as Markdown: the device
scripts' output, read on the screen and kept in the results files."""

from rich.console import Console
from rich.table import Table


def print_table(title, columns, rows, markdown, width=120):
    table = Table(*columns, title=title)
    for row in rows:
        table.add_row(*row)
    Console(width=width).print(table)
    if markdown:
        lines = [title, "", "| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]
        markdown.write("\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows]) + "\n\n")
        markdown.flush()
