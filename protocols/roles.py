"""The three roles of a session, and the ranks of the two that hold shares."""

SERVER, CLIENT, DEALER = "server", "client", "dealer"
RANKS = {SERVER: 0, CLIENT: 1}  # the server owns the weights, the client the input
ROLES = (SERVER, CLIENT, DEALER)
