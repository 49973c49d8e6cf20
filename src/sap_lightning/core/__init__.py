"""The small shared core every stage may import: errors, atomic IO, lesion geometry, case keys,
run-folder names, the task table and the sliding-window size."""
