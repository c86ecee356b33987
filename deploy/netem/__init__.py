"""Network shaping in the kernel for latency studies: namespaces, a veth pair, tbf and a delay relay."""
