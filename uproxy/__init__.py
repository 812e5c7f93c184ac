"""uproxy: a Kubernetes-style service proxy."""

__version__ = "0.1.0"
