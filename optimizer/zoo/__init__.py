"""Small demo classifiers built only from layers the secure protocols support."""
