"""Query/retrieve: identifiers as conditions (pure) and their answers from the index."""
