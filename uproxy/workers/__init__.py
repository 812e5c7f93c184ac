"""`--workers N`: one control plane, N forwarding processes sharing every proxy port."""
