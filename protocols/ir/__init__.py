"""The graph IR's types: nodes, the graph, its JSON form. The bottom layer: ops and passes build on it."""
