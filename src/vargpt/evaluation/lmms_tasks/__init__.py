"""Local lmms-eval tasks built from this project's data (each folder: a task template and its hooks)."""
