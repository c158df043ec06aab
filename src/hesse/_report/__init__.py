"""The analysis report of ``hesse analyze --report``: schema, computation, figures, files."""
