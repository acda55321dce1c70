"""The command-line tool: options, model and data loading, training runs, exports, sweeps."""
