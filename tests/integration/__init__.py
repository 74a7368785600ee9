"""Integration tests: real web servers and FastCGI tools on loopback and UNIX sockets."""
