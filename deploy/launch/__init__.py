"""Starting the three parties (local processes or Ray actors) and collecting what they report."""
