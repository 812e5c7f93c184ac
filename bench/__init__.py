"""uproxy's benchmark: `python -m bench [--quick] [--out DIR]`, as root.

Modules by concern:

  topology      network namespaces client -- node -- backend, always removed
  procs         daemons inside them, and their CPU / RSS from /proc
  servers       backend servers (nginx, iperf3), readiness probes
  contenders    direct, kernel DNAT, HAProxy, nginx stream, uproxy (uvloop, asyncio, IPVS)
  loads         iperf3, wrk, UDP flood (udpflood), idle connections (idleconns)
  runner        rounds, pair by pair, with per-load CPU and memory
  controlplane  NetfilterPortals sync timings, per iptables backend
  stats         medians, per-round ratios, targets (pure)
  report        markdown, JSON, PNG
  machine       what it ran on and what limited it
"""
