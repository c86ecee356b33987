"""A party process: sessions, several per process, and the model file it serves."""
