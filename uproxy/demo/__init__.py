"""The demo: a client, uproxy and its backends, on one Linux host (`uproxy demo`, as root), and
the roles docker-compose.yml's containers run.

- `main.py`: `run_demo`, what `uproxy demo` runs: build, run, show, always tear down.
- `topology.py`: the network namespaces and the processes in them.
- `roles.py`: the HTTP backend, the DNS backend and the client, one per namespace or container
  (started as `uproxy demo-role ROLE`, a hidden command).
- `services.py`: the Services both demos share.
"""
