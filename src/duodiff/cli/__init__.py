"""The ``duodiff`` command line. Each sub-command lives in its own module and imports heavy code lazily."""
