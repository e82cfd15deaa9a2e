"""Reading a run for people and other tools: plots, diffs, export to plain files."""
